"""Decode-state layers of converted attention: the recurrent ``(S, z)`` per key/value head, the hybrid's
ring buffer of the last ``w`` keys/values, and the sparse-cache hybrid's :class:`SparseCacheState`. ``HedgehogAttention`` updates them; ``HedgehogCache``
(:mod:`hedgehog.layers.generation`) holds one per converted layer."""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin


class HedgehogStateLayer(CacheLayerMixin):
    """One converted layer's recurrent state, plus a token count.

    Stored packed as ``Sz = [S, z]``: (B, Hkv, F, D + 1) in fp32, ``S = Sz[..., :D]`` (B, Hkv, F, D) and
    ``z = Sz[..., D]`` (B, Hkv, F) are views of it. One tensor lets a decode step update both with one
    rank-1 product against ``[v, 1]`` and read both with one matmul (``packed_recurrent_step``).
    """

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.Sz: Optional[torch.Tensor] = None
        self.seen = 0

    @property
    def S(self) -> Optional[torch.Tensor]:
        return None if self.Sz is None else self.Sz[..., :-1]

    @property
    def z(self) -> Optional[torch.Tensor]:
        return None if self.Sz is None else self.Sz[..., -1]

    def lazy_initialization(self, key_states, value_states) -> None:  # states are set by the attention layer
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a Hedgehog layer keeps a recurrent state, not keys/values; use its attention module")

    def set_state(self, S: torch.Tensor, z: torch.Tensor, n_new: int) -> None:
        """Replace the state by ``(S (B, Hkv, F, D), z (B, Hkv, F))`` and count ``n_new`` more tokens."""
        self.Sz = torch.cat([S, z.unsqueeze(-1).to(S.dtype)], -1)
        self.seen += n_new
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int):
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.Sz = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise RuntimeError("a recurrent state cannot be cropped (tokens are summed into it)")

    _tensors = ("Sz",)  # what batch reordering/selection applies to

    def _map_tensors(self, fn) -> None:
        for name in self._tensors:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in map(self.__getattribute__, self._tensors) if t is not None)


class HybridStateLayer(HedgehogStateLayer):
    """A hybrid layer's cache: the last ``w`` keys/values (per KV head) plus the linear state of every
    older key. Constant size: ``w`` slots from the start.

    The window is a ring buffer: token ``t`` sits in slot ``t % w`` (``k_win`` (B, Hk, w, d),
    ``v_win`` (B, Hk, w, D + 1) holding ``[v, 1]``), ``valid`` (B, w) is False for empty slots and
    padding. A decode step overwrites one slot in place, folding the token that leaves the window
    into the packed state first (no concatenation or shifting per token). The window softmax is a
    sum over its slots, so their order does not matter.
    """

    _tensors = ("Sz", "k_win", "v_win", "valid")

    def __init__(self):
        super().__init__()
        self.k_win: Optional[torch.Tensor] = None
        self.v_win: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None

    def set_window(self, S, z, k_tail, v_tail, valid_tail, n_new: int, window: Optional[int] = None,
                   sinks=None, sink_slots: int = 0) -> None:
        """State ``(S, z)`` of the older keys plus the last ``m`` keys/values in order (``k_tail``
        (B, Hk, m, d), ``v_tail`` (B, Hk, m, D), ``valid_tail`` (B, m)), after ``n_new`` more tokens (the
        first prefill); ``window`` is the ring's size (default ``m``).

        ``sinks``: ``(k, v, valid)`` of the first ``s <= sink_slots`` tokens (fewer when the prompt is shorter:
        the slots after them wait for decoded tokens). Sink ``j`` has slot ``window + j`` after the ring, seen
        (valid) once its token has left the window."""
        B, Hk, m, d = k_tail.shape
        w = window or m
        if m > w:
            raise ValueError(f"{m} window keys do not fit a window of {w}")
        total = self.seen + n_new
        n_sinks = 0 if sinks is None else sinks[0].shape[2]
        if n_sinks > sink_slots:
            raise ValueError(f"{n_sinks} sink keys do not fit {sink_slots} sink slots")
        slots = w + sink_slots
        idx = torch.arange(total - m, total, device=k_tail.device) % w
        self.k_win = k_tail.new_zeros(B, Hk, slots, d)
        self.v_win = v_tail.new_zeros(B, Hk, slots, v_tail.shape[-1] + 1)
        self.valid = torch.zeros(B, slots, dtype=torch.bool, device=k_tail.device)
        self.k_win[:, :, idx] = k_tail
        self.v_win[:, :, idx, :-1] = v_tail
        self.v_win[:, :, idx, -1] = 1.0
        self.valid[:, idx] = valid_tail.to(self.valid.device)
        if n_sinks:
            sk, sv, svalid = sinks
            self.k_win[:, :, w:w + n_sinks] = sk
            self.v_win[:, :, w:w + n_sinks, :-1] = sv
            self.v_win[:, :, w:w + n_sinks, -1] = 1.0
            gone = torch.arange(n_sinks, device=sk.device) <= total - 1 - w  # left the window already
            self.valid[:, w:w + n_sinks] = svalid.to(self.valid.device) & gone[None, :]
        self.set_state(S, z, n_new)

    def reset(self) -> None:
        super().reset()
        self.k_win = self.v_win = self.valid = None


class SparseStateLayer(HedgehogStateLayer):
    """A sparse-cache hybrid layer's decoding state: one :class:`hedgehog.ops.sparse_cache.SparseCacheState`
    (recent keys, cached exact keys, sinks, linear state), constant in size, which the op extends call by call."""

    def __init__(self):
        super().__init__()
        self.state = None

    def _map_tensors(self, fn) -> None:
        if self.state is not None:
            self.state.map(fn)

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def reset(self) -> None:
        super().reset()
        self.state = None
