"""Drop-in linear attention for a transformer layer, keeping the model's own projections.

``HedgehogAttention`` replaces one self-attention module of a Hugging Face model. It *adopts* the
original module's sub-modules (``q_proj``/``k_proj``/``v_proj``/``o_proj`` or GPT-2's ``c_attn``/
``c_proj``) and plain attributes under the same names, so state-dict keys do not change and peft's
LoRA finds the same target names. It adds two feature maps:

- ``feature_map_q``: one per *query* head, applied to the post-RoPE query;
- ``feature_map_k``: one per *key/value* head (GQA), applied to the post-RoPE key, then shared by
  the query heads of its group, so a decoding state needs only one ``(S, z)`` per KV head.

Modes (``set_attention_mode(model, mode)``):

- ``softmax``: the original attention, exactly (the teacher);
- ``linear``: normalised linear attention ``phi(q).phi(k)`` (the student);
- ``distill``: returns the teacher's output (so later layers see teacher activations) and stores
  this layer's distillation loss in ``.distill_loss``;
- ``mimic``: returns the student's (linear) output and stores in ``.distill_loss`` the loss of the
  feature maps against the softmax attention of the same, *detached* q/k, so that loss trains only
  the feature maps (the paper's recipe for training Hedgehog from scratch, ``hedgehog.scratch``).

Any mode can record post-RoPE ``(q, k)`` in ``.captured`` (``start_capture``), which stage-1
distillation uses to train every layer's maps from one teacher forward.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from hedgehog.feature_maps import HedgehogFeatureMap, get_feature_map, hedgehog_pair_features
from hedgehog.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import backends
from hedgehog.ops import (feature_linear_attention, kernel_linear_attention, linear_attention, packed_recurrent_step,
                          quadratic_linear_attention)
from hedgehog.ops.cpu_kernel import fused_hedgehog_attention, fused_hybrid_attention
from hedgehog.ops.hybrid import feature_hybrid_attention, hybrid_weights, ring_hybrid_step
from hedgehog.ops.linear_attention import DEFAULT_EPS
from hedgehog.state import HedgehogStateLayer, HybridStateLayer

MODES = ("softmax", "linear", "distill", "mimic")
# what attention modules call their cache argument: transformers 5.24's name first, then older ones
CACHE_PARAMS = ("cache", "past_key_values", "layer_past", "past_key_value")
ATTENTIONS = ("linear", "hybrid")


@dataclass
class HedgehogConfig:
    """What conversion does; saved with every converted model."""

    feature_map: str = "hedgehog"
    feature_map_kwargs: Dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 64
    # Inputs to the feature maps are q * qk_scale and k * qk_scale. 1.0 (raw post-RoPE q/k) fitted the
    # softmax teacher better at identity init than d^-1/2 on SmolLM2.
    qk_scale: float = 1.0
    distill_loss: str = "ce"  # "ce" (Hedgehog) or "mse" (LoLCATs output MSE)
    layers: Optional[list] = None  # layer indices to convert; None = all
    # "linear": every key through the feature maps. "hybrid" (LoLCATs): the last `window` keys with exact
    # softmax, scaled per head by sigmoid(window_gate), older keys through the feature maps.
    attention: str = "linear"
    window: int = 64
    window_gate_init: float = 0.0  # sigmoid(0) = 0.5

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {ATTENTIONS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HedgehogConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _key_valid(mask: Optional[torch.Tensor], n_keys: int, sliding: Optional[int] = None) -> Optional[torch.Tensor]:
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


class _GroupedKeyMap(nn.Module):
    """Applies a per-KV-head key map and repeats its features to the query heads of each group."""

    def __init__(self, fm: nn.Module, n_rep: int):
        super().__init__()
        self.fm = fm
        self.n_rep = n_rep
        self.feature_dim = fm.feature_dim
        self.blockwise = getattr(fm, "blockwise", True)

    def forward(self, k, positions=None):
        phi = self.fm(k, positions)
        if self.n_rep == 1:
            return phi
        b, h, n, f = phi.shape
        return phi[:, :, None].expand(b, h, self.n_rep, n, f).reshape(b, h * self.n_rep, n, f)


class _ScaledMap:
    """``fm(x[:, ::every] * scale, positions)``: a map on raw (possibly head-repeated) q/k for the hybrid kernel,
    which needs the raw q/k for its softmax window and the scaled ones for the features."""

    def __init__(self, fm, scale: float, every: int = 1):
        self.fm, self.scale, self.every = fm, scale, every
        self.feature_dim = fm.feature_dim
        self.blockwise = getattr(fm, "blockwise", True)

    def __call__(self, x, positions=None):
        if self.every > 1:
            x = x[:, ::self.every]
        return self.fm(x * self.scale if self.scale != 1.0 else x, positions)


class _PassThroughCache:
    """What a generic family's forward sees as its cache outside softmax mode: ``update`` hands the new k/v back
    unchanged (the recurrent state layers, not a growing KV list, keep what decoding needs)."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self._cache, name)


class _ConfigView:
    """The model's config, except that the attention implementation is hedgehog's."""

    _attn_implementation = "hedgehog"

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        return getattr(self._config, name)


class _InterfaceView:
    """The converted layer as the family's forward sees it: its own modules and attributes, hedgehog's config."""

    def __init__(self, layer):
        object.__setattr__(self, "_hedgehog_layer", layer)
        object.__setattr__(self, "config", _ConfigView(layer.config))

    def __getattr__(self, name):
        return getattr(self._hedgehog_layer, name)


def _hedgehog_attention_function(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as ``"hedgehog"`` with transformers' ``AttentionInterface``."""
    layer = getattr(module, "_hedgehog_layer", None)
    if layer is None:
        raise RuntimeError("the 'hedgehog' attention implementation is used by converted layers internally; "
                           "load a converted model with hedgehog instead of setting attn_implementation='hedgehog'")
    return layer._attend_generic(module, query, key, value, attention_mask, kwargs)


def register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("hedgehog", _hedgehog_attention_function)


register_attention_function()


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


class HedgehogAttention(nn.Module):
    def __init__(self, base: nn.Module, adapter, config: HedgehogConfig, layer_idx: int):
        super().__init__()
        for k, v in vars(base).items():  # plain attributes: config, head_dim, scaling, layer_idx, ...
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        for name, child in base.named_children():
            self.add_module(name, child)
        self._base_forward = type(base).forward
        self.base_class = type(base).__name__
        self.adapter = adapter
        self._hedgehog_generic = getattr(adapter, "generic", False)
        if self._hedgehog_generic:
            self._cache_param = adapter.cache_param(type(base))
            self._signature = inspect.signature(type(base).forward)
        # the teacher's own sliding window and logit soft-cap, as the module passes them to the attention
        # function (read from the module now, confirmed at every generic call)
        self.teacher_window = getattr(base, "sliding_window", None) if self._hedgehog_generic else None
        self.teacher_softcap = getattr(base, "attn_logit_softcapping", None) if self._hedgehog_generic else None
        self._teacher_scaling = None
        self.hh_config = config
        self.layer_idx = layer_idx
        self.num_q_heads = adapter.num_heads(base)
        self.num_kv_heads = adapter.num_kv_heads(base)
        self.hh_head_dim = adapter.head_dim(base)
        self.n_rep = self.num_q_heads // self.num_kv_heads
        self.causal = adapter.causal
        kw = dict(config.feature_map_kwargs)
        self.feature_map_q = get_feature_map(config.feature_map, self.hh_head_dim, self.num_q_heads, **kw)
        self.feature_map_k = get_feature_map(config.feature_map, self.hh_head_dim, self.num_kv_heads, **kw)
        self._grouped_k = _GroupedKeyMap(self.feature_map_k, self.n_rep)
        self._pair_maps = all(type(fm) is HedgehogFeatureMap for fm in (self.feature_map_q, self.feature_map_k))
        self.kernels = backends.bind("auto")  # the causal kernel for CUDA tensors, chosen once here
        self.window_gate = None
        if config.attention == "hybrid":  # per query head; gamma = sigmoid(gate)
            self.window_gate = nn.Parameter(torch.full((self.num_q_heads,), float(config.window_gate_init)))
        self.mode = "linear"
        self.captured = None
        self.distill_loss = None
        # mimic mode: the query rows (1-D positions) its loss is taken over; None = every row. Training from
        # scratch sets a fresh subset per step (an unbiased estimate at rows x N cost instead of N x N).
        self.mimic_rows = None

    # -- helpers -----------------------------------------------------------------------------
    def start_capture(self):
        self.captured = []

    def stop_capture(self):
        out, self.captured = self.captured, None
        return out

    def teacher_scale(self) -> float:
        return self._teacher_scaling if self._teacher_scaling is not None else self.adapter.scaling(self)

    def teacher_kwargs(self) -> Dict[str, Any]:
        """The teacher's own sliding window / soft-cap for the loss and metric functions (only those set)."""
        return {k: v for k, v in (("sliding_window", self.teacher_window), ("softcap", self.teacher_softcap))
                if v is not None}

    @property
    def hybrid(self) -> bool:
        return self.window_gate is not None

    def gamma(self) -> Optional[torch.Tensor]:
        """The hybrid layer's per-query-head window factor in (0, 1), or None for pure linear attention."""
        return None if self.window_gate is None else torch.sigmoid(self.window_gate)

    def hybrid_kwargs(self) -> Dict[str, Any]:
        """``window``/``gamma`` for the loss and metric functions when this layer is hybrid, else {}."""
        return dict(window=self.hh_config.window, gamma=self.gamma()) if self.hybrid else {}

    def trainable_modules(self) -> Dict[str, nn.Module]:
        """What attention transfer trains and checkpoints save: the feature maps (and the window gate)."""
        mods = {"q": self.feature_map_q, "k": self.feature_map_k}
        if self.window_gate is not None:
            holder = nn.Module()
            holder.window_gate = self.window_gate
            mods["gate"] = holder
        return mods

    def features(self, q: torch.Tensor, k: torch.Tensor, positions=None):
        """phi(q) (B, Hq, N, F) and phi(k) repeated to the query heads (B, Hq, N, F)."""
        s = self.hh_config.qk_scale
        return self.feature_map_q(q * s, positions), self._grouped_k(k * s, positions)

    def layer_distill_loss(self, q, k, v=None, query_index=None):
        """The configured distillation loss of this layer for captured post-RoPE q (B,Hq,N,d), k (B,Hkv,N,d);
        ``query_index`` restricts the (cross-entropy) loss to those query rows."""
        phi_q, phi_k = self.features(q, k)
        k_rep = _repeat_heads(k, self.n_rep)
        hyb = self.hybrid_kwargs()
        if self.hh_config.distill_loss == "mse":
            if v is None:
                raise ValueError("the mse distillation loss needs v")
            if query_index is not None:
                raise ValueError("the mse distillation loss takes every row (query_index applies to 'ce' only)")
            return attention_output_mse_loss(q, k_rep, _repeat_heads(v, self.n_rep), phi_q, phi_k,
                                             causal=self.causal, scale=self.teacher_scale(), **hyb,
                                             **self.teacher_kwargs())
        return attention_distillation_loss(q, k_rep, phi_q, phi_k, causal=self.causal, scale=self.teacher_scale(),
                                           query_index=query_index, **hyb, **self.teacher_kwargs())

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states, *args, **kwargs):
        if self.mode not in MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "softmax" and self.captured is None:
            return self._base_forward(self, hidden_states, *args, **kwargs)
        if self._hedgehog_generic:
            return self._forward_generic(hidden_states, args, kwargs)
        call = self.adapter.parse_call(args, kwargs)
        q, k, v = self.adapter.qkv(self, hidden_states, call)
        cache = call.get("cache")
        if self.mode == "softmax" and cache is not None:
            k, v = cache.update(k, v, self.adapter.cache_index(self))
        y = self._attend(q, k, v, call, cache, lambda q_, k_, v_: self.adapter.softmax_attention(self, q_, k_, v_, call))
        return self.adapter.output(self, y), None

    def _attend(self, q, k, v, call, cache, teacher):
        """The mode's attention of post-RoPE q (B,Hq,N,d), k/v (B,Hkv,N,d) -> (B, N, Hq, d); ``teacher(q, k, v)``
        is the model's own softmax attention in that layout."""
        if self.captured is not None:
            self.captured.append((q.detach(), k.detach(), v.detach()))
        if self.mode == "softmax":
            return teacher(q, k, v)
        if self.mode == "distill":
            self.distill_loss = self.layer_distill_loss(q, k, v)
            return teacher(q, k, v)
        if self.mode == "mimic" and torch.is_grad_enabled():
            rows = self.mimic_rows
            if rows is not None and (rows.numel() == 0 or int(rows.max()) >= q.shape[2]):
                raise ValueError(f"mimic rows must be non-empty positions below the sequence length "
                                 f"{q.shape[2]}, got {rows.numel()} rows up to {int(rows.max()) if rows.numel() else None}")
            self.distill_loss = self.layer_distill_loss(q.detach(), k.detach(), v.detach(), query_index=rows)
        return self._linear(q, k, v, call, cache).transpose(1, 2)

    def _forward_generic(self, hidden_states, args, kwargs):
        """Run the family's own attention forward with our attention function (see :class:`InterfaceAdapter`).

        Its projections, norms and rotary run as written; its cache update sees a pass-through cache outside
        softmax mode (our state layers own the decoding state); the attention function it calls is
        :func:`_hedgehog_attention_function`, which routes to :meth:`_attend` with the model's own function as
        the teacher."""
        if args:  # positional arguments: name them (decoder layers pass keywords, so this is rare)
            bound = self._signature.bind(self, hidden_states, *args, **kwargs)
            params = dict(bound.arguments)
            params.pop(next(iter(self._signature.parameters)))  # self
            for name, p in self._signature.parameters.items():
                if p.kind is inspect.Parameter.VAR_KEYWORD:
                    params.update(params.pop(name, {}) or {})
            hidden_states = params.pop(next(n for n in self._signature.parameters if n != "self"))
        else:
            params = dict(kwargs)
        # the forward's own name for its cache, or an older alias its deprecation shim still accepts
        key = self._cache_param if self._cache_param in params else \
            next((n for n in CACHE_PARAMS if n in params), None)
        cache = params.get(key) if key else None
        if cache is not None and self.mode != "softmax":
            params[key] = _PassThroughCache(cache)
        self._generic_call = {"attention_mask": params.get("attention_mask"),
                              "position_ids": params.get("position_ids"), "cache": cache}
        try:
            return self._base_forward(_InterfaceView(self), hidden_states, **params)
        finally:
            self._generic_call = None

    def _attend_generic(self, view, q, k, v, attention_mask, kwargs):
        """Called by the family's forward through the attention interface -> ((B, N, Hq, d), None)."""
        self.teacher_window = kwargs.get("sliding_window")
        self.teacher_softcap = kwargs.get("softcap")
        self._teacher_scaling = kwargs.get("scaling")
        call = dict(self._generic_call or {})
        call["attention_mask"] = attention_mask
        impl = self.config._attn_implementation
        module_fns = sys.modules[self._base_forward.__module__]

        def teacher(q_, k_, v_):
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, module_fns.eager_attention_forward)
            kw = {k2: v2 for k2, v2 in kwargs.items() if k2 != "dropout"}
            return fn(view, q_, k_, v_, attention_mask, dropout=0.0, **kw)[0]

        return self._attend(q, k, v, call, call.get("cache"), teacher), None

    def _valid(self, call, n_keys):
        return _key_valid(call.get("attention_mask"), n_keys, self.teacher_window)

    def _positions(self, call, n, offset, device):
        pos = call.get("position_ids")
        if pos is not None and pos.shape[-1] == n:
            return pos[0] if pos.dim() == 2 and (pos == pos[:1]).all() else pos
        return torch.arange(offset, offset + n, device=device)

    def _linear(self, q, k, v, call, cache):
        """q (B,Hq,N,d), k/v (B,Hkv,N,d) -> (B,Hq,N,d) causal linear attention."""
        n = q.shape[2]
        if cache is not None:
            idx = self.adapter.cache_index(self)
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            if isinstance(layer, HybridStateLayer) and self.hybrid:
                return self._hybrid_recurrent(q, k, v, call, layer)
            if isinstance(layer, HedgehogStateLayer) and not self.hybrid:
                return self._linear_recurrent(q, k, v, call, layer)
        if cache is not None:
            # Generic fallback for any HF Cache: keep k/v in it and attend over all of them (the
            # recurrent-state cache replaces this with O(1) state updates).
            k, v = cache.update(k, v, self.adapter.cache_index(self))
        nk = k.shape[2]
        pos_k = self._positions(call, nk, 0, q.device) if nk == n else torch.arange(nk, device=q.device)
        pos_q = pos_k[..., nk - n:]
        valid = self._valid(call, nk)
        s = self.hh_config.qk_scale
        v_rep = _repeat_heads(v, self.n_rep)
        if not self.causal:  # encoder: every query sees every real key
            if self._kernel_form(max(n, nk)):
                return self._kernel_attention(q, k, v_rep, causal=False, valid=valid)
            phi_q = self.feature_map_q(q * s, pos_q)
            phi_k = self._grouped_k(k * s, pos_k)
            if valid is not None:
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
            return linear_attention(phi_q, phi_k, v_rep, causal=False)
        if self.hybrid:
            return self._hybrid_full(q, k, v_rep, pos_q, pos_k, valid)
        if nk != n or valid is not None:
            phi_q = self.feature_map_q(q * s, pos_q)
            phi_k = self._grouped_k(k * s, pos_k)
            if valid is not None:
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
            if nk == n:
                return linear_attention(phi_q, phi_k, v_rep, chunk_size=self.hh_config.chunk_size,
                                        backend=self.kernels)
            return quadratic_linear_attention(phi_q, phi_k, v_rep, causal=True)
        if self._kernel_form(n):  # e.g. Taylor on short sequences: O(N^2 d) beats O(N F d)
            return self._kernel_attention(q, k, v_rep, causal=True)
        fused = fused_hedgehog_attention(q * s, k * s, v, self.feature_map_q, self.feature_map_k)
        if fused is not None:  # CPU, no autograd: one pass per key head, no repeated k/v
            return fused[0]
        return feature_linear_attention(
            q * s, k * s, v_rep, self.feature_map_q, self._grouped_k, positions=pos_q,
            chunk_size=self.hh_config.chunk_size, backend=self.kernels,
        )

    def _kernel_form(self, n: int) -> bool:
        """True where the maps have a closed-form kernel (same map for q and k) and N < F makes it cheaper."""
        fq, fk = self.feature_map_q, self.feature_map_k
        return (hasattr(fq, "kernel") and getattr(fq, "has_kernel", True) and getattr(fk, "has_kernel", True)
                and type(fq) is type(fk) and getattr(fq, "scale", None) == getattr(fk, "scale", None)
                and n <= fq.feature_dim)

    def _kernel_attention(self, q, k, v_rep, causal: bool, valid=None):
        """Linear attention through the maps' closed-form kernel; ``valid`` (B, Nk) zeroes padding keys' columns."""
        s = self.hh_config.qk_scale
        a = self.feature_map_q.kernel(q * s, _repeat_heads(k * s, self.n_rep))
        if valid is not None:
            a = a * valid[:, None, None, :].to(a.dtype)
        return kernel_linear_attention(a, v_rep, causal=causal)

    def _linear_recurrent(self, q, k, v, call, layer):
        """Prefill (fills the state) or decode (updates it) with a HedgehogStateLayer; state per KV head."""
        b, _, n, _ = q.shape
        s = self.hh_config.qk_scale
        pos = None  # built only for maps that read positions (a decode step is a few dozen small ops)
        if self.feature_map_q.uses_positions or self.feature_map_k.uses_positions:
            pos = torch.arange(layer.seen, layer.seen + n, device=q.device)
        if s != 1.0:
            q, k = q * s, k * s
        if n > 1 and (layer.Sz is not None or self._valid(call, n) is None):
            init = None if layer.Sz is None else (layer.S, layer.z)
            fused = fused_hedgehog_attention(q, k, v, self.feature_map_q, self.feature_map_k, init)
            if fused is not None:  # prefill in the fused CPU kernel; its state is per key head already
                y, (S, z) = fused
                layer.set_state(S, z, n)
                return y
        pair = hedgehog_pair_features(self.feature_map_q, self.feature_map_k, q, k) \
            if self._pair_maps and layer.Sz is not None else None
        if pair is not None:  # one decoding token: both maps in one matmul
            phi_q, phi_k = pair
        else:
            phi_q = self.feature_map_q(q, pos)
            phi_k = self.feature_map_k(k, pos)  # (B, Hkv, n, F): not repeated
        if layer.Sz is None:
            valid = self._valid(call, n)
            if valid is not None:  # padding never enters the state
                phi_k = phi_k * valid[:, None, :, None].to(phi_k.dtype)
        elif n == 1:
            y = packed_recurrent_step(phi_q, phi_k, v, layer.Sz)
            layer.seen += 1
            return y
        init = None
        if layer.S is not None:  # several new tokens on top of a state: expand it to the query heads
            init = (_repeat_heads(layer.S, self.n_rep), _repeat_heads(layer.z.unsqueeze(-1), self.n_rep).squeeze(-1))
        y, (S, z) = linear_attention(phi_q, _repeat_heads(phi_k, self.n_rep), _repeat_heads(v, self.n_rep),
                                     chunk_size=self.hh_config.chunk_size, initial_state=init, return_state=True,
                                     backend=self.kernels)
        # every query head of a group holds the same state: keep one per KV head
        S = S.view(b, self.num_kv_heads, self.n_rep, *S.shape[2:])[:, :, 0].contiguous()
        z = z.view(b, self.num_kv_heads, self.n_rep, -1)[:, :, 0].contiguous()
        layer.set_state(S, z, n)
        return y

    def _hybrid_full(self, q, k, v_rep, pos_q, pos_k, valid, return_state=False):
        """Hybrid attention of n queries (the last n positions) over all nk keys; chunked when n == nk
        and there is no padding, else the O(n * nk) form (short prompts, generic caches). With
        ``return_state`` returns ``(y, state)``: the chunked path's linear state of keys ``0..n-w-1`` per KV
        head, or None from the other path."""
        s, w = self.hh_config.qk_scale, self.hh_config.window
        k_rep = _repeat_heads(k, self.n_rep)
        n, nk = q.shape[2], k.shape[2]
        if n == nk and valid is None:
            fused = fused_hybrid_attention(q, k, v_rep[:, ::self.n_rep], self.feature_map_q, self.feature_map_k, w,
                                           self.gamma(), self.teacher_scale(), feature_scale=s)
            if fused is not None:  # CPU, no autograd: the fused kernel, state per KV head already
                return fused if return_state else fused[0]
            out = feature_hybrid_attention(q, k_rep, v_rep, _ScaledMap(self.feature_map_q, s),
                                           _ScaledMap(self._grouped_k, s, self.n_rep), window=w, gamma=self.gamma(),
                                           scale=self.teacher_scale(), positions=pos_q,
                                           chunk_size=self.hh_config.chunk_size, return_state=return_state)
            if not return_state:
                return out
            y, (S, z) = out  # per query head; the heads of a group hold the same state
            return y, (S[:, ::self.n_rep].contiguous(), z[:, ::self.n_rep].contiguous())
        phi_q = self.feature_map_q(q * s, pos_q)
        phi_k = self._grouped_k(k * s, pos_k)
        a, _, _ = hybrid_weights(q, k_rep, phi_q, phi_k, w, self.gamma(), self.teacher_scale(),
                                 q_positions=torch.arange(nk - n, nk, device=q.device), key_valid=valid)
        y = (a / a.sum(-1, keepdim=True).clamp_min(DEFAULT_EPS)) @ v_rep.to(a.dtype)
        return (y.to(v_rep.dtype), None) if return_state else y.to(v_rep.dtype)

    def _hybrid_recurrent(self, q, k, v, call, layer):
        """Hybrid prefill (window of the last w keys + state of older ones) or decode, per KV head."""
        s, w = self.hh_config.qk_scale, self.hh_config.window
        b, _, n, _ = q.shape
        if layer.Sz is None:  # prefill: one parallel pass, then build the cache from its keys
            valid = self._valid(call, n)
            pos = torch.arange(n, device=q.device)
            y, state = self._hybrid_full(q, k, _repeat_heads(v, self.n_rep), pos, pos, valid, return_state=True)
            valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
            old = max(0, n - w)
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            fd = self.feature_map_k.feature_dim
            if state is not None:  # the chunked pass already summed the keys older than the window
                S, z = state[0].to(acc), state[1].to(acc)
            else:
                S = v.new_zeros(b, self.num_kv_heads, fd, v.shape[-1], dtype=acc)
                z = v.new_zeros(b, self.num_kv_heads, fd, dtype=acc)
            if old and state is None:
                phi_k = self.feature_map_k(k[:, :, :old] * s, pos[:old]) * valid[:, None, :old, None].to(k.dtype)
                S += phi_k.to(acc).transpose(-1, -2) @ v[:, :, :old].to(acc)
                z += phi_k.to(acc).sum(2)
            layer.set_window(S, z, k[:, :, old:], v[:, :, old:], valid[:, old:], n, window=w)
            return y
        ys = []
        needs_pos = self.feature_map_q.uses_positions or self.feature_map_k.uses_positions
        Sz3 = layer.Sz.view(b * self.num_kv_heads, *layer.Sz.shape[2:])
        for t in range(n):  # decode, one token at a time: it takes ring slot seen % w
            p = layer.seen % w
            if layer.seen >= w:  # that slot's token leaves the window: fold it into the state
                pos = torch.tensor([layer.seen - w], device=q.device) if needs_pos else None
                k_old = layer.k_win[:, :, p:p + 1]
                phi = self.feature_map_k(k_old * s if s != 1.0 else k_old, pos)
                phi = phi * layer.valid[:, p].view(b, 1, 1, 1).to(phi.dtype)
                Sz3.baddbmm_(phi.to(Sz3.dtype).reshape(-1, phi.shape[-1], 1),
                             layer.v_win[:, :, p:p + 1].to(Sz3.dtype).reshape(Sz3.shape[0], 1, -1))
            layer.k_win[:, :, p] = k[:, :, t]
            layer.v_win[:, :, p, :-1] = v[:, :, t]
            layer.v_win[:, :, p, -1] = 1.0
            layer.valid[:, p] = True
            layer.seen += 1
            qt = q[:, :, t:t + 1]
            pos = torch.tensor([layer.seen - 1], device=q.device) if needs_pos else None
            phi_q = self.feature_map_q(qt * s if s != 1.0 else qt, pos)
            ys.append(ring_hybrid_step(qt, phi_q, layer.k_win, layer.v_win, layer.valid, layer.Sz, self.gamma(),
                                       self.teacher_scale()))
        return ys[0] if n == 1 else torch.cat(ys, 2)

    def extra_repr(self) -> str:
        kind = f"hybrid(window={self.hh_config.window})" if self.hybrid else "linear"
        return (f"base={self.base_class}, mode={self.mode}, attention={kind}, feature_map={self.hh_config.feature_map}, "
                f"q_heads={self.num_q_heads}, kv_heads={self.num_kv_heads}")


def hedgehog_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, HedgehogAttention)]


def set_attention_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {MODES}")
    layers = hedgehog_layers(model)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it first (hedgehog.convert_model)")
    for m in layers:
        m.mode = mode
