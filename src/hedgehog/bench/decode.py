"""Decode benchmark: per-token latency and memory vs context length, Hedgehog state vs softmax KV cache.

Run:  hedgehog bench decode [--model smollm2|RUN/model] [--contexts 256,...,32768]

For every context length L, each model is brought to L tokens of context, then ``--steps`` single
tokens are decoded one at a time (greedy, ``use_cache``) and timed; the median per-token latency is
reported with the bytes held by the cache (Hedgehog: recurrent state; softmax: keys/values) and the
process RSS high-water mark through context fill + decoding (VmHWM reset before the fill) above the RSS
before it. Latency is per decode step; with ``--batch B`` each step decodes one token for B sequences.

Context fill: for L <= ``--max-real-prefill`` (default 4096) the context is a real prefill of text
tokens. Above it the cache is filled synthetically with tensors of exactly the shapes a prefill
would leave (softmax: L keys/values per layer; Hedgehog: its state, which has no length), because a
softmax prefill of 32k tokens takes minutes here and decode cost depends only on those shapes.
The output marks which rows used which.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from hedgehog.bench.attention import _vm_kb, reset_peak_rss
from hedgehog.errors import UserError
from hedgehog.generation import cache_kwargs

DEFAULT_CONTEXTS = [256, 1024, 4096, 8192, 16384, 32768]


def _fill_cache(model, kind: str, L: int, ids: torch.Tensor, real: bool, batch: int = 1):
    """Returns (cache, next_token) with L tokens of context in the cache."""
    from transformers import DynamicCache

    from hedgehog.generation import HedgehogCache, HedgehogStateLayer

    if real:
        cache = HedgehogCache(model) if kind == "hedgehog" else DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids[:, :L].expand(batch, L), **cache_kwargs(model, cache), use_cache=True,
                        logits_to_keep=1)
        return cache, out.logits[:, -1:].argmax(-1)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kvh = cfg.num_key_value_heads
    if kind == "hedgehog":
        from hedgehog.attention import hedgehog_layers

        cache = HedgehogCache(model)
        for layer, attn in zip(cache.layers, hedgehog_layers(model)):
            f = attn.feature_map_k.feature_dim
            S, z = torch.rand(batch, kvh, f, hd, generator=g), torch.rand(batch, kvh, f, generator=g) + 1.0
            if attn.hybrid:  # the last w keys/values of the context, plus the state of the older ones
                w = min(L, attn.hh_config.window)
                kw, vw = (torch.randn(batch, kvh, w, hd, generator=g) * 0.5 for _ in range(2))
                layer.set_window(S, z, kw, vw, torch.ones(batch, w, dtype=torch.bool), L, window=attn.hh_config.window)
            else:
                layer.set_state(S, z, L)
        assert all(isinstance(l, HedgehogStateLayer) for l in cache.layers)
    else:
        cache = DynamicCache(config=model.config)
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(batch, kvh, L, hd, generator=g) * 0.5
            v = torch.randn(batch, kvh, L, hd, generator=g) * 0.5
            cache.update(k, v, i)
    return cache, ids[:, -1:].expand(batch, 1)


def decode_latency(model, kind: str, L: int, ids: torch.Tensor, steps: int, real: bool, batch: int = 1) -> Dict:
    rss0 = _vm_kb("VmRSS")
    hwm_ok = reset_peak_rss()  # peak from here: context fill + decode
    cache, nxt = _fill_cache(model, kind, L, ids, real, batch)
    pos = L
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True,
                        cache_position=torch.tensor([pos]), position_ids=torch.tensor([[pos]]).expand(batch, 1))
            nxt = out.logits[:, -1:].argmax(-1)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
            pos += 1
    peak = (_vm_kb("VmHWM") - rss0) / 1024 if hwm_ok else None
    if kind == "hedgehog":
        cache_bytes = cache.state_nbytes()
    else:
        cache_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)
    return {"ms_per_token": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "cache_mb": cache_bytes / 2 ** 20, "peak_mb": peak, "context_fill": "prefill" if real else "synthetic"}


def load_pair(model_name: str):
    """(hedgehog model, softmax model, tokenizer, description): a converted run's model dir and its base, or
    a base model and a copy converted with identity-initialised maps (timing does not depend on training)."""
    from hedgehog.checkpoint import is_converted_dir, load, read_meta
    from hedgehog.convert import convert_model
    from hedgehog.pipeline import load_base

    torch.manual_seed(0)
    softmax, tok, _ = load_base(read_meta(model_name)["base_model"] if is_converted_dir(model_name) else model_name)
    if is_converted_dir(model_name):
        hedgehog, _ = load(model_name)
        return hedgehog, softmax, tok, f"converted model {model_name}"
    hedgehog, _, _ = load_base(model_name)
    convert_model(hedgehog)
    return hedgehog, softmax, tok, f"{model_name} converted with identity-initialised maps"


def run(model_name: str, contexts: List[int], steps: int, max_real_prefill: int, batch: int = 1, log=print) -> Dict:
    from hedgehog.data import load_corpus, tokenize_windows

    hedgehog, softmax, tok, source = load_pair(model_name)
    need = min(max(contexts), max_real_prefill)
    corpus = load_corpus("shakespeare")
    ids = tokenize_windows(corpus.splits["train"], tok, need, max_tokens=need)[:1]
    rows = []
    for L in contexts:
        real = L <= max_real_prefill
        row = {"context": L}
        for kind, model in (("hedgehog", hedgehog), ("softmax", softmax)):
            r = decode_latency(model, kind, L, ids if real else ids[:, :2], steps, real, batch)
            row.update({f"{kind}_{k}": v for k, v in r.items()})
        row["speedup"] = row["softmax_ms_per_token"] / row["hedgehog_ms_per_token"]
        rows.append(row)
        log(_fmt(row))
    base = rows[0]["hedgehog_ms_per_token"]
    for r in rows:
        r["hedgehog_latency_vs_first"] = r["hedgehog_ms_per_token"] / base
    crossover = next((r["context"] for r in rows if r["speedup"] > 1.0), None)
    return {"model": model_name, "source": source, "steps": steps, "batch": batch, "threads": torch.get_num_threads(),
            "max_real_prefill": max_real_prefill, "rows": rows, "crossover_context": crossover}


HEADER = (f"{'context':>8} | {'hh ms/tok':>9} {'sm ms/tok':>9} {'speedup':>7} | {'hh state MB':>11} "
          f"{'sm KV MB':>9} | {'hh peak MB':>10} {'sm peak MB':>10} | fill")


def _fmt(r: Dict) -> str:
    def mb(x):
        return "-" if x is None else f"{x:.1f}"

    return (f"{r['context']:>8} | {r['hedgehog_ms_per_token']:>9.1f} {r['softmax_ms_per_token']:>9.1f} "
            f"{r['speedup']:>6.2f}x | {r['hedgehog_cache_mb']:>11.2f} {r['softmax_cache_mb']:>9.1f} | "
            f"{mb(r['hedgehog_peak_mb']):>10} {mb(r['softmax_peak_mb']):>10} | {r['hedgehog_context_fill']}")


def plot(result: Dict, path: Path) -> None:
    from hedgehog.plotting import pyplot

    plt = pyplot()

    rows = result["rows"]
    L = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].semilogx(L, [r["hedgehog_ms_per_token"] for r in rows], "o-", label="Hedgehog (recurrent state)")
    axes[0].semilogx(L, [r["softmax_ms_per_token"] for r in rows], "s-", label="softmax (KV cache)")
    axes[0].set_xlabel("context length")
    axes[0].set_ylabel("ms per decoded token (median)")
    axes[0].set_title("decode latency")
    axes[0].legend()
    axes[1].loglog(L, [max(r["hedgehog_cache_mb"], 1e-3) for r in rows], "o-", label="Hedgehog state")
    axes[1].loglog(L, [r["softmax_cache_mb"] for r in rows], "s-", label="softmax KV cache")
    axes[1].set_xlabel("context length")
    axes[1].set_ylabel("cache MB")
    axes[1].set_title("cache memory")
    axes[1].legend()
    fig.suptitle(f"{result['source']}, {result['threads']} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a base model dir/hub id (converted with untrained "
                   "maps for timing), or a converted run's model dir (default: %(default)s)")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                   help="comma-separated context lengths (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per point (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--max-real-prefill", type=int, default=4096,
                   help="real prefill up to this context; synthetic cache fill above (default: %(default)s)")
    p.add_argument("--out", default="bench_out/decode", help="output dir for JSON + PNG (default: %(default)s)")


def run_from_args(args) -> Dict:
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    if not contexts or min(contexts) < 2:
        raise UserError(f"--contexts must be integers >= 2, got {args.contexts!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    result = run(args.model, contexts, args.steps, args.max_real_prefill, args.batch)
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "decode.png")
    rows = result["rows"]
    print(f"Hedgehog latency at {rows[-1]['context']} vs {rows[0]['context']}: "
          f"{rows[-1]['hedgehog_latency_vs_first']:.2f}x; crossover (Hedgehog faster) at context "
          f"{result['crossover_context']}")
    for r in rows:
        if r["context"] == 16384:
            print(f"at 16k context: Hedgehog {r['speedup']:.1f}x faster per token than softmax + KV cache")
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return result
