"""Attention-fidelity metrics on materialised weight rows (B, H, Nq, Nk).

Used to check the paper's findings: softmax attention is *spiky* (low row entropy) and
*monotonic* in q.k; a good linear attention matches both (low KL to softmax).
Masked entries (causal) must be exactly 0 in the weight tensors; ``mask`` says which are valid.
These functions materialise N x N rows: meant for analysis at moderate N (a few thousand).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from hedgehog.ops import quadratic_linear_attention
from hedgehog.ops.masks import causal_mask
from hedgehog.ops.settings import HybridSettings, TeacherSettings
from hedgehog.ops.softmax import softmax_attention_weights


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, y)


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row: (..., N) -> (...). 0 * log 0 = 0."""
    return -_xlogy(p, p).sum(-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) per row (nats): (..., N) -> (...). ``q`` is clamped at eps where p > 0."""
    return (_xlogy(p, p) - _xlogy(p, q.clamp_min(eps))).sum(-1)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis, ties sharing their average rank (as Spearman requires)."""
    n = x.shape[-1]
    vs, idx = x.sort(-1)
    pos = torch.arange(n, device=x.device).expand_as(vs)
    starts = torch.ones_like(vs, dtype=torch.bool)
    starts[..., 1:] = vs[..., 1:] != vs[..., :-1]
    ends = torch.ones_like(vs, dtype=torch.bool)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(-1).cummin(-1).values.flip(-1)
    avg = (first + last).to(torch.float64) / 2
    return torch.empty_like(avg).scatter_(-1, idx, avg)


def spearman_rows(scores: torch.Tensor, weights: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spearman rank correlation of ``scores`` vs ``weights`` within each row, over valid entries.

    Args: scores, weights (..., N); mask (..., N) or broadcastable bool (None = all valid).
    Returns: (...) float64; NaN for rows with fewer than 2 valid entries or a constant row.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.expand_as(scores)
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    # Invalid entries all rank last (and tie among themselves), leaving valid ranks untouched.
    rs = _average_ranks(torch.where(mask, scores, inf))
    rw = _average_ranks(torch.where(mask, weights.to(scores.dtype), inf))
    m = mask.to(torch.float64)
    cnt = m.sum(-1, keepdim=True)
    mu_s = (rs * m).sum(-1, keepdim=True) / cnt
    mu_w = (rw * m).sum(-1, keepdim=True) / cnt
    ds, dw = (rs - mu_s) * m, (rw - mu_w) * m
    cov = (ds * dw).sum(-1)
    var = (ds * ds).sum(-1).sqrt() * (dw * dw).sum(-1).sqrt()
    out = cov / var
    return torch.where((cnt.squeeze(-1) >= 2) & (var > 0), out, torch.full_like(out, float("nan")))


def attention_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    causal: bool = True,
    teacher: Optional[TeacherSettings] = None,
    hybrid: Optional[HybridSettings] = None,
) -> Dict[str, torch.Tensor]:
    """Per-head fidelity of linear attention to the softmax teacher, averaged over batch and rows.

    Args: q, k (B, H, N, d); phi_q, phi_k (B, H, N, F); ``teacher`` the softmax rows' scale and the model's own
    sliding window / soft-cap (its rows are the model's real attention); ``hybrid``: the student is the hybrid
    layer (exact softmax on the last ``window`` keys and the first ``sinks``, its linear state decayed).
    Returns dict of (H,) float64 tensors: ``kl`` KL(softmax || linear), ``entropy_softmax``,
    ``entropy_linear``, ``spearman_linear`` (rank correlation of q.k vs linear weight per row;
    rows with < 2 keys are skipped) and ``spearman_softmax`` (1 by construction; a sanity check).
    """
    teacher = teacher or TeacherSettings()
    with torch.no_grad():
        scale_ = teacher.scale_for(q.shape[-1])
        p = softmax_attention_weights(q, k, causal=causal, scale=scale_, **teacher.masking()).to(torch.float64)
        v_dummy = phi_k.new_zeros(phi_k.shape[:-1] + (1,), dtype=torch.float64)
        if hybrid is not None:
            from hedgehog.ops.hybrid import quadratic_hybrid_attention

            g = hybrid.gamma.double() if torch.is_tensor(hybrid.gamma) else hybrid.gamma
            _, w = quadratic_hybrid_attention(q.double(), k.double(), v_dummy, phi_q.double(), phi_k.double(),
                                              hybrid.window, g, scale=scale_, return_weights=True, sinks=hybrid.sinks,
                                              decay=None if hybrid.decay is None else hybrid.decay.double())
        else:
            _, w = quadratic_linear_attention(phi_q.double(), phi_k.double(), v_dummy, causal=causal,
                                              return_weights=True)
        s = (q.double() @ k.double().transpose(-1, -2)) * scale_
        n = q.shape[2]
        mask = causal_mask(n, n, q.device) if causal else torch.ones(n, n, dtype=torch.bool, device=q.device)

        def mean_rows(x):  # (B,H,N) -> (H,), ignoring NaN rows
            return torch.nanmean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=-1)

        return {
            "kl": mean_rows(kl_divergence(p, w)),
            "entropy_softmax": mean_rows(row_entropy(p)),
            "entropy_linear": mean_rows(row_entropy(w)),
            "spearman_linear": mean_rows(spearman_rows(s, w, mask)),
            "spearman_softmax": mean_rows(spearman_rows(s, p, mask)),
        }


def paired_bootstrap_ratio(nll_a: torch.Tensor, nll_b: torch.Tensor, block: int = 16, samples: int = 2000,
                           seed: int = 0, level: float = 0.95) -> dict:
    """Perplexity ratio ``exp(mean(a) - mean(b))`` of two models on the same windows, with a paired block bootstrap.

    ``nll_a``, ``nll_b``: per-window mean NLL (same windows, same order). Neighbouring windows of a text are
    correlated (same scene, same speakers), so the resampling draws runs of ``block`` consecutive windows
    with replacement, both models together. Returns ``ratio``, ``lo``, ``hi`` (the ``level`` percentile
    interval), ``p_a_better`` (share of resamples where a's perplexity is lower) and ``windows``.
    """
    a, b = torch.as_tensor(nll_a, dtype=torch.float64), torch.as_tensor(nll_b, dtype=torch.float64)
    if a.dim() != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need two equal-length 1-d per-window NLL vectors; got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("per-window NLL contains inf/NaN: a model diverged; evaluate finished, finite runs")
    if block < 1 or samples < 1 or not 0 < level < 1:
        raise ValueError(f"block ({block}) and samples ({samples}) must be >= 1 and level ({level}) in (0, 1)")
    d = a - b
    n = d.numel()
    block = min(block, n)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - block + 1, (samples, -(-n // block)), generator=g)
    idx = (starts[..., None] + torch.arange(block)).reshape(samples, -1)[:, :n]
    means = d[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return {"ratio": math.exp(d.mean().item()), "lo": math.exp(lo), "hi": math.exp(hi),
            "p_a_better": (means < 0).double().mean().item(), "windows": n}
