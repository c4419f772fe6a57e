"""One decoding step at a time: the recurrent forms that carry a constant-size state between tokens.

- :func:`recurrent_step` / :func:`packed_recurrent_step`: linear attention, state ``(S, z)`` (or packed ``[S, z]``);
  each step adds ``phi(k) v^T`` and ``phi(k)`` and reads out with ``phi(q)``. Equal to the chunked prefill of
  :mod:`hedgehog.ops.linear_attention` token by token.
- :func:`hybrid_recurrent_step` / :func:`ring_hybrid_step`: the sliding-window hybrid of :mod:`hedgehog.ops.hybrid`:
  the last ``w`` keys exactly (softmax scores), older keys through the linear state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hedgehog.ops.hybrid import Gamma
from hedgehog.ops.chunked import acc_dtype
from hedgehog.ops.linear_attention import DEFAULT_EPS, State

def recurrent_step(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    state: Optional[State] = None,
    eps: float = DEFAULT_EPS,
    inplace: bool = False,
):
    """One decoding step: add token t's key/value to the state, then read it with token t's query.

    Args:
        phi_q: (B, Hq, F) or (B, Hq, 1, F).
        phi_k: (B, Hk, F) or (B, Hk, 1, F); v: (B, Hk, D) or (B, Hk, 1, D). ``Hk`` may divide ``Hq``
            (grouped-query attention): query head h reads the state of key head ``h // (Hq / Hk)``,
            as transformers' ``repeat_kv`` orders heads. The state is kept per key head.
        state: ``(S (B, Hk, F, D), z (B, Hk, F))`` of all earlier tokens, or None for the first token.
        inplace: update the given state tensors in place (decoding loops; no new allocation per token).
    Returns:
        ``(y, (S, z))``: y (B, Hq, [1,] D) in v's dtype; the state in float32/float64.
    """
    squeeze = v.dim() == 3
    if squeeze:
        phi_q, phi_k, v = phi_q.unsqueeze(2), phi_k.unsqueeze(2), v.unsqueeze(2)
    for name, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != 1:
            raise ValueError(
                f"recurrent_step takes one token: {name} must be (B, H, F) or (B, H, 1, F), got {tuple(t.shape)}; "
                "use linear_attention(..., initial_state=state, return_state=True) for several"
            )
    B, Hq, _, Fd = phi_q.shape
    Hk, D = phi_k.shape[1], v.shape[-1]
    if phi_k.shape[0] != B or v.shape[:2] != phi_k.shape[:2] or phi_k.shape[-1] != Fd or Hq % Hk:
        raise ValueError(f"shapes do not fit: phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, "
                         f"v {tuple(v.shape)} (key heads must divide query heads)")
    acc = acc_dtype(v)
    k, vv = phi_k[:, :, 0].to(acc), v[:, :, 0].to(acc)
    kv = k.unsqueeze(-1) * vv.unsqueeze(-2)
    if state is None:
        S, z = kv, k
    else:
        if tuple(state[0].shape) != (B, Hk, Fd, D) or tuple(state[1].shape) != (B, Hk, Fd):
            raise ValueError(f"state shapes S {tuple(state[0].shape)}, z {tuple(state[1].shape)} do not match "
                             f"expected S ({B}, {Hk}, {Fd}, {D}) and z ({B}, {Hk}, {Fd})")
        if inplace:
            S, z = state[0].add_(kv), state[1].add_(k)
        else:
            S, z = state[0].to(acc) + kv, state[1].to(acc) + k
    g = Hq // Hk
    q = phi_q[:, :, 0].to(acc).reshape(B, Hk, g, Fd)
    num = q @ S  # (B, Hk, g, D)
    den = (q @ z.unsqueeze(-1)).clamp_min(eps)
    y = (num / den).reshape(B, Hq, D).to(v.dtype)
    if not squeeze:
        y = y.unsqueeze(2)
    return y, (S, z)


def packed_recurrent_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, Sz: torch.Tensor,
                          eps: float = DEFAULT_EPS) -> torch.Tensor:
    """:func:`recurrent_step` on a packed state ``Sz = [S, z]`` (B, Hk, F, D + 1), updated in place.

    The decoding loop's form: with values augmented as ``[v, 1]`` the update ``S += phi_k v^T``,
    ``z += phi_k`` is one rank-1 product and the readout ``phi_q S``, ``phi_q . z`` one matmul
    (fewer, larger ops per token than the unpacked form; same arithmetic).

    Args:
        phi_q: (B, Hq, 1, F); phi_k: (B, Hk, 1, F); v: (B, Hk, 1, D); ``Hk`` divides ``Hq`` (GQA: query
            head h reads key head ``h // (Hq / Hk)``).
        Sz: contiguous (B, Hk, F, D + 1) float32/float64 state, modified in place.
    Returns: y (B, Hq, 1, D) in v's dtype.
    """
    B, Hk, Fd, D1 = Sz.shape
    Hq = phi_q.shape[1]
    if (phi_q.shape != (B, Hq, 1, Fd) or phi_k.shape != (B, Hk, 1, Fd) or v.shape != (B, Hk, 1, D1 - 1)
            or Hq % Hk or not Sz.is_contiguous()):
        raise ValueError(f"packed_recurrent_step: phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, "
                         f"v {tuple(v.shape)} do not fit the contiguous state Sz {tuple(Sz.shape)} "
                         "(expected (B, Hq, 1, F), (B, Hk, 1, F), (B, Hk, 1, D) with Sz (B, Hk, F, D + 1))")
    acc = Sz.dtype
    va = F.pad(v.to(acc), (0, 1), value=1.0)
    S3 = Sz.view(B * Hk, Fd, D1)
    S3.baddbmm_(phi_k.to(acc).reshape(B * Hk, Fd, 1), va.view(B * Hk, 1, D1))
    nd = torch.bmm(phi_q.to(acc).reshape(B * Hk, Hq // Hk, Fd), S3)  # (B * Hk, g, D + 1)
    num, den = nd.split((D1 - 1, 1), -1)
    return num.div_(den.clamp_min_(eps)).reshape(B, Hq, 1, D1 - 1).to(v.dtype)


def hybrid_recurrent_step(
    q: torch.Tensor,
    phi_q: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    state: Optional[State],
    gamma: Gamma = 0.5,
    scale: Optional[float] = None,
    eps: float = DEFAULT_EPS,
    window_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One decoding step of the hybrid layer: query t against its window and the state of older keys.

    Args:
        q: (B, Hq, d) or (B, Hq, 1, d); phi_q: (B, Hq, F) or (B, Hq, 1, F).
        k_window, v_window: (B, Hk, W, d/D), the keys/values of the window *including* token t
            (``W <= window``); ``Hk`` divides ``Hq`` (grouped-query attention, heads ordered as
            transformers' ``repeat_kv``).
        state: ``(S (B, Hk, F, D), z (B, Hk, F))`` of all keys older than the window, or None.
        gamma: scalar or (Hq,).
        window_valid: (B, W) bool, False for padding keys in the window (left-padded batches).
    Returns: y with q's leading shape and v's last dim, in v's dtype.
    """
    squeeze = q.dim() == 3
    if squeeze:
        q, phi_q = q.unsqueeze(2), phi_q.unsqueeze(2)
    if q.dim() != 4 or q.shape[2] != 1 or phi_q.shape[:3] != q.shape[:3]:
        raise ValueError(f"hybrid_recurrent_step takes one query: q {tuple(q.shape)}, phi_q {tuple(phi_q.shape)}")
    B, Hq, _, d = q.shape
    Hk, W = k_window.shape[1], k_window.shape[2]
    if Hq % Hk or k_window.shape[0] != B or v_window.shape[:3] != k_window.shape[:3] or W == 0:
        raise ValueError(f"window shapes do not fit: q {tuple(q.shape)}, k_window {tuple(k_window.shape)}, "
                         f"v_window {tuple(v_window.shape)} (key heads must divide query heads; W >= 1)")
    acc = acc_dtype(v_window)
    g_heads = Hq // Hk
    scale = d ** -0.5 if scale is None else scale
    qq = q[:, :, 0].to(acc).reshape(B, Hk, g_heads, d)
    s = (qq @ k_window.to(acc).transpose(-1, -2)) * scale  # (B, Hk, g, W)
    if window_valid is not None:
        s = s.masked_fill(~window_valid[:, None, None, :].to(s.device), float("-inf"))
    c = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
    gam = torch.as_tensor(gamma, device=q.device).to(acc)
    gam = gam.view(1, Hk, g_heads, 1) if gam.dim() == 1 else gam
    num = gam * (e @ v_window.to(acc))
    den = gam * e.sum(-1, keepdim=True)
    if state is not None:
        pq = phi_q[:, :, 0].to(acc).reshape(B, Hk, g_heads, -1)
        num = num + pq @ state[0].to(acc)
        den = den + pq @ state[1].to(acc).unsqueeze(-1)
    y = (num / den.clamp_min(eps)).reshape(B, Hq, 1, -1).to(v_window.dtype)
    return y[:, :, 0] if squeeze else y


def ring_hybrid_step(q: torch.Tensor, phi_q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                     valid: torch.Tensor, Sz: torch.Tensor, gamma: Gamma = 0.5, scale: Optional[float] = None,
                     eps: float = DEFAULT_EPS) -> torch.Tensor:
    """One query of the hybrid layer against a ring-buffer window and a packed linear state (decoding).

    Same value as :func:`hybrid_recurrent_step`; the cache layout differs: the window's slots may be in
    any order (a softmax over them is a sum), values carry a ones column so one matmul gives the
    window's numerator and denominator, and the state is packed as ``Sz = [S, z]``.

    Args:
        q: (B, Hq, 1, d); phi_q: (B, Hq, 1, F).
        k_win: (B, Hk, w, d); v_win: (B, Hk, w, D + 1) = ``[v, 1]``; valid: (B, w) bool, False for empty
            slots and padding (at least one slot per row must be valid: the current token's).
        Sz: (B, Hk, F, D + 1) state of the keys older than the window; ``Hk`` divides ``Hq``.
        gamma: scalar or (Hq,).
    Returns: y (B, Hq, 1, D) in ``v_win``'s dtype.
    """
    B, Hq, _, d = q.shape
    Hk, w, D1 = k_win.shape[1], k_win.shape[2], v_win.shape[-1]
    if (q.shape[2] != 1 or phi_q.shape[:3] != q.shape[:3] or Hq % Hk or v_win.shape[:3] != k_win.shape[:3]
            or valid.shape != (B, w) or Sz.shape[:2] != (B, Hk) or Sz.shape[-1] != D1):
        raise ValueError(f"ring_hybrid_step: shapes do not fit: q {tuple(q.shape)}, phi_q {tuple(phi_q.shape)}, "
                         f"k_win {tuple(k_win.shape)}, v_win {tuple(v_win.shape)}, valid {tuple(valid.shape)}, "
                         f"Sz {tuple(Sz.shape)}")
    acc = Sz.dtype
    g = Hq // Hk
    scale = d ** -0.5 if scale is None else scale
    s = (q.to(acc).reshape(B, Hk, g, d) * scale) @ k_win.to(acc).transpose(-1, -2)  # (B, Hk, g, w)
    s = s.masked_fill_(~valid[:, None, None, :], float("-inf"))
    e = s.sub_(s.amax(-1, keepdim=True)).exp_()
    gam = torch.as_tensor(gamma, device=q.device).to(acc)
    gam = gam.view(1, Hk, g, 1) if gam.dim() == 1 else gam
    nd = torch.matmul(phi_q.to(acc).reshape(B, Hk, g, -1), Sz).add_((e @ v_win.to(acc)).mul_(gam))
    num, den = nd.split((D1 - 1, 1), -1)
    return num.div_(den.clamp_min_(eps)).reshape(B, Hq, 1, D1 - 1).to(v_win.dtype)
