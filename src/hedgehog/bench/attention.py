"""Speed/memory benchmark: causal Hedgehog attention (feature maps included) vs torch SDPA.

Run:  hedgehog bench attention [--lengths 256,1024,...] [--out bench_out/attention]

Each length times, in one process and interleaved, the forward (no grad) and forward+backward of
(1) Hedgehog attention: per-head q and k feature maps + chunked causal linear attention, via
``feature_linear_attention`` (the no-grad forward takes the fused CPU kernel of
``hedgehog.ops.cpu_kernel`` where it builds, the backward the PyTorch ops; the JSON's
``forward_kernel`` says which; ``HEDGEHOG_CPU_KERNEL=0`` times the PyTorch forward); (2) ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.
With ``--attention linear`` it also times (3) the public op ``linear_attention`` on precomputed features
(``op ms``), which custom feature maps call (the fused kernel without the maps). The process is a library
caller's: the CLI leaves malloc alone for the benchmarks (the kernels keep their own output buffers).
With ``--attention hybrid`` the student is the sliding-window + linear hybrid
(``feature_hybrid_attention``, window ``--window``, feature maps applied block by block); with ``--sparse-cache N``
as well it is the default converted model's attention, the hybrid with a sparse cache of ``N`` exact keys
(``sparse_hybrid_attention``: chunk ``--sparse-chunk``, 4 sinks, a state decaying by 0.99 a token; without
autograd on CUDA its schedule is the Triton kernel of ``hedgehog.ops.triton_sparse``). On CUDA the no-grad forward of
the linear and the plain hybrid form with Hedgehog maps takes the fused Triton kernels (``hedgehog.ops.triton_fused``:
the maps inside the kernels; ``forward_kernel`` "triton-fused"), the backward the autograd forms.
Times are the best of ``--repeats`` runs. Peak forward memory on the CPU is measured in a fresh
process per point: the kernel's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs)
above the RSS once inputs exist (CPU PyTorch keeps no allocator statistics, and in a long-lived
process freed pages hide new peaks); on CUDA it is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from hedgehog.errors import UserError
from hedgehog.modules.feature_maps import get_feature_map
from hedgehog.ops import (backends, cpu_kernel, feature_hybrid_attention, feature_linear_attention, linear_attention,
                          triton_fused, triton_sparse, triton_window)
from hedgehog.ops.sparse_cache import sparse_hybrid_attention
from hedgehog.train.engine import DTYPES, parse_dtype

DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


SPARSE_SINKS, SPARSE_DECAY = 4, 0.99  # the sparse-cache student's sinks and state decay (the default model's)


def student_forward(q, k, v, fq, fk, chunk_size: int, window=None, sparse=None):
    """The timed linear-attention forward: pure (feature maps per block), hybrid (window softmax + linear), or the
    hybrid with a sparse cache (``sparse``: ``(cache_size, chunk)``)."""
    if sparse:
        decay = torch.full((q.shape[1],), math.log(SPARSE_DECAY), device=q.device)
        # features per piece, as the model's layer passes them (a long prefill runs in pieces)
        phi_q, phi_k = (lambda a, b: fq(q[:, :, a:b])), (lambda a, b: fk(k[:, :, a:b]))
        y, _ = sparse_hybrid_attention(q, k, v, phi_q, phi_k, window, sparse[0], gamma=0.5, sinks=SPARSE_SINKS,
                                       decay=decay, chunk=sparse[1])
        return y
    if window is None:
        return feature_linear_attention(q, k, v, fq, fk, chunk_size=chunk_size)
    return feature_hybrid_attention(q, k, v, fq, fk, window=window, gamma=0.5, chunk_size=chunk_size,
                                    backend=backends.bind("auto"))


def _peak_child(kind, n, batch, heads, head_dim, feature_map, chunk_size, window, sparse, conn):
    """Runs in a fresh process: peak RSS (VmHWM) above the level after inputs are built."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim) for _ in range(3))
    fq = get_feature_map(feature_map, head_dim, heads)
    fk = get_feature_map(feature_map, head_dim, heads)
    reset_peak_rss()
    base = _vm_kb("VmRSS")
    with torch.no_grad():
        if kind == "hedgehog":
            student_forward(q, k, v, fq, fk, chunk_size, window, sparse)
        else:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    conn.send((_vm_kb("VmHWM") - base) / 1024)
    conn.close()


def peak_forward_mb(kind: str, n: int, batch: int, heads: int, head_dim: int, feature_map: str, chunk_size: int,
                    window=None, sparse=None):
    """Peak CPU memory (MB) of one forward, measured in a fresh process (freed pages of earlier
    runs would otherwise hide it); None where /proc is unavailable."""
    import multiprocessing as mp

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(kind, n, batch, heads, head_dim, feature_map, chunk_size, window,
                                                     sparse, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = None
    proc.join()
    return result


def peak_forward_cuda_mb(fn, device=None) -> float:
    """Peak CUDA memory of ``fn()`` above what was allocated before it (MB), on ``device`` (None: the current)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def sync_device(device):
    """Wait for ``device``'s queued kernels (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable, repeats: int, device) -> float:
    return first_and_best_time(fn, repeats, device)[1]


def first_and_best_time(fn: Callable, repeats: int, device):
    """``(first call, best of repeats)`` in seconds. The first call of a CUDA kernel at a new shape includes its
    Triton compile/autotune (fla's chunked kernels autotune per shape), which the best time leaves out."""
    t0 = time.perf_counter()
    fn()  # warm-up
    sync_device(device)
    first = time.perf_counter() - t0
    return first, best_of(fn, repeats, device)


def best_of(fn: Callable, repeats: int, device) -> float:
    """The best wall time of ``repeats`` calls of ``fn`` (each waited for on ``device``), no warm-up."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(device, n: int = 2048, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = best_time(lambda: a @ a, 5, device)
    return 2 * n ** 3 / t / 1e9


def hedgehog_flops(n: int, b: int, h: int, d: int, f: int, chunk: int, window=None) -> float:
    """Multiply-add FLOPs of causal Hedgehog attention as implemented (forward); with ``window`` the hybrid's
    band (w queries x 2w keys per chunk: scores and weights times v) is added."""
    per_token = (2 * 2 * 2 * window * d if window else 0) + (
        2 * 2 * d * f  # q and k feature-map projections (one matmul each against [W, -W])
        + 2 * chunk * f  # intra-chunk phi_q phi_k^T
        + 2 * chunk * d  # ... times v
        + 2 * f * d * 2  # phi_k^T v into the state and phi_q @ S
    )
    return per_token * n * b * h


def sdpa_flops(n: int, b: int, h: int, d: int) -> float:
    return 2 * 2 * n * n * d * b * h / 2  # QK^T and PV, causal half


def forward_kernel(fq, fk, device, dtype, window, sparse=None) -> str:
    """Which implementation the timed no-grad forward takes: the fused CPU kernel or the PyTorch ops."""
    if sparse:
        x = torch.zeros(1, device=device)
        return "triton-sparse-schedule+torch" if triton_sparse.serves(x) else "torch"
    if device.type != "cpu":
        with torch.no_grad():
            fused = triton_fused.bound(backends.bind("auto"), torch.zeros(1, device=device)) and \
                triton_fused.hedgehog_weights(fq) is not None
        if fused:  # the feature maps inside the kernels (hedgehog.ops.triton_fused)
            return "triton-fused"
        if not window:
            return backends.bind("auto").name  # fla's chunked kernel when it imports
        x = torch.zeros(1, 1, 1, 1, device=device)
        if not triton_window.serves(x):
            return "torch"
        return "triton-window+fla-gla" if backends.bind("auto").hybrid_linear(x) else "triton-window+torch"
    x = torch.zeros(1, fq.num_heads, 1, fq.head_dim, dtype=dtype)
    with torch.no_grad():
        ok = cpu_kernel.applicable(x, x, x, fq, fk) and cpu_kernel.load() is not None
    return "fused-cpu" if ok else "torch"


def run(lengths: List[int], batch=1, heads=8, head_dim=64, repeats=3, backward=True, device="cpu",
        feature_map="hedgehog", chunk_size=64, max_sdpa_len=None, dtype=torch.float32, log=print,
        measure_memory=True, window=None, sparse=None) -> Dict:
    device = torch.device(device)
    torch.manual_seed(0)
    fq = get_feature_map(feature_map, head_dim, heads).to(device)
    fk = get_feature_map(feature_map, head_dim, heads).to(device)
    fdim = fq.feature_dim
    kernel = forward_kernel(fq, fk, device, dtype, window, sparse)
    flop_chunk = cpu_kernel.CHUNK if kernel == "fused-cpu" else chunk_size
    log(f"forward kernel: {kernel}")
    rate = matmul_gflops(device, dtype=dtype)
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype) for _ in range(3))
        reps = repeats  # Hedgehog is cheap: always the full repeats (this CPU's timings are noisy)
        sdpa_reps = repeats if n <= 8192 else max(1, min(repeats, 2))  # SDPA takes seconds at large N
        row = {"n": n}

        def hh_fwd():
            with torch.no_grad():
                return student_forward(q, k, v, fq, fk, chunk_size, window, sparse)

        def sd_fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def hh_bwd():
            student_forward(qg, kg, vg, fq, fk, chunk_size, window, sparse).sum().backward()

        def sd_bwd():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward()

        run_sdpa = max_sdpa_len is None or n <= max_sdpa_len
        def peak(kind, fn):
            if not measure_memory:
                return None
            if device.type == "cuda":
                return peak_forward_cuda_mb(fn)
            return peak_forward_mb(kind, n, batch, heads, head_dim, feature_map, chunk_size, window, sparse)

        row["hedgehog_first_call_s"], row["hedgehog_fwd_s"] = first_and_best_time(hh_fwd, reps, device)
        if row["hedgehog_first_call_s"] > 1.0:
            log(f"N={n}: first Hedgehog call {row['hedgehog_first_call_s']:.1f} s (kernel compile/autotune for this "
                "shape; left out of the timings)")
        row["hedgehog_fwd_peak_mb"] = peak("hedgehog", hh_fwd)
        if not window:  # the public op on precomputed features, as a custom feature map calls it
            with torch.no_grad():
                pq, pk = fq(q), fk(k)

            def plain_fwd():
                with torch.no_grad():
                    return linear_attention(pq, pk, v, chunk_size=chunk_size)

            row["plain_fwd_s"] = best_time(plain_fwd, reps, device)
            del pq, pk
        if run_sdpa:
            row["sdpa_fwd_s"] = best_time(sd_fwd, sdpa_reps, device)
            row["sdpa_fwd_peak_mb"] = peak("sdpa", sd_fwd)
            row["fwd_speedup"] = row["sdpa_fwd_s"] / row["hedgehog_fwd_s"]
            if "plain_fwd_s" in row:
                row["plain_speedup"] = row["sdpa_fwd_s"] / row["plain_fwd_s"]
        if backward:
            row["hedgehog_fwdbwd_s"] = best_time(hh_bwd, reps, device)
            if run_sdpa:
                row["sdpa_fwdbwd_s"] = best_time(sd_bwd, 1 if n >= 16384 else sdpa_reps, device)
                row["fwdbwd_speedup"] = row["sdpa_fwdbwd_s"] / row["hedgehog_fwdbwd_s"]
        # the sparse cache's exact part: w + chunk/2 recent keys, the cache and the sinks per query (the band of w
        # queries x 2w keys of the plain hybrid counts 2w); its schedule's work is left out
        flop_window = (window + sparse[0] + sparse[1] // 2 + SPARSE_SINKS) / 2 if sparse else window
        row["hedgehog_gflops"] = (hedgehog_flops(n, batch, heads, head_dim, fdim, flop_chunk, flop_window)
                                  / row["hedgehog_fwd_s"] / 1e9)
        if run_sdpa:
            row["sdpa_gflops"] = sdpa_flops(n, batch, heads, head_dim) / row["sdpa_fwd_s"] / 1e9
        rows.append(row)
        log(_fmt_row(row))
    crossover = next((r["n"] for r in rows if r.get("fwd_speedup", 0) > 1.0), None)
    return {
        "config": {"batch": batch, "heads": heads, "head_dim": head_dim, "feature_map": feature_map,
                   "feature_dim": fdim, "chunk_size": chunk_size, "forward_kernel": kernel,
                   "attention": "hybrid" if window else "linear", "window": window,
                   "sparse_cache": sparse and {"cache_size": sparse[0], "chunk": sparse[1], "sinks": SPARSE_SINKS,
                                               "decay": SPARSE_DECAY},
                   "dtype": str(dtype), "device": str(device),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
                   "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "matmul_gflops": rate,
        "rows": rows,
        "crossover_n": crossover,
    }


HEADER = (f"{'N':>6} | {'hh fwd ms':>9} {'sdpa fwd ms':>11} {'speedup':>7} | {'hh f+b ms':>9} {'sdpa f+b ms':>11} "
          f"{'speedup':>7} | {'hh MB':>7} {'sdpa MB':>7} | {'hh GF/s':>7} | {'op ms':>7} {'speedup':>7}")


def _fmt_row(r: Dict) -> str:
    def ms(key):
        return f"{r[key] * 1e3:.1f}" if key in r else "-"

    def x(key):
        return f"{r[key]:.1f}x" if key in r else "-"

    def mb(key):
        return f"{r[key]:.0f}" if r.get(key) is not None else "-"

    return (f"{r['n']:>6} | {ms('hedgehog_fwd_s'):>9} {ms('sdpa_fwd_s'):>11} {x('fwd_speedup'):>7} | "
            f"{ms('hedgehog_fwdbwd_s'):>9} {ms('sdpa_fwdbwd_s'):>11} {x('fwdbwd_speedup'):>7} | "
            f"{mb('hedgehog_fwd_peak_mb'):>7} {mb('sdpa_fwd_peak_mb'):>7} | {r['hedgehog_gflops']:>7.1f} | "
            f"{ms('plain_fwd_s'):>7} {x('plain_speedup'):>7}")


def plot(result: Dict, path: Path) -> None:
    from hedgehog.eval.plotting import label_axes, pyplot, save_figure

    plt = pyplot()

    rows = result["rows"]
    n = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    ax.loglog(n, [r["hedgehog_fwd_s"] * 1e3 for r in rows], "o-", label="Hedgehog fwd")
    ns = [r["n"] for r in rows if "sdpa_fwd_s" in r]
    ax.loglog(ns, [r["sdpa_fwd_s"] * 1e3 for r in rows if "sdpa_fwd_s" in r], "s-", label="SDPA fwd")
    if "hedgehog_fwdbwd_s" in rows[0]:
        ax.loglog(n, [r["hedgehog_fwdbwd_s"] * 1e3 for r in rows], "o--", label="Hedgehog fwd+bwd")
        nb = [r["n"] for r in rows if "sdpa_fwdbwd_s" in r]
        ax.loglog(nb, [r["sdpa_fwdbwd_s"] * 1e3 for r in rows if "sdpa_fwdbwd_s" in r], "s--", label="SDPA fwd+bwd")
    label_axes(ax, "sequence length N", "time (ms)", "causal attention time")
    ax = axes[1]
    ax.semilogx(ns, [r["fwd_speedup"] for r in rows if "fwd_speedup" in r], "o-", label="forward")
    if any("fwdbwd_speedup" in r for r in rows):
        ax.semilogx([r["n"] for r in rows if "fwdbwd_speedup" in r],
                    [r["fwdbwd_speedup"] for r in rows if "fwdbwd_speedup" in r], "o--", label="fwd+bwd")
    ax.axhline(1.0, color="gray", lw=0.8)
    label_axes(ax, "sequence length N", "SDPA time / Hedgehog time", "speed-up")
    ax = axes[2]
    for key, style, label in (("hedgehog_fwd_peak_mb", "o-", "Hedgehog fwd"), ("sdpa_fwd_peak_mb", "s-", "SDPA fwd")):
        pts = [(r["n"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.loglog([a for a, _ in pts], [max(b, 1e-2) for _, b in pts], style, label=label)
    label_axes(ax, "sequence length N", "peak memory above baseline (MB)", "memory")
    c = result["config"]
    kind = f"hybrid w={c['window']}, " if c.get("window") else ""
    if c.get("sparse_cache"):
        kind += f"sparse cache {c['sparse_cache']['cache_size']}, "
    fig.suptitle(f"{kind}B={c['batch']} H={c['heads']} d={c['head_dim']} {c['device']} ({c['threads']} threads), "
                 f"{c['dtype'].replace('torch.', '')} matmul {result['matmul_gflops']:.0f} GFLOP/s")
    save_figure(fig, path, dpi=110)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(prog="hedgehog bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated sequence lengths (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension d (default: %(default)s)")
    p.add_argument("--feature-map", default="hedgehog", help="registered feature map (default: %(default)s)")
    p.add_argument("--attention", choices=["linear", "hybrid"], default="linear",
                   help="pure linear attention, or the sliding-window + linear hybrid (default: %(default)s)")
    p.add_argument("--window", type=int, default=64, help="hybrid window (default: %(default)s)")
    p.add_argument("--sparse-cache", type=int, default=0,
                   help="with --attention hybrid: this many exact older keys per head (the default converted model "
                        "has 128), i.e. the default model's attention; 0: the plain hybrid (default: %(default)s)")
    p.add_argument("--sparse-chunk", type=int, default=32,
                   help="keys leave the window and the cache is re-chosen every this many tokens (default: "
                        "%(default)s)")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk of the PyTorch causal kernel (the fused CPU forward uses its own, "
                   "32) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, best kept (default: %(default)s)")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward timings")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--max-sdpa-len", type=int, default=None, help="skip SDPA above this length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="q, k, v for both SDPA and Hedgehog (bf16/fp16 on GPUs; the CPU is fastest in fp32) "
                        "(default: %(default)s)")
    p.add_argument("--out", default="bench_out/attention", help="output dir for JSON + PNG (default: %(default)s)")


def run_from_args(args) -> Dict:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths must be positive integers, got {args.lengths!r}")
    if args.sparse_cache and (args.attention != "hybrid" or args.sparse_cache < 0 or args.sparse_chunk < 1):
        raise UserError(f"--sparse-cache {args.sparse_cache} needs --attention hybrid, a cache >= 0 and "
                        f"--sparse-chunk >= 1 (got --attention {args.attention}, --sparse-chunk {args.sparse_chunk}): "
                        "the sparse cache is part of the hybrid")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    result = run(lengths, args.batch, args.heads, args.head_dim, args.repeats, not args.no_backward, args.device,
                 args.feature_map, args.chunk_size, args.max_sdpa_len, measure_memory=not args.no_memory,
                 window=args.window if args.attention == "hybrid" else None, dtype=parse_dtype(args.dtype),
                 sparse=(args.sparse_cache, args.sparse_chunk) if args.sparse_cache else None)
    (out / "attention.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "attention.png")
    best = max((r for r in result["rows"] if "fwd_speedup" in r), key=lambda r: r["n"], default=None)
    print(f"{args.dtype} matmul rate: {result['matmul_gflops']:.0f} GFLOP/s; crossover (Hedgehog faster) at N = "
          f"{result['crossover_n']}")
    if best:
        print(f"at N={best['n']}: forward {best['fwd_speedup']:.1f}x faster than SDPA, "
              f"{best['hedgehog_gflops']:.0f} GFLOP/s ({100 * best['hedgehog_gflops'] / result['matmul_gflops']:.0f}% "
              f"of the matmul rate)")
    print(f"wrote {out / 'attention.json'} and {out / 'attention.png'}")
    return result


if __name__ == "__main__":
    main()
