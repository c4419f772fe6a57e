"""Recurrent-state cache: converted models decode with O(1) memory per token through HF ``generate``.

``HedgehogCache`` is a ``transformers.Cache`` whose converted layers hold the linear-attention state
``(S = sum phi(k) v^T, z = sum phi(k))`` instead of a growing key/value cache. The state is kept per
*key/value* head: under GQA every query head of a group reads the same ``phi(k)`` and ``v``, so the
group shares one state (SmolLM2: 3 states per layer instead of 9). Layers left unconverted keep an
ordinary ``DynamicLayer``.

Prefill runs the chunked kernel with ``return_state`` (padding keys, e.g. left padding, are zeroed
before they enter the state); each further token is one ``packed_recurrent_step`` updating the
state, kept packed as ``[S, z]``, in place. Hybrid layers add a ring buffer of the last ``w``
keys/values (``HybridStateLayer``). ``convert_model`` installs a hook so that ``model.generate(...)`` builds this cache by default;
passing a cache explicitly (``cache=``, or ``past_key_values=`` before transformers 5.24) still works.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer


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

    def set_window(self, S, z, k_tail, v_tail, valid_tail, n_new: int, window: Optional[int] = None) -> None:
        """State ``(S, z)`` of the older keys plus the last ``m`` keys/values in order (``k_tail``
        (B, Hk, m, d), ``v_tail`` (B, Hk, m, D), ``valid_tail`` (B, m)), after ``n_new`` more tokens;
        ``window`` is the ring's size (default ``m``)."""
        B, Hk, m, d = k_tail.shape
        w = window or m
        if m > w:
            raise ValueError(f"{m} window keys do not fit a window of {w}")
        total = self.seen + n_new
        idx = torch.arange(total - m, total, device=k_tail.device) % w
        self.k_win = k_tail.new_zeros(B, Hk, w, d)
        self.v_win = v_tail.new_zeros(B, Hk, w, v_tail.shape[-1] + 1)
        self.valid = torch.zeros(B, w, dtype=torch.bool, device=k_tail.device)
        self.k_win[:, :, idx] = k_tail
        self.v_win[:, :, idx, :-1] = v_tail
        self.v_win[:, :, idx, -1] = 1.0
        self.valid[:, idx] = valid_tail.to(self.valid.device)
        self.set_state(S, z, n_new)

    def reset(self) -> None:
        super().reset()
        self.k_win = self.v_win = self.valid = None


class HedgehogCache(Cache):
    """Cache for a converted model: a state layer per converted attention layer, KV layers elsewhere."""

    def __init__(self, model):
        from hedgehog.attention import hedgehog_layers
        from hedgehog.convert import get_adapter

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        n_slots = len(get_adapter(inner).attention_slots(inner))
        converted = {m.layer_idx: m.hybrid for m in hedgehog_layers(inner)}
        layers = [DynamicLayer() if i not in converted else HybridStateLayer() if converted[i] else HedgehogStateLayer()
                  for i in range(n_slots)]
        super().__init__(layers=layers)

    def state_nbytes(self) -> int:
        """Bytes held by the recurrent states and hybrid windows (constant in the number of tokens)."""
        return sum(l.nbytes() for l in self.layers if isinstance(l, HedgehogStateLayer))

    def kv_nbytes(self) -> int:
        """Bytes held by key/value layers (unconverted layers only)."""
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers
                   if isinstance(l, DynamicLayer) and l.keys is not None)


# transformers 5.24 renamed the cache argument of models and layers (and the output field) from
# `past_key_values` to `cache`; earlier 5.x releases use the old name. Read both, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict):
    """The cache object in a model's or layer's keyword arguments (``cache`` or ``past_key_values``), or None."""
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


@functools.lru_cache(maxsize=None)
def _cache_param(model_cls) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes (``cache`` from transformers 5.24 on);
    the name is looked up once per model class (decode loops call this every token)."""
    return {_cache_param(type(model)): cache}


def output_cache(out):
    """The cache a model's output (or ``generate(..., return_dict_in_generate=True)``) hands back."""
    return next((getattr(out, n) for n in CACHE_NAMES if getattr(out, n, None) is not None), None)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """Wraps transformers' method: swap the default DynamicCache for a HedgehogCache."""
    out = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    name = next((n for n in CACHE_NAMES if n in model_kwargs), None)
    cache = None if name is None else model_kwargs[name]
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0:
        model_kwargs[name] = HedgehogCache(self)
    return out


def install_generation_cache(model) -> None:
    """Make ``model.generate`` use ``HedgehogCache`` unless a cache is passed explicitly."""
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
