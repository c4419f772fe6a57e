"""Grouped-query heads: a key/value head serves ``n_rep`` query heads. One way to repeat them, used for tensors
(:func:`repeat_heads`) and for key feature maps (:class:`GroupedKeyMap`), and the scaled view of a map that the
hybrid kernel takes (:class:`ScaledMap`)."""
from __future__ import annotations

import torch
import torch.nn as nn


def repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, N, d) -> (B, Hk * n_rep, N, d): key head h serves query heads h * n_rep ... h * n_rep + n_rep - 1."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


class GroupedKeyMap(nn.Module):
    """Applies a per-KV-head key map and repeats its features to the query heads of each group."""

    def __init__(self, fm: nn.Module, n_rep: int):
        super().__init__()
        self.fm = fm
        self.n_rep = n_rep
        self.feature_dim = fm.feature_dim
        self.blockwise = getattr(fm, "blockwise", True)

    def forward(self, k, positions=None):
        return repeat_heads(self.fm(k, positions), self.n_rep)

    def wrapped_map(self):
        """``(map, scale, every, rep)``: what a kernel computes instead of calling this (see :class:`ScaledMap`)."""
        return self.fm, 1.0, 1, self.n_rep


class ScaledMap:
    """``fm(x[:, ::every] * scale, positions)``: a map on raw (possibly head-repeated) q/k for the hybrid kernel,
    which needs the raw q/k for its softmax window and the scaled ones for the features."""

    def __init__(self, fm, scale: float, every: int = 1):
        self.fm, self.scale, self.every = fm, scale, every
        self.feature_dim = fm.feature_dim
        self.blockwise = getattr(fm, "blockwise", True)

    def wrapped_map(self):
        """``(map, scale, every, rep)``: this is ``map`` on ``x[:, ::every] * scale``, its heads repeated ``rep``
        times; kernels that apply the map themselves read it here (hedgehog.ops.triton_fused)."""
        inner = getattr(self.fm, "wrapped_map", None)
        fm, scale, _, rep = inner() if callable(inner) else (self.fm, 1.0, 1, 1)
        return fm, self.scale * scale, self.every, rep

    def __call__(self, x, positions=None):
        if self.every > 1:
            x = x[:, ::self.every]
        return self.fm(x * self.scale if self.scale != 1.0 else x, positions)
