"""The one place that says which keys a query row sees: causal, sliding-window and hybrid masks.

Rows are queries at absolute positions (by default the last ``nq`` of ``nk``, as in a prefill continued from a
cache; ``q_offset`` puts the first row elsewhere; ``q_positions`` names any subset of rows); columns are keys
0..nk-1. Every mask is (nq, nk) bool. A row at position n sees keys ``i <= n``; with a window w, the exact
(softmax) part of the hybrid is ``n - w < i <= n`` and the linear part ``i <= n - w``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def row_positions(nq: int, nk: int, device, q_offset: Optional[int] = None,
                  q_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(nq,) absolute positions of the rows: ``q_positions``, else ``q_offset + 0..nq-1``, else the last nq."""
    if q_positions is not None:
        return q_positions.to(device)
    start = nk - nq if q_offset is None else q_offset
    return torch.arange(start, start + nq, device=device)


def _grid(nq, nk, device, q_offset, q_positions):
    return row_positions(nq, nk, device, q_offset, q_positions)[:, None], torch.arange(nk, device=device)[None, :]


def causal_mask(nq: int, nk: int, device, q_offset: Optional[int] = None,
                q_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """True where key i is visible to the row (``i <= n``)."""
    n, i = _grid(nq, nk, device, q_offset, q_positions)
    return i <= n


def causal_drop_mask(nq: int, nk: int, device, q_offset: Optional[int] = None,
                     q_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """True where key i is in the row's future (masked out)."""
    return ~causal_mask(nq, nk, device, q_offset, q_positions)


def window_drop_mask(nq: int, nk: int, window: int, device, q_offset: Optional[int] = None,
                     q_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """True where key i is at least ``window`` positions behind the row (``i <= n - w``: outside its window)."""
    n, i = _grid(nq, nk, device, q_offset, q_positions)
    return i <= n - window


def hybrid_masks(nq: int, nk: int, window: int, device, q_positions: Optional[torch.Tensor] = None,
                 sinks: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(exact, linear)``: the keys of the exact softmax part, ``n - w < i <= n`` and the ``sinks`` first keys
    ``i < sinks`` (attention sinks, once they have left the window), and the older keys of the linear part,
    ``sinks <= i <= n - w``."""
    older = window_drop_mask(nq, nk, window, device, q_positions=q_positions)
    exact = causal_mask(nq, nk, device, q_positions=q_positions) & ~older
    if sinks:
        sink = older & (torch.arange(nk, device=device) < sinks)[None, :]
        return exact | sink, older & ~sink
    return exact, older


def linear_key_age(row_pos: torch.Tensor, nk: int, window: int) -> torch.Tensor:
    """(R, nk) ``n - w - i``: the steps key ``i`` has spent in a decayed linear state when the row at position ``n``
    (``row_pos`` (R,)) reads it, so its weight there is ``lambda^(n - w - i)``; 0 where the key has not left the
    window (those entries are masked anyway)."""
    return (row_pos[:, None] - window - torch.arange(nk, device=row_pos.device)[None, :]).clamp_min(0)
