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

import math
from typing import Callable, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

_REGISTRY: Dict[str, Type["FeatureMap"]] = {}


def register_feature_map(name: str) -> Callable:
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"feature map {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


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


@register_feature_map("performer")
class PerformerFeatureMap(FeatureMap):
    """Performer FAVOR+ positive random features (Choromanski et al. 2021).

    ``phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * scale^(1/2)``, so that
    ``E[phi(q) . phi(k)] = exp(scale * q . k)`` (``scale = d^-1/2`` by default). Per-head orthogonal
    Gaussian projections ``(H, d, m)`` (blocks of QR-orthogonalised rows, chi-distributed norms).
    No max-subtraction is needed: ``w^T x - |x|^2/2 <= |w|^2/2`` for every x, so exp cannot overflow.

    ``redraw()`` resamples the features; ``redraw_every=n`` does it every n training forwards.
    The projection is a buffer, so a saved model reloads the same features.
    """

    def __init__(self, head_dim: int, num_heads: int, num_features: Optional[int] = None,
                 scale: Optional[float] = None, redraw_every: int = 0, seed: Optional[int] = None):
        super().__init__(head_dim, num_heads)
        self.feature_dim = num_features or head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.redraw_every = redraw_every
        self._calls = 0
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("projection", self._sample())

    def _sample(self) -> torch.Tensor:
        d, m, g = self.head_dim, self.feature_dim, self._gen
        heads = []
        for _ in range(self.num_heads):
            blocks = []
            for _ in range(-(-m // d)):
                qmat, r = torch.linalg.qr(torch.randn(d, d, generator=g))
                # Householder QR fixes the sign of R's diagonal, which biases Q's columns; this
                # correction makes Q Haar-distributed (else the kernel estimate is biased).
                blocks.append((qmat * torch.sign(torch.diagonal(r))).T)
            w = torch.cat(blocks, 0)[:m]  # (m, d) orthonormal rows within each block
            norms = torch.randn(m, d, generator=g).norm(dim=1, keepdim=True)
            heads.append((w * norms).T)  # (d, m)
        return torch.stack(heads)

    @torch.no_grad()
    def redraw(self) -> None:
        self.projection.copy_(self._sample().to(self.projection))

    def forward(self, x, positions=None):
        self._check(x)
        if self.training and self.redraw_every > 0:
            if self._calls % self.redraw_every == 0 and self._calls > 0:
                self.redraw()
            self._calls += 1
        x = _float(x) * self.scale ** 0.5
        u = torch.einsum("bhnd,hdm->bhnm", x, self.projection.to(x.dtype))
        u = u - 0.5 * (x * x).sum(-1, keepdim=True)
        return torch.exp(u) / math.sqrt(self.feature_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", redraw_every={self.redraw_every}"


@register_feature_map("cosformer")
class CosformerFeatureMap(FeatureMap):
    """cosFormer (Qin et al. 2022): ReLU features re-weighted by ``cos(pi/2 * (i - j) / M)``.

    Decomposed as ``phi(x_i) = [relu(x_i) cos(a_i), relu(x_i) sin(a_i)]`` with ``a_i = pi i / (2M)``,
    so ``phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) * cos(a_i - a_j)``. ``positions`` are absolute
    token indices (default ``0..N-1``). ``M = max_len`` if given, else the call's sequence length
    as in the paper; decoding token by token needs a fixed ``max_len`` >= the longest sequence
    (beyond it the cosine goes negative).
    """

    uses_positions = True

    def __init__(self, head_dim: int, num_heads: int, max_len: Optional[int] = None):
        super().__init__(head_dim, num_heads)
        self.feature_dim = 2 * head_dim
        self.max_len = max_len

    @property
    def blockwise(self) -> bool:
        return self.max_len is not None

    def forward(self, x, positions=None):
        self._check(x)
        x = _float(x)
        n = x.shape[2]
        if positions is None:
            positions = torch.arange(n, device=x.device)
        positions = positions.to(device=x.device, dtype=x.dtype)
        m = self.max_len if self.max_len is not None else n
        angle = (math.pi / 2) * positions / m
        if angle.dim() == 1:
            angle = angle[None, None, :, None]
        else:  # (B, N)
            angle = angle[:, None, :, None]
        r = F.relu(x)
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_len={self.max_len}"


@register_feature_map("taylor")
class TaylorFeatureMap(FeatureMap):
    """2nd-order Taylor expansion of exp (as in Based, Arora et al. 2024).

    ``phi(x) = [1, x', x'_i^2/sqrt(2) (i), x'_i x'_j (i<j)]`` with ``x' = x * scale^(1/2)``, so
    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` exactly, ``s = scale * q . k`` (``scale = d^-1/2`` default).
    Uses the upper triangle of ``x x^T`` (``F = 1 + d + d(d+1)/2``) instead of all d^2 entries:
    the same inner products at about half the feature dimension. ``1 + s + s^2/2 > 0`` for all s.

    ``feature_dim = p`` (``!= head_dim``): x first goes through a trainable per-head projection ``(H, d, p)``
    (random N(0, 1/d) init), as Based sizes its state with a small q/k "feature dimension" (16 there), so
    ``F = 1 + p + p(p+1)/2`` and ``scale = p^-1/2``. The projection makes q's and k's maps differ, so the
    closed-form :meth:`kernel` is only for the unprojected map.
    """

    def __init__(self, head_dim: int, num_heads: int, scale: Optional[float] = None,
                 feature_dim: Optional[int] = None):
        super().__init__(head_dim, num_heads)
        p = feature_dim or head_dim
        if p < 1:
            raise ValueError(f"feature_dim must be positive, got {p}")
        self.proj_dim = p
        self.weight = None
        if p != head_dim:
            self.weight = nn.Parameter(torch.randn(num_heads, head_dim, p) * head_dim ** -0.5)
            self.trainable = True
        self.scale = p ** -0.5 if scale is None else scale
        self.feature_dim = 1 + p + p * (p + 1) // 2
        iu = torch.triu_indices(p, p)
        self.register_buffer("_iu0", iu[0], persistent=False)
        self.register_buffer("_iu1", iu[1], persistent=False)
        self.register_buffer("_diag", iu[0] == iu[1], persistent=False)

    @property
    def has_kernel(self) -> bool:
        """The closed form ``1 + s + s^2/2`` of q.k applies (no projection)."""
        return self.weight is None

    def forward(self, x, positions=None):
        self._check(x)
        x = _float(x)
        if self.weight is not None:
            x = x @ self.weight.to(x.dtype)
        x = x * self.scale ** 0.5
        # coefficient built in x's dtype: a float32 1/sqrt(2) would cap float64 accuracy at 1e-7
        coef = torch.where(self._diag, x.new_tensor(math.sqrt(0.5)), x.new_tensor(1.0))
        second = x[..., self._iu0] * x[..., self._iu1] * coef
        return torch.cat([torch.ones_like(x[..., :1]), x, second], dim=-1)

    def kernel(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``phi(q) phi(k)^T = 1 + s + s^2/2`` without the features: (B,H,Nq,d), (B,H,Nk,d) -> (B,H,Nq,Nk).

        Costs O(Nq Nk d) instead of O(Nq Nk F) with F = 1 + d + d(d+1)/2: the quadratic form is the cheap
        one for short sequences (as fla's ``parallel_based``), and it never materialises the features.
        """
        if not self.has_kernel:
            raise ValueError("kernel() is the unprojected map's closed form; a projected Taylor map "
                             "(feature_dim != head_dim) goes through its features")
        self._check(q)
        self._check(k)
        s = (_float(q) @ _float(k).transpose(-1, -2)) * self.scale
        return torch.addcmul(s + 1.0, s, s, value=0.5)

    def extra_repr(self) -> str:
        proj = f", proj_dim={self.proj_dim}" if self.weight is not None else ""
        return super().extra_repr() + proj + f", scale={self.scale:.4g}"
