"""The sparse cache's schedule and attention as Triton kernels (for :mod:`hedgehog.ops.sparse_cache`, on CUDA).

The schedule is sequential: at every boundary the candidates are scored against the state as it is then, and the
state then takes the keys that leave. In PyTorch each boundary is some fifty small operations, which on a GPU is
fifty kernel launches per 32 tokens per layer (about 100,000 per layer at 64k tokens). Here one program per (batch
row, KV head) walks every boundary of a call with the state ``(S, z)`` in registers and does, per boundary, what
:func:`hedgehog.ops.sparse_cache._boundary` does, in the same order:

1. decay ``S, z`` by ``lambda^(t - t_prev)``;
2. pool the ``cache_size`` cached keys with the ``P`` keys leaving the window, weights ``w_i = lambda^(t - w - i)``;
3. score each (``"unique"``: the leave-one-out read-back error, lowered to the distance to the nearest newer
   value; ``"memory"``: the leave-one-out error; ``"state"``: the read-back error against ``S`` as it is);
4. keep the ``cache_size`` highest scores (slot = rank, so slots come out in descending score as ``topk`` gives
   them; ties go to the earlier pool entry) and fold the rest into ``S, z``.

Each step walks the pool :data:`PB` entries at a time (the entries' codes and scores pass between the steps through
a scratch row in global memory), so a program's shared memory and registers are bounded whatever the cache size.
The state stays in registers, and as a matmul operand it is staged in shared memory: at head dim 128 (F x D = 256 x
128) that is 188 KB, more than an A100 block may have. :func:`_schedule_tiled` does the same steps with the state
in global scratch, a :data:`TILE` x :data:`TILE` tile at a time (49 KB at any head dim); the op runs it where a GPU
refuses to launch :func:`_schedule` (:func:`hedgehog.ops.sparse_cache._on_kernel`).

It writes, per segment of the call, the state ``(S_m, z_m)`` and the cache as *indices* into the call's table of
candidate keys (the incoming cache, then the recent and new keys). Without autograd the attention is a second
kernel, :func:`attend`: one program per (segment, batch row, query head) reads its segment's state and cache, the
recent keys and the sinks, and writes the rows, where PyTorch (:func:`hedgehog.ops.sparse_cache._attend`, kept for
training) materialises every segment's scores, recent keys and masks. The
choice of which keys stay is not differentiated, and this kernel computes no gradient: under autograd (stage 2) it
only chooses (``states=False``: no state is written) and the states are folded again in PyTorch from its choice.

Matrix products run in full fp32 (``input_precision="ieee"``, not TF32): a score decides which keys stay, and the
PyTorch reference runs in fp32. Correctness is tested on the CPU under ``TRITON_INTERPRET=1`` against it and
against float64; speed needs a GPU.
"""
from __future__ import annotations

import torch

from hedgehog.ops.triton_window import _dims, serves, triton, tl  # noqa: F401  (serves: re-exported)

SCORE_CODES = {"unique": 0, "memory": 1, "state": 2}
# Pool entries per block: a program holds the state (F x D: 128 x 64 at the default model's shapes) in registers
# and walks the pool (cache + the keys leaving the window: 160 there) a block at a time, so its shared memory and
# registers do not grow with the cache (the whole pool at once needed 320 KB of shared memory for cache 128 on
# sm_90, over the 227 KB an H100/H200 block may have: tests/ops/test_triton_compile.py compiles it for sm_90).
PB = 32
# The state and its leave-one-out sum (two F x D fp32 tiles) take 32 registers a thread each at 16 warps; at 4 warps
# ptxas spills 2.7 KB a thread, at 16 warps 64 bytes (the compile test prints each kernel's registers and spills).
# A schedule program has its SM to itself (one per batch row and KV head), so its warps take none from others, and
# it may have the whole register file: without that bound the ptxas of triton 3.6 (the lent H200's) kept 64
# registers, for room for a second block that never comes, and spilled 872 bytes. Speed unmeasured on a GPU (#37).
SCHEDULE_WARPS = 16
MAXNREG = 65536 // (32 * SCHEDULE_WARPS)  # registers a thread when one block holds the SM's 64K
# The tiled schedule (_schedule_tiled, for a GPU that cannot launch _schedule: head dim 128 on an A100) reads and
# writes its state TILE x TILE at a time from global scratch; it holds no whole state, so 8 warps suffice.
TILE = 64
TILED_WARPS = 8
# Exact keys per block of the attention kernel, and features per step of its linear part (the state's rows). It once
# read the whole cache (128 keys), every recent key (95) and the whole state at once: at sm_90, 255 registers and
# ~7.5 KB of spill a thread at the default model's shapes, 164 KB of shared memory at head dim 128. By blocks, with
# 8 warps: 80-100 registers, at most 32 bytes of spill, 25-45 KB (head dim 128: 49-86 KB, under 416 bytes of
# spill). tests/ops/test_triton_compile.py prints them. Speed unmeasured on a GPU (#37).
KB = 32
FB = 32
ATTEND_WARPS = 8
# At a padded head dim of 256 (Gemma-2/3) blocks of 32 need 168 KB of shared memory for fp32 inputs, over an A100's
# 163 KB and sm_86's 99 KB; blocks of 16 need 100 KB (65 KB for bf16 inputs).
WIDE_KB = 16
WIDE_FROM = 256
# The largest state (F x D) the schedule keeps in registers: 256 x 128 (head dim 128), which fits an H100/H200
# (188 KB) and not an A100, where the op then runs the tiled schedule. Larger states (head dim 256: 630 KB, and
# ~1-2 minutes of compiling before a launch is refused) go to the tiled schedule directly.
REGISTER_STATE = 256 * 128


def in_registers(F: int, D: int) -> bool:
    """Whether the schedule with its state in registers is tried for features F and values D (else the tiled one)."""
    return _dims(F) * _dims(D) <= REGISTER_STATE


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _entry(CODE_ROW, lane, NP):
        """A block of pool lanes: (table index, counts, in the pool), from the codes pass 1 wrote."""
        real = lane < NP
        code = tl.load(CODE_ROW + lane, mask=real, other=-1)
        return tl.where(code >= 0, code, -1 - code), code >= 0, real

    @triton.jit
    def _fold_weight(POS, base_src, safe, real, valid, lam_log, t, window):
        """A block of pool entries' positions and fold weights ``lambda^(t - w - i)`` (0 where an entry does not
        count)."""
        pos = tl.load(POS + base_src + safe, mask=real, other=0)
        return pos, tl.where(valid, tl.exp(lam_log * (t - window - pos).to(tl.float32)), 0.0)

    @triton.jit
    def _codes(row_prev, OK, code_row, base_src, lane, c0, cache_size, NP):
        """Pass 1 for a block of pool lanes (the cache, then the keys leaving): each entry's table index as a code
        in ``code_row`` (-1 - index where the entry does not count: an empty cache slot or a padding key). Returns
        (table index, counts, in the pool)."""
        in_cache = lane < cache_size
        is_new = (lane >= cache_size) & (lane < NP)
        # a cache slot holds a table index, or -1 - index when it is empty
        prev = tl.load(row_prev + lane, mask=in_cache, other=-1)
        safe = tl.where(in_cache, tl.where(prev >= 0, prev, -1 - prev), tl.where(is_new, c0 + lane - cache_size, 0))
        ok = tl.load(OK + base_src + safe, mask=is_new, other=0) != 0
        valid = tl.where(in_cache, prev >= 0, is_new & ok)
        tl.store(code_row + lane, tl.where(valid, safe, -1 - safe), mask=in_cache | is_new)
        return safe, valid, in_cache | is_new

    @triton.jit
    def _closer(near, norms, dots, cv_ok, pc, pos, copy_tol):
        """``near`` lowered to the squared distance to the nearest newer valid value of a block of candidates
        (``norms``: the pairs' summed squared norms, ``dots``: their products; an exact copy is at 0)."""
        dist = tl.maximum(norms - 2 * dots, 0.0)
        dist = tl.where(dist <= copy_tol * norms, 0.0, dist)  # an exact copy (COPY_TOL)
        newer = cv_ok[None, :] & (pc[None, :] > pos[:, None])
        return tl.minimum(near, tl.min(tl.where(newer, dist, float("inf")), 1))

    @triton.jit
    def _rank_keep(err_row, row_new, lane, safe, valid, real, NP, cache_size, PB: tl.constexpr):
        """Pass 3 for a block of pool lanes: rank = how many pool entries come before this one (higher score, or
        equal and earlier); the ``cache_size`` first stay, at slot = rank in ``row_new``. Returns which stay."""
        e = tl.load(err_row + lane, mask=real, other=float("-inf"))
        rank = tl.zeros([PB], tl.int32)
        for c in range(0, NP, PB):
            cl = c + tl.arange(0, PB)
            c_real = cl < NP
            ec = tl.load(err_row + cl, mask=c_real, other=float("-inf"))
            before = c_real[None, :] & ((ec[None, :] > e[:, None]) |
                                        ((ec[None, :] == e[:, None]) & (cl[None, :] < lane[:, None])))
            rank += tl.sum(before.to(tl.int32), 1)
        keep = real & (rank < cache_size)
        tl.store(row_new + rank, tl.where(valid, safe, -1 - safe), mask=keep)
        return keep

    @triton.jit
    def _copy_row(row_prev, row_new, cache_size, PB: tl.constexpr):
        """No key leaves: the cache as it was."""
        for s0 in range(0, cache_size, PB):
            lane = s0 + tl.arange(0, PB)
            in_cache = lane < cache_size
            tl.store(row_new + lane, tl.load(row_prev + lane, mask=in_cache), mask=in_cache)

    @triton.jit
    def _load_pool(PHI, V, POS, base_src, safe, real, valid, lam_log, t, window, fr, dr, fmask, dmask,
                   F: tl.constexpr, D: tl.constexpr):
        """A block of pool entries' features, values, positions and fold weights ``lambda^(t - w - i)`` (0 where
        an entry does not count)."""
        pos, w = _fold_weight(POS, base_src, safe, real, valid, lam_log, t, window)
        phi = tl.load(PHI + (base_src + safe)[:, None] * F + fr[None, :], mask=real[:, None] & fmask[None, :],
                      other=0.0)
        v = tl.load(V + (base_src + safe)[:, None] * D + dr[None, :], mask=real[:, None] & dmask[None, :], other=0.0)
        return phi, v, pos, w

    @triton.jit
    def _schedule(PHI, V, POS, OK, DECAY, S0, Z0, IDX, CAND0, NCAND, DT, T, S_OUT, Z_OUT, ERR, CODE,
                  M, Hk, Ns, NPMAX, window, cache_size, eps, copy_tol, F: tl.constexpr, D: tl.constexpr,
                  BF: tl.constexpr, BD: tl.constexpr, PB: tl.constexpr, SCORE: tl.constexpr, STATES: tl.constexpr):
        bh = tl.program_id(0)
        h = bh % Hk
        fr = tl.arange(0, BF)
        dr = tl.arange(0, BD)
        fmask = fr < F
        dmask = dr < D
        S = tl.load(S0 + bh * F * D + fr[:, None] * D + dr[None, :], mask=fmask[:, None] & dmask[None, :], other=0.0)
        z = tl.load(Z0 + bh * F + fr, mask=fmask, other=0.0)
        lam_log = tl.load(DECAY + h)
        base_src = bh * Ns
        err_row = ERR + bh * NPMAX
        code_row = CODE + bh * NPMAX
        for m in range(0, M):
            dt = tl.load(DT + m).to(tl.float32)
            t = tl.load(T + m)
            lam = tl.exp(lam_log * dt)
            S = S * lam
            z = z * lam
            P = tl.load(NCAND + m).to(tl.int32)
            c0 = tl.load(CAND0 + m).to(tl.int32)
            row_prev = IDX + (bh * (M + 1) + m) * cache_size
            row_new = row_prev + cache_size
            NP = cache_size + P
            if P > 0:
                # pass 1: each pool entry's table index as a code (-1 - index where the entry does not count:
                # an empty cache slot or a padding key), and for the leave-one-out scores the state with every
                # candidate folded in
                S_tot = S
                z_tot = z
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, pooled = _codes(row_prev, OK, code_row, base_src, lane, c0, cache_size, NP)
                    if SCORE != 2:
                        phi, v, pos, w = _load_pool(PHI, V, POS, base_src, safe, pooled, valid, lam_log, t, window,
                                                    fr, dr, fmask, dmask, F, D)
                        phi_w = phi * w[:, None]
                        S_tot += tl.dot(tl.trans(phi_w), v, input_precision="ieee")
                        z_tot += tl.sum(phi_w, 0)
                tl.debug_barrier()
                # pass 2: the scores
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, real = _entry(code_row, lane, NP)
                    phi, v, pos, w = _load_pool(PHI, V, POS, base_src, safe, real, valid, lam_log, t, window, fr,
                                                dr, fmask, dmask, F, D)
                    if SCORE == 2:  # the state as it is
                        num = tl.dot(phi, S, input_precision="ieee")
                        den = tl.sum(phi * z[None, :], 1)
                    else:  # the state with every other candidate folded in
                        self_w = tl.sum(phi * w[:, None] * phi, 1)
                        num = tl.dot(phi, S_tot, input_precision="ieee") - self_w[:, None] * v
                        den = tl.sum(phi * z_tot[None, :], 1) - self_w
                    pred = num / tl.maximum(den, eps)[:, None]
                    err = tl.sum(tl.where(dmask[None, :], (v - pred) * (v - pred), 0.0), 1)
                    if SCORE == 0:  # lowered to the distance to the nearest newer valid value
                        sq = tl.sum(v * v, 1)
                        near = tl.full([PB], float("inf"), tl.float32)
                        for c in range(0, NP, PB):
                            cs, cv_ok, c_real = _entry(code_row, c + tl.arange(0, PB), NP)
                            cv_ok = cv_ok & c_real
                            vc = tl.load(V + (base_src + cs)[:, None] * D + dr[None, :],
                                         mask=cv_ok[:, None] & dmask[None, :], other=0.0)
                            pc = tl.load(POS + base_src + cs, mask=cv_ok, other=0)
                            near = _closer(near, sq[:, None] + tl.sum(vc * vc, 1)[None, :],
                                           tl.dot(v, tl.trans(vc), input_precision="ieee"), cv_ok, pc, pos, copy_tol)
                        err = tl.minimum(err, near)
                    tl.store(err_row + lane, tl.where(valid, err, float("-inf")), mask=real)
                tl.debug_barrier()
                # pass 3: rank = how many pool entries come before this one (higher score, or equal and earlier);
                # the cache_size first stay (slot = rank), the other valid ones are folded into the state
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, real = _entry(code_row, lane, NP)
                    keep = _rank_keep(err_row, row_new, lane, safe, valid, real, NP, cache_size, PB)
                    fold = valid & ~keep
                    phi, v, pos, w = _load_pool(PHI, V, POS, base_src, safe, real, fold, lam_log, t, window, fr,
                                                dr, fmask, dmask, F, D)
                    phi_f = phi * w[:, None]
                    S += tl.dot(tl.trans(phi_f), v, input_precision="ieee")
                    z += tl.sum(phi_f, 0)
            else:  # no key leaves: the cache as it was
                _copy_row(row_prev, row_new, cache_size, PB)
            if STATES:
                out = bh * M + m
                tl.store(S_OUT + out * F * D + fr[:, None] * D + dr[None, :], S, mask=fmask[:, None] & dmask[None, :])
                tl.store(Z_OUT + out * F + fr, z, mask=fmask)
            tl.debug_barrier()

    @triton.jit
    def _tile(PTR, rows, real, c0, NC: tl.constexpr, TC: tl.constexpr):
        """Columns ``c0 .. c0 + TC`` of rows ``rows`` of a row-major (., NC) fp32 array (0 outside it, or where not
        ``real``)."""
        cols = c0 + tl.arange(0, TC)
        return tl.load(PTR + rows[:, None] * NC + cols[None, :], mask=real[:, None] & (cols < NC)[None, :], other=0.0)

    @triton.jit
    def _state_tile(PTR, f0, d0, F: tl.constexpr, D: tl.constexpr, TF: tl.constexpr, TD: tl.constexpr):
        """Pointers to, and the mask of, the (TF, TD) tile of an F x D state at (f0, d0)."""
        fr = f0 + tl.arange(0, TF)
        dr = d0 + tl.arange(0, TD)
        return PTR + fr[:, None] * D + dr[None, :], (fr < F)[:, None] & (dr < D)[None, :]

    @triton.jit
    def _fold_into(SRC, DST, ZSRC, ZDST, PHI, V, base_src, code_row, w_row, NP, F: tl.constexpr, D: tl.constexpr,
                   TF: tl.constexpr, TD: tl.constexpr, PB: tl.constexpr):
        """``DST = SRC + sum_i w_i phi_i^T v_i`` and ``ZDST = ZSRC + sum_i w_i phi_i`` over the pool (weights in
        ``w_row``), a (TF, TD) tile of the state at a time: each tile is read and written once, the pool's features
        and values once per tile."""
        for f0 in range(0, F, TF):
            zf = f0 + tl.arange(0, TF)
            zacc = tl.load(ZSRC + zf, mask=zf < F, other=0.0)
            for b0 in range(0, NP, PB):
                lane = b0 + tl.arange(0, PB)
                safe, valid, real = _entry(code_row, lane, NP)
                w = tl.load(w_row + lane, mask=real, other=0.0)
                zacc += tl.sum(_tile(PHI, base_src + safe, real, f0, F, TF) * w[:, None], 0)
            tl.store(ZDST + zf, zacc, mask=zf < F)
            for d0 in range(0, D, TD):
                src, sm = _state_tile(SRC, f0, d0, F, D, TF, TD)
                acc = tl.load(src, mask=sm, other=0.0)
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, real = _entry(code_row, lane, NP)
                    w = tl.load(w_row + lane, mask=real, other=0.0)
                    phi_w = _tile(PHI, base_src + safe, real, f0, F, TF) * w[:, None]
                    acc += tl.dot(tl.trans(phi_w), _tile(V, base_src + safe, real, d0, D, TD), input_precision="ieee")
                dst, dm = _state_tile(DST, f0, d0, F, D, TF, TD)
                tl.store(dst, acc, mask=dm)

    @triton.jit
    def _schedule_tiled(PHI, V, POS, OK, DECAY, SW, ZW, ST, ZT, IDX, CAND0, NCAND, DT, T, S_OUT, Z_OUT, ERR, CODE,
                        WF, M, Hk, Ns, NPMAX, window, cache_size, eps, copy_tol, F: tl.constexpr, D: tl.constexpr,
                        TF: tl.constexpr, TD: tl.constexpr, PB: tl.constexpr, SCORE: tl.constexpr,
                        STATES: tl.constexpr):
        """:func:`_schedule` for states too large to hold in registers (head dim 128: F x D = 256 x 128 fp32, which
        as a matmul operand needs 188 KB of shared memory, over an A100's 163 KB): the state ``S, z`` lives in
        global scratch (``SW, ZW``; the leave-one-out sums in ``ST, ZT``) and every product runs a (TF, TD) tile of
        it at a time, so a program's shared memory does not grow with the state. Same steps, same order, same tie
        rule; sums over the features run a tile at a time, so results agree with :func:`_schedule` to rounding."""
        bh = tl.program_id(0)
        h = bh % Hk
        lam_log = tl.load(DECAY + h)
        base_src = bh * Ns
        err_row = ERR + bh * NPMAX
        code_row = CODE + bh * NPMAX
        w_row = WF + bh * NPMAX
        SW = SW + bh * F * D
        ST = ST + bh * F * D
        ZW = ZW + bh * F
        ZT = ZT + bh * F
        for m in range(0, M):
            dt = tl.load(DT + m).to(tl.float32)
            t = tl.load(T + m)
            lam = tl.exp(lam_log * dt)
            for f0 in range(0, F, TF):
                zf = f0 + tl.arange(0, TF)
                tl.store(ZW + zf, tl.load(ZW + zf, mask=zf < F, other=0.0) * lam, mask=zf < F)
                for d0 in range(0, D, TD):
                    sp, sm = _state_tile(SW, f0, d0, F, D, TF, TD)
                    tl.store(sp, tl.load(sp, mask=sm, other=0.0) * lam, mask=sm)
            tl.debug_barrier()
            P = tl.load(NCAND + m).to(tl.int32)
            c0 = tl.load(CAND0 + m).to(tl.int32)
            row_prev = IDX + (bh * (M + 1) + m) * cache_size
            row_new = row_prev + cache_size
            NP = cache_size + P
            if P > 0:
                # pass 1: the codes (as in _schedule) and every candidate's fold weight
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, pooled = _codes(row_prev, OK, code_row, base_src, lane, c0, cache_size, NP)
                    _, w = _fold_weight(POS, base_src, safe, pooled, valid, lam_log, t, window)
                    tl.store(w_row + lane, w, mask=pooled)
                tl.debug_barrier()
                if SCORE != 2:  # the state with every candidate folded in
                    _fold_into(SW, ST, ZW, ZT, PHI, V, base_src, code_row, w_row, NP, F, D, TF, TD, PB)
                    tl.debug_barrier()
                # pass 2: the scores
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, real = _entry(code_row, lane, NP)
                    rows = base_src + safe
                    pos = tl.load(POS + rows, mask=real, other=0)
                    w = tl.load(w_row + lane, mask=real, other=0.0)
                    den = tl.zeros([PB], tl.float32)
                    self_w = tl.zeros([PB], tl.float32)
                    for f0 in range(0, F, TF):
                        phi = _tile(PHI, rows, real, f0, F, TF)
                        zf = f0 + tl.arange(0, TF)
                        if SCORE == 2:  # the state as it is
                            zs = tl.load(ZW + zf, mask=zf < F, other=0.0)
                        else:  # the state with every other candidate folded in
                            zs = tl.load(ZT + zf, mask=zf < F, other=0.0)
                            self_w += tl.sum(phi * w[:, None] * phi, 1)
                        den += tl.sum(phi * zs[None, :], 1)
                    den = tl.maximum(den - self_w, eps)
                    err = tl.zeros([PB], tl.float32)
                    for d0 in range(0, D, TD):
                        v = _tile(V, rows, real, d0, D, TD)
                        num = tl.zeros([PB, TD], tl.float32)
                        for f0 in range(0, F, TF):
                            if SCORE == 2:
                                sp, sm = _state_tile(SW, f0, d0, F, D, TF, TD)
                            else:
                                sp, sm = _state_tile(ST, f0, d0, F, D, TF, TD)
                            num += tl.dot(_tile(PHI, rows, real, f0, F, TF), tl.load(sp, mask=sm, other=0.0),
                                          input_precision="ieee")
                        pred = (num - self_w[:, None] * v) / den[:, None]
                        dr = d0 + tl.arange(0, TD)
                        err += tl.sum(tl.where((dr < D)[None, :], (v - pred) * (v - pred), 0.0), 1)
                    if SCORE == 0:  # lowered to the distance to the nearest newer valid value
                        near = tl.full([PB], float("inf"), tl.float32)
                        for c in range(0, NP, PB):
                            cs, cv_ok, c_real = _entry(code_row, c + tl.arange(0, PB), NP)
                            cv_ok = cv_ok & c_real
                            pc = tl.load(POS + base_src + cs, mask=cv_ok, other=0)
                            sq = tl.zeros([PB], tl.float32)
                            sqc = tl.zeros([PB], tl.float32)
                            dots = tl.zeros([PB, PB], tl.float32)
                            for d0 in range(0, D, TD):
                                v = _tile(V, rows, real, d0, D, TD)
                                vc = _tile(V, base_src + cs, cv_ok, d0, D, TD)
                                sq += tl.sum(v * v, 1)
                                sqc += tl.sum(vc * vc, 1)
                                dots += tl.dot(v, tl.trans(vc), input_precision="ieee")
                            near = _closer(near, sq[:, None] + sqc[None, :], dots, cv_ok, pc, pos, copy_tol)
                        err = tl.minimum(err, near)
                    tl.store(err_row + lane, tl.where(valid, err, float("-inf")), mask=real)
                tl.debug_barrier()
                # pass 3: the ranks (as in _schedule); the cache_size first stay, the others' fold weights stay in
                # w_row (0 for those that stay) and are folded in a tile at a time
                for b0 in range(0, NP, PB):
                    lane = b0 + tl.arange(0, PB)
                    safe, valid, real = _entry(code_row, lane, NP)
                    keep = _rank_keep(err_row, row_new, lane, safe, valid, real, NP, cache_size, PB)
                    w = tl.load(w_row + lane, mask=real, other=0.0)
                    tl.store(w_row + lane, tl.where(keep, 0.0, w), mask=real)
                tl.debug_barrier()
                _fold_into(SW, SW, ZW, ZW, PHI, V, base_src, code_row, w_row, NP, F, D, TF, TD, PB)
            else:  # no key leaves: the cache as it was
                _copy_row(row_prev, row_new, cache_size, PB)
            tl.debug_barrier()
            if STATES:
                out = bh * M + m
                for f0 in range(0, F, TF):
                    zf = f0 + tl.arange(0, TF)
                    tl.store(Z_OUT + out * F + zf, tl.load(ZW + zf, mask=zf < F, other=0.0), mask=zf < F)
                    for d0 in range(0, D, TD):
                        sp, sm = _state_tile(SW, f0, d0, F, D, TF, TD)
                        op, om = _state_tile(S_OUT + out * F * D, f0, d0, F, D, TF, TD)
                        tl.store(op, tl.load(sp, mask=sm, other=0.0), mask=om)
            tl.debug_barrier()


def schedule(phi: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ok: torch.Tensor, decay: torch.Tensor,
             S0: torch.Tensor, z0: torch.Tensor, idx0: torch.Tensor, cand0, ncand, dt, t, window: int,
             cache_size: int, eps: float, score: str, copy_tol: float, states: bool = True, tiled: bool = False):
    """Run the schedule of one call (module docstring).

    Args:
        phi (B, Hk, Ns, F), v (B, Hk, Ns, D), pos (B, Hk, Ns), ok (B, Hk, Ns): the candidate table (cache first).
        decay (Hk,): log lambda (zeros: no decay). S0 (B, Hk, F, D), z0 (B, Hk, F): the state at the call's start.
        idx0 (B, Hk, cache_size): the cache's table indices, ``-1 - i`` for an empty slot holding entry ``i``.
        cand0, ncand, dt, t: per segment, the table index of its first new candidate, how many (0: no boundary
            or no key leaves), the boundary's step from the previous one (0: none) and the boundary.
        copy_tol: a squared distance below this fraction of two values' squared norms is an exact copy
            (:data:`hedgehog.ops.sparse_cache.COPY_TOL`).
        states: False for a caller that folds the states itself (under autograd): no state is written, and
            ``S``, ``z`` come back as None.
        tiled: run :func:`_schedule_tiled` (the state in global scratch, a tile at a time), for a GPU that cannot
            launch :func:`_schedule` at these shapes (head dim 128 on an A100).
    Returns: ``S (B, Hk, M, F, D)``, ``z (B, Hk, M, F)`` (fp32), ``idx (B, Hk, M, cache_size)`` (int32, encoded as
    ``idx0``).
    """
    B, Hk, Ns, F = phi.shape
    D = v.shape[-1]
    M = len(t)
    dev = phi.device
    NP = cache_size + max(max(ncand), 1)  # the largest pool
    f32 = lambda x: x.float().contiguous()
    idx = torch.full((B, Hk, M + 1, cache_size), -1, dtype=torch.int32, device=dev)
    idx[:, :, 0] = idx0.to(torch.int32)
    ints = lambda xs, dtype=torch.int64: torch.tensor(list(xs), dtype=dtype, device=dev)
    # without states the kernel stores nothing there (one element each: a valid pointer to pass)
    S_out = torch.empty(B, Hk, M, F, D, dtype=torch.float32, device=dev) if states else torch.empty(1, device=dev)
    z_out = torch.empty(B, Hk, M, F, dtype=torch.float32, device=dev) if states else torch.empty(1, device=dev)
    err = torch.empty(B * Hk, NP, dtype=torch.float32, device=dev)
    code = torch.empty(B * Hk, NP, dtype=torch.int32, device=dev)
    table = (f32(phi), f32(v), pos.to(torch.int64).contiguous(), ok.to(torch.int8).contiguous(), f32(decay))
    steps = (ints(cand0), ints(ncand), ints(dt), ints(t))
    sizes = (M, Hk, Ns, NP, int(window), int(cache_size), float(eps), float(copy_tol))
    flags = dict(PB=PB, SCORE=SCORE_CODES[score], STATES=bool(states))
    if tiled:  # the state in scratch: the working state, the leave-one-out sums, the fold weights
        SW, ZW = S0.float().reshape(B * Hk, F, D).clone(), z0.float().reshape(B * Hk, F).clone()
        loo = score != "state"
        ST = torch.empty_like(SW) if loo else torch.empty(1, device=dev)
        ZT = torch.empty_like(ZW) if loo else torch.empty(1, device=dev)
        wf = torch.empty(B * Hk, NP, dtype=torch.float32, device=dev)
        _schedule_tiled[(B * Hk,)](*table, SW, ZW, ST, ZT, idx, *steps, S_out, z_out, err, code, wf, *sizes, F=F, D=D,
                                   TF=min(TILE, _dims(F)), TD=min(TILE, _dims(D)), **flags, num_warps=TILED_WARPS)
    else:
        _schedule[(B * Hk,)](*table, f32(S0), f32(z0), idx, *steps, S_out, z_out, err, code, *sizes, F=F, D=D,
                             BF=_dims(F), BD=_dims(D), **flags, num_warps=SCHEDULE_WARPS, maxnreg=MAXNREG)
    if not states:
        S_out = z_out = None
    return S_out, z_out, idx[:, :, 1:]


# ------------------------------------------------------------------------------------------------------------------
# The attention of every query against its segment's state and cache (without autograd), one program per
# (segment, batch row, query head): what :func:`hedgehog.ops.sparse_cache._attend` computes in a few large batched
# operations, without materialising its per-segment scores, recent keys and masks. The exact keys (sinks, cache,
# recent) are read a block of :data:`KB` at a time with a running row max, as flash attention does: the sums come out
# relative to the row max over every exact score, which is the hybrid's ``c_n``.

if triton is not None:

    @triton.jit
    def _exact_block(q, KP, VP, rows, ok, see, m_i, l_i, acc, dq, dv, dqm, dvm, d: tl.constexpr, D: tl.constexpr):
        """One block of exact keys at rows ``rows`` of ``KP``/``VP`` (``ok``: which to read; ``see`` (BL, KB): which
        each query sees) folded into the running max ``m_i``, sum ``l_i`` and weighted values ``acc``."""
        k = tl.load(KP + rows[:, None] * d + dq[None, :], mask=ok[:, None] & dqm[None, :], other=0.0).to(tl.float32)
        v = tl.load(VP + rows[:, None] * D + dv[None, :], mask=ok[:, None] & dvm[None, :], other=0.0).to(tl.float32)
        s = tl.where(see, tl.dot(q, tl.trans(k), input_precision="ieee"), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        return m_new, l_i, acc

    @triton.jit
    def _attend(Q, PHI, S, Z, KT, VT, ENTRY, SEEC, SK, SV, SOK, K, V, KOK, GAM, DECAY, Y, STARTS, ENDS, TS,
                p0, base, n, Nk, Nt, Hq, Hk, G, M, lam, ns, window, R, scale, eps, d: tl.constexpr, F: tl.constexpr,
                D: tl.constexpr, BD: tl.constexpr, FB: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
                KB: tl.constexpr):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // G
        bk = b * Hk + hk
        start = tl.load(STARTS + m)
        end = tl.load(ENDS + m)
        t = tl.load(TS + m)
        dq = tl.arange(0, BD)
        dv = tl.arange(0, BDV)
        dqm, dvm = dq < d, dv < D
        qpos = start + tl.arange(0, BL)
        rows = qpos < end
        qi = qpos - p0
        jb = tl.arange(0, KB)
        # inputs in their own dtype (bf16 q, k, v on a GPU), every product in fp32
        q = tl.load(Q + (bh * n + qi)[:, None] * d + dq[None, :], mask=rows[:, None] & dqm[None, :], other=0.0)
        q = q.to(tl.float32) * scale
        m_i = tl.full([BL], float("-inf"), tl.float32)
        l_i = tl.zeros([BL], tl.float32)
        acc = tl.zeros([BL, BDV], tl.float32)
        # the sinks that have left the recent keys
        for j0 in range(0, ns, KB):
            js = j0 + jb
            s_ok = (js < ns) & (js <= t - window)
            s_ok = s_ok & (tl.load(SOK + b * ns + js, mask=js < ns, other=0) != 0)
            m_i, l_i, acc = _exact_block(q, SK, SV, bk * ns + js, s_ok, rows[:, None] & s_ok[None, :], m_i, l_i, acc,
                                         dq, dv, dqm, dvm, d, D)
        # the cache as of the segment's boundary: its entries in the table of candidate keys
        for j0 in range(0, lam, KB):
            jc = j0 + jb
            crow = (bk * M + m) * lam + jc
            c_ok = (jc < lam) & (tl.load(SEEC + crow, mask=jc < lam, other=0) != 0)
            trow = bk * Nt + tl.load(ENTRY + crow, mask=c_ok, other=0)
            m_i, l_i, acc = _exact_block(q, KT, VT, trow, c_ok, rows[:, None] & c_ok[None, :], m_i, l_i, acc,
                                         dq, dv, dqm, dvm, d, D)
        # the recent keys t - w < i <= query
        for j0 in range(0, R, KB):
            rp = t - window + 1 + j0 + jb
            ri = rp - base
            r_in = (rp >= 0) & (rp < end) & (ri < Nk)
            r_ok = r_in & (tl.load(KOK + b * Nk + ri, mask=r_in, other=0) != 0)
            see_r = rows[:, None] & r_ok[None, :] & (rp[None, :] <= qpos[:, None])
            m_i, l_i, acc = _exact_block(q, K, V, bk * Nk + ri, r_ok, see_r, m_i, l_i, acc, dq, dv, dqm, dvm, d, D)
        gam = tl.load(GAM + h)
        num = acc * gam
        den = l_i * gam
        # the linear part: the state of the boundary, lambda^(query - t), FB features at a time
        st = bk * M + m
        lin = tl.zeros([BL, BDV], tl.float32)
        lin_den = tl.zeros([BL], tl.float32)
        for f0 in range(0, F, FB):
            df = f0 + tl.arange(0, FB)
            dfm = df < F
            fq = tl.load(PHI + (bh * n + qi)[:, None] * F + df[None, :], mask=rows[:, None] & dfm[None, :],
                         other=0.0).to(tl.float32)
            Sm = tl.load(S + st * F * D + df[:, None] * D + dv[None, :], mask=dfm[:, None] & dvm[None, :], other=0.0)
            zm = tl.load(Z + st * F + df, mask=dfm, other=0.0)
            lin += tl.dot(fq, Sm, input_precision="ieee")
            lin_den += tl.sum(fq * zm[None, :], 1)
        age = tl.exp(tl.load(DECAY + hk) * (qpos - t).to(tl.float32))
        lin = lin * age[:, None]
        lin_den = lin_den * age
        y = (num + lin) / tl.maximum(den + lin_den, eps)[:, None]
        tl.store(Y + (bh * n + qi)[:, None] * D + dv[None, :], y, mask=rows[:, None] & dvm[None, :])


def attend(q, phi_q, S, z, tab_k, tab_v, entry, see_c, sink_k, sink_v, sink_ok, keys_k, keys_v, keys_ok, base: int,
           segs, p0: int, window: int, gamma, scale: float, decay, eps: float) -> torch.Tensor:
    """Every query of a call against its segment's state, cache, recent keys and sinks (no autograd).

    Args: q (B, Hq, n, d), phi_q (B, Hq, n, F); per segment ``S`` (B, Hk, M, F, D), ``z`` (B, Hk, M, F); the
    cache as ``entry`` (B, Hk, M, λ), indices into the table ``tab_k``/``tab_v`` (B, Hk, Nt, .), and ``see_c``
    (B, Hk, M, λ), so no segment's cache is copied out; the sinks (B, Hk, ns, .) and ``sink_ok`` (B, ns); the call's
    key table ``keys_k``/``keys_v`` (B, Hk, Nk, .), ``keys_ok`` (B, Nk) from position ``base``; ``segs`` ``(start,
    end, t)``; gamma (Hq,) or a scalar; decay (Hk,) or None. Keys, values, queries and features are read in their
    own dtype (no fp32 copies); the products and the output are fp32.
    Returns: y (B, Hq, n, D) in float32.
    """
    B, Hq, n, d = q.shape
    Hk, M, lam = S.shape[1], S.shape[2], entry.shape[3]
    F, D, ns, Nk, Nt = phi_q.shape[-1], tab_v.shape[-1], sink_k.shape[2], keys_k.shape[2], tab_k.shape[2]
    dev = q.device
    c = lambda x: x.contiguous()
    f32 = lambda x: x.float().contiguous()
    i8 = lambda x: x.to(torch.int8).contiguous()
    ints = lambda i: torch.tensor([s[i] for s in segs], dtype=torch.int64, device=dev)
    gam = torch.as_tensor(gamma, device=dev).detach().float().expand(Hq).contiguous()
    lam_log = decay.detach().float().contiguous() if decay is not None else torch.zeros(Hk, device=dev)
    L = max(s[1] - s[0] for s in segs)
    kb = WIDE_KB if max(_dims(d), _dims(D)) >= WIDE_FROM else KB
    R = max(s[1] - s[2] for s in segs) + window - 1
    y = torch.empty(B, Hq, n, D, dtype=torch.float32, device=dev)
    dummy = lambda x: x if x.numel() else torch.zeros(1, device=dev, dtype=x.dtype)  # a valid pointer for no sinks
    _attend[(M, B * Hq)](
        c(q), c(phi_q), f32(S), f32(z), c(tab_k), c(tab_v), entry.to(torch.int32).contiguous(), i8(see_c),
        dummy(c(sink_k)), dummy(c(sink_v)), dummy(i8(sink_ok)), c(keys_k), c(keys_v), i8(keys_ok), gam, lam_log, y,
        ints(0), ints(1), ints(2), int(p0), int(base), n, Nk, Nt, Hq, Hk, Hq // Hk, M, lam, ns, int(window), R,
        float(scale), float(eps), d=d, F=F, D=D, BD=_dims(d), FB=min(kb, FB, _dims(F)), BDV=_dims(D), BL=_pow2(L),
        KB=kb, num_warps=ATTEND_WARPS)
    return y
