"""The hybrid with a sparse cache of exact keys (LoLA, McDermott et al. 2025): long-range recall at constant memory.

A decayed linear state forgets (a key ``a`` tokens old weighs ``lambda^a``) and an undecayed one blurs: neither can
give back one passkey from thousands of filler tokens. LoLA keeps three memories per key/value head:

* the **recent** keys, exact (the hybrid's sliding window);
* a **sparse cache** of ``cache_size`` older keys, exact, chosen because the linear state represents them worst;
* the **linear state** ``(S, z)`` of every other older key (decayed as the layer's state is).

Keys leave the window a chunk at a time. At a boundary ``t`` (a multiple of ``chunk``) the keys ``i <= t - w``
still in the recent buffer leave it; the first ``sinks`` keys go to their own exact slots (attention sinks), the
others join the cache's keys as candidates. Each candidate ``j`` is scored by its *self-recall error*,
``|| v_j - S_j^T phi(k_j) / (z_j . phi(k_j)) ||^2`` (how badly reading a state with its own key returns its value);
the ``cache_size`` worst stay in the cache and the rest are folded into the state. Three rules (``score``):

* ``"state"`` (LoLA's rule): ``S_j = S``, the state as it is. A token repeated through the text (every "There"
  of a filler) is read back badly each time, so its copies fill the cache and push out the one key that matters;
* ``"memory"``: ``S_j = S + sum_{i != j} w_i phi(k_i) v_i^T`` over the other candidates, the state as it would
  be if every other candidate were folded (:func:`leave_one_out_error`): a repeated key is read back by its
  copies and leaves, a unique one stays. But the state is a decayed blend of every key like it, so copies of a
  filler token still read back badly and, on SmolLM2 at 4k, still hold most slots in most layers;
* ``"unique"`` (the default): the smaller of that error and the distance from ``v_j`` to the nearest value of a
  newer candidate (:func:`newer_copy_error`), so of the copies of a value only the newest can stay, whatever the
  state makes of them. Measured in docs/results.md (passkey at 2k and 4k).

Between boundaries the
queries ``n`` in ``[t, t + chunk)`` see, with one normalisation (see :mod:`hedgehog.ops.hybrid`):

    exact:  the sinks, the cache, and the recent keys t - w < i <= n      g * exp(s_ni - c_n) v_i
    linear: the state (keys folded by boundary t)                          lambda^(n - w - i) phi(q_n) . phi(k_i) v_i

with ``c_n`` the max of the row's exact scores. So a query sees between ``w`` and ``w + chunk - 1`` recent keys
exactly; ``chunk = 1`` and ``cache_size = 0`` is the plain hybrid. Which keys are cached depends on keys and values
only, never on queries, so a prefill and token-by-token decoding follow the same schedule and give the same output:
:func:`sparse_hybrid_attention` takes and returns a :class:`SparseCacheState` and is used for both. Memory per KV
head: ``sinks + cache_size + w + chunk - 1`` exact keys/values plus ``(S, z)``, whatever the context length.

A long call without autograd (a prefill, an evaluation) runs in pieces of ``PREFILL_PIECE`` tokens, each from the
state the one before it left, with the features computed per piece where the caller passes the maps as functions:
the same schedule and the same output, but the per-segment states, scores and features of one piece at a time, so
its memory stops growing with the context (the bench's 8 heads in fp32 on the CPU, 64k tokens: 7.0 GB in one
piece, 0.4 GB in pieces; docs/results.md). Under autograd a call is one piece (backward needs every segment's
tensors anyway).

On CUDA (float32 accumulation, a call of more than one token) the schedule, which is sequential and some fifty
small operations per boundary here, runs as one Triton kernel launch per call (:mod:`hedgehog.ops.triton_sparse`),
which returns the state and the cache's indices at every boundary; under autograd the states are then folded again
in PyTorch from that schedule (:func:`_fold_states`), so gradients flow as here. Without autograd the attention of
the call runs there as a second kernel (:func:`hedgehog.ops.triton_sparse.attend`), one program per segment and
query head, instead of :func:`_attend`'s batched operations. Among equal scores the kernel keeps
the earlier pool entry, as :func:`_top` does here, and both count a value's exact copies (first-layer values of a
repeated token) at distance 0 (:data:`COPY_TOL`), so the two choose the same keys on every device.

LoLA adds the cache to a trained hybrid without training. Here stage 2 trains with it: the op is differentiable
(the choice of which keys stay is made outside the graph), and LoRA trained without the cache fits a student that
sees old keys only through the state, so the same cache then served it far worse than it serves the teacher's own
weights (passkey at 4k 1/8 against 6/8; trained with the cache 6/8: docs/results.md).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from hedgehog.ops.hybrid import Gamma
from hedgehog.ops.chunked import Features, acc_dtype, feature_rows, records
from hedgehog.ops.linear_attention import DEFAULT_EPS

SCORES = ("unique", "memory", "state")
# Tokens per piece of a call without autograd (module docstring). One piece's temporaries (each segment's state and
# cache, the recent keys, the scores) take ~15 KB per token and KV head at the default model's shapes in fp32: ~30 MB
# per KV head for 2,048 tokens. The evaluation's 4k and 8k windows run in 2 and 4 pieces, with the same figures.
PREFILL_PIECE = 2048


@dataclass
class SparseCacheState:
    """What a sparse-cache hybrid layer carries from one call to the next (per batch row and KV head).

    ``S`` (B, Hk, F, D), ``z`` (B, Hk, F): the linear state of the folded keys, each weighted
    ``lambda^(boundary - w - i)`` (exactly 1 without decay). ``recent_*``: the keys ``boundary - w < i < seen``
    in order, ``recent_ok`` (B, r) False for padding. ``cache_*``: ``cache_size`` slots, ``cache_ok`` (B, Hk, λ)
    False for empty ones, ``cache_pos`` their positions. ``sink_*``: ``sinks`` slots for the first tokens, filled as
    they arrive (``sink_ok`` False before that and for padding); a query sees sink ``j`` there once ``j`` has left
    the recent keys.
    """

    S: torch.Tensor
    z: torch.Tensor
    recent_k: torch.Tensor
    recent_v: torch.Tensor
    recent_phi: torch.Tensor
    recent_ok: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    cache_phi: torch.Tensor
    cache_ok: torch.Tensor
    cache_pos: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_ok: torch.Tensor
    seen: int = 0
    boundary: int = 0

    def tensors(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def map(self, fn) -> None:
        """Apply ``fn`` to every tensor along the batch axis (beam reordering, batch selection)."""
        for name, t in self.tensors():
            setattr(self, name, fn(t))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())


def empty_state(B: int, Hk: int, d: int, D: int, F: int, cache_size: int, sinks: int, dtype, acc,
                device) -> SparseCacheState:
    z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)
    return SparseCacheState(
        S=z(B, Hk, F, D, dt=acc), z=z(B, Hk, F, dt=acc),
        recent_k=z(B, Hk, 0, d), recent_v=z(B, Hk, 0, D), recent_phi=z(B, Hk, 0, F, dt=acc),
        recent_ok=z(B, 0, dt=torch.bool),
        cache_k=z(B, Hk, cache_size, d), cache_v=z(B, Hk, cache_size, D), cache_phi=z(B, Hk, cache_size, F, dt=acc),
        cache_ok=z(B, Hk, cache_size, dt=torch.bool), cache_pos=z(B, Hk, cache_size, dt=torch.long),
        sink_k=z(B, Hk, sinks, d), sink_v=z(B, Hk, sinks, D), sink_ok=z(B, sinks, dt=torch.bool))


def self_recall_error(phi: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                      eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``|| v - S^T phi / (z . phi) ||^2`` per key: phi (B, Hk, P, F), v (B, Hk, P, D), S (B, Hk, F, D), z (B, Hk, F)
    -> (B, Hk, P). With an empty state the read-out is 0 and the error is ``||v||^2``."""
    pred = (phi @ S) / (phi @ z.unsqueeze(-1)).clamp_min(eps)
    return (v.to(pred.dtype) - pred).pow(2).sum(-1)


def leave_one_out_error(phi: torch.Tensor, v: torch.Tensor, w: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                        eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The self-recall error of each of ``P`` candidates against the state with every *other* candidate folded in
    (weights ``w`` (B, Hk, P)): ``|| v_j - S_j^T phi_j / (z_j . phi_j) ||^2`` with ``S_j = S + sum_{i != j} w_i
    phi_i v_i^T``. A key repeated many times is recalled by its copies and leaves; a unique one stays."""
    acc = S.dtype
    phi_w = phi.to(acc) * w.unsqueeze(-1)
    S_tot = S + phi_w.transpose(-1, -2) @ v.to(acc)
    z_tot = z + phi_w.sum(2)
    self_w = (phi_w * phi.to(acc)).sum(-1)  # w_j phi_j . phi_j
    num = phi.to(acc) @ S_tot - self_w.unsqueeze(-1) * v.to(acc)
    den = (phi.to(acc) @ z_tot.unsqueeze(-1)).squeeze(-1) - self_w
    pred = num / den.clamp_min(eps).unsqueeze(-1)
    return (v.to(acc) - pred).pow(2).sum(-1)


COPY_TOL = 1e-4  # a squared distance below this fraction of the two values' squared norms: an exact copy (0)


def newer_copy_error(v: torch.Tensor, ok: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``min || v_j - v_i ||^2`` over the valid entries ``i`` (``ok`` (B, Hk, P)) newer than ``j`` (``pos`` (B, Hk, P)),
    for ``v`` (B, Hk, P, D), in ``dtype``: how well a later exact copy would give ``v_j`` back (``inf`` for the newest
    of its kind, so of several copies one keeps its own score).

    A distance below :data:`COPY_TOL` of ``||v_i||^2 + ||v_j||^2`` is 0: the expansion ``|a|^2 + |b|^2 - 2 a.b``
    leaves an exact copy (a repeated token's value in the first layer) a rounding residue that differs between
    devices and kernels, and ranking those residues would make the cache's choice among copies device-dependent.
    The Triton schedule does the same, so both then rank the copies' equal scores by pool order (:func:`_top`)."""
    vv = v.to(dtype)
    sq = vv.pow(2).sum(-1)
    norms = sq.unsqueeze(-1) + sq.unsqueeze(-2)
    d = (norms - 2 * vv @ vv.transpose(-1, -2)).clamp_min(0)
    d = d.masked_fill(d <= COPY_TOL * norms, 0.0)
    newer = ok.unsqueeze(-2) & (pos.unsqueeze(-2) > pos.unsqueeze(-1))  # [j, i]: i is valid and newer than j
    return d.masked_fill(~newer, float("inf")).amin(-1)


def _top(err: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` highest scores along the last axis, highest first; among equal scores the earlier
    pool entry, as the Triton schedule takes it (a stable sort: ``torch.topk``'s pick among ties is its own and
    differs between CPU and CUDA, so the cache would hold other keys on another device)."""
    return err.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def _segments(p0: int, n: int, chunk: int, boundary: int, window: int, sinks: int):
    """The segments of a call of ``n`` tokens from ``p0`` after the boundary ``boundary``: per segment
    ``(start, end, t, leave)``. Its queries ``start..end-1`` read the state of boundary ``t``; ``leave`` is None, or,
    where a boundary falls at ``start``, ``(prev, first, last)``: the boundary before it and the positions of the keys
    that leave the recent keys there (``last < first``: none). The one walk both schedules take."""
    pos, b = p0, boundary
    while pos < p0 + n:
        leave = None
        if pos % chunk == 0 and pos != b:
            leave = (b, max(0, b - window + 1, sinks), pos - window)
            b = pos
        end = min(p0 + n, (pos // chunk + 1) * chunk)
        yield pos, end, b, leave
        pos = end


def _gather_keys(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Entries of ``t`` (B, Hk, N) or (B, Hk, N, X) along the key axis at ``idx`` (B, Hk, ...) (long):
    (B, Hk, ...) or (B, Hk, ..., X)."""
    flat = idx.reshape(*idx.shape[:2], -1)
    if t.dim() == 3:
        return t.gather(2, flat).view(idx.shape)
    return t.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])).view(*idx.shape, t.shape[-1])


class _Keys:
    """The keys a call can reach by position: the state's recent keys followed by the call's own, from ``base``."""

    def __init__(self, st: SparseCacheState, k, v, phi_k, ok, base: int):
        self.k = torch.cat([st.recent_k, k], 2)
        self.v = torch.cat([st.recent_v, v], 2)
        self.phi = torch.cat([st.recent_phi, phi_k.to(st.recent_phi.dtype)], 2)
        self.ok = torch.cat([st.recent_ok, ok], 1)
        self.base = base


class _SegCache(NamedTuple):
    """Each segment's cache as of its boundary: ``entry`` (B, Hk, M, λ), indices into the table ``k``, ``v``
    (B, Hk, Nt, .) of the call's candidate keys (the kernel schedule), or with ``entry`` None the keys themselves,
    ``k``, ``v`` (B, Hk, M, λ, .) (the PyTorch schedule); ``see`` (B, Hk, M, λ): which slots hold a key."""
    k: torch.Tensor
    v: torch.Tensor
    entry: Optional[torch.Tensor]
    see: torch.Tensor

    def gathered(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The keys and values per segment, (B, Hk, M, λ, .)."""
        if self.entry is None:
            return self.k, self.v
        return _gather_keys(self.k, self.entry), _gather_keys(self.v, self.entry)

    def table(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A table (B, Hk, Nt, .) of keys and values and the entries (B, Hk, M, λ) into it."""
        if self.entry is not None:
            return self.k, self.v, self.entry
        B, Hk, M, lam = self.see.shape
        flat = lambda x: x.reshape(B, Hk, M * lam, x.shape[-1])
        entry = torch.arange(M * lam, device=self.see.device).view(M, lam).expand(B, Hk, M, lam)
        return flat(self.k), flat(self.v), entry


def _boundary(st: SparseCacheState, t: int, first: int, last: int, keys: _Keys, window: int, cache_size: int,
              decay: Optional[torch.Tensor], eps: float, score: str = "unique") -> None:
    """The keys ``first..last`` leave the recent keys at boundary ``t`` (:func:`_segments`); they are scored with the
    cache's, the ``cache_size`` worst represented stay exact and the rest are folded into the state (which first
    decays to ``t``). Replaces the state's tensors (earlier segments keep the ones they read)."""
    if decay is not None and t > st.boundary:
        lam = torch.exp(decay.to(st.S.dtype) * (t - st.boundary))  # (Hk,)
        st.S = st.S * lam[None, :, None, None]
        st.z = st.z * lam[None, :, None]
    st.boundary = t
    if last < first:
        return
    B, Hk = st.S.shape[:2]
    P = last - first + 1
    sl = slice(first - keys.base, last - keys.base + 1)
    pool_k = torch.cat([st.cache_k, keys.k[:, :, sl]], 2)
    pool_v = torch.cat([st.cache_v, keys.v[:, :, sl]], 2)
    pool_phi = torch.cat([st.cache_phi, keys.phi[:, :, sl]], 2)
    pool_ok = torch.cat([st.cache_ok, keys.ok[:, None, sl].expand(B, Hk, P)], 2)
    pool_pos = torch.cat([st.cache_pos, torch.arange(first, last + 1, device=st.S.device).expand(B, Hk, P)], 2)
    fold = pool_ok
    wt_all = pool_ok.to(st.S.dtype)
    if decay is not None:  # key i weighs lambda^(t - w - i) at the boundary
        wt_all = wt_all * torch.exp(decay.to(st.S.dtype)[None, :, None] * (t - window - pool_pos).to(st.S.dtype))
    if cache_size:
        with torch.no_grad():  # which keys stay is a choice, not a function to differentiate
            if score in ("memory", "unique"):
                err = leave_one_out_error(pool_phi, pool_v, wt_all, st.S, st.z, eps)
                if score == "unique":  # a value a newer candidate holds as well leaves too
                    err = torch.minimum(err, newer_copy_error(pool_v, pool_ok, pool_pos, err.dtype))
            else:
                err = self_recall_error(pool_phi, pool_v, st.S, st.z, eps)
            err = err.masked_fill(~pool_ok, float("-inf"))
            keep = _top(err, cache_size)  # (B, Hk, λ)
        st.cache_k, st.cache_v, st.cache_phi = (_gather_keys(x, keep) for x in (pool_k, pool_v, pool_phi))
        st.cache_ok, st.cache_pos = _gather_keys(pool_ok, keep), _gather_keys(pool_pos, keep)
        fold = pool_ok & ~torch.zeros_like(pool_ok).scatter_(2, keep, True)
    wt = wt_all * fold.to(st.S.dtype)
    phi_w = pool_phi * wt.unsqueeze(-1)
    st.S = st.S + phi_w.transpose(-1, -2) @ pool_v.to(st.S.dtype)
    st.z = st.z + phi_w.sum(2)


def _kernel_serves(q, acc, cache_size: int) -> bool:
    """Whether the Triton kernels (:mod:`hedgehog.ops.triton_sparse`) may run for this call: on CUDA (or under
    Triton's CPU interpreter), in float32, with a cache; ``HEDGEHOG_SPARSE_KERNEL=0`` turns them off. The schedule
    kernel also needs more than one token (a decoding step without a boundary has nothing to schedule), the
    attention kernel a call without autograd (training keeps the PyTorch attention and its gradients)."""
    if not cache_size or acc != torch.float32 or os.environ.get("HEDGEHOG_SPARSE_KERNEL") == "0":
        return False
    from hedgehog.ops import triton_sparse

    return triton_sparse.serves(q)


# (kernel, device, shape) that a GPU could not launch for want of shared memory or registers: the PyTorch path
# serves them from then on in this process
_CANNOT_LAUNCH = set()


def _on_kernel(kernel: str, key: tuple, run: Callable, then: str = "the PyTorch path"):
    """``run()``, or None where this GPU cannot launch ``kernel`` for calls like this one (Triton's
    ``OutOfResources``: at head dim 128 the schedule with its state in registers needs ~188 KB of shared memory,
    over an A100's 163 KB; tests/ops/test_triton_compile.py), after one warning; the caller then takes ``then``,
    with the same results. Nothing of the state has changed when a launch is refused."""
    if (kernel, key) in _CANNOT_LAUNCH:
        return None
    try:
        return run()
    except Exception as e:  # noqa: BLE001 (only Triton's refusal to launch is caught: triton is not imported here)
        if type(e).__name__ != "OutOfResources":
            raise
        _CANNOT_LAUNCH.add((kernel, key))
        warnings.warn(f"the sparse cache's Triton {kernel} kernel cannot run on this GPU for these shapes ({e}); "
                      f"{then} serves them from now on in this process, with the same results"
                      f"{', more slowly' if then == 'the PyTorch path' else ''}. HEDGEHOG_SPARSE_KERNEL=0 skips "
                      "the kernels from the start.", RuntimeWarning)
        return None


def _schedule_on_kernel(st: SparseCacheState, keys: _Keys, p0: int, n: int, chunk: int, window: int, sinks: int,
                        cache_size: int, decay, eps: float, score: str, tiled: bool = False):
    """The boundaries of one call in one kernel launch: the segments ``(start, end, t)`` and, per segment, the
    state and cache :func:`_attend` reads; ``st`` is left as the last boundary left it (as :func:`_boundary` does)."""
    from hedgehog.ops import triton_sparse

    B, Hk = st.S.shape[:2]
    dev, lam = st.S.device, cache_size
    segs, cand0, ncand, dts = [], [], [], []
    for start, end, t, leave in _segments(p0, n, chunk, st.boundary, window, sinks):
        prev, first, last = leave or (t, 0, -1)
        cand0.append(lam + first - keys.base if leave else 0)
        ncand.append(max(0, last - first + 1))
        dts.append(t - prev)
        segs.append((start, end, t))
    nk = keys.k.shape[2]
    tab = lambda cache, new: torch.cat([cache, new], 2)
    tab_k, tab_v, tab_phi = tab(st.cache_k, keys.k), tab(st.cache_v, keys.v), tab(st.cache_phi, keys.phi)
    tab_pos = tab(st.cache_pos, (keys.base + torch.arange(nk, device=dev)).expand(B, Hk, nk))
    tab_ok = tab(st.cache_ok, keys.ok[:, None].expand(B, Hk, nk))
    slots = torch.arange(lam, device=dev).expand(B, Hk, lam)
    idx0 = torch.where(st.cache_ok, slots, -1 - slots)
    lam_log = decay.detach().float() if decay is not None else torch.zeros(Hk, device=dev)
    ts = [s[2] for s in segs]
    autograd = records((tab_phi, tab_v, st.S, st.z, decay))
    with torch.no_grad():  # under autograd the kernel only chooses; the states are folded again below
        S, z, idx = triton_sparse.schedule(tab_phi, tab_v, tab_pos, tab_ok, lam_log, st.S, st.z, idx0, cand0,
                                           ncand, dts, ts, window, cache_size, eps, score, COPY_TOL,
                                           states=not autograd, tiled=tiled)
    if autograd:
        S, z = _fold_states(st, tab_phi, tab_v, tab_pos, tab_ok, idx0, idx, cand0, ncand, dts, ts, window, decay)
    see = idx >= 0
    entry = torch.where(see, idx, -1 - idx).long()  # (B, Hk, M, λ)
    last = entry[:, :, -1]
    st.S, st.z, st.boundary = S[:, :, -1], z[:, :, -1], ts[-1]
    st.cache_k, st.cache_v, st.cache_ok = _gather_keys(tab_k, last), _gather_keys(tab_v, last), see[:, :, -1]
    st.cache_phi, st.cache_pos = _gather_keys(tab_phi, last), _gather_keys(tab_pos, last)
    return segs, (S, z, _SegCache(tab_k, tab_v, entry, see))


def _fold_states(st: SparseCacheState, tab_phi, tab_v, tab_pos, tab_ok, idx0, idx, cand0, ncand, dts, ts,
                 window: int, decay):
    """The state at each segment, ``(S (B, Hk, M, F, D), z (B, Hk, M, F))``, differentiably, from a schedule the
    kernel chose: at boundary ``m`` the pool is the cache before it and its new candidates, and the valid pool
    entries not in the cache after it are folded, weighted ``lambda^(t - w - i)``, after the state decays by
    ``lambda^dt`` (what :func:`_boundary` does, with the choice fixed; the scan over boundaries as one matmul, so
    its sums associate differently, within fp32 rounding)."""
    B, Hk, M, lam = idx.shape
    dev, acc = st.S.device, st.S.dtype
    C = max(max(ncand), 1)
    prev = torch.cat([idx0.unsqueeze(2).to(idx.dtype), idx[:, :, :-1]], 2)  # the cache before each boundary
    j = torch.arange(C, device=dev)
    new = torch.tensor(cand0, device=dev)[:, None] + j  # (M, C)
    new_real = j < torch.tensor(ncand, device=dev)[:, None]
    new = torch.where(new_real, new, torch.zeros_like(new)).expand(B, Hk, M, C)
    entry = torch.cat([torch.where(prev >= 0, prev, -1 - prev).long(), new], -1)  # (B, Hk, M, λ + C)
    valid = torch.cat([prev >= 0, _gather_keys(tab_ok, new) & new_real], -1)
    kept = (entry.unsqueeze(-1) == torch.where(idx >= 0, idx, -1).long().unsqueeze(-2)).any(-1)
    fold = valid & ~kept & torch.tensor([p > 0 for p in ncand], device=dev)[:, None]
    wt = fold.to(acc)
    if decay is not None:
        age = torch.tensor(ts, device=dev)[:, None] - window - _gather_keys(tab_pos, entry)
        wt = wt * torch.exp(decay.to(acc)[None, :, None, None] * age.to(acc))
    phi_w = _gather_keys(tab_phi, entry) * wt.unsqueeze(-1)
    vv = _gather_keys(tab_v, entry)
    dS, dz = phi_w.transpose(-1, -2) @ vv.to(acc), phi_w.sum(-2)
    # S_m = lambda^(T_m) S_0 + sum_{j <= m} lambda^(T_m - T_j) dS_j, with T the time since the state's boundary:
    # the scan of :func:`_boundary` (decay, then fold) in one (M x M) matmul per KV head, not 4 small ops a segment
    # (a boundary without candidates has dS = 0: ``fold`` is empty there; no decay is lambda = 1, exp(0) exactly)
    T = torch.tensor(dts, device=dev, dtype=acc).cumsum(0)  # (M,)
    lam_log = decay.to(acc) if decay is not None else torch.zeros(Hk, device=dev, dtype=acc)
    tri = torch.ones(M, M, device=dev, dtype=torch.bool).tril()
    W = torch.exp(lam_log[:, None, None] * (T[:, None] - T[None, :]).clamp_min(0)) * tri  # (Hk, M, M)
    w0 = torch.exp(lam_log[:, None] * T[None, :])  # (Hk, M)
    F_, D_ = dS.shape[-2:]
    S = w0[None, :, :, None, None] * st.S[:, :, None] + (W @ dS.reshape(B, Hk, M, F_ * D_)).view(B, Hk, M, F_, D_)
    z = w0[None, :, :, None] * st.z[:, :, None] + W @ dz
    return S, z


def _attend(segs, S, z, cache: _SegCache, st: SparseCacheState, keys: _Keys, q, phi_q, p0: int, window: int,
            gamma: Gamma, scale: float, decay, eps: float) -> torch.Tensor:
    """Every query of the call at once, segment by segment in one batch: (B, Hq, n, D) in acc.

    ``segs``: per segment ``(start, end, t)``, the queries ``start..end-1`` read the state ``S`` (B, Hk, M, F, D),
    ``z`` (B, Hk, M, F) and the cache (:class:`_SegCache`) as they were at boundary ``t``, the recent keys
    ``t - w < i <= n`` and the sinks ``j <= t - w``. Where the Triton kernel serves (:func:`_kernel_serves`, no
    autograd) it computes the same, reading the cache through its indices.
    """
    if _kernel_serves(q, S.dtype, cache.see.shape[3]) and not records(
            (q, phi_q, S, z, cache.k, cache.v, keys.k, keys.v, decay, gamma)):
        from hedgehog.ops import triton_sparse

        y = _on_kernel("attention", (str(q.device), q.dtype, q.shape[-1], phi_q.shape[-1], S.shape[-1]),
                       lambda: triton_sparse.attend(q, phi_q, S, z, *cache.table(), cache.see, st.sink_k, st.sink_v,
                                                    st.sink_ok, keys.k, keys.v, keys.ok, keys.base, segs, p0, window,
                                                    gamma, scale, decay, eps))
        if y is not None:
            return y
    Kc, Vc, see_c = *cache.gathered(), cache.see
    B, Hq, n, d = q.shape
    Hk = st.S.shape[1]
    g = Hq // Hk
    acc, dev = st.S.dtype, q.device
    M = len(segs)
    starts = torch.tensor([s[0] for s in segs], device=dev)
    ends = torch.tensor([s[1] for s in segs], device=dev)
    ts = torch.tensor([s[2] for s in segs], device=dev)
    L = int((ends - starts).max())
    R = int((ends - ts).max()) + window - 1  # recent keys a segment may see
    qpos = starts[:, None] + torch.arange(L, device=dev)[None, :]  # (M, L)
    qrow = qpos < ends[:, None]
    qi = (qpos - p0).clamp(max=n - 1).flatten()
    # rows of a segment: its L queries for each of the g query heads of a KV head, (B, Hk, M, g * L, .)
    # index_select, not t[:, :, idx]: on the CPU the latter's backward (an accumulating index_put over repeated
    # indices) sums in an order that varies from run to run with 2+ threads, so stage 2 was not reproducible
    rows = lambda t: t.to(acc).index_select(2, qi).view(B, Hk, g, M, L, -1).transpose(2, 3).reshape(B, Hk, M, g * L, -1)
    qg, fq = rows(q) * scale, rows(phi_q)
    # recent keys t - w < i <= query, by position from the call's key table
    rpos = (ts - window + 1)[:, None] + torch.arange(R, device=dev)[None, :]  # (M, R)
    ri = (rpos - keys.base).clamp(0, keys.k.shape[2] - 1).flatten()
    Kr = keys.k.to(acc).index_select(2, ri).view(B, Hk, M, R, d)
    Vr = keys.v.to(acc).index_select(2, ri).view(B, Hk, M, R, -1)
    see_r = ((rpos >= 0)[:, None, :] & (rpos[:, None, :] <= qpos[:, :, None]))[None] & keys.ok[:, ri].view(B, M, 1, R)
    # cache as of each segment's boundary; sinks that have left the recent keys
    Kc, Vc, see_c = Kc.to(acc), Vc.to(acc), see_c[:, :, :, None, None, :]  # (B, Hk, M, 1, 1, λ)
    ns, nc = st.sink_k.shape[2], Kc.shape[-2]
    see_s = (torch.arange(ns, device=dev)[None, :] <= (ts - window)[:, None])[None] & st.sink_ok[:, None, :]
    ss = (qg.reshape(B, Hk, M * g * L, d) @ st.sink_k.to(acc).transpose(-1, -2)).view(B, Hk, M, g * L, ns)
    scores = torch.cat([ss, qg @ Kc.transpose(-1, -2), qg @ Kr.transpose(-1, -2)], -1).view(B, Hk, M, g, L, -1)
    see = torch.cat([see_s[:, None, :, None, None, :].expand(B, Hk, M, 1, L, ns),
                     see_c.expand(B, Hk, M, 1, L, nc), see_r[:, None, :, None].expand(B, Hk, M, 1, L, R)], -1)
    # Under autograd (stage 2) amax keeps scores and exp its result, so those steps run out of place; a prefill
    # runs them in place (at 8k the three temporaries cost ~0.06 s per layer on 2 cores)
    grad = records((scores, gamma))
    scores = scores.masked_fill(~see, float("-inf")) if grad else scores.masked_fill_(~see, float("-inf"))
    c = scores.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # a padding query that sees no key
    gam = torch.as_tensor(gamma, device=dev).to(acc)
    gam = gam.view(1, Hk, 1, g, 1, 1) if gam.dim() == 1 else gam
    e = ((scores - c).exp() * gam) if grad else scores.sub_(c).exp_().mul_(gam)
    e = e.view(B, Hk, M, g * L, -1)
    es, ec, er = e.split((ns, nc, R), -1)
    num = (es.reshape(B, Hk, M * g * L, ns) @ st.sink_v.to(acc)).view(B, Hk, M, g * L, -1) + ec @ Vc + er @ Vr
    den = e.sum(-1, keepdim=True)
    lin, lin_den = fq @ S, fq @ z.unsqueeze(-1)
    if decay is not None:  # lambda^(query - t), per KV head, segment and row
        age = torch.exp(decay.to(acc)[:, None, None] * (qpos - ts[:, None]).to(acc)[None])  # (Hk, M, L)
        age = age[None, :, :, None, :, None].expand(1, Hk, M, g, L, 1).reshape(1, Hk, M, g * L, 1)
        lin, lin_den = lin * age, lin_den * age
    y = ((num + lin) / (den + lin_den).clamp_min(eps))  # (B, Hk, M, g * L, D)
    y = y.view(B, Hk, M, g, L, -1).transpose(2, 3).reshape(B, Hq, M * L, -1)
    return y if M * L == n else y[:, :, qrow.flatten()]


def sparse_hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: Features,
                            phi_k: Features, window: int, cache_size: int, gamma: Gamma = 0.5,
                            scale: Optional[float] = None, sinks: int = 0, decay: Optional[torch.Tensor] = None,
                            chunk: Optional[int] = None, key_valid: Optional[torch.Tensor] = None,
                            state: Optional[SparseCacheState] = None, eps: float = DEFAULT_EPS,
                            score: str = "unique") -> Tuple[torch.Tensor, SparseCacheState]:
    """Causal hybrid attention with a sparse cache (module docstring), for ``n`` new tokens after ``state``.

    The cache schedule runs boundary by boundary (a few small ops each); the attention of every query then runs
    in one batch over all segments, each against the state and cache of its boundary. Without autograd a call of
    more than ``PREFILL_PIECE`` tokens runs in pieces (module docstring).

    Args:
        q (B, Hq, n, d), phi_q (B, Hq, n, F): the queries and their features.
        k (B, Hk, n, d), v (B, Hk, n, D), phi_k (B, Hk, n, F): per key/value head (``Hk`` divides ``Hq``; query
            head h reads KV head ``h // (Hq / Hk)``). Either feature may instead be a function ``(a, b) -> features
            of the call's tokens a..b-1``, called once per piece.
        window: recent keys seen exactly (at least); cache_size: exact slots for older keys (0: none).
        gamma: the window factor, scalar or (Hq,); scale: softmax scale (``d^-1/2``); sinks: first keys kept exact;
        decay: (Hk,) ``log lambda`` of a decayed state, or None; chunk: keys leave the window every ``chunk``
        tokens (default ``window``); key_valid (B, n): False for padding keys (never cached nor summed).
        state: what an earlier call returned, with the same settings (None: the sequence starts here).
        score: ``"unique"``, ``"memory"`` or ``"state"``, how candidates are scored (module docstring).
    Returns: ``(y (B, Hq, n, D) in v's dtype, state)``; the state passed in is updated and returned.
    """
    if window < 1 or cache_size < 0 or sinks < 0 or (chunk is not None and chunk < 1):
        raise ValueError(f"need window >= 1, chunk >= 1, cache_size >= 0, sinks >= 0; got window={window}, "
                         f"chunk={chunk}, cache_size={cache_size}, sinks={sinks}")
    if score not in SCORES:
        raise ValueError(f"unknown sparse-cache score {score!r}; choose one of {SCORES}")
    n, step = q.shape[2], max(1, PREFILL_PIECE // (chunk or window)) * (chunk or window)
    rows_q, rows_k = feature_rows(phi_q), feature_rows(phi_k)
    # one piece under autograd (grad mode alone is not enough: a frozen model outside no_grad still goes in pieces)
    if n <= PREFILL_PIECE or records((q, k, v, gamma, decay), features=(phi_q, phi_k)):
        return _sparse_call(q, k, v, rows_q(0, n), rows_k(0, n), window, cache_size, gamma, scale,
                            sinks, decay, chunk, key_valid, state, eps, score)
    p0, a, y = (state.seen if state is not None else 0), 0, None
    while a < n:  # pieces end at multiples of ``step`` (of the chunk: the segments stay as they are)
        b = min(n, (p0 + a) // step * step + step - p0)
        sl = lambda t: t[:, :, a:b]
        piece, state = _sparse_call(sl(q), sl(k), sl(v), rows_q(a, b), rows_k(a, b), window, cache_size,
                                    gamma, scale, sinks, decay, chunk,
                                    None if key_valid is None else key_valid[:, a:b], state, eps, score)
        if y is None:  # written piece by piece (a list and a cat would hold the output twice)
            y = piece.new_empty(*piece.shape[:2], n, piece.shape[-1])
        y[:, :, a:b] = piece
        a = b
    return y, state


def _sparse_call(q, k, v, phi_q, phi_k, window: int, cache_size: int, gamma: Gamma, scale: Optional[float],
                 sinks: int, decay, chunk: Optional[int], key_valid, state: Optional[SparseCacheState], eps: float,
                 score: str) -> Tuple[torch.Tensor, SparseCacheState]:
    """One piece of :func:`sparse_hybrid_attention` (its arguments, features as tensors)."""
    B, Hq, n, d = q.shape
    Hk, D, Fd = k.shape[1], v.shape[-1], phi_q.shape[-1]
    if (n == 0 or k.shape != (B, Hk, n, d) or v.shape[:3] != (B, Hk, n) or phi_q.shape[:3] != (B, Hq, n)
            or phi_k.shape != (B, Hk, n, Fd) or Hq % Hk):
        raise ValueError(f"sparse_hybrid_attention: shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}")
    chunk = chunk or window
    acc = acc_dtype(v)
    scale = d ** -0.5 if scale is None else scale
    st = state if state is not None else empty_state(B, Hk, d, D, Fd, cache_size, sinks, k.dtype, acc, q.device)
    p0, base = st.seen, max(0, st.boundary - window + 1)
    if st.recent_k.shape[2] != p0 - base or st.cache_k.shape[2] != cache_size or st.sink_k.shape[2] != sinks:
        raise ValueError("this sparse-cache state was built with another window, cache_size or sinks")
    ok = torch.ones(B, n, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.to(q.device).bool()
    if p0 < sinks:  # the first tokens also take their sink slots
        m = min(sinks, p0 + n) - p0
        for name, src in (("sink_k", k), ("sink_v", v)):
            t = getattr(st, name).clone()
            t[:, :, p0:p0 + m] = src[:, :, :m]
            setattr(st, name, t)
        st.sink_ok = st.sink_ok.clone()
        st.sink_ok[:, p0:p0 + m] = ok[:, :m]
    keys = _Keys(st, k, v, phi_k, ok, base)
    on_kernel = None
    if n >= 2 and _kernel_serves(q, acc, cache_size):
        # the schedule with its state in registers (up to head dim 128); where this GPU cannot launch that (head
        # dim 128 on an A100), or for larger states, the tiled one; where it cannot launch either, the PyTorch path
        from hedgehog.ops import triton_sparse

        shapes = (str(q.device), Fd, D, score)
        for kernel, tiled, then in (("schedule", False, "the tiled schedule kernel"),
                                    ("tiled schedule", True, "the PyTorch path")):
            if not tiled and not triton_sparse.in_registers(Fd, D):
                continue
            on_kernel = _on_kernel(kernel, shapes, lambda: _schedule_on_kernel(
                st, keys, p0, n, chunk, window, sinks, cache_size, decay, eps, score, tiled=tiled), then=then)
            if on_kernel is not None:
                break
    if on_kernel is not None:
        segs, per_seg = on_kernel
    else:
        segs, states = [], []
        for start, end, t, leave in _segments(p0, n, chunk, st.boundary, window, sinks):
            if leave:
                _boundary(st, t, *leave[1:], keys, window, cache_size, decay, eps, score)
            segs.append((start, end, t))
            states.append((st.S, st.z, st.cache_k, st.cache_v, st.cache_ok))
        S, z, Kc, Vc, see = (torch.stack(x, 2) for x in zip(*states))
        per_seg = (S, z, _SegCache(Kc, Vc, None, see))
    y = _attend(segs, *per_seg, st, keys, q, phi_q, p0, window, gamma, scale, decay, eps)
    keep = max(0, st.boundary - window + 1) - base
    st.recent_k, st.recent_v = keys.k[:, :, keep:], keys.v[:, :, keep:]
    st.recent_phi, st.recent_ok = keys.phi[:, :, keep:], keys.ok[:, keep:]
    st.seen = p0 + n
    return y.to(v.dtype), st
