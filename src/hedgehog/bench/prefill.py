"""Whole-model prefill: a converted model's decoder stack vs the same model with softmax attention.

Run:  hedgehog bench prefill [--model smollm2|RUN/model] [--lengths 1024,4096,16384] [--device cuda]
                              [--sparse-cache 0,128]

Times one no-grad forward of the decoder stack (embeddings, every layer, final norm; no LM head, whose
(N x vocab) logits would dominate memory) over N tokens, for the Hedgehog model (attention through the
fused CPU kernel where it builds) and for the softmax base model (torch SDPA). Both share everything but
attention, so the ratio is what conversion buys on a real prefill; the op-level ratio is
``hedgehog bench attention``. Token ids are drawn at random (speed does not depend on them). On CUDA each
point also records the peak memory of one prefill, and the first (compiling) call is left out of the timing.
``--sparse-cache 0,128`` times a hybrid model once per sparse-cache size (LoLA's exact keys),
so the cache's prefill cost is a ratio measured in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hedgehog.bench.attention import best_of, peak_forward_cuda_mb, sync_device
from hedgehog.errors import UserError
from hedgehog.train.engine import DTYPES

DEFAULT_LENGTHS = (1024, 4096, 16384)


def decoder_stack(model):
    """The model without its LM head (``get_decoder`` of a causal LM, through a peft wrapper if any)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner


def prefill_seconds(model, ids: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timed forwards of the decoder stack over ``ids`` (after one untimed warm-up on CUDA,
    where the first call compiles kernels)."""
    stack = decoder_stack(model).eval()
    with torch.no_grad():
        if ids.is_cuda:
            stack(input_ids=ids, use_cache=False)
            sync_device(ids.device)
        return best_of(lambda: stack(input_ids=ids, use_cache=False), repeats, ids.device)


def peak_cuda_mb(model, ids: torch.Tensor) -> float:
    """Peak CUDA memory of one prefill above what was allocated before it (MB)."""
    with torch.no_grad():
        return peak_forward_cuda_mb(lambda: decoder_stack(model)(input_ids=ids, use_cache=False), ids.device)


def run(model_name: str, lengths: List[int], repeats: int = 1, log=print, device: str = "cpu",
        sparse_caches: Optional[List[int]] = None, dtype: str = "fp32") -> Dict:
    """Per length: the converted model's and the softmax base's prefill seconds (and, with ``sparse_caches``, the
    converted model's at each sparse-cache size, the first of them being ``hedgehog_s``)."""
    from hedgehog.bench.decode import load_pair
    from hedgehog.layers.attention import set_sparse_cache
    from hedgehog.train.engine import parse_dtype, resolve_device

    dev = resolve_device(device)
    hedgehog, softmax, tok, source = load_pair(model_name, device=dev, dtype=parse_dtype(dtype))
    vocab = min(getattr(tok, "vocab_size", None) or 1000, softmax.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
        row = {"n": n}
        if sparse_caches:
            row["sparse_cache_s"] = {}
            for c in sparse_caches:
                set_sparse_cache(hedgehog, c)
                row["sparse_cache_s"][str(c)] = prefill_seconds(hedgehog, ids, repeats)
            row["hedgehog_s"] = row["sparse_cache_s"][str(sparse_caches[0])]
        else:
            row["hedgehog_s"] = prefill_seconds(hedgehog, ids, repeats)
        row["softmax_s"] = prefill_seconds(softmax, ids, repeats)
        row["speedup"] = row["softmax_s"] / row["hedgehog_s"]
        row["hedgehog_tokens_per_s"], row["softmax_tokens_per_s"] = n / row["hedgehog_s"], n / row["softmax_s"]
        if dev.type == "cuda":
            row["hedgehog_peak_mb"], row["softmax_peak_mb"] = peak_cuda_mb(hedgehog, ids), peak_cuda_mb(softmax, ids)
        rows.append(row)
        extra = "".join(f" | cache {c}: {t:.2f} s ({t / row['hedgehog_s']:.2f}x)"
                        for c, t in list(row.get("sparse_cache_s", {}).items())[1:])
        log(f"{n:>7} | {row['hedgehog_s']:9.2f} {row['softmax_s']:10.2f} | {row['speedup']:6.2f}x{extra}")
    return {"model": source, "device": str(dev), "dtype": dtype, "threads": torch.get_num_threads(), "repeats": repeats,
            "sparse_caches": sparse_caches, "rows": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a base model dir, a converted run's model dir, or "
                   "'smollm2-shape' (SmolLM2's shape, random weights, nothing to download) "
                   "(default: %(default)s)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated prompt lengths (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards per point, best kept (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="both models' weights (default: %(default)s)")
    p.add_argument("--sparse-cache", default="", help="comma-separated sparse-cache sizes to time the (hybrid) model "
                   "at, e.g. 0,128 (the first is the hedgehog column; default: the model's own)")
    p.add_argument("--out", default="bench_out/prefill", help="output dir for prefill.json and .png (default: %(default)s)")


def run_from_args(args) -> Dict:
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        caches = [int(x) for x in args.sparse_cache.split(",") if x.strip()]
    except ValueError:
        lengths, caches = [], [-1]
    if not lengths or min(lengths) < 1 or args.repeats < 1 or (caches and min(caches) < 0):
        raise UserError(f"--lengths must be positive integers, --sparse-cache non-negative integers and --repeats "
                        f">= 1, got {args.lengths!r}, {args.sparse_cache!r}, {args.repeats}")
    from hedgehog.train.engine import device_arg

    device_arg(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'N':>7} | {'hedgehog s':>9} {'softmax s':>10} | speedup")
    result = run(args.model, lengths, args.repeats, device=args.device, sparse_caches=caches or None, dtype=args.dtype)
    (out / "prefill.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "prefill.png")
    print(f"wrote {out / 'prefill.json'} and {out / 'prefill.png'}")
    return result


def plot(result: Dict, path: Path) -> None:
    from hedgehog.eval.plotting import label_axes, pyplot, save_figure

    plt = pyplot()
    rows = result["rows"]
    n = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(n, [r["hedgehog_s"] for r in rows], "o-", label="converted (Hedgehog attention)")
    ax.loglog(n, [r["softmax_s"] for r in rows], "s--", label="softmax base (SDPA)")
    label_axes(ax, "prompt length N", "seconds per prefill (decoder stack)", f"{result['model']}: prefill, {result.get('device', 'cpu')}, {result.get('dtype', 'fp32')}, "
                                f"{result['threads']} threads")
    save_figure(fig, path, dpi=110)
