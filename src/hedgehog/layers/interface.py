"""How a converted layer meets transformers' attention interface (the generic path for every decoder family).

The family's own attention forward runs with :class:`InterfaceView` of the converted layer as ``self``: its
modules and attributes, and a config whose attention implementation is ``"hedgehog"``, the function registered
here with ``AttentionInterface``, which routes back to the layer. Outside softmax mode the forward sees
:class:`PassThroughCache`, so the family's cache update hands k/v back (the decode-state layers keep what
decoding needs). :func:`key_valid` reads which keys are padding from the 4-D mask transformers passes.
"""
from __future__ import annotations

from typing import Optional

import torch


def key_valid(mask: Optional[torch.Tensor], n_keys: int, sliding: Optional[int] = None) -> Optional[torch.Tensor]:
    """(B, Nk) bool of real (non-padding) keys from an HF attention mask, or None if all are real.

    HF hands attention layers a 4-D mask (B, 1, Nq, Nk): bool (True = attend) or additive float.
    The last query row sees every real key (causal), so it identifies padding, left or right. A layer whose
    teacher has a ``sliding`` window gets a mask in which the last row sees only its window: there a key is
    real when some row sees it, and keys older than every row's window (only with Nq < Nk) count as real.
    """
    if mask is None or mask.dim() != 4:
        return None
    rows = mask[:, 0, :, -n_keys:]

    def visible(x):
        return x if x.dtype == torch.bool else x > torch.finfo(x.dtype).min / 2

    valid = visible(rows[:, -1])
    if bool(valid.all()):
        return None
    if sliding is not None:
        valid = visible(rows).any(1)
        n_q = rows.shape[1]
        old = max(0, n_keys - n_q - sliding + 1)  # keys outside the first row's window: no row can see them
        valid[:, :old] = True
        if bool(valid.all()):
            return None
    return valid


class PassThroughCache:
    """What a generic family's forward sees as its cache outside softmax mode: ``update`` hands the new k/v back
    unchanged (the recurrent state layers, not a growing KV list, keep what decoding needs)."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self._cache, name)


class ConfigView:
    """The model's config, except that the attention implementation is hedgehog's."""

    _attn_implementation = "hedgehog"

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        return getattr(self._config, name)


class InterfaceView:
    """The converted layer as the family's forward sees it: its own modules and attributes, hedgehog's config."""

    def __init__(self, layer):
        object.__setattr__(self, "_hedgehog_layer", layer)
        object.__setattr__(self, "config", ConfigView(layer.config))

    def __getattr__(self, name):
        return getattr(self._hedgehog_layer, name)


def hedgehog_attention_function(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as ``"hedgehog"`` with transformers' ``AttentionInterface``."""
    layer = getattr(module, "_hedgehog_layer", None)
    if layer is None:
        raise RuntimeError("the 'hedgehog' attention implementation is used by converted layers internally; "
                           "load a converted model with hedgehog instead of setting attn_implementation='hedgehog'")
    return layer._attend_generic(module, query, key, value, attention_mask, kwargs)


def register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("hedgehog", hedgehog_attention_function)


register_attention_function()


