"""Drop-in linear attention for a transformer layer, keeping the model's own projections.

``HedgehogAttention`` replaces one self-attention module of a Hugging Face model. It *adopts* the
original module's sub-modules (``q_proj``/``k_proj``/``v_proj``/``o_proj`` or GPT-2's ``c_attn``/
``c_proj``) and plain attributes under the same names, so state-dict keys do not change and peft's
LoRA finds the same target names. It adds two feature maps:

- ``feature_map_q``: one per *query* head, applied to the post-RoPE query;
- ``feature_map_k``: one per *key/value* head (GQA), applied to the post-RoPE key, then shared by
  the query heads of its group, so a decoding state needs only one ``(S, z)`` per KV head.

Modes (``set_attention_mode(model, mode)``, or for a block ``with attention_mode(model, mode):``, which restores
the modes it found):

- ``softmax``: the original attention, exactly (the teacher);
- ``linear``: normalised linear attention ``phi(q).phi(k)`` (the student);
- ``distill``: returns the teacher's output (so later layers see teacher activations) and stores
  this layer's distillation loss in ``.distill_loss``;
- ``window``: the teacher's exact softmax limited to ``.baseline = (window, sinks)``, the last keys and the
  first ones, in O(N * window) (the no-training baseline a converted model is measured against;
  :func:`baseline_mode`);
- ``mimic``: returns the student's (linear) output and stores in ``.distill_loss`` the loss of the
  feature maps against the softmax attention of the same, *detached* q/k, so that loss trains only
  the feature maps (the paper's recipe for training Hedgehog from scratch, ``hedgehog.train.scratch``).

Any mode can record post-RoPE ``(q, k)`` in ``.captured`` (``start_capture``), which stage-1
distillation uses to train every layer's maps from one teacher forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.layers.attention_paths import StudentPaths
from hedgehog.layers.interface import InterfaceView, PassThroughCache, key_valid
from hedgehog.modules.feature_maps import HedgehogFeatureMap, get_feature_map
from hedgehog.modules.heads import GroupedKeyMap, repeat_heads
from hedgehog.modules.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import backends, window_softmax_attention
from hedgehog.ops.sparse_cache import SCORES as SPARSE_SCORES

MODES = ("softmax", "linear", "distill", "mimic", "window")
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
    # Long context (hybrid only; the defaults keep the plain LoLCATs hybrid, which models saved before these
    # settings existed load as). `sinks`: the first keys stay in the exact softmax part after they leave the
    # window (StreamingLLM's attention sinks). `state_decay`: the initial per-KV-head factor lambda of a
    # decayed linear state, S_n = lambda S_{n-1} + phi(k) v^T (learned as sigmoid of a logit; None: no decay),
    # which bounds the linear part's mass so that it stays what it was at the training length.
    sinks: int = 0
    state_decay: Optional[float] = None
    # Inference (hybrid only, LoLA): `sparse_cache` older keys per KV head stay exact, those the linear state reads
    # back worst, chosen every `sparse_chunk` tokens (hedgehog.ops.sparse_cache). 0: none. Training ignores it.
    # `sparse_score`: read back by the state with the other candidates folded ("memory") or as it is ("state", LoLA).
    sparse_cache: int = 0
    sparse_chunk: int = 32
    sparse_score: str = "memory"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {ATTENTIONS}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.state_decay is not None and not 0.0 < self.state_decay < 1.0:
            raise ValueError(f"state_decay must be in (0, 1) (or None for no decay), got {self.state_decay}")
        if self.sparse_cache < 0 or self.sparse_chunk < 1:
            raise ValueError(f"sparse_cache must be >= 0 and sparse_chunk >= 1, got {self.sparse_cache} and "
                             f"{self.sparse_chunk}")
        if self.sparse_score not in SPARSE_SCORES:
            raise ValueError(f"unknown sparse_score {self.sparse_score!r}; choose one of {SPARSE_SCORES}")
        if (self.sinks or self.state_decay is not None or self.sparse_cache) and self.attention != "hybrid":
            raise ValueError("sinks, state_decay and sparse_cache apply to the hybrid attention (attention='hybrid')")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HedgehogConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class HedgehogAttention(StudentPaths, nn.Module):
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
        self._grouped_k = GroupedKeyMap(self.feature_map_k, self.n_rep)
        self._pair_maps = all(type(fm) is HedgehogFeatureMap for fm in (self.feature_map_q, self.feature_map_k))
        self.kernels = backends.bind("auto")  # the causal kernel for CUDA tensors, chosen once here
        self.window_gate = None
        if config.attention == "hybrid":  # per query head; gamma = sigmoid(gate)
            self.window_gate = nn.Parameter(torch.full((self.num_q_heads,), float(config.window_gate_init)))
        self.state_decay = None
        if config.state_decay is not None:  # per KV head (the state is); lambda = sigmoid(state_decay)
            logit = math.log(config.state_decay / (1.0 - config.state_decay))
            self.state_decay = nn.Parameter(torch.full((self.num_kv_heads,), logit))
        self.mode = "linear"
        self.baseline = (config.window, 0)  # window mode's (window, sinks)
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

    def log_decay(self, per_query_head: bool = True) -> Optional[torch.Tensor]:
        """``log lambda`` of the decayed linear state, per query head (H,) or per KV head; None without decay."""
        if self.state_decay is None:
            return None
        ld = F.logsigmoid(self.state_decay)
        return ld.repeat_interleave(self.n_rep) if per_query_head else ld

    def hybrid_kwargs(self) -> Dict[str, Any]:
        """``window``/``gamma`` (and ``sinks``/``decay`` when set) for the loss, metric and op functions when this
        layer is hybrid, else {}."""
        if not self.hybrid:
            return {}
        kw = dict(window=self.hh_config.window, gamma=self.gamma())
        if self.hh_config.sinks:
            kw["sinks"] = self.hh_config.sinks
        if self.state_decay is not None:
            kw["decay"] = self.log_decay()
        return kw

    def trainable_modules(self) -> Dict[str, nn.Module]:
        """What attention transfer trains and checkpoints save: the feature maps (and the window gate)."""
        mods = {"q": self.feature_map_q, "k": self.feature_map_k}
        if self.window_gate is not None:
            holder = nn.Module()
            holder.window_gate = self.window_gate
            mods["gate"] = holder
        if self.state_decay is not None:
            holder = nn.Module()
            holder.state_decay = self.state_decay
            mods["decay"] = holder
        return mods

    def features(self, q: torch.Tensor, k: torch.Tensor, positions=None):
        """phi(q) (B, Hq, N, F) and phi(k) repeated to the query heads (B, Hq, N, F)."""
        s = self.hh_config.qk_scale
        return self.feature_map_q(q * s, positions), self._grouped_k(k * s, positions)

    def layer_distill_loss(self, q, k, v=None, query_index=None):
        """The configured distillation loss of this layer for captured post-RoPE q (B,Hq,N,d), k (B,Hkv,N,d);
        ``query_index`` restricts the (cross-entropy) loss to those query rows."""
        phi_q, phi_k = self.features(q, k)
        k_rep = repeat_heads(k, self.n_rep)
        hyb = self.hybrid_kwargs()
        if self.hh_config.distill_loss == "mse":
            if v is None:
                raise ValueError("the mse distillation loss needs v")
            if query_index is not None:
                raise ValueError("the mse distillation loss takes every row (query_index applies to 'ce' only)")
            return attention_output_mse_loss(q, k_rep, repeat_heads(v, self.n_rep), phi_q, phi_k,
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
        if self.mode == "window":
            if self._valid(call, k.shape[2]) is not None or q.shape[2] != k.shape[2]:
                raise ValueError("window mode (the no-training baseline) scores whole unpadded windows without a "
                                 "cache; pass input ids without padding and use_cache=False")
            w, sinks = self.baseline
            return window_softmax_attention(q, repeat_heads(k, self.n_rep), repeat_heads(v, self.n_rep), w, sinks,
                                            scale=self.teacher_scale()).transpose(1, 2)
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
        :func:`hedgehog.layers.interface.hedgehog_attention_function`, which routes to :meth:`_attend` with the model's own function as
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
            params[key] = PassThroughCache(cache)
        self._generic_call = {"attention_mask": params.get("attention_mask"),
                              "position_ids": params.get("position_ids"), "cache": cache}
        try:
            return self._base_forward(InterfaceView(self), hidden_states, **params)
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
        return key_valid(call.get("attention_mask"), n_keys, self.teacher_window)

    def _positions(self, call, n, offset, device):
        pos = call.get("position_ids")
        if pos is not None and pos.shape[-1] == n:
            return pos[0] if pos.dim() == 2 and (pos == pos[:1]).all() else pos
        return torch.arange(offset, offset + n, device=device)

    def extra_repr(self) -> str:
        c = self.hh_config
        kind = (f"hybrid(window={c.window}, sinks={c.sinks}, decay={c.state_decay is not None}, "
                f"sparse_cache={c.sparse_cache})" if self.hybrid
                else "linear")
        return (f"base={self.base_class}, mode={self.mode}, attention={kind}, feature_map={self.hh_config.feature_map}, "
                f"q_heads={self.num_q_heads}, kv_heads={self.num_kv_heads}")


def hedgehog_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, HedgehogAttention)]


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Inside the block every converted layer of ``model`` computes in ``mode``; afterwards each is back in the
    mode it was in before (not a fixed one), also when the block raises."""
    layers = hedgehog_layers(model)
    before = [m.mode for m in layers]
    set_attention_mode(model, mode)
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.mode = b


def set_sparse_cache(model: nn.Module, cache_size: int, chunk: Optional[int] = None,
                     score: Optional[str] = None) -> None:
    """Give every hybrid layer of a converted ``model`` a sparse cache of ``cache_size`` exact older keys per KV
    head (0: none), chosen every ``chunk`` tokens by ``score`` (None: keep the layer's); an inference setting,
    saved with the model (:mod:`hedgehog.ops.sparse_cache`)."""
    layers = [m for m in hedgehog_layers(model) if m.hybrid]
    if cache_size and not layers:
        raise ValueError("a sparse cache needs hybrid attention layers (convert with --attention hybrid); this "
                         "model has none")
    for m in layers:
        m.hh_config = dataclasses.replace(m.hh_config, sparse_cache=cache_size,
                                          sparse_chunk=m.hh_config.sparse_chunk if chunk is None else chunk,
                                          sparse_score=m.hh_config.sparse_score if score is None else score)


def set_attention_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {MODES}")
    layers = hedgehog_layers(model)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it first (hedgehog.convert_model)")
    for m in layers:
        m.mode = mode
