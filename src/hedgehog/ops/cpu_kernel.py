"""The fused CPU kernel for causal Hedgehog attention (inference and prefill, no autograd).

``csrc/hedgehog_cpu.cpp`` computes both Hedgehog feature maps and the chunked causal linear attention
in one pass per (batch, key head): a chunk's features, its (C x C) scores and the ``[S, z]`` state stay
in the core's caches, and the arithmetic is a few small MKL sgemm calls per chunk. The pure-PyTorch
path does the same arithmetic in ~40 ops per block whose temporaries go through memory; at N = 16k
the kernel is ~1.8x faster (see ``hedgehog bench attention``).

It is compiled on first use with ``torch.utils.cpp_extension`` (g++, ~30 s, once per machine; cached
under ``$HEDGEHOG_CACHE/kernels``). Anything that stops it (no compiler, a torch without MKL, another
OS) makes :func:`load` return None with one log line, and every caller falls back to the PyTorch path,
which stays the reference. ``HEDGEHOG_CPU_KERNEL=0`` turns the kernel off; ``HEDGEHOG_CPU_KERNEL_ARCH`` sets
the ``-march`` of the build (default ``native``).

Scope: float32 compute (other float dtypes are converted, float64 is left to the reference path),
Hedgehog's softmax feature map with per-head weights, grouped-query attention (states per key head).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Optional, Tuple

import torch

log = logging.getLogger("hedgehog")

SOURCE = Path(__file__).with_name("csrc") / "hedgehog_cpu.cpp"
CHUNK = 32  # the kernel's chunk (its fastest at d = 64); results do not depend on it beyond rounding

_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get("HEDGEHOG_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _arch() -> str:
    """The ``-march`` of the build: ``native`` unless ``HEDGEHOG_CPU_KERNEL_ARCH`` names another (e.g.
    ``x86-64-v3`` for AVX2 without AVX-512, which selects the kernel's portable loops)."""
    return os.environ.get("HEDGEHOG_CPU_KERNEL_ARCH", "native").strip() or "native"


def _build_name() -> str:
    """A name per source, torch version, -march and CPU (flags from /proc/cpuinfo)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_arch().encode())
    h.update(platform.machine().encode())
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        h.update(flags.encode())
    except (OSError, StopIteration):
        pass
    return f"hedgehog_cpu_{h.hexdigest()[:12]}"


def load():
    """The compiled kernel module, or None when it is disabled or cannot be built here."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    _tried = True
    try:
        from torch.utils.cpp_extension import load as load_extension

        from hedgehog.utils.cachedir import cache_dir

        name = _build_name()
        build = cache_dir() / "kernels" / name
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.warning("hedgehog: compiling the fused CPU attention kernel (once per machine, ~30 s)")
        _module = load_extension(
            name=name, sources=[str(SOURCE)], build_directory=str(build),
            extra_cflags=["-O3", f"-march={_arch()}", "-fopenmp"], extra_ldflags=["-lmvec", "-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler / headers / MKL symbols: the PyTorch path serves
        log.warning("hedgehog: fused CPU kernel unavailable (%s: %s); using the PyTorch path "
                    "(set HEDGEHOG_CPU_KERNEL=0 to skip the attempt)", type(e).__name__, str(e).splitlines()[0][:200])
        _module = None
    return _module


def _map_params(fm) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``fm.fused_softmax_params()`` when the map offers it: ``([W, -W] (H, d, F), [b, -b] (H, F) or empty)``,
    the per-head softmax map ``phi(x) = softmax over halves of x @ [W, -W] + [b, -b]`` (hedgehog's Hedgehog map).
    Any other map (None, or no such method) takes the PyTorch path. The kernel sees tensors, never a map class."""
    get = getattr(fm, "fused_softmax_params", None)
    return get() if callable(get) else None


def _fused_params(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq, fk):
    """``((wq, bq), (wk, bk))`` when the fused kernel can serve these inputs, else None (cheap; loads nothing)."""
    if not enabled() or q.device.type != "cpu" or q.dtype == torch.float64 or not q.dtype.is_floating_point:
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] == 0:
        return None
    params = [*fq.parameters(), *fk.parameters()] if hasattr(fq, "parameters") and hasattr(fk, "parameters") else []
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *params)):
        return None
    pq, pk = _map_params(fq), _map_params(fk)
    if pq is None or pk is None:
        return None
    (wq, _), (wk, _) = pq, pk
    fits = (wq.shape[-1] == wk.shape[-1] and wq.shape[0] == q.shape[1] and wk.shape[0] == k.shape[1]
            and wq.shape[1] == q.shape[-1] and wk.shape[1] == k.shape[-1] and q.shape[1] % k.shape[1] == 0)
    return (pq, pk) if fits else None


def applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq, fk) -> bool:
    """Whether :func:`fused_hedgehog_attention` can serve these inputs (cheap checks; loads nothing)."""
    return _fused_params(q, k, v, fq, fk) is not None


def _module_for(q, k, v, fq, fk, name: str):
    """``(kernel module, the maps' parameters)`` when the kernel applies to these inputs and is built, else
    ``(None, None)``; checks the head layout."""
    params = _fused_params(q, k, v, fq, fk)
    mod = load() if params is not None else None
    if mod is None:
        return None, None
    B, H, N, d = q.shape
    if v.shape[:3] != (B, k.shape[1], N) or k.shape[0] != B or k.shape[2] != N or k.shape[-1] != d:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, N, d), (B, Hk, N, d), (B, Hk, N, D)")
    return mod, params


def _f32(*ts):
    """The kernels' inputs: float32, contiguous."""
    return [t.to(torch.float32).contiguous() for t in ts]


def _split(q, k) -> bool:
    """Few (batch x key head) tasks for the threads and grouped heads: one task per query head instead."""
    return q.shape[0] * k.shape[1] < torch.get_num_threads() and q.shape[1] > k.shape[1]


def _packed_state(B: int, H: int, Fd: int, D: int, initial_state=None) -> torch.Tensor:
    """The kernels' in-out state ``[S, z]`` (B, H, F, D + 1): zeros, or ``initial_state = (S, z)`` packed."""
    Sz = torch.zeros(B, H, Fd, D + 1)
    if initial_state is not None:
        S, z = initial_state
        if tuple(S.shape) != (B, H, Fd, D) or tuple(z.shape) != (B, H, Fd):
            raise ValueError(f"initial_state shapes S {tuple(S.shape)}, z {tuple(z.shape)}; expected "
                             f"({B}, {H}, {Fd}, {D}) and ({B}, {H}, {Fd})")
        Sz[..., :D], Sz[..., D] = S, z
    return Sz


def _output(y: torch.Tensor, v: torch.Tensor, Sz: torch.Tensor):
    """``(y in v's dtype, (S, z))`` from a kernel's output and its packed state."""
    D = Sz.shape[-1] - 1
    return y.to(v.dtype), (Sz[..., :D].contiguous(), Sz[..., D].contiguous())


def _gammas(gamma: torch.Tensor, H: int) -> Optional[torch.Tensor]:
    """The hybrid's window factor as one float32 value per query head, or None if it is neither scalar nor (H,)."""
    gam = gamma.detach().expand(H).contiguous() if gamma.dim() == 0 else gamma.detach().contiguous()
    return gam if gam.shape == (H,) else None


def _plain_inputs(ts) -> bool:
    """Whether tensors can feed a kernel taking them as given: enabled, CPU, 4-d, non-empty, float32/half, and
    nothing that autograd would need a backward for."""
    return (enabled() and all(t.device.type == "cpu" and t.dim() == 4 for t in ts) and ts[0].shape[2] > 0
            and all(t.dtype.is_floating_point and t.dtype != torch.float64 for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def fused_hedgehog_attention(q, k, v, fq, fk, initial_state=None, eps: float = 1e-6):
    """Causal Hedgehog attention ``y = linear_attention(fq(q), fk(k) per group, v)`` in the fused kernel.

    Args:
        q: (B, H, N, d); k: (B, Hk, N, d); v: (B, Hk, N, D), ``Hk`` dividing ``H`` (query head h reads key
            head ``h // (H / Hk)``); fq a Hedgehog map of H heads, fk one of Hk heads.
        initial_state: ``(S (B, Hk, F, D), z (B, Hk, F))`` of earlier tokens, or None.
    Returns:
        ``(y (B, H, N, D) in v's dtype, (S, z))`` with the state per key head in float32, or None when the
        kernel is unavailable or does not apply (the caller then takes the PyTorch path).
    """
    mod, params = _module_for(q, k, v, fq, fk, "fused_hedgehog_attention")
    if mod is None:
        return None
    (wq, bq), (wk, bk) = params
    B, H, N, _ = q.shape
    Hk, D = k.shape[1], v.shape[-1]
    Sz = _packed_state(B, Hk, wq.shape[-1], D, initial_state)
    return _output(mod.causal_forward(*_f32(q, k, v), wq, bq, wk, bk, Sz, CHUNK, float(eps), _split(q, k)), v, Sz)


def fused_hybrid_attention(q, k, v, fq, fk, window: int, gamma, scale: Optional[float] = None,
                           feature_scale: float = 1.0, eps: float = 1e-6):
    """The sliding-window + Hedgehog hybrid (:mod:`hedgehog.ops.hybrid`'s formula) in the fused kernel.

    Args:
        q: (B, H, N, d); k: (B, Hk, N, d); v: (B, Hk, N, D) (grouped heads as in
            :func:`fused_hedgehog_attention`); window ``w >= 1``; gamma a scalar or (H,) per query head;
            scale for the window scores (default d ** -0.5); the feature maps see ``x * feature_scale``.
    Returns:
        ``(y (B, H, N, D), (S, z))`` with the linear state of keys ``0 .. N - w - 1`` per key head, or None
        when the kernel is unavailable or does not apply.
    """
    gam = torch.as_tensor(gamma, dtype=torch.float32)
    if window < 1 or (torch.is_grad_enabled() and gam.requires_grad):
        return None
    mod, params = _module_for(q, k, v, fq, fk, "fused_hybrid_attention")
    if mod is None:
        return None
    (wq, bq), (wk, bk) = params
    B, H, N, d = q.shape
    Hk, D = k.shape[1], v.shape[-1]
    gams = _gammas(gam, H)
    if gams is None:
        raise ValueError(f"gamma must be a scalar or one value per query head ({H},), got {tuple(gam.shape)}")
    if feature_scale != 1.0:  # fm(x * s) = softmax(x @ (s W) + b)
        wq, wk = wq * feature_scale, wk * feature_scale
    Sz = _packed_state(B, Hk, wq.shape[-1], D)  # the kernel writes the state of the delayed keys
    y = mod.hybrid_forward(*_f32(q, k, v), wq, bq, wk, bk, gams, Sz, int(window), CHUNK,
                           float(d ** -0.5 if scale is None else scale), float(eps), _split(q, k))
    return _output(y, v, Sz)


def fused_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, initial_state=None,
                           eps: float = 1e-6):
    """Causal linear attention on precomputed features of any map, in the fused kernel.

    Args:
        phi_q, phi_k: (B, H, N, F) features; v: (B, H, N, D); initial_state ``(S (B,H,F,D), z (B,H,F))`` or None.
    Returns:
        ``(y (B, H, N, D) in v's dtype, (S, z) in float32)``, or None where the kernel does not apply (autograd,
        float64, another device, other shapes) or is unavailable; the caller then takes the PyTorch path.
    """
    ts = (phi_q, phi_k, v)
    if not _plain_inputs(ts) or phi_k.shape != phi_q.shape or v.shape[:3] != phi_q.shape[:3]:
        return None
    if initial_state is not None and torch.is_grad_enabled() and any(t.requires_grad for t in initial_state):
        return None
    mod = load()
    if mod is None:
        return None
    B, H, _, Fd = phi_q.shape
    Sz = _packed_state(B, H, Fd, v.shape[-1], initial_state)
    return _output(mod.causal_forward_features(*_f32(*ts), Sz, CHUNK, float(eps), False), v, Sz)


def fused_hybrid_features(q, k, v, phi_q, phi_k, window: int, gamma, scale: Optional[float] = None,
                          eps: float = 1e-6):
    """The hybrid on precomputed features of any map (``hedgehog.ops.hybrid_attention``'s inputs) in the kernel.

    Args: q, k, v (B, H, N, d|D); phi_q, phi_k (B, H, N, F); window >= 1; gamma a scalar or (H,).
    Returns ``(y, (S, z))`` (the state of keys ``0 .. N - w - 1``), or None where the kernel does not apply
    (autograd, float64, another device, other shapes) or is unavailable.
    """
    gam = torch.as_tensor(gamma, dtype=torch.float32)
    ts = (q, k, v, phi_q, phi_k)
    if (window < 1 or not _plain_inputs(ts) or phi_k.shape != phi_q.shape or phi_q.shape[:3] != q.shape[:3]
            or k.shape != q.shape or v.shape[:3] != q.shape[:3] or (torch.is_grad_enabled() and gam.requires_grad)):
        return None
    B, H, _, d = q.shape
    gams = _gammas(gam, H)
    mod = load() if gams is not None else None
    if mod is None:
        return None
    Sz = _packed_state(B, H, phi_q.shape[-1], v.shape[-1])  # the kernel writes the state of the delayed keys
    y = mod.hybrid_forward_features(*_f32(*ts), gams, Sz, int(window), CHUNK,
                                    float(d ** -0.5 if scale is None else scale), float(eps), False)
    return _output(y, v, Sz)


def pool_bytes() -> int:
    """Bytes of freed kernel outputs kept for reuse (at most ``HEDGEHOG_KERNEL_POOL_MB``, default 1024 MB)."""
    mod = load()
    return 0 if mod is None else int(mod.pool_bytes())
