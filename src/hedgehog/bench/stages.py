"""Conversion throughput: the main job's stage 1 and stage 2 in tokens/s, on a model of SmolLM2-135M's shape.

Run:  hedgehog bench stages [--device cuda] [--batch-scale auto|N] [--dtype auto] [--batches 4]

Builds a Llama decoder of SmolLM2-135M-Instruct's shape (30 layers, width 576, 9 query / 3 KV heads, vocabulary
49,152) with random weights, or of ``--model DIR``'s config, and converts it as ``hedgehog convert`` does with its
defaults (the hybrid: window 64, 4 sinks, sparse cache 128, decayed state). It then runs ``--batches`` batches of
stage 1 (attention transfer: the teacher forward that captures every layer's q/k/v, then the per-layer losses and
updates) and as many steps of stage 2 (LoRA by KL to the teacher, with the cache) on random token windows, with the
job's batches, windows and precision for the device (``--batch-scale auto``: 8 on CUDA, as the job; bf16 weights on
CUDA). Speed does not depend on the weights or the text, so no model or corpus is fetched, and a machine without the
package registry (a lent GPU) runs it. Tokens/s leave the first batch or step out (allocation, kernel compiles);
on CUDA the peak allocation of each stage is recorded. The issue's targets (#37, on an H200): stage 1 >= 150k
tokens/s, stage 2 >= 50k.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hedgehog.errors import UserError

# SmolLM2-135M-Instruct's config (the default job's model; as its GGUF's metadata gives it)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
TARGETS = {"stage1": 150_000, "stage2": 50_000}  # tokens/s on an H200 in bf16 (#37)


def tokens_per_second(history: List[Dict]) -> Optional[float]:
    """Tokens/s between the first and the last record of a stage's history (the first batch left out)."""
    if len(history) < 2:
        return None
    a, b = history[0], history[-1]
    return (b["tokens"] - a["tokens"]) / max(b["seconds"] - a["seconds"], 1e-9)


def build_model(model_dir: Optional[str], dtype: torch.dtype, shape: Optional[Dict] = None):
    """A randomly initialised causal LM: ``model_dir``'s config, or SmolLM2-135M's (``shape`` overrides fields)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    cfg = AutoConfig.from_pretrained(model_dir) if model_dir else LlamaConfig(**{**SMOLLM2_135M, **(shape or {})})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)


def run(device: str = "cpu", batch_scale: Optional[int] = None, dtype: str = "auto", batches: int = 4,
        model_dir: Optional[str] = None, shape: Optional[Dict] = None, log=print) -> Dict:
    from hedgehog.jobs.config import ConvertJob, for_device, hedgehog_config, stage2_seq_len, with_position_offsets
    from hedgehog.models.convert import convert_model
    from hedgehog.train.engine import Engine, parse_dtype
    from hedgehog.train.stage1 import attention_transfer
    from hedgehog.train.stage2 import add_lora, lora_finetune

    engine = Engine(device, progress=False)
    job = for_device(ConvertJob(device=device, batch_scale=batch_scale, dtype=dtype), engine.device)
    model = build_model(model_dir, parse_dtype(job.dtype), shape)
    job = with_position_offsets(job, model.config)
    model.to(engine.device)
    convert_model(model, hedgehog_config(job))
    cuda = engine.device.type == "cuda"
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    result = {"config": {"device": str(engine.device), "dtype": job.dtype, "batch_scale": job.batch_scale,
                         "model": model_dir or "SmolLM2-135M shape, random weights", "batches": batches,
                         "layers": model.config.num_hidden_layers, "torch": torch.__version__}}

    def stage(name, fn, cfg, L):
        windows = torch.randint(0, vocab, (batches * cfg.batch_size, L), generator=gen)
        cfg = replace(cfg, tokens=batches * cfg.batch_size * L, time_budget_s=None)
        if cuda:
            torch.cuda.synchronize(engine.device)
            torch.cuda.reset_peak_memory_stats(engine.device)
        t = time.perf_counter()
        report = fn(windows, cfg)
        if cuda:
            torch.cuda.synchronize(engine.device)
        rate = tokens_per_second(report["history"])
        row = {"batch_size": cfg.batch_size, "seq_len": L, "tokens": report["tokens"],
               "seconds": time.perf_counter() - t, "tokens_per_s": rate,
               "target_tokens_per_s": TARGETS[name],
               "peak_mb": torch.cuda.max_memory_allocated(engine.device) / 2 ** 20 if cuda else None}
        result[name] = row
        log(f"{name}: batch {cfg.batch_size} x {L} tokens, {report['tokens']} tokens in {row['seconds']:.1f} s; "
            f"{'-' if rate is None else f'{rate:,.0f}'} tokens/s after the first batch "
            f"({'-' if rate is None else f'{rate / TARGETS[name]:.2f}'}x the {TARGETS[name]:,} target)"
            + (f", peak {row['peak_mb']:.0f} MB" if cuda else ""))

    stage("stage1", lambda w, cfg: attention_transfer(model, w, cfg, progress=False, engine=engine),
          job.stage1, job.seq_len)
    if job.stage2 is not None:
        pm = add_lora(model, job.stage2)
        stage("stage2", lambda w, cfg: lora_finetune(pm, w, cfg, progress=False, engine=engine), job.stage2,
              stage2_seq_len(job))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hedgehog.jobs.config import batch_scale_arg
    from hedgehog.train.engine import DTYPES

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="'cpu', 'cuda' or 'cuda:N' (default: %(default)s)")
    p.add_argument("--batch-scale", type=batch_scale_arg, default="auto",
                   help="as convert's: 'auto' (8 on CUDA, 1 on the CPU) or N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="the model's weights, as convert's (auto: bf16 on CUDA) (default: %(default)s)")
    p.add_argument("--batches", type=int, default=4,
                   help="stage 1 batches and stage 2 steps to run, the first of each left out of the rate "
                        "(default: %(default)s)")
    p.add_argument("--model", default=None, help="a local Hugging Face model dir whose config to use (random "
                   "weights); default: SmolLM2-135M's shape")
    p.add_argument("--out", default="bench_out/stages", help="output dir for stages.json (default: %(default)s)")


def run_from_args(args) -> Dict:
    if args.batches < 2:
        raise UserError(f"--batches must be at least 2 (the first is left out of the rate), got {args.batches}")
    from hedgehog.train.engine import device_arg

    device_arg(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.device, args.batch_scale, args.dtype, args.batches, args.model)
    (out / "stages.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'stages.json'}")
    return result
