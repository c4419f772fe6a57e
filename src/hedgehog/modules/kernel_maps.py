"""Feature maps with a closed form or random features (registered by name like the others): Performer's
positive random features, cosFormer's position reweighting, Taylor's second-order expansion of exp."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.modules.feature_map_base import FeatureMap, _float, register_feature_map


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
