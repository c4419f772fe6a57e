"""Training-step time from scratch: softmax vs Hedgehog with its mimic loss over every query row or over R rows.

Run:  hedgehog bench train-step [--lengths 256,1024,4096] [--tokens 4096] [--mimic-rows 64]

Each point times one optimizer step (forward, backward, gradient clip, AdamW: the engine's ``backward`` + ``step``, as in
training) of the ``hedgehog train`` model (a 4-layer, width-256 Llama-style decoder, byte vocabulary,
``--short-conv`` as given) on ``tokens // N`` random windows of N bytes, so every length trains on the same
number of tokens. Hedgehog runs in ``mimic`` mode, as in
training: once with the mimic loss over every query row (O(N^2) per layer, like the softmax teacher it
mimics) and once over ``--mimic-rows`` random rows (O(R N): ``hedgehog train --mimic-rows R``). The best of
``--repeats`` steps after one warm-up step is kept; ratios are taken within this one run. ``--device cuda``
runs it on a GPU (each step synchronised; tokens/s and the peak allocation of a step are recorded), with
``--mixed-precision bf16`` under the engine's autocast as ``hedgehog train`` would.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from hedgehog.errors import UserError

DEFAULT_LENGTHS = (256, 1024, 4096)


def step_seconds(kind: str, n: int, tokens: int, mimic_rows: Optional[int], repeats: int, short_conv: int,
                 device: str = "cpu", mixed_precision: str = "no") -> Tuple[float, Optional[float]]:
    """Best wall time of one training step of ``kind`` on (tokens // n, n) random bytes, and on CUDA the peak
    allocation of a step above what was allocated before it (MB; None on the CPU)."""
    from hedgehog.bench.attention import sync_device
    from hedgehog.train.engine import Engine
    from hedgehog.train.scratch.model import (ByteTokenizer, ModelSpec, _with_mimic, build_model, mimic_rows_for_step,
                                        set_mimic_rows, set_train_mode)

    spec = ModelSpec(short_conv=short_conv, max_len=max(4096, n))
    model = build_model(kind, spec, seed=0)
    set_train_mode(model, kind, 1.0)
    model.train()
    engine = Engine(device, mixed_precision=mixed_precision, progress=False)
    model.to(engine.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = engine.prepare(model, opt)
    dev = engine.device
    cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, ByteTokenizer.vocab_size - 1, (max(1, tokens // n), n), generator=gen).to(dev)
    best, peak = float("inf"), None
    for i in range(repeats + 1):  # the first step warms up (allocations, lazy init, kernel compiles)
        sync_device(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        if mimic_rows:
            set_mimic_rows(model, mimic_rows_for_step(n, mimic_rows, 0, i))
        with engine.autocast():
            lm = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss, _ = _with_mimic(model, lm, 1.0)
        engine.backward(loss, f"bench train-step {kind}, N={n}")  # as train_lm
        engine.step(opt, model.parameters(), lr=1e-4, clip=1.0)
        sync_device(dev)
        if i:
            best = min(best, time.perf_counter() - t)
            if cuda:
                peak = max(peak or 0.0, (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20)
    return best, peak


def run(lengths: List[int], tokens: int, mimic_rows: int, repeats: int = 1, short_conv: int = 4,
        log=print, device: str = "cpu", mixed_precision: str = "no") -> Dict:
    rows = []
    for n in lengths:
        row = {"n": n, "batch": max(1, tokens // n)}
        for key, kind, rows_ in (("softmax", "softmax", None), ("hedgehog_all_rows", "hedgehog", None),
                                 ("hedgehog_rows", "hedgehog", mimic_rows)):
            t, peak = step_seconds(kind, n, tokens, rows_, repeats, short_conv, device, mixed_precision)
            row[f"{key}_s"], row[f"{key}_tokens_per_s"] = t, row["batch"] * n / t
            if peak is not None:
                row[f"{key}_peak_mb"] = peak
        row["all_rows_vs_softmax"] = row["hedgehog_all_rows_s"] / row["softmax_s"]
        row["rows_vs_softmax"] = row["hedgehog_rows_s"] / row["softmax_s"]
        row["rows_speedup"] = row["hedgehog_all_rows_s"] / row["hedgehog_rows_s"]
        rows.append(row)
        log(f"{n:>6} {row['batch']:>5} | {row['softmax_s']:9.3f} {row['hedgehog_all_rows_s']:10.3f} "
            f"{row['hedgehog_rows_s']:10.3f} | {row['all_rows_vs_softmax']:7.2f}x {row['rows_vs_softmax']:7.2f}x "
            f"{row['rows_speedup']:7.2f}x")
    return {"tokens_per_step": tokens, "mimic_rows": mimic_rows, "short_conv": short_conv, "repeats": repeats,
            "device": device, "mixed_precision": mixed_precision, "threads": torch.get_num_threads(), "rows": rows}


def plot(result: Dict, path: Path) -> None:
    from hedgehog.eval.plotting import label_axes, pyplot, save_figure

    plt = pyplot()
    rows = result["rows"]
    n = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(n, [r["softmax_s"] for r in rows], "s--", label="softmax")
    ax.loglog(n, [r["hedgehog_all_rows_s"] for r in rows], "o-", label="Hedgehog, mimic loss on every row")
    ax.loglog(n, [r["hedgehog_rows_s"] for r in rows], "^-", label=f"Hedgehog, mimic loss on {result['mimic_rows']} rows")
    label_axes(ax, "window length N", f"seconds per step ({result['tokens_per_step']} tokens)", f"training step, {result.get('device', 'cpu')}, {result['threads']} threads")
    save_figure(fig, path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated window lengths N (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens per step; batch = tokens // N (default: %(default)s)")
    p.add_argument("--mimic-rows", type=int, default=64, help="R, the rows of the subsampled mimic loss "
                   "(default: %(default)s)")
    p.add_argument("--short-conv", type=int, default=4, help="as in hedgehog train (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per point, best kept (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: %(default)s)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast of the forward, as the training engine runs it (default: %(default)s)")
    p.add_argument("--out", default="bench_out/train_step", help="output dir for train_step.json "
                   "(default: %(default)s)")


def run_from_args(args) -> Dict:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 2 or args.repeats < 1 or args.tokens < 1 or args.mimic_rows < 1:
        raise UserError(f"--lengths must be integers >= 2, --tokens, --mimic-rows and --repeats >= 1; got "
                         f"{args.lengths!r}, {args.tokens}, {args.mimic_rows}, {args.repeats}")
    from hedgehog.train.engine import device_arg

    device_arg(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'N':>6} {'batch':>5} | {'softmax s':>9} {'hh all s':>10} {'hh R s':>10} | "
          f"{'all/sm':>8} {'R/sm':>8} {'all/R':>8}")
    result = run(lengths, args.tokens, args.mimic_rows, args.repeats, args.short_conv, device=args.device,
                 mixed_precision=args.mixed_precision)
    (out / "train_step.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "train_step.png")
    print(f"wrote {out / 'train_step.json'} and {out / 'train_step.png'}")
    return result
