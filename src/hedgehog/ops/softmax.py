"""Softmax attention: the teacher. The weights are materialised (reference / loss / metrics);
the output path uses torch SDPA."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hedgehog.ops.masks import causal_drop_mask, window_drop_mask


def softmax_attention_weights(
    q: torch.Tensor, k: torch.Tensor, causal: bool = True, scale: Optional[float] = None, q_offset: int = 0,
    q_positions: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Rows of ``softmax(q k^T * scale)`` in float32 (float64 for float64 inputs).

    Args:
        q: (B, H, Nq, d); k: (B, H, Nk, d).
        q_offset: absolute position of q's first row, so query ``i`` sees keys ``j <= q_offset + i``
            (lets the loss process a block of queries against the keys it can see).
        q_positions: (Nq,) absolute positions of the rows instead (any subset of rows); overrides q_offset.
        sliding_window: the teacher's own window (Mistral, Gemma2's local layers, ...): query ``i`` sees only
            keys ``j > i - sliding_window``, as transformers' sliding-window masks do.
        softcap: the teacher's logit soft-cap (Gemma2): scores ``softcap * tanh(s / softcap)`` before the softmax.
    Returns: (B, H, Nq, Nk); masked entries are exactly 0.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.to(acc) * scale) @ k.to(acc).transpose(-1, -2)  # scale the (Nq, d) side, not the (Nq, Nk) scores
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if causal:
        s.masked_fill_(causal_drop_mask(s.shape[-2], s.shape[-1], s.device, q_offset, q_positions), float("-inf"))
    if sliding_window is not None:
        s.masked_fill_(window_drop_mask(s.shape[-2], s.shape[-1], sliding_window, s.device, q_offset, q_positions),
                       float("-inf"))
    return torch.softmax(s, dim=-1)


def softmax_attention(q, k, v, causal: bool = True, scale: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """(B, H, N, d) x 3 -> (B, H, N, D): exact attention via torch SDPA (through the weights when the teacher has
    a sliding window or a soft-cap)."""
    if sliding_window is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    p = softmax_attention_weights(q, k, causal=causal, scale=scale, sliding_window=sliding_window, softcap=softcap)
    return (p @ v.to(p.dtype)).to(v.dtype)
