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

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from hedgehog.layers.attention import hedgehog_layers
from hedgehog.modules.state import HedgehogStateLayer, HybridStateLayer, SparseStateLayer

__all__ = ["HedgehogCache", "HedgehogStateLayer", "HybridStateLayer", "SparseStateLayer", "cache_argument", "cache_kwargs",
           "install_generation_cache", "output_cache"]


def state_layer(layer) -> HedgehogStateLayer:
    """The decoding state a converted attention layer keeps: sparse-cache hybrid, hybrid ring, or linear state."""
    if layer.hybrid and layer.hh_config.sparse_cache:
        return SparseStateLayer()
    return HybridStateLayer() if layer.hybrid else HedgehogStateLayer()


class HedgehogCache(Cache):
    """Cache for a converted model: a state layer per converted attention layer, KV layers elsewhere."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        converted = {m.layer_idx: m for m in hedgehog_layers(inner)}
        cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        n_slots = max(getattr(cfg, "num_hidden_layers", 0) or 0, max(converted, default=-1) + 1)
        layers = [DynamicLayer() if i not in converted else state_layer(converted[i]) for i in range(n_slots)]
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


def cache_nbytes(cache) -> int:
    """Bytes a generation cache holds: a :class:`HedgehogCache`'s states and windows plus any key/value layers,
    or a transformers cache's keys and values."""
    if isinstance(cache, HedgehogCache):
        return cache.state_nbytes() + cache.kv_nbytes()
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers
               if getattr(l, "keys", None) is not None)


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
