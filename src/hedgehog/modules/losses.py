"""Distillation losses: train feature maps so linear attention mimics the layer's softmax attention.

``attention_distillation_loss`` is the Hedgehog paper's objective: cross-entropy between the
teacher's attention rows ``softmax(q k^T / sqrt(d))`` and the student's normalised linear-attention
rows ``phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j')``, averaged over (batch, heads, query rows).
It is computed over blocks of queries, each block under activation checkpointing, so memory is
O(block * N) in the forward *and* the backward pass rather than O(N^2).

``attention_output_mse_loss`` is LoLCATs' variant: MSE between the two attention *outputs*;
it never materialises weights at all.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from hedgehog.ops import linear_attention, softmax_attention
from hedgehog.ops.hybrid import hybrid_attention
from hedgehog.ops.masks import causal_drop_mask, hybrid_masks, linear_key_age
from hedgehog.ops.settings import HybridSettings, TeacherSettings
from hedgehog.ops.softmax import softmax_attention_weights

LOSSES = ("ce", "mse")


def _check_qk(q, k, phi_q, phi_k):
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (batch, heads, seq, head_dim) with equal shapes, got {tuple(q.shape)} "
            f"and {tuple(k.shape)}; repeat grouped k heads to the query heads first"
        )
    if phi_q.shape[:3] != q.shape[:3] or phi_k.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"features {tuple(phi_q.shape)}/{tuple(phi_k.shape)} do not match q/k {tuple(q.shape)} "
            "in (batch, heads, seq)"
        )


def _block_ce(q_blk, k_vis, pq_blk, pk_vis, row_pos, causal: bool, teacher: TeacherSettings, eps: float,
              hybrid: Optional[HybridSettings] = None):
    """Summed cross-entropy of a set of query rows (absolute positions ``row_pos``) against their keys.

    With student rows ``w_ij = a_ij / den_i`` and teacher rows summing to 1,
    ``-sum_ij p_ij log w_ij = sum_i log den_i - sum_ij p_ij log a_ij``. The first term comes from running key
    sums, except for blocks of few rows against wide features, where masked row sums of the scores are cheaper
    (this loss dominates stage-1 time).
    """
    with torch.no_grad():
        p = softmax_attention_weights(q_blk, k_vis, causal=causal, scale=teacher.scale, q_positions=row_pos,
                                      **teacher.masking())
    acc = p.dtype
    if hybrid is not None:
        return _hybrid_block_ce(q_blk, k_vis, pq_blk, pk_vis, row_pos, p, teacher.scale, hybrid, eps)
    pq, pk = pq_blk.to(acc), pk_vis.to(acc)
    if causal and len(row_pos) < 2 * pq.shape[-1]:
        # Few rows against wide features (stage 1's row subsets: 128 rows, F = 128): running sums over every
        # key and their backward cost more than masked row sums of the scores (measured: 10% slower stage 1)
        a = (pq @ pk.transpose(-1, -2)).masked_fill_(
            causal_drop_mask(p.shape[-2], p.shape[-1], p.device, q_positions=row_pos), 0.0)
        log_den = a.sum(-1).clamp_min(eps).log()
        return log_den.sum() - torch.vdot(p.reshape(-1), a.clamp_min(eps).log().reshape(-1))
    # den_i = phi(q_i) . (sum of the phi(k_j) row i sees): a running key sum, O(keys x F), no rows x keys pass
    ksum = pk.cumsum(-2)[:, :, row_pos] if causal else pk.sum(-2, keepdim=True)
    log_den = (pq * ksum).sum(-1).clamp_min(eps).log()
    # the teacher's rows are exactly 0 on future keys, so sum_ij p_ij log a_ij needs no causal mask on a
    return log_den.sum() - _TeacherLogKernel.apply(pq, pk, p, eps)


def _hybrid_block_ce(q_blk, k_vis, pq, pk, row_pos, p, scale: float, hybrid: HybridSettings, eps: float):
    """:func:`_block_ce` for the hybrid student (:func:`hedgehog.ops.hybrid.hybrid_weights`), term by term.

    Row i's weights are ``a_ij = g exp(s_ij - c_i)`` on its exact keys E_i (window and sinks) and
    ``lambda^age_ij A_ij`` on the older keys O_i (``A = phi_q phi_k^T``, ``age_ij = i - w - j``), so with
    ``W_i = sum_E exp(s - c)`` and ``L_i = sum_O lambda^age A``:

        -sum_j p_ij log(a_ij / den_i) = log(g W_i + L_i) - log g sum_E p - sum_E p (s - c)
                                        - log lambda sum_O p age - sum_O p log A

    The teacher-only pieces (``W``, the sums of ``p``) take no gradient; the (rows x keys) terms of the student
    are one :class:`_HybridLinearTerms` (one matmul and a few passes each way). This is most of stage 1's time:
    autograd through ``hybrid_weights`` made many more passes over the rows x keys and ran 1.29x slower on
    SmolLM2's 30 layers (``scripts/stage1_loss_speed.py``). The one difference
    from ``log(max(lambda^age A, eps))`` is that the clamp applies to ``A`` alone, so a weight made tiny by the
    decay still passes its gradient to lambda (the exact cross-entropy).
    """
    acc = p.dtype
    B, H, nq, _ = q_blk.shape
    nk = k_vis.shape[2]
    win, old = hybrid_masks(nq, nk, hybrid.window, q_blk.device, row_pos, hybrid.sinks)
    with torch.no_grad():
        s = (q_blk.to(acc) @ k_vis.to(acc).transpose(-1, -2)).mul_(scale).masked_fill_(~win, float("-inf"))
        c = s.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        s = s.sub_(c)
        w_sum = s.exp().sum(-1)  # W_i (exp(-inf) = 0 off the exact keys)
        s = s.masked_fill_(~win, 0.0)  # s - c on the exact keys, 0 elsewhere
        exact_log = torch.vdot(p.reshape(-1), s.reshape(-1))  # sum_E p (s - c)
        p_old = p.masked_fill(~old, 0.0)
        p_exact = (p.sum(-1) - p_old.sum(-1)).sum((0, 2))  # (H,): sum_E p per head (p is 0 on future keys)
        decay = hybrid.decay
        age = None
        if decay is not None:
            age = linear_key_age(row_pos.to(q_blk.device), nk, hybrid.window).to(acc)
            p_age = (p_old.sum(0) * age).sum((1, 2))  # (H,): sum_O p age per head
    log_decay = decay.to(acc) if decay is not None else None
    lin_sum, log_sum = _HybridLinearTerms.apply(pq.to(acc), pk.to(acc), log_decay, p_old, old, age, eps)
    g = torch.as_tensor(hybrid.gamma, device=q_blk.device).to(acc)
    g = g.expand(H) if g.dim() == 0 else g
    den = g.view(1, H, 1) * w_sum + lin_sum
    loss = den.clamp_min(eps).log().sum() - (torch.log(g) * p_exact).sum() - exact_log - log_sum
    if log_decay is not None:
        loss = loss - (log_decay * p_age).sum()
    return loss


class _HybridLinearTerms(torch.autograd.Function):
    """The hybrid student's older-key terms of a block of rows: ``(L, T)`` with ``L_i = sum_j m_ij A_ij`` (B, H, R),
    ``m = old * lambda^age`` (old: the rows' linear-part mask; no decay: m = old), and
    ``T = sum_ij p_ij log max(A_ij, eps)`` over the teacher weights ``p`` zeroed off the linear part; ``A = phi_q
    phi_k^T``. Differentiable in phi_q, phi_k and ``log lambda`` (H,); written out like :class:`_TeacherLogKernel`."""

    @staticmethod
    def forward(ctx, pq, pk, log_decay, p_old, old, age, eps):
        a = pq @ pk.transpose(-1, -2)  # (B, H, R, N)
        if log_decay is None:
            m = old.to(a.dtype)[None, None]
        else:
            m = torch.exp(log_decay.view(-1, 1, 1) * age).mul_(old)[None]  # (1, H, R, N)
        lin_sum = (a * m).sum(-1)
        a_c = a.clamp_min(eps)
        log_sum = torch.vdot(p_old.reshape(-1), a_c.log().reshape(-1))
        ctx.save_for_backward(pq, pk, a, m, p_old, age)
        ctx.eps, ctx.decayed = eps, log_decay is not None
        return lin_sum, log_sum

    @staticmethod
    def backward(ctx, g_lin, g_log):
        pq, pk, a, m, p_old, age = ctx.saved_tensors
        grad_a = torch.div(p_old, a).masked_fill_(a <= ctx.eps, 0.0).mul_(g_log.to(a.dtype))
        gm = m * g_lin.unsqueeze(-1).to(a.dtype)  # (B, H, R, N)
        g_decay = None
        if ctx.decayed and ctx.needs_input_grad[2]:  # d/d log lambda of sum_j m_ij A_ij = sum_j age_ij m_ij A_ij
            g_decay = (gm * a * age).sum((0, 2, 3))
        grad_a.add_(gm)
        return (grad_a @ pk if ctx.needs_input_grad[0] else None,
                grad_a.transpose(-1, -2) @ pq if ctx.needs_input_grad[1] else None,
                g_decay, None, None, None, None)


class _TeacherLogKernel(torch.autograd.Function):
    """``sum_ij p_ij log max(a_ij, eps)`` with ``a = phi_q phi_k^T``; differentiable in phi_q and phi_k.

    Forward and backward written out, so the (rows x keys) work is one matmul and three passes each way
    (clamp, log, dot; ratio, mask, select): ``d/da_ij = p_ij / a_ij`` where ``a_ij > eps``, else 0 (the
    clamp's flat side). Autograd's chain keeps more temporaries of that size and makes about twice the
    passes; this term is most of stage 1's time and of Hedgehog's from-scratch step (the mimic loss).
    """

    @staticmethod
    def forward(ctx, pq, pk, p, eps):
        a = (pq @ pk.transpose(-1, -2)).clamp_min_(eps)
        out = torch.vdot(p.reshape(-1), a.log().reshape(-1))
        ctx.save_for_backward(pq, pk, p, a)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g):
        pq, pk, p, a = ctx.saved_tensors
        grad_a = torch.div(p, a)
        grad_a.masked_fill_(a <= ctx.eps, 0.0)
        g = g.to(grad_a.dtype)
        return ((grad_a @ pk) * g if ctx.needs_input_grad[0] else None,
                (grad_a.transpose(-1, -2) @ pq) * g if ctx.needs_input_grad[1] else None, None, None)


def attention_distillation_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    causal: bool = True,
    teacher: Optional[TeacherSettings] = None,
    hybrid: Optional[HybridSettings] = None,
    query_block: int = 512,
    eps: float = 1e-12,
    query_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hedgehog's attention-distillation cross-entropy, mean over (batch, heads, query rows).

    Args:
        q, k: (B, H, N, d) the teacher's queries/keys (post-RoPE; gradients are not taken through
            the teacher rows, which are computed in float32 under no_grad).
        phi_q, phi_k: (B, H, N, F) the student's features of the same q/k.
        teacher: the softmax teacher's scale (default ``d^-1/2``) and its own sliding window / logit soft-cap
            (its rows are then the model's real attention; see :func:`hedgehog.ops.softmax.softmax_attention_weights`).
        hybrid: score a *hybrid* student instead (:mod:`hedgehog.ops.hybrid`; causal only): exact softmax over the
            last ``window`` keys scaled by ``gamma`` (differentiable), the features for older keys.
        query_block: query rows per block; peak memory is O(query_block * N).
        query_index: optional 1-D tensor of row positions: the loss over just those rows (each still
            against all the keys it sees), an unbiased estimate of the full loss at a fraction of the cost.
    Returns: a scalar; its minimum over students is the teacher's mean row entropy (KL = 0).
    """
    _check_qk(q, k, phi_q, phi_k)
    if hybrid is not None and not causal:
        raise ValueError("the hybrid (sliding-window) student is causal only")
    teacher = teacher or TeacherSettings()
    teacher = dataclasses.replace(teacher, scale=teacher.scale_for(q.shape[-1]))
    B, H, N, _ = q.shape
    # The rows' bounds are read on the host where the index lives there (stage 1's row subsets): on a GPU, reading
    # them from a device copy would stall the launch queue once per block, layer and step.
    rows = torch.arange(N) if query_index is None else query_index.sort().values
    total = q.new_zeros((), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    track = torch.is_grad_enabled() and (phi_q.requires_grad or phi_k.requires_grad)
    for s in range(0, len(rows), query_block):
        pos_h = rows[s:s + query_block]
        pos = pos_h.to(q.device, non_blocking=True)
        contiguous = query_index is None
        kend = (int(pos_h[-1]) + 1) if causal else N
        sel = slice(int(pos_h[0]), int(pos_h[-1]) + 1) if contiguous else pos
        args = (q[:, :, sel], k[:, :, :kend], phi_q[:, :, sel], phi_k[:, :, :kend], pos)
        if track and query_block < len(rows):  # several blocks: recompute each in backward to bound memory
            part = checkpoint(_block_ce, *args, causal, teacher, eps, hybrid, use_reentrant=False)
        else:
            part = _block_ce(*args, causal, teacher, eps, hybrid)
        total = total + part
    return total / (B * H * len(rows))


def attention_output_mse_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    causal: bool = True,
    teacher: Optional[TeacherSettings] = None,
    hybrid: Optional[HybridSettings] = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """LoLCATs' attention-output MSE: ``mean((softmax_attn(q,k,v) - linear_attn(phi_q,phi_k,v))^2)``
    (the ``hybrid`` student's output where given; ``teacher`` as in :func:`attention_distillation_loss`)."""
    _check_qk(q, k, phi_q, phi_k)
    teacher = teacher or TeacherSettings()
    with torch.no_grad():
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        y_t = softmax_attention(q.to(acc), k.to(acc), v.to(acc), causal=causal, scale=teacher.scale,
                                **teacher.masking())
    if hybrid is not None:
        y_s = hybrid_attention(q, k, v.to(acc), phi_q, phi_k, scale=teacher.scale, chunk_size=chunk_size,
                               **hybrid.op_kwargs())
    else:
        y_s = linear_attention(phi_q, phi_k, v.to(acc), causal=causal, chunk_size=chunk_size)
    return torch.mean((y_s.to(acc) - y_t) ** 2)
