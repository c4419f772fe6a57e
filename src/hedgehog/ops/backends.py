"""Optional fast kernels, bound once; the pure-PyTorch path stays the reference.

Pattern from transformers' Qwen3-Next: the layer binds its kernel when it is built (:func:`bind`, cached per
name), not on every call. With ``"auto"`` that is flash-linear-attention's (fla) Triton
``chunk_linear_attn`` when fla imports, used for CUDA tensors; CPU tensors always take the torch path (and,
for Hedgehog maps without autograd, the fused CPU kernel). Errors inside the kernel propagate: nothing is
swallowed per call. The one shape fla refuses by design, fewer positions than heads (its guard against
head-first input), goes to the torch path.

fla's API (fla-core 0.6): ``chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize,
cu_seqlens)`` on ``[B, T, H, K]`` inputs and a ``[B, H, K, V]`` state. We call it *unnormalised* with ``v``
augmented by a column of ones, so the normaliser ``z = sum phi(k)`` is carried inside fla's state as that
extra column and the division happens here. This sidesteps fla's ``normalize=True`` path, which
historically dropped the initial state's key sum (fla#267) and summed over the wrong axis (fla#594).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

log = logging.getLogger("hedgehog")

BACKENDS = ("auto", "torch", "fla")
FLA_PARAMS = ("q", "k", "v", "scale", "initial_state", "output_final_state", "normalize")
GLA_PARAMS = ("q", "k", "v", "g", "scale", "initial_state", "output_final_state")

_logged = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def _import_fla() -> Optional[Callable]:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # not installed, or no Triton/driver: the torch path
        return None
    return chunk_linear_attn


def _missing(fn: Callable, wanted) -> list:
    """The arguments of ``wanted`` that ``fn`` does not take."""
    params = inspect.signature(fn).parameters
    return [p for p in wanted if p not in params]


def _import_fla_gla() -> Optional[Callable]:
    """fla's ``chunk_simple_gla`` (a head-wise gated linear attention: the hybrid's decayed linear part), or None
    (with one log line when this fla's takes other arguments: the hybrid's linear part then runs in PyTorch)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None
    missing = _missing(chunk_simple_gla, GLA_PARAMS)
    if missing:
        _log_once(f"hedgehog: this flash-linear-attention's chunk_simple_gla lacks {missing}; the hybrid's linear "
                  "part on CUDA uses the PyTorch form (fla-core 0.6 has them)")
        return None
    return chunk_simple_gla


def check_fla_signature(fn: Callable) -> None:
    """Refuse an fla whose ``chunk_linear_attn`` does not take the arguments we pass, at bind time."""
    missing = _missing(fn, FLA_PARAMS)
    if missing:
        params = inspect.signature(fn).parameters
        raise ImportError(f"this flash-linear-attention's chunk_linear_attn lacks {missing} (it takes "
                          f"{list(params)}); hedgehog needs fla-core >= 0.6 (pip install -U flash-linear-attention)"
                          ", or use backend='torch'")


@dataclass(frozen=True)
class Backend:
    """A bound kernel choice. ``name``: what runs causal attention on CUDA ("fla" or "torch");
    ``requested``: what was asked for; ``fla``: the bound fla function, if any."""

    name: str
    requested: str
    fla: Optional[Callable] = None
    gla: Optional[Callable] = None  # fla's chunk_simple_gla, for the hybrid's linear part

    def hybrid_linear(self, x: torch.Tensor) -> Optional[Callable]:
        """fla's gated chunk kernel for the hybrid's linear part of CUDA tensors like ``x`` (see
        :func:`hedgehog.ops.hybrid.device_hybrid_attention`), or None: the PyTorch form."""
        return self.gla if x.is_cuda else None

    def causal(self, x: torch.Tensor) -> Optional[Callable]:
        """The fast causal kernel for tensors like ``x`` (``fn(phi_q, phi_k, v, state, eps)``), or None: torch."""
        if not x.is_cuda:
            if self.requested == "fla":
                raise ValueError("backend='fla' needs CUDA tensors; use backend='torch' (or 'auto') on the CPU")
            return None
        if self.fla is None:
            _log_once("hedgehog: flash-linear-attention is not installed; CUDA attention uses the pure-PyTorch "
                      "chunked kernel (pip install flash-linear-attention for the Triton kernels)")
            return None
        return self._fla_causal

    def _fla_causal(self, phi_q, phi_k, v, state, eps):
        return fla_causal(self.fla, phi_q, phi_k, v, state, eps)


@lru_cache(maxsize=None)
def bind(backend: str = "auto") -> Backend:
    """Resolve ``backend`` once: "torch"; "fla" (fla must import, else ImportError now); "auto" (fla if it
    imports)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return Backend("torch", backend)
    fn = _import_fla()
    if fn is None:
        if backend == "fla":
            raise ImportError("backend='fla' needs flash-linear-attention: pip install flash-linear-attention")
        return Backend("torch", backend)
    check_fla_signature(fn)
    return Backend("fla", backend, fn, _import_fla_gla())


def resolve(backend: Union[str, Backend]) -> Backend:
    return backend if isinstance(backend, Backend) else bind(backend)


def is_fla_available() -> bool:
    return bind("auto").fla is not None


def fla_causal(chunk_linear_attn: Callable, phi_q, phi_k, v, state, eps):
    """Causal linear attention through fla's unnormalised chunked kernel. ``phi_q, phi_k``: (B, H, N, F);
    ``v``: (B, H, N, D); ``state``: ``(S (B,H,F,D), z (B,H,F))`` or None. Returns ``(y, (S, z))``, or None for
    N < H (fla refuses that shape; the caller takes the torch path)."""
    B, H, N, Fd = phi_q.shape
    if N < H:
        return None
    D = v.shape[-1]
    Dp = -(-(D + 1) // 16) * 16  # ones column, padded to a multiple of 16 for the kernel tiles
    dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    v_aug = F.pad(torch.cat([v, torch.ones_like(v[..., :1])], -1), (0, Dp - D - 1)).to(dtype)
    init = None
    if state is not None:
        S, z = state
        init = F.pad(torch.cat([S, z.unsqueeze(-1)], -1), (0, Dp - D - 1)).float()
    q, k, v_aug = (t.to(dtype).transpose(1, 2).contiguous() for t in (phi_q, phi_k, v_aug))  # [B, T, H, *]
    o, st = chunk_linear_attn(q, k, v_aug, scale=1.0, initial_state=init, output_final_state=True, normalize=False)
    o = o.transpose(1, 2).float()
    y = (o[..., :D] / o[..., D:D + 1].clamp_min(eps)).to(v.dtype)
    return y, (st[..., :D].float(), st[..., D].float())
