"""What every feature map is: the registry (:func:`register_feature_map`) and the base classes. The maps
themselves are :mod:`hedgehog.modules.feature_maps` (Hedgehog and the simple ones; the lookup by name) and
:mod:`hedgehog.modules.kernel_maps` (Performer, cosFormer, Taylor)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

import torch
import torch.nn as nn

_REGISTRY: Dict[str, Type["FeatureMap"]] = {}


def register_feature_map(name: str) -> Callable:
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"feature map {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class FeatureMap(nn.Module):
    """Base class. Subclasses set ``feature_dim`` and implement ``forward(x, positions=None)``."""

    name = "base"
    trainable = False
    uses_positions = False  # True for maps that read ``positions`` (callers may skip building them otherwise)

    @property
    def blockwise(self) -> bool:
        """True when phi of a slice of tokens equals that slice of phi (no dependence on the call's
        length), so ops may apply the map block by block."""
        return True

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.feature_dim = head_dim

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{self.name} feature map expects (batch, {self.num_heads}, seq, {self.head_dim}), "
                f"got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class _PerHeadLinear(FeatureMap):
    """Holds per-head ``W: (H, d, F)`` and ``b: (H, F)``, identity-initialised (rectangular eye).

    Wider than the head (``feature_dim > head_dim``): the first ``head_dim`` columns are the identity and
    the others random (N(0, 1/d) entries, so unit-norm columns like the identity's), drawn from torch's
    global generator. Zero extra columns would be a trap: columns that start equal see equal inputs and
    get equal gradients under the (permutation-symmetric) softmax or ReLU, so they would stay clones of
    one another for ever and the extra features would add nothing.
    """

    trainable = True

    def __init__(self, head_dim: int, num_heads: int, feature_dim: Optional[int] = None, bias: bool = True):
        super().__init__(head_dim, num_heads)
        f = feature_dim or head_dim
        if f < 1:
            raise ValueError(f"feature_dim must be positive, got {f}")
        self.proj_dim = f
        w = torch.eye(head_dim, f).repeat(num_heads, 1, 1)
        if f > head_dim:
            w[:, :, head_dim:] = torch.randn(num_heads, head_dim, f - head_dim) * head_dim ** -0.5
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(num_heads, f)) if bias else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = _float(x)
        u = x @ self.weight.to(x.dtype)
        if self.bias is not None:
            u = u + self.bias.to(x.dtype)[None, :, None, :]
        return u
