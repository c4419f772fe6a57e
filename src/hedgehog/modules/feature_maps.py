"""Feature maps phi: (B, H, N, d) -> (B, H, N, F), one registry selected by name.

All maps give positive kernels phi(q).phi(k) >= 0, so the linear-attention denominator is
non-negative: every map's features are non-negative except Taylor's, whose kernel
1 + s + s^2/2 is positive for every s.
Every ``forward`` takes an optional ``positions`` argument ((N,) or (B, N) absolute token
positions); only position-dependent maps (cosFormer) read it, so callers can pass it uniformly.
Such maps set ``uses_positions = True``: decoding builds positions only for them (a custom map that
reads ``positions`` must declare it, or it gets None while decoding).

Half-precision inputs are computed in float32 and returned in float32: the features feed
sums over many tokens, and the ops promote to float32 anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hedgehog.modules import kernel_maps  # noqa: F401  (registers performer, cosformer, taylor)
from hedgehog.modules.feature_map_base import _REGISTRY, FeatureMap, _float, _PerHeadLinear, register_feature_map

__all__ = ["FeatureMap", "HedgehogFeatureMap", "available_feature_maps", "get_feature_map", "hedgehog_pair_features",
           "register_feature_map"]


def available_feature_maps() -> list:
    return sorted(_REGISTRY)


def get_feature_map(name: str, head_dim: int, num_heads: int, **kwargs) -> "FeatureMap":
    """Build the feature map registered as ``name`` for ``num_heads`` heads of size ``head_dim``."""
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown feature map {name!r}; registered feature maps: {', '.join(available_feature_maps())}"
        )
    if head_dim < 1 or num_heads < 1:
        raise ValueError(f"head_dim and num_heads must be positive, got {head_dim}, {num_heads}")
    return _REGISTRY[name](head_dim=head_dim, num_heads=num_heads, **kwargs)


@register_feature_map("hedgehog")
class HedgehogFeatureMap(_PerHeadLinear):
    """Hedgehog (Zhang et al. 2024): ``phi(x) = [softmax(Wx+b), softmax(-(Wx+b))]`` over features.

    Per-head ``W (H, d, d')`` initialised to identity, ``F = 2 d'``. The softmax over the feature axis
    is the numerically stable form of the paper's exp map: it divides each token's features by
    their sum, which for queries cancels in the normalisation and for keys is the variant used
    in the paper's released code. Stable for any input magnitude (|x| ~ 1e3 included).
    """

    def __init__(self, head_dim: int, num_heads: int, feature_dim: Optional[int] = None, bias: bool = True):
        super().__init__(head_dim, num_heads, feature_dim, bias)
        self.feature_dim = 2 * self.proj_dim

    def _signed_params(self, dtype):
        """([W, -W] (H, d, 2d'), [b, -b] (H, 1, 2d') or None); cached outside autograd (decoding calls this
        once per token per layer) and rebuilt whenever the parameters change (version counter or storage)."""
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and w.requires_grad:
            b2 = None if b is None else torch.cat([b, -b], -1).to(dtype).unsqueeze(1)
            return torch.cat([w, -w], -1).to(dtype), b2
        key = (dtype, w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()))
        cached = self.__dict__.get("_signed_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w2 = torch.cat([w, -w], -1).to(dtype)
                b2 = None if b is None else torch.cat([b, -b], -1).to(dtype).unsqueeze(1)
            self.__dict__["_signed_cache"] = cached = (key, w2, b2)
        return cached[1], cached[2]

    def fused_softmax_params(self):
        """What the fused CPU kernel (hedgehog.ops.cpu_kernel) computes this map from: ``([W, -W] (H, d, F),
        [b, -b] (H, F) or an empty tensor)`` in float32. None for a subclass, which may compute something else."""
        if type(self) is not HedgehogFeatureMap:
            return None
        w2, b2 = self._signed_params(torch.float32)
        b = w2.new_empty(0) if b2 is None else b2.squeeze(1)
        return w2.contiguous(), b.contiguous()

    def forward(self, x, positions=None):
        self._check(x)
        x = _float(x)
        # One matmul against [W, -W] gives [u, -u] side by side; a softmax over the (2, d') view
        # then yields both halves without a concat or negation pass over the features.
        w2, b2 = self._signed_params(x.dtype)
        B, H, N, d = x.shape
        xh = x.view(H, N, d) if B == 1 else x.transpose(0, 1).reshape(H, B * N, d)  # heads as the batch
        u = xh @ w2 if b2 is None else torch.baddbmm(b2, xh, w2)  # b2 (H, 1, 2d') broadcasts over tokens
        phi = torch.softmax(u.view(H, B * N, 2, self.proj_dim), dim=-1)
        return phi.view(1, H, N, 2 * self.proj_dim) if B == 1 else phi.view(H, B, N, -1).transpose(0, 1)


def hedgehog_pair_features(fq: "HedgehogFeatureMap", fk: "HedgehogFeatureMap", q: torch.Tensor, k: torch.Tensor):
    """``(fq(q), fk(k))`` for one decoding token (B = 1, N = 1, no autograd) in one matmul and one softmax.

    Decoding calls both maps once per token per layer on a handful of values, where the cost is the
    number of ops, not the arithmetic; the two maps' signed weights are stacked once (cached on
    ``fq``, rebuilt when either map's parameters change). Returns None when the fast path does not
    apply (other shapes, autograd, maps of different sizes or without bias); callers then call the maps.
    """
    if (torch.is_grad_enabled() or q.shape[0] != 1 or q.shape[2] != 1 or k.shape[2] != 1 or fq.bias is None
            or fk.bias is None or fq.proj_dim != fk.proj_dim or q.dtype != k.dtype or q.shape[-1] != k.shape[-1]):
        return None
    wq, bq = fq._signed_params(q.dtype)
    wk, bk = fk._signed_params(q.dtype)
    key = (fq.__dict__["_signed_cache"][0], fk.__dict__["_signed_cache"][0])  # both maps' parameter versions
    cached = fq.__dict__.get("_pair_cache")
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([wq, wk]), torch.cat([bq, bk]))
        fq.__dict__["_pair_cache"] = cached
    hq, hk = q.shape[1], k.shape[1]
    if cached[1].shape[0] != hq + hk:
        return None
    x = torch.cat([q.reshape(hq, 1, -1), k.reshape(hk, 1, -1)])
    phi = torch.softmax(torch.baddbmm(cached[2], x, cached[1]).view(hq + hk, 2, fq.proj_dim), dim=-1)
    phi = phi.view(1, hq + hk, 1, 2 * fq.proj_dim)
    return phi[:, :hq], phi[:, hq:]


@register_feature_map("hedgehog_exp")
class HedgehogExpFeatureMap(_PerHeadLinear):
    """The paper's ``[exp(Wx+b), exp(-(Wx+b))]`` with max-subtraction.

    Each token's features are scaled by ``exp(-max_f |Wx+b|_f)`` so nothing overflows. For queries
    the scale cancels in the normalisation exactly; for keys it is a per-key reweighting (as in
    the reference implementation), which training absorbs.
    """

    def __init__(self, head_dim: int, num_heads: int, feature_dim: Optional[int] = None, bias: bool = True):
        super().__init__(head_dim, num_heads, feature_dim, bias)
        self.feature_dim = 2 * self.proj_dim

    def forward(self, x, positions=None):
        u = self.project(x)
        m = u.abs().amax(-1, keepdim=True).detach()
        return torch.cat([torch.exp(u - m), torch.exp(-u - m)], dim=-1)


@register_feature_map("t2r")
class T2RFeatureMap(_PerHeadLinear):
    """T2R (Kasai et al. 2021): trainable ``relu(Wx + b)``, per head, identity-initialised
    (so it starts as the plain ReLU map)."""

    def __init__(self, head_dim: int, num_heads: int, feature_dim: Optional[int] = None, bias: bool = True):
        super().__init__(head_dim, num_heads, feature_dim, bias)
        self.feature_dim = self.proj_dim

    def forward(self, x, positions=None):
        return F.relu(self.project(x))


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """1 + ELU (Katharopoulos et al. 2020)."""

    def forward(self, x, positions=None):
        self._check(x)
        return F.elu(_float(x)) + 1.0


@register_feature_map("relu")
class ReluFeatureMap(FeatureMap):
    """ReLU. Rows whose features are all zero hit the ops' denominator guard and output 0."""

    def forward(self, x, positions=None):
        self._check(x)
        return F.relu(_float(x))
