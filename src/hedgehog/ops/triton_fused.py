"""Hedgehog linear and hybrid attention as fused Triton kernels, for a forward without autograd (prefill, eval).

fla's chunked kernels take features: a caller computes ``phi(q)``, ``phi(k)`` (2 d' floats per head and token, in
float32), fla copies them, and keeps a state per chunk. So a forward holds several times SDPA's memory, which holds
only its output. Here the Hedgehog map ``phi(x) = [softmax(W x + b), softmax(-(W x + b))]`` is computed inside the
kernels from q and k tiles; nothing token-sized is written besides the output.

What one program computes, for query head ``h`` and a segment of the sequence, walking it in blocks of ``C``
queries ``a .. a + C - 1`` with the state ``S = sum_i lambda^(a - w - 1 - i) phi(k_i) v_i^T`` (and ``z``, the same
of ``phi(k_i)``) of the keys ``sinks <= i < a - w`` in registers:

* the exact part first: the window's keys ``a - w + 1 .. a + C - 1`` in tiles of ``C`` (query ``n`` sees
  ``n - w < i <= n``), and the sinks ``i < sinks`` those tiles do not reach in one more tile, into a running softmax
  with its row max ``m_n`` (part of the hybrid's formula, as in :mod:`hedgehog.ops.triton_window`), times the
  head's window factor ``g``;
* then the linear part: from the state, ``lambda^(n - a + 1) phi(q_n) . [S, z]``, and the one tile of keys
  ``a - w .. a + C - w - 1`` that some rows already see linearly (``sinks <= i <= n - w``), as
  ``lambda^(n - w - i) phi(q_n) . phi(k_i)``;
* ``y_n = (g num_exact + num_lin) / max(g den_exact + den_lin, eps)``;
* the state moves past that tile's keys.

``w = 0`` and no sinks is plain causal linear attention (no exact part). The state entering each segment comes
from two small kernels: one sums each segment's keys (``_segment_sums``), one scans those sums in order
(``_scan``) from an initial state; so the segments run in parallel (B x H x segments programs) and what is held
besides the output is one state per segment, at most 1/32 of the output's bytes (:func:`segments`). The final state
(keys ``sinks .. N - w - 1``, as the last query sees them) is the scan's last entry.

Weights come as ``(W (Hm, d, d'), b (Hm, d'))`` per map head (:func:`hedgehog_weights` reads them from the maps,
the layer's query scale folded into ``W``); query head ``h`` uses map head ``h // (H / Hm)``, and reads k and v at
head ``h // (H / Hk)``, so grouped keys need no repeat.

Every tile is float32 in the kernels (``tl.dot`` takes TF32 on a GPU): Triton's CPU interpreter multiplies bf16
tiles wrongly (it reads their bits as integers), so native half-precision dots could not be tested here; a GPU may
run the exact part's two products twice as fast in bf16. Correctness is tested on the CPU under
``TRITON_INTERPRET=1`` against the float64 references; the block sizes and the number of segments are guesses until
a GPU measures them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from hedgehog.ops import triton_window
from hedgehog.ops.triton_window import _dims  # a head dim padded to a Triton block shape

try:  # Triton is a CUDA dependency (and, with TRITON_INTERPRET=1, runs on the CPU for tests)
    import triton
    import triton.language as tl
except Exception:  # not installed
    triton = None
    tl = None

# Programs to aim for across batch x heads x segments (an H100 has 132 SMs): a guess, not tuned on a GPU.
TARGET_PROGRAMS = 512
STATE_SHARE = 1 / 32  # the segments' states, at most this share of the output's bytes
MAX_DIM = 128
MAX_SINKS = 16  # the sinks the window's tiles do not reach are one tile of C >= 16 keys
KB = 32  # head-dim slice of the feature projection and the scores


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like ``x`` (CUDA with Triton, or Triton's CPU interpreter)."""
    return triton_window.serves(x)


def blocks_for(dv: int) -> Tuple[int, int, int]:
    """``(C, BV, warps)``: queries and keys per tile, value columns per program and warps per program for a value
    head dim ``dv``. The state (2 x d' x BV floats) stays in registers through a segment, beside the (C x 2 d')
    features. Chosen from the compiled kernels' registers and spills at head dims 64 and 128 (16 / 32 / 8 spill
    least among the tiles of 16 to 64 tried: tests/ops/test_triton_compile.py prints them), not timed."""
    return 16, min(_dims(dv), 32), 8


def fits(d: int, dp: int) -> bool:
    """Whether the kernels take these head dims: q/k and the map's d' up to 128 (from 256 on, Gemma-2/3's head dim,
    the state and feature tiles would spill most of the registers: those calls take the other paths)."""
    return max(_dims(d), _dims(dp)) <= MAX_DIM


def segments(bh: int, n: int, C: int, fp: int, vp: int, out_bytes: int) -> int:
    """Tokens per segment, a multiple of ``C``: towards :data:`TARGET_PROGRAMS` programs (with the value-column
    blocks), while the segments' states (2 ``fp`` x (``vp`` + 1) floats each per batch x head) stay within
    :data:`STATE_SHARE` of the output's ``out_bytes``, the size of the log-sum-exp SDPA keeps beside its output at
    head dim 64, so the forward's peak stays near SDPA's."""
    per_state = bh * 2 * fp * (vp + 1) * 4
    p = max(1, min(-(-TARGET_PROGRAMS // bh), int(out_bytes * STATE_SHARE) // per_state, -(-n // C)))
    return -(-(-(-n // p)) // C) * C


if triton is not None:

    @triton.jit
    def _rows(X, base, s_n, rows, cols, n, width):
        """Rows ``rows`` (R,) and columns ``cols`` of a (N, width) view at ``base``, in float32; zeros outside."""
        m = (rows[:, None] >= 0) & (rows[:, None] < n) & (cols[None, :] < width)
        return tl.load(X + base + rows[:, None] * s_n + cols[None, :], mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _phi(X, base, s_n, rows, n, d, WB, hm, fmask, R: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
             KB: tl.constexpr):
        """Both halves of the Hedgehog features of rows ``rows`` of X with map head ``hm`` of ``WB`` (its (DP, FP)
        weights, then its FP biases): ``softmax(x W + b)`` and ``softmax(-(x W + b))`` over the ``fmask`` columns
        (0 on the padding). ``x W`` is summed over head-dim slices of ``KB``, so no (R, DP) or (DP, FP) tile is
        held whole (at head dim 128 those alone would fill the registers)."""
        fcol = tl.arange(0, FP)
        w = WB + hm * (DP + 1) * FP
        u = tl.zeros([R, FP], tl.float32)
        for k0 in tl.static_range(0, DP, KB):
            dc = k0 + tl.arange(0, KB)
            u += tl.dot(_rows(X, base, s_n, rows, dc, n, d), tl.load(w + dc[:, None] * FP + fcol[None, :]))
        u += tl.load(w + DP * FP + fcol)[None, :]
        up = tl.where(fmask[None, :], u, float("-inf"))
        ep = tl.exp(up - tl.max(up, 1)[:, None])
        un = tl.where(fmask[None, :], -u, float("-inf"))
        en = tl.exp(un - tl.max(un, 1)[:, None])
        return ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]

    @triton.jit
    def _exact_step(Q, qbase, sq_n, rows, K, kbase, sk_n, cols, vv, n, d, vis, scale, m_i, l_i, acc,
                    C: tl.constexpr, DP: tl.constexpr, KB: tl.constexpr):
        """Keys ``cols`` (exact where ``vis``; values ``vv``) into the running max, sum and numerator of ``rows``;
        the scores summed over head-dim slices of ``KB``."""
        s = tl.zeros([C, C], tl.float32)
        for k0 in tl.static_range(0, DP, KB):
            dc = k0 + tl.arange(0, KB)
            s += tl.dot(_rows(Q, qbase, sq_n, rows, dc, n, d), tl.trans(_rows(K, kbase, sk_n, cols, dc, n, d)))
        s = tl.where(vis, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, vv)

    @triton.jit
    def _program(H, n, seg, fdim, FP: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
        """A (batch x head, segment, value-column block) program's indices: ``bh, j, vb``, batch and head, its
        segment's tokens ``s0 .. s1 - 1``, the block offsets, its feature and value columns and the real features."""
        bh = tl.program_id(0)
        j = tl.program_id(1)
        vb = tl.program_id(2)
        s0 = j * seg
        fcol = tl.arange(0, FP)
        return (bh, j, vb, bh // H, bh % H, s0, tl.minimum(s0 + seg, n), tl.arange(0, C), fcol,
                vb * BV + tl.arange(0, BV), fcol < fdim)

    @triton.jit
    def _segment_sums(K, V, WK, LDEC, T, TZ, H, n, d, dv, fdim, seg, window, sinks, k_group, v_group, map_group,
                      sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, P1,
                      HAS_DECAY: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr, VP: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, KB: tl.constexpr):
        """Segment j's keys ``s0 - w .. s1 - w - 1`` (``sinks`` and on) as ``sum lambda^(s1 - w - 1 - i)
        phi(k_i) [v_i, 1]^T``, into slot j of ``T`` (BH, P + 1, 2, FP, VP) and ``TZ`` (BH, P + 1, 2, FP); value
        columns ``vb * BV ..``."""
        bh, j, vb, b, h, s0, s1, t, fcol, vcol, fmask = _program(H, n, seg, fdim, FP, BV, C)
        hm = h // map_group
        kbase = b * sk_b + (h // k_group) * sk_h
        vbase = b * sv_b + (h // v_group) * sv_h
        ld = 0.0
        if HAS_DECAY:
            ld = tl.load(LDEC + h)
        Tp = tl.zeros([FP, BV], tl.float32)
        Tn = tl.zeros([FP, BV], tl.float32)
        zp = tl.zeros([FP], tl.float32)
        zn = tl.zeros([FP], tl.float32)
        end = s1 - window
        for kb in range(s0 - window, end, C):
            cols = kb + t
            keep = (cols >= 0) & (cols >= sinks) & (cols < end)
            vv = _rows(V, vbase, sv_n, cols, vcol, n, dv)
            pk, nk = _phi(K, kbase, sk_n, cols, n, d, WK, hm, fmask, C, DP, FP, KB)
            wt = tl.where(keep, 1.0, 0.0)
            if HAS_DECAY:
                wt = tl.where(keep, tl.exp(ld * tl.maximum(end - 1 - cols, 0).to(tl.float32)), 0.0)
            pk = pk * wt[:, None]
            nk = nk * wt[:, None]
            Tp += tl.dot(tl.trans(pk), vv)
            Tn += tl.dot(tl.trans(nk), vv)
            zp += tl.sum(pk, 0)
            zn += tl.sum(nk, 0)
        slot = bh * P1 + j
        base = T + slot * 2 * FP * VP + fcol[:, None] * VP + vcol[None, :]
        tl.store(base, Tp)
        tl.store(base + FP * VP, Tn)
        if vb == 0:
            tl.store(TZ + slot * 2 * FP + fcol, zp)
            tl.store(TZ + slot * 2 * FP + FP + fcol, zn)

    @triton.jit
    def _scan(T, TZ, INIT, INITZ, LDEC, H, n, seg, P, P1,
              HAS_INIT: tl.constexpr, HAS_DECAY: tl.constexpr, FP: tl.constexpr, VP: tl.constexpr, BV: tl.constexpr):
        """In place over ``T``/``TZ``: slot j becomes the state entering segment j (from ``INIT``, or zeros), slot
        P the state after the last. One program per (batch x head, half, value columns ``vb * BV ..``); those of
        ``vb = 0`` scan z."""
        bh = tl.program_id(0)
        half = tl.program_id(1)
        vb = tl.program_id(2)
        h = bh % H
        fcol = tl.arange(0, FP)
        vcol = vb * BV + tl.arange(0, BV)
        off = half * FP * VP + fcol[:, None] * VP + vcol[None, :]
        offz = half * FP + fcol
        S = tl.zeros([FP, BV], tl.float32)
        z = tl.zeros([FP], tl.float32)
        if HAS_INIT:
            S = tl.load(INIT + bh * 2 * FP * VP + off)
            z = tl.load(INITZ + bh * 2 * FP + offz)
        ld = 0.0
        if HAS_DECAY:
            ld = tl.load(LDEC + h)
        for j in range(0, P):
            slot = bh * P1 + j
            Tj = tl.load(T + slot * 2 * FP * VP + off)
            zj = tl.load(TZ + slot * 2 * FP + offz)
            tl.store(T + slot * 2 * FP * VP + off, S)
            if vb == 0:
                tl.store(TZ + slot * 2 * FP + offz, z)
            carry = 1.0
            if HAS_DECAY:
                carry = tl.exp(ld * (tl.minimum(seg, n - j * seg)).to(tl.float32))
            S = S * carry + Tj
            z = z * carry + zj
        tl.store(T + (bh * P1 + P) * 2 * FP * VP + off, S)
        if vb == 0:
            tl.store(TZ + (bh * P1 + P) * 2 * FP + offz, z)

    @triton.jit
    def _forward(Q, K, V, Y, WQ, WK, GAM, LDEC, T, TZ, H, n, d, dv, fdim, seg, window, sinks, scale, eps,
                 k_group, v_group, qmap_group, kmap_group,
                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sy_b, sy_h, sy_n, P1,
                 HAS_EXACT: tl.constexpr, HAS_DECAY: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
                 VP: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, KB: tl.constexpr):
        """Segment j's queries, value columns ``vb * BV ..`` (see the module docstring)."""
        bh, j, vb, b, h, s0, s1, t, fcol, vcol, fmask = _program(H, n, seg, fdim, FP, BV, C)
        hq = h // qmap_group
        hk = h // kmap_group
        qbase = b * sq_b + h * sq_h
        kbase = b * sk_b + (h // k_group) * sk_h
        vbase = b * sv_b + (h // v_group) * sv_h
        slot = bh * P1 + j
        sbase = T + slot * 2 * FP * VP + fcol[:, None] * VP + vcol[None, :]
        Sp = tl.load(sbase)
        Sn = tl.load(sbase + FP * VP)
        zp = tl.load(TZ + slot * 2 * FP + fcol)
        zn = tl.load(TZ + slot * 2 * FP + FP + fcol)
        ld = 0.0
        carry = 1.0
        if HAS_DECAY:
            ld = tl.load(LDEC + h)
            carry = tl.exp(ld * C)
        g = 0.0
        if HAS_EXACT:
            g = tl.load(GAM + h)
        for a in range(s0, s1, C):
            rows = a + t
            r = rows[:, None]
            # the exact part first, into num and den with its g: the linear part then adds to them (so the exact
            # part's running sums are not held while the features are)
            num = tl.zeros([C, BV], tl.float32)
            den = tl.zeros([C], tl.float32)
            if HAS_EXACT:
                m_i = tl.full([C], -1.0e30, tl.float32)
                for kb in range(a - window + 1, a + C, C):  # the window's keys
                    cols = kb + t
                    c = cols[None, :]
                    vis = (c <= r) & (c >= 0) & (r < n) & (((r - c) < window) | (c < sinks))
                    vv = _rows(V, vbase, sv_n, cols, vcol, n, dv)
                    m_i, den, num = _exact_step(Q, qbase, sq_n, rows, K, kbase, sk_n, cols, vv, n, d, vis, scale,
                                                m_i, den, num, C, DP, KB)
                if sinks > 0:
                    if a - window + 1 > 0:  # the sinks the window's tiles do not reach
                        c = t[None, :]
                        vis = (c < sinks) & (c < a - window + 1) & (c <= r) & (r < n)
                        vv = _rows(V, vbase, sv_n, t, vcol, n, dv)
                        m_i, den, num = _exact_step(Q, qbase, sq_n, rows, K, kbase, sk_n, t, vv, n, d, vis, scale,
                                                    m_i, den, num, C, DP, KB)
                num = num * g
                den = den * g
            # the linear part: the state, then keys a - w .. a + C - w - 1 (seen linearly by some rows)
            pq, nq = _phi(Q, qbase, sq_n, rows, n, d, WQ, hq, fmask, C, DP, FP, KB)
            fq = tl.full([C], 1.0, tl.float32)
            if HAS_DECAY:
                fq = tl.exp(ld * (t + 1).to(tl.float32))
            num += tl.dot(pq * fq[:, None], Sp) + tl.dot(nq * fq[:, None], Sn)
            den += (tl.sum(pq * zp[None, :], 1) + tl.sum(nq * zn[None, :], 1)) * fq
            cols = a - window + t
            c = cols[None, :]
            lin = (c <= r - window) & (c >= 0) & (c >= sinks) & (r < n)
            vv = _rows(V, vbase, sv_n, cols, vcol, n, dv)
            pk, nk = _phi(K, kbase, sk_n, cols, n, d, WK, hk, fmask, C, DP, FP, KB)
            al = tl.dot(pq, tl.trans(pk)) + tl.dot(nq, tl.trans(nk))
            if HAS_DECAY:
                al = al * tl.exp(ld * tl.maximum(r - window - c, 0).to(tl.float32))
            al = tl.where(lin, al, 0.0)
            num += tl.dot(al, vv)
            den += tl.sum(al, 1)
            y = num / tl.maximum(den, eps)[:, None]
            ymask = (r < n) & (vcol[None, :] < dv)
            tl.store(Y + b * sy_b + h * sy_h + r * sy_n + vcol[None, :], y.to(Y.dtype.element_ty), mask=ymask)
            # the state moves past the same keys
            keep = (cols >= 0) & (cols >= sinks) & (cols < n)
            wt = tl.where(keep, 1.0, 0.0)
            if HAS_DECAY:
                wt = tl.where(keep, tl.exp(ld * (C - 1 - t).to(tl.float32)), 0.0)
            pk = pk * wt[:, None]
            nk = nk * wt[:, None]
            Sp = Sp * carry + tl.dot(tl.trans(pk), vv)
            Sn = Sn * carry + tl.dot(tl.trans(nk), vv)
            zp = zp * carry + tl.sum(pk, 0)
            zn = zn * carry + tl.sum(nk, 0)


def _unwrap(fm):
    """``(map, scale, every, rep)``: a wrapper's ``wrapped_map()`` (the layer's :class:`~hedgehog.modules.heads.
    ScaledMap` and :class:`~hedgehog.modules.heads.GroupedKeyMap`: ``map`` on ``x[:, ::every] * scale``, heads
    repeated ``rep`` times), or the map itself."""
    get = getattr(fm, "wrapped_map", None)
    return get() if callable(get) else (fm, 1.0, 1, 1)


def hedgehog_weights(fm) -> Optional["Weights"]:
    """``(W (Hm, d, d'), b (Hm, d') or None)`` in float32 of a Hedgehog map as the kernels compute it, or None
    for any other map. Takes the map itself (``fused_softmax_params``) or a wrapper of one (``wrapped_map()``: its
    scale folded into ``W``, ``(s x) W = x (s W)``; repeated heads, which the kernels do by indexing)."""
    fm, scale, every, rep = _unwrap(fm)
    if every not in (1, rep):  # a head slicing the kernels' indexing does not reproduce
        return None
    get = getattr(fm, "fused_softmax_params", None)
    params = get() if callable(get) else None
    if params is None:
        return None
    w2, b2 = params
    dp = w2.shape[-1] // 2
    W = w2[..., :dp] * scale if scale != 1.0 else w2[..., :dp]
    return W, (b2[..., :dp] if b2.numel() else None)


def _heads_out(fm, heads_in: int) -> int:
    """The heads a (wrapped) map returns for ``heads_in`` input heads."""
    _, _, every, rep = _unwrap(fm)
    return -(-heads_in // every) * rep


def bound(backend, x: torch.Tensor) -> bool:
    """Whether a layer's ``backend`` (:func:`hedgehog.ops.backends.bind`; None: the PyTorch form) takes the fused
    kernels for tensors like ``x``: any backend but an explicit ``"torch"``, where they run (:func:`serves`)."""
    if backend is None or not serves(x):
        return False
    from hedgehog.ops import backends

    return backends.resolve(backend).requested != "torch"


def _padded_weights(W: torch.Tensor, b: Optional[torch.Tensor], DP: int, FP: int) -> torch.Tensor:
    """(Hm, d, d') and (Hm, d') -> float32 (Hm, DP + 1, FP), zero-padded: each head's weights, then its biases."""
    hm, d, f = W.shape
    wb = W.new_zeros(hm, DP + 1, FP, dtype=torch.float32)
    wb[:, :d, :f] = W
    if b is not None:
        wb[:, DP, :f] = b
    return wb


def _group(H: int, h: int, what: str) -> int:
    if h < 1 or H % h:
        raise ValueError(f"{what} has {h} heads, which must divide the {H} query heads")
    return H // h


Weights = Tuple[torch.Tensor, Optional[torch.Tensor]]


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: Weights, wk: Weights, window: int = 0,
                    sinks: int = 0,
                    gamma: Optional[torch.Tensor] = None, decay: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, eps: float = 1e-6, initial_state=None,
                    seg: Optional[int] = None):
    """Causal Hedgehog linear (``window = 0``) or hybrid attention, without autograd, in the fused kernels.

    Args:
        q: (B, H, N, d); k: (B, Hk, N, d); v: (B, Hv, N, D), ``Hk`` and ``Hv`` dividing ``H``.
        wq, wk: ``(W (Hm, d, d'), b (Hm, d') or None)`` of the query and key maps (:func:`hedgehog_weights`), Hm
            dividing H; features ``[softmax(x W + b), softmax(-(x W + b))]`` (F = 2 d').
        window, sinks, gamma (scalar or (H,)), decay ((H,) ``log lambda``), scale (the exact part's, ``d^-1/2``
            by default): as :func:`hedgehog.ops.hybrid.hybrid_attention`; ``window = 0`` needs no sinks or gamma.
        initial_state: ``(S (B, H, F, D), z (B, H, F))`` of earlier keys (linear attention only), or None.
        seg: tokens per segment (default :func:`segments`), a multiple of the block size.
    Returns: ``(y (B, H, N, D) in v's dtype, (S (B, H, F, D), z (B, H, F)) float32)``, the state of keys
    ``sinks .. N - w - 1``.
    """
    if triton is None:
        raise RuntimeError("the fused Triton kernels need triton (it comes with CUDA builds of torch); the PyTorch "
                           "path serves without it")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k, v, gamma, decay, *wq, *wk)):
        raise ValueError("fused_attention has no backward: call it under torch.no_grad(), or use the autograd "
                         "forms (hedgehog.ops.feature_linear_attention / feature_hybrid_attention)")
    B, H, N, d = q.shape
    if k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or v.shape[0] != B or k.shape[2] != N or v.shape[2] != N \
            or k.shape[-1] != d:
        raise ValueError(f"q (B, H, N, d), k (B, Hk, N, d), v (B, Hv, N, D) do not fit: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if N == 0:
        raise ValueError("attention needs at least one position (got seq length 0)")
    if window < 0 or (window == 0 and sinks) or not 0 <= sinks <= MAX_SINKS:
        raise ValueError(f"window must be >= 0 (0: linear attention, no sinks) and sinks in 0..{MAX_SINKS}; got "
                         f"window {window}, sinks {sinks}")
    if window and initial_state is not None:
        raise ValueError("an initial state is for linear attention (window 0) only")
    D = v.shape[-1]
    (Wq, bq), (Wk, bk) = wq, wk
    dp = Wq.shape[-1]
    if Wq.shape[1] != d or Wk.shape[1] != d or Wk.shape[-1] != dp:
        raise ValueError(f"map weights {tuple(Wq.shape)}, {tuple(Wk.shape)} do not fit head dim {d}")
    if not fits(d, dp):
        raise ValueError(f"the fused kernels take head dims and feature maps up to {MAX_DIM} (got {d} and {dp}); "
                         "feature_linear_attention / feature_hybrid_attention serve wider heads on other paths")
    qmap, kmap = _group(H, Wq.shape[0], "the query map"), _group(H, Wk.shape[0], "the key map")
    kg, vg = _group(H, k.shape[1], "k"), _group(H, v.shape[1], "v")
    DP, FP, VP = _dims(d), _dims(dp), _dims(D)
    C, BV, warps = blocks_for(D)
    BH = B * H
    y = torch.empty(B, H, N, D, device=q.device, dtype=v.dtype)
    seg = seg or segments(BH, N, C, FP, VP, y.numel() * y.element_size())
    if seg % C:
        raise ValueError(f"seg ({seg}) must be a multiple of the block size {C}")
    P = -(-N // seg)
    f32 = torch.float32
    T = torch.empty(BH, P + 1, 2, FP, VP, device=q.device, dtype=f32)
    TZ = torch.empty(BH, P + 1, 2, FP, device=q.device, dtype=f32)
    wbq, wbk = _padded_weights(Wq, bq, DP, FP), _padded_weights(Wk, bk, DP, FP)
    ld = torch.zeros(H, device=q.device, dtype=f32) if decay is None else \
        torch.as_tensor(decay, device=q.device).to(f32).expand(H).contiguous()
    gam = torch.zeros(H, device=q.device, dtype=f32) if not window else \
        torch.as_tensor(0.5 if gamma is None else gamma, device=q.device).to(f32).expand(H).contiguous()
    scale = d ** -0.5 if scale is None else float(scale)
    init = initz = None
    if initial_state is not None:
        S0, z0 = initial_state
        init = torch.zeros(BH, 2, FP, VP, device=q.device, dtype=f32)
        initz = torch.zeros(BH, 2, FP, device=q.device, dtype=f32)
        S0 = S0.to(f32).reshape(BH, 2, dp, D)
        init[:, :, :dp, :D] = S0
        initz[:, :, :dp] = z0.to(f32).reshape(BH, 2, dp)
    sk, sv = k.stride(), v.stride()
    sk, sv, sq, sy = k.stride(), v.stride(), q.stride(), y.stride()
    shapes = dict(HAS_DECAY=decay is not None, FP=FP, VP=VP, BV=BV, num_stages=1)
    tiles = dict(DP=DP, C=C, KB=min(DP, KB), num_warps=warps)
    _segment_sums[(BH, P, VP // BV)](k, v, wbk, ld, T, TZ, H, N, d, D, dp, seg, window, sinks, kg, vg, kmap,
                                     sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], P + 1, **shapes, **tiles)
    _scan[(BH, 2, VP // BV)](T, TZ, T if init is None else init, TZ if initz is None else initz, ld, H, N, seg, P,
                             P + 1, HAS_INIT=init is not None, **shapes, num_warps=4)
    _forward[(BH, P, VP // BV)](q, k, v, y, wbq, wbk, gam, ld, T, TZ, H, N, d, D, dp, seg, window, sinks, scale,
                                float(eps), kg, vg, qmap, kmap, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0],
                                sv[1], sv[2], sy[0], sy[1], sy[2], P + 1, HAS_EXACT=bool(window or sinks),
                                **shapes, **tiles)
    S = T[:, P, :, :dp, :D].reshape(B, H, 2 * dp, D)
    z = TZ[:, P, :, :dp].reshape(B, H, 2 * dp)
    return y, (S, z)


def fused_maps(q, k, v, fq, fk, positions, tensors=(), **kw):
    """:func:`fused_attention` of raw q, k with the maps ``fq``, ``fk`` where it serves: both are Hedgehog maps
    (:func:`hedgehog_weights`), the sinks fit, and nothing requires grad (:func:`~hedgehog.ops.chunked.records`,
    over q, k, v, ``tensors`` and the maps' outputs). Else None: the caller takes its other paths."""
    from hedgehog.ops.chunked import records

    wq, wk = hedgehog_weights(fq), hedgehog_weights(fk)
    H = q.shape[1]
    if wq is None or wk is None or kw.get("sinks", 0) > MAX_SINKS or q.shape[2] == 0 \
            or not fits(q.shape[-1], wq[0].shape[-1]):
        return None
    if _heads_out(fq, H) != H or _heads_out(fk, k.shape[1]) != H:  # the other paths say what is wrong
        return None
    pos = torch.zeros(1, dtype=torch.long, device=q.device) if positions is None else positions  # Hedgehog ignores it
    if records((q, k, v, *tensors), maps=((fq, q, pos), (fk, k, pos))):
        return None
    return fused_attention(q, k, v, wq, wk, **kw)

