"""Optional fast kernels, chosen at call time; the pure-PyTorch path stays the reference.

Pattern borrowed from transformers (Qwen3-Next): keep the torch functions, switch to
flash-linear-attention (fla) Triton kernels when the inputs live on CUDA and fla imports.

We call fla's *unnormalised* chunked linear attention with ``v`` augmented by a column of ones,
so that the normaliser ``z = sum phi(k)`` is carried inside fla's state as that extra column and
the division happens here. This sidesteps fla's own ``normalize=True`` path, which historically
dropped the initial state's key sum (fla#267) and summed over the wrong axis (fla#594).
"""
from __future__ import annotations

import inspect
import logging
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("hedgehog")

BACKENDS = ("auto", "torch", "fla")


@lru_cache(maxsize=None)
def is_fla_available() -> bool:
    try:
        from fla.ops.linear_attn import chunk_linear_attn  # noqa: F401
    except Exception:
        return False
    return True


_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def select(x: torch.Tensor, backend: str) -> Optional[Callable]:
    """Return the fast causal kernel to use for tensors like ``x``, or None for pure torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    if backend == "fla":
        if not x.is_cuda:
            raise ValueError("backend='fla' needs CUDA tensors; use backend='torch' on the CPU")
        if not is_fla_available():
            raise ImportError("backend='fla' needs flash-linear-attention: pip install flash-linear-attention")
        return _fla_causal
    if x.is_cuda:
        if is_fla_available():
            return _fla_causal
        _warn_once("hedgehog: fla not installed, using the pure-PyTorch chunked kernel on CUDA "
                   "(pip install flash-linear-attention for the Triton kernels)")
    return None


def _fla_causal(phi_q, phi_k, v, state, eps):
    """fla chunked kernel; returns None (caller falls back to torch) if the kernel raises."""
    from fla.ops.linear_attn import chunk_linear_attn

    B, H, N, Fd = phi_q.shape
    D = v.shape[-1]
    Dp = -(-(D + 1) // 16) * 16  # ones column, padded to a multiple of 16 for the kernel tiles
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    v_aug = F.pad(torch.cat([v, torch.ones_like(v[..., :1])], -1), (0, Dp - D - 1)).to(dtype)
    init = None
    if state is not None:
        S, z = state
        init = F.pad(torch.cat([S, z.unsqueeze(-1)], -1), (0, Dp - D - 1)).float()
    kwargs = dict(scale=1.0, initial_state=init, output_final_state=True, normalize=False)
    params = inspect.signature(chunk_linear_attn).parameters
    q, k = phi_q.to(dtype), phi_k.to(dtype)
    head_first = "head_first" in params
    if head_first:
        kwargs["head_first"] = True
    else:  # newer fla: [B, T, H, K]
        q, k, v_aug = (t.transpose(1, 2) for t in (q, k, v_aug))
    try:
        o, st = chunk_linear_attn(q.contiguous(), k.contiguous(), v_aug.contiguous(), **kwargs)
    except Exception as e:  # unsupported shape/dtype on this fla version
        _warn_once(f"hedgehog: fla kernel failed ({type(e).__name__}: {e}); using the torch kernel")
        return None
    if not head_first:
        o = o.transpose(1, 2)
    o = o.float()
    y = (o[..., :D] / o[..., D:D + 1].clamp_min(eps)).to(v.dtype)
    return y, (st[..., :D].float(), st[..., D].float())
