"""The hybrid's exact part as a Triton kernel (forward and backward), for CUDA tensors.

What it computes, per row ``n`` of (BH, N, d) queries against keys/values of the same length: the keys ``n`` sees
exactly are its window ``n - w < i <= n`` and the sinks ``i < sinks`` (once they left the window), and with the row
max ``m_n`` over those scores ``s_ni = scale * q_n . k_i``

    num_n = sum_i exp(s_ni - m_n) v_i,      den_n = sum_i exp(s_ni - m_n),

the unnormalised pair :func:`hedgehog.ops.window.window_part` computes (before its gamma): the hybrid adds its
linear part to both and divides once. ``m_n`` is part of the hybrid's formula (the linear part is not rescaled by
it), so the backward carries the max's own gradient, ``d m_n / d s_ni = [i = argmax]``: for upstream gradients
``g_num, g_den``,

    d s_ni = exp(s_ni - m_n) (g_num_n . v_i + g_den_n) - [i = argmax_n] (g_num_n . num_n + g_den_n den_n),

which autograd of the reference does through ``amax`` (ties split; here the first maximum takes it).

No library kernel returns the row max with the window sum (FlexAttention returns the log-sum-exp, which fixes
``m_n + log den_n`` but not ``m_n``), hence our own, written flash-attention style: one program per block of
queries walks the key blocks of its window (and the sink block), keeping the running max, its argmax and the
sums; the backward recomputes the scores per block. Memory O(N (d + D)); work O(N (w + sinks) d).

Correctness is tested on the CPU under ``TRITON_INTERPRET=1`` against the float64 reference; speed needs a GPU.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is a CUDA dependency (and, with TRITON_INTERPRET=1, runs on the CPU for tests)
    import triton
    import triton.language as tl
except Exception:  # not installed
    triton = None
    tl = None

BLOCK = 32  # queries and keys per program step; sinks must fit in one key block
# From a padded head dim (q/k or v) of WIDE_FROM (Gemma-2/3's 256), blocks of WIDE_BLOCK: at 32 the kernels need
# 168-197 KB of shared memory there, over an A100's 163 KB and sm_86's 99 KB; at 16, 83-99 KB
# (tests/ops/test_triton_compile.py compiles them for sm_90, sm_80 and sm_86).
WIDE_BLOCK = 16
WIDE_FROM = 256


def block_for(d: int, dv: int) -> int:
    """Queries and keys per program step for head dims ``d`` (q, k) and ``dv`` (v)."""
    return WIDE_BLOCK if max(_dims(d), _dims(dv)) >= WIDE_FROM else BLOCK


def fits(d: int, dv: int, sinks: int) -> bool:
    """Whether the kernel takes these shapes: its sinks fit in one key block (a caller takes the PyTorch path
    otherwise)."""
    return 0 <= sinks <= block_for(d, dv)


def available() -> bool:
    return triton is not None


def serves(x: torch.Tensor) -> bool:
    """Whether the kernel runs for tensors like ``x``: Triton is there and ``x`` is on CUDA, or Triton's CPU
    interpreter is on (``TRITON_INTERPRET=1``, set before the first import: how the tests run it here)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _visible(rows, cols, n, window, sinks):
        """(BM, BN) bool: query ``rows`` sees key ``cols`` exactly (its window, or a sink outside it)."""
        r = rows[:, None]
        c = cols[None, :]
        return (c <= r) & (c < n) & (r < n) & (((r - c) < window) | (c < sinks))

    @triton.jit
    def _key_block(K, V, rows, kb, n, window, sinks, sinks_only, sk_b, sk_n, sv_b, sv_n, bh, D_QK: tl.constexpr,
                   D_V: tl.constexpr, BN: tl.constexpr):
        """Keys and values ``kb .. kb + BN - 1`` and which of them ``rows`` see (``sinks_only``: only its sinks)."""
        cols = kb + tl.arange(0, BN)
        k = tl.load(K + bh * sk_b + cols[:, None] * sk_n + tl.arange(0, D_QK)[None, :], mask=cols[:, None] < n,
                    other=0.0)
        v = tl.load(V + bh * sv_b + cols[:, None] * sv_n + tl.arange(0, D_V)[None, :], mask=cols[:, None] < n,
                    other=0.0)
        vis = _visible(rows, cols, n, window, sinks) & ((cols[None, :] < sinks) | (sinks_only == 0))
        return cols, k, v, vis

    @triton.jit
    def _fwd_step(q, K, V, rows, kb, n, scale, window, sinks, sinks_only, m_i, arg, l_i, acc, sk_b, sk_n, sv_b,
                  sv_n, bh, D_QK: tl.constexpr, D_V: tl.constexpr, BN: tl.constexpr):
        """One key block ``kb .. kb + BN - 1`` into the running max, argmax and sums (``sinks_only``: its sinks)."""
        cols, k, v, vis = _key_block(K, V, rows, kb, n, window, sinks, sinks_only, sk_b, sk_n, sv_b, sv_n, bh, D_QK,
                                     D_V, BN)
        s = tl.where(vis, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        bm = tl.max(s, 1)
        arg = tl.where(bm > m_i, tl.argmax(s, 1).to(tl.int32) + kb, arg)
        m_new = tl.maximum(m_i, bm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        return m_new, arg, l_i, acc

    @triton.jit
    def _fwd(Q, K, V, NUM, DEN, M, ARG, n, scale, window, sinks,
             sq_b, sq_n, sk_b, sk_n, sv_b, sv_n, so_b, so_n, sm_b,
             D_QK: tl.constexpr, D_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        q = tl.load(Q + bh * sq_b + rows[:, None] * sq_n + tl.arange(0, D_QK)[None, :], mask=rows[:, None] < n,
                    other=0.0)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        arg = tl.zeros([BM], tl.int32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D_V], tl.float32)
        lo = tl.maximum(pid_m * BM - window + 1, 0) // BN * BN
        hi = tl.minimum(pid_m * BM + BM, n)
        if sinks > 0:
            if lo > 0:  # the sinks, in block 0, which the window's blocks do not reach
                m_i, arg, l_i, acc = _fwd_step(q, K, V, rows, 0, n, scale, window, sinks, 1, m_i, arg, l_i, acc,
                                               sk_b, sk_n, sv_b, sv_n, bh, D_QK, D_V, BN)
        for kb in range(lo, hi, BN):
            m_i, arg, l_i, acc = _fwd_step(q, K, V, rows, kb, n, scale, window, sinks, 0, m_i, arg, l_i, acc,
                                           sk_b, sk_n, sv_b, sv_n, bh, D_QK, D_V, BN)
        rmask = rows < n
        tl.store(NUM + bh * so_b + rows[:, None] * so_n + tl.arange(0, D_V)[None, :], acc, mask=rmask[:, None])
        tl.store(DEN + bh * sm_b + rows, l_i, mask=rmask)
        tl.store(M + bh * sm_b + rows, m_i, mask=rmask)
        tl.store(ARG + bh * sm_b + rows, arg, mask=rmask)

    @triton.jit
    def _dq_step(q, K, V, g, gden, m, arg, delta, dq, rows, kb, n, scale, window, sinks, sinks_only, sk_b, sk_n,
                 sv_b, sv_n, bh, D_QK: tl.constexpr, D_V: tl.constexpr, BN: tl.constexpr):
        cols, k, v, vis = _key_block(K, V, rows, kb, n, window, sinks, sinks_only, sk_b, sk_n, sv_b, sv_n, bh, D_QK,
                                     D_V, BN)
        p = tl.where(vis, tl.exp(tl.dot(q, tl.trans(k)) * scale - m[:, None]), 0.0)
        return dq + tl.dot(_ds(p, v, g, gden, arg, delta, vis, cols), k)

    @triton.jit
    def _ds(p, v, g, gden, arg, delta, vis, cols):
        """The scores' gradient on a (rows, keys) tile of weights ``p = exp(s - m)`` (the module docstring)."""
        ds = p * (tl.dot(g, tl.trans(v)) + gden[:, None])
        return ds - tl.where(vis & (cols[None, :] == arg[:, None]), delta[:, None], 0.0)

    @triton.jit
    def _row_stats(GNUM, GDEN, M, ARG, DELTA, rows, rmask, bh, so_b, so_n, sm_b, D_V: tl.constexpr):
        """What the backward reads per query row: the upstream gradients, the forward's max and argmax, and
        ``delta = g_num . num + g_den den`` (the max's own gradient)."""
        g = tl.load(GNUM + bh * so_b + rows[:, None] * so_n + tl.arange(0, D_V)[None, :], mask=rmask[:, None],
                    other=0.0)
        gden = tl.load(GDEN + bh * sm_b + rows, mask=rmask, other=0.0)
        m = tl.load(M + bh * sm_b + rows, mask=rmask, other=0.0)
        arg = tl.load(ARG + bh * sm_b + rows, mask=rmask, other=-1)
        delta = tl.load(DELTA + bh * sm_b + rows, mask=rmask, other=0.0)
        return g, gden, m, arg, delta

    @triton.jit
    def _bwd_dq(Q, K, V, GNUM, GDEN, M, ARG, DELTA, DQ, n, scale, window, sinks,
                sq_b, sq_n, sk_b, sk_n, sv_b, sv_n, so_b, so_n, sm_b,
                D_QK: tl.constexpr, D_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        dq_ = tl.arange(0, D_QK)
        rmask = rows < n
        q = tl.load(Q + bh * sq_b + rows[:, None] * sq_n + dq_[None, :], mask=rmask[:, None], other=0.0)
        g, gden, m, arg, delta = _row_stats(GNUM, GDEN, M, ARG, DELTA, rows, rmask, bh, so_b, so_n, sm_b, D_V)
        dq = tl.zeros([BM, D_QK], tl.float32)
        lo = tl.maximum(pid_m * BM - window + 1, 0) // BN * BN
        hi = tl.minimum(pid_m * BM + BM, n)
        if sinks > 0:
            if lo > 0:
                dq = _dq_step(q, K, V, g, gden, m, arg, delta, dq, rows, 0, n, scale, window, sinks, 1, sk_b, sk_n,
                              sv_b, sv_n, bh, D_QK, D_V, BN)
        for kb in range(lo, hi, BN):
            dq = _dq_step(q, K, V, g, gden, m, arg, delta, dq, rows, kb, n, scale, window, sinks, 0, sk_b, sk_n,
                          sv_b, sv_n, bh, D_QK, D_V, BN)
        tl.store(DQ + bh * sq_b + rows[:, None] * sq_n + dq_[None, :], dq * scale, mask=rmask[:, None])

    @triton.jit
    def _bwd_dkdv(Q, K, V, GNUM, GDEN, M, ARG, DELTA, DK, DV, n, scale, window, sinks,
                  sq_b, sq_n, sk_b, sk_n, sv_b, sv_n, so_b, so_n, sm_b,
                  D_QK: tl.constexpr, D_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        cols = pid_n * BN + tl.arange(0, BN)
        dq_ = tl.arange(0, D_QK)
        dv_ = tl.arange(0, D_V)
        cmask = cols < n
        k = tl.load(K + bh * sk_b + cols[:, None] * sk_n + dq_[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + bh * sv_b + cols[:, None] * sv_n + dv_[None, :], mask=cmask[:, None], other=0.0)
        dk = tl.zeros([BN, D_QK], tl.float32)
        dv = tl.zeros([BN, D_V], tl.float32)
        lo = pid_n * BN // BM * BM
        hi = tl.minimum(pid_n * BN + BN + window - 1, n)
        if sinks > 0:
            if pid_n * BN < sinks:  # a sink block: every later query sees its sinks
                hi = n
        for r0 in range(lo, hi, BM):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < n
            q = tl.load(Q + bh * sq_b + rows[:, None] * sq_n + dq_[None, :], mask=rmask[:, None], other=0.0)
            g, gden, m, arg, delta = _row_stats(GNUM, GDEN, M, ARG, DELTA, rows, rmask, bh, so_b, so_n, sm_b, D_V)
            vis = _visible(rows, cols, n, window, sinks)
            p = tl.where(vis, tl.exp(tl.dot(q, tl.trans(k)) * scale - m[:, None]), 0.0)
            dv += tl.dot(tl.trans(p), g)
            dk += tl.dot(tl.trans(_ds(p, v, g, gden, arg, delta, vis, cols)), q)
        tl.store(DK + bh * sk_b + cols[:, None] * sk_n + dq_[None, :], dk * scale, mask=cmask[:, None])
        tl.store(DV + bh * sv_b + cols[:, None] * sv_n + dv_[None, :], dv, mask=cmask[:, None])


def _dims(d: int) -> int:
    """Triton's block shapes are powers of two of at least 16: the head dim padded up to one."""
    return max(16, 1 << (d - 1).bit_length())


def _padded(t: torch.Tensor, d: int) -> torch.Tensor:
    t = t.float().contiguous()
    return t if t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1])).contiguous()


class _WindowPart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, sinks: int, scale: float):
        bh, n, d = q.shape
        dv = v.shape[-1]
        DQ, DV = _dims(d), _dims(dv)
        q3, k3, v3 = _padded(q, DQ), _padded(k, DQ), _padded(v, DV)
        num = torch.empty(bh, n, DV, device=q.device, dtype=torch.float32)
        den, m = (torch.empty(bh, n, device=q.device, dtype=torch.float32) for _ in range(2))
        arg = torch.empty(bh, n, device=q.device, dtype=torch.int32)
        blk = block_for(d, dv)
        grid = (triton.cdiv(n, blk), bh)
        _fwd[grid](q3, k3, v3, num, den, m, arg, n, float(scale), int(window), int(sinks),
                   q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
                   num.stride(0), num.stride(1), den.stride(0), D_QK=DQ, D_V=DV, BM=blk, BN=blk)
        ctx.save_for_backward(q3, k3, v3, num, den, m, arg)
        ctx.shape = (d, dv, window, sinks, scale)
        return num[..., :dv], den

    @staticmethod
    def backward(ctx, g_num, g_den):
        q3, k3, v3, num, den, m, arg = ctx.saved_tensors
        d, dv, window, sinks, scale = ctx.shape
        bh, n, DQ = q3.shape
        DV = v3.shape[-1]
        g = _padded(g_num, DV)
        gden = g_den.float().contiguous()
        delta = ((g * num).sum(-1) + gden * den).contiguous()  # what the row max's gradient carries
        dq, dk = torch.empty_like(q3), torch.empty_like(k3)
        dvv = torch.empty_like(v3)
        args = (q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
                g.stride(0), g.stride(1), den.stride(0))
        blk = block_for(d, dv)
        grid = (triton.cdiv(n, blk), bh)
        _bwd_dq[grid](q3, k3, v3, g, gden, m, arg, delta, dq, n, float(scale), int(window), int(sinks), *args,
                      D_QK=DQ, D_V=DV, BM=blk, BN=blk)
        _bwd_dkdv[grid](q3, k3, v3, g, gden, m, arg, delta, dk, dvv, n, float(scale), int(window), int(sinks),
                        *args, D_QK=DQ, D_V=DV, BM=blk, BN=blk)
        return dq[..., :d], dk[..., :d], dvv[..., :dv], None, None, None


def window_num_den(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float, sinks: int = 0):
    """``(num (BH, N, D), den (BH, N))`` of the exact window part (see the module docstring), in float32;
    differentiable in q, k, v. q, k: (BH, N, d); v: (BH, N, D). Needs Triton (CUDA tensors, or any device under
    ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("the Triton window kernel needs triton (pip install triton; it comes with CUDA builds of "
                           "torch); the PyTorch path (hedgehog.ops.window) serves without it")
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k (BH, N, d) and v (BH, N, D) must share (BH, N): {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    blk = block_for(q.shape[-1], v.shape[-1])
    if window < 1 or not fits(q.shape[-1], v.shape[-1], sinks):
        raise ValueError(f"window must be >= 1 and sinks in 0..{blk} (one key block at these head dims), got "
                         f"{window} and {sinks}; the callers in hedgehog.ops take the PyTorch path where sinks do "
                         "not fit (triton_window.fits)")
    return _WindowPart.apply(q, k, v, int(window), int(sinks), float(scale))
