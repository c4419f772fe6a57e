"""What one attention call carries, and how a converted layer meets transformers' attention interface.

:class:`AttentionCall` is everything a forward passes to the attention besides q/k/v: the mask, positions, the
cache, and the teacher's settings for this call. It travels as an argument; the layer keeps no per-call state.

The generic path (every decoder family): the family's own attention forward runs with an
:class:`InterfaceView` of the converted layer as ``self`` -- its modules and attributes, a config whose attention
implementation is ``"hedgehog"``, and the call being made. Transformers' ``AttentionInterface`` then calls
:func:`hedgehog_attention_function` (registered here) with that view; it completes the call with what the
family passes the attention function (mask, scale, sliding window, soft-cap) and hands it to
``layer.attend``. Outside teacher mode the forward sees :class:`PassThroughCache`, so the family's cache
update hands k/v back (the decode-state layers keep what decoding needs). :func:`key_valid` reads which keys
are padding from the 4-D mask transformers passes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from hedgehog.ops.settings import TeacherSettings


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


@dataclass(frozen=True)
class AttentionCall:
    """One attention call's context. ``attention_mask``: the 4-D mask transformers passes (None: no padding);
    ``position_ids``: as the model got them (None: 0..N-1 after the cache); ``cache``: the model's cache (None
    without one); ``teacher``: the softmax attention's settings for this call; ``teacher_fn(q, k, v)``: the
    model's own attention function for it -> (B, N, Hq, d)."""

    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    cache: Any = None
    teacher: TeacherSettings = TeacherSettings()
    teacher_fn: Optional[Callable] = None

    def replace(self, **changes) -> "AttentionCall":
        return dataclasses.replace(self, **changes)

    def valid_keys(self, n_keys: int) -> Optional[torch.Tensor]:
        """(B, n_keys) bool of real keys, or None when none is padding (:func:`key_valid`)."""
        return key_valid(self.attention_mask, n_keys, self.teacher.window)

    def positions(self, n: int, offset: int, device) -> torch.Tensor:
        """The positions of ``n`` tokens: the call's ``position_ids`` when they cover them ((N,) when the batch
        shares them, else (B, N)), else ``offset .. offset + n - 1``."""
        pos = self.position_ids
        if pos is not None and pos.shape[-1] == n:
            return pos[0] if pos.dim() == 2 and (pos == pos[:1]).all() else pos
        return torch.arange(offset, offset + n, device=device)


class PassThroughCache:
    """What a generic family's forward sees as its cache outside teacher mode: ``update`` hands the new k/v back
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
    """The converted layer as the family's forward sees it during one call: its own modules and attributes,
    hedgehog's config, and that call (``_hedgehog_call``; mask and teacher settings still to come)."""

    def __init__(self, layer, call: AttentionCall):
        object.__setattr__(self, "_hedgehog_layer", layer)
        object.__setattr__(self, "_hedgehog_call", call)
        object.__setattr__(self, "config", ConfigView(layer.config))

    def __getattr__(self, name):
        return getattr(self._hedgehog_layer, name)


def hedgehog_attention_function(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as ``"hedgehog"`` with transformers' ``AttentionInterface``: completes
    the view's call with what the family passes (mask; scale, sliding window and soft-cap: the teacher's
    settings) and the family's own attention function as the teacher, then runs the layer's attention
    -> ((B, N, Hq, d), None)."""
    layer = getattr(module, "_hedgehog_layer", None)
    if layer is None:
        raise RuntimeError("the 'hedgehog' attention implementation is used by converted layers internally; "
                           "load a converted model with hedgehog instead of setting attn_implementation='hedgehog'")
    # the scale is the module's unless the call names one; window and soft-cap are the call's (None: unset)
    scale = kwargs.get("scaling")
    teacher = TeacherSettings(scale=layer.teacher.scale if scale is None else scale,
                              window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"))
    teacher_kwargs = {k: v for k, v in kwargs.items() if k != "dropout"}

    def teacher_fn(q, k, v):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(layer.config._attn_implementation, layer.family_eager_attention)
        return fn(module, q, k, v, attention_mask, dropout=0.0, **teacher_kwargs)[0]

    call = module._hedgehog_call.replace(attention_mask=attention_mask, teacher=teacher, teacher_fn=teacher_fn)
    return layer.attend(query, key, value, call), None


def register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("hedgehog", hedgehog_attention_function)


register_attention_function()


