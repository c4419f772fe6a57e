"""Drop-in linear attention for a transformer layer, keeping the model's own projections.

``HedgehogAttention`` replaces one self-attention module of a Hugging Face model. It *adopts* the
original module's sub-modules (``q_proj``/``k_proj``/``v_proj``/``o_proj`` or GPT-2's ``c_attn``/
``c_proj``) and plain attributes under the same names, so state-dict keys do not change and peft's
LoRA finds the same target names. It adds two feature maps:

- ``feature_map_q``: one per *query* head, applied to the post-RoPE query;
- ``feature_map_k``: one per *key/value* head (GQA), applied to the post-RoPE key, then shared by
  the query heads of its group, so a decoding state needs only one ``(S, z)`` per KV head.

What it computes is its :class:`~hedgehog.layers.config.Mode` (``with attention_mode(model, mode):`` restores the
modes it found; ``set_attention_mode`` sets them for good):

- ``teacher``: the original softmax attention, exactly;
- ``student``: the converted attention, linear ``phi(q).phi(k)`` or the hybrid (its config's ``attention``);
- ``distill``: returns the teacher's output (so later layers see teacher activations) and stores
  this layer's distillation loss in ``.distill_loss``;
- ``baseline``: the teacher's exact softmax limited to ``.baseline = (window, sinks)``, the last keys and the
  first ones, in O(N * window) (the no-training baseline a converted model is measured against);
- ``mimic``: returns the student's output and stores in ``.distill_loss`` the loss of the feature maps
  against the softmax attention of the same, *detached* q/k, so that loss trains only the feature maps (the
  paper's recipe for training Hedgehog from scratch, ``hedgehog.train.scratch``).

A forward reads top to bottom: the teacher mode runs the original module untouched; otherwise the layer
computes post-RoPE q/k/v -- through the family's own forward and transformers' attention interface
(:mod:`hedgehog.layers.interface`), or the adapter's projections for encoders -- and :meth:`attend` takes
them with the call's :class:`~hedgehog.layers.interface.AttentionCall` (mask, positions, cache, the teacher's
settings and function). The student's prefill and decoding forms are :mod:`hedgehog.layers.student`.

Any mode can record the post-RoPE ``(q, k, v)`` of each call with the teacher settings it ran under
(:class:`Capture`, ``start_capture``), which stage-1 distillation uses to train every layer's maps from one
teacher forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from typing import Dict, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.layers.config import ATTENTIONS, MODES, HedgehogConfig, Mode
from hedgehog.layers.interface import AttentionCall, InterfaceView, PassThroughCache
from hedgehog.layers.student import StudentPaths
from hedgehog.modules.feature_maps import HedgehogFeatureMap, get_feature_map
from hedgehog.modules.heads import GroupedKeyMap, repeat_heads
from hedgehog.modules.losses import attention_distillation_loss, attention_output_mse_loss
from hedgehog.ops import backends, window_softmax_attention
from hedgehog.ops.settings import HybridSettings, TeacherSettings

__all__ = ["ATTENTIONS", "CACHE_PARAMS", "MODES", "Capture", "HedgehogAttention", "HedgehogConfig", "Mode",
           "attention_mode", "hedgehog_layers", "set_attention_mode", "set_sparse_cache"]

# what attention modules call their cache argument: transformers 5.24's name first, then older ones
CACHE_PARAMS = ("cache", "past_key_values", "layer_past", "past_key_value")


class Capture(NamedTuple):
    """One captured call: post-RoPE q (B, Hq, N, d), k and v (B, Hkv, N, d), and the teacher's settings."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    teacher: TeacherSettings


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
        # the family's eager attention function: the teacher where the config names no other implementation
        self.family_eager_attention = getattr(sys.modules[type(base).forward.__module__], "eager_attention_forward",
                                              None)
        if self._hedgehog_generic:
            self._cache_param = adapter.cache_param(type(base))
            self._signature = inspect.signature(type(base).forward)
        # The teacher's scale, sliding window and logit soft-cap as the module has them; a generic family's
        # call passes its own to the attention function, and those then hold for that call.
        generic = self._hedgehog_generic
        self.teacher = TeacherSettings(scale=adapter.scaling(base),
                                       window=getattr(base, "sliding_window", None) if generic else None,
                                       softcap=getattr(base, "attn_logit_softcapping", None) if generic else None)
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
        # Hedgehog maps on both sides: the fused CPU kernel serves them (CPU inference takes it; it declines for
        # what a call brings -- autograd, float64 -- and when HEDGEHOG_CPU_KERNEL=0 or it could not be built), and
        # a decoding token runs both maps in one matmul
        self._pair_maps = all(type(fm) is HedgehogFeatureMap for fm in (self.feature_map_q, self.feature_map_k))
        self.kernels = backends.bind("auto")  # the kernels for CUDA tensors (fla), chosen once here
        self.window_gate = None
        if config.attention == "hybrid":  # per query head; gamma = sigmoid(gate)
            self.window_gate = nn.Parameter(torch.full((self.num_q_heads,), float(config.window_gate_init)))
        self.state_decay = None
        if config.state_decay is not None:  # per KV head (the state is); lambda = sigmoid(state_decay)
            logit = math.log(config.state_decay / (1.0 - config.state_decay))
            self.state_decay = nn.Parameter(torch.full((self.num_kv_heads,), logit))
        self._mode = Mode.STUDENT
        self.baseline = (config.window, 0)  # baseline mode's (window, sinks)
        self.captured = None
        self.distill_loss = None
        # mimic mode: the query rows (1-D positions) its loss is taken over; None = every row. Training from
        # scratch sets a fresh subset per step (an unbiased estimate at rows x N cost instead of N x N).
        self.mimic_rows = None

    @property
    def mode(self) -> Mode:
        """What this layer computes (:class:`Mode`); set it with a Mode or its name."""
        return self._mode

    @mode.setter
    def mode(self, mode) -> None:
        self._mode = Mode.of(mode)

    # -- helpers -----------------------------------------------------------------------------
    def start_capture(self):
        self.captured = []

    def stop_capture(self):
        out, self.captured = self.captured, None
        return out

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

    def hybrid_settings(self) -> Optional[HybridSettings]:
        """The hybrid student's window, gamma, sinks and decay (differentiable, per query head), or None when
        this layer is linear."""
        if not self.hybrid:
            return None
        return HybridSettings(window=self.hh_config.window, gamma=self.gamma(), sinks=self.hh_config.sinks,
                              decay=self.log_decay())

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

    def layer_distill_loss(self, q, k, v=None, query_index=None, teacher: Optional[TeacherSettings] = None):
        """The configured distillation loss of this layer for captured post-RoPE q (B,Hq,N,d), k (B,Hkv,N,d)
        against ``teacher`` (None: the module's settings; a :class:`Capture` holds those of its call);
        ``query_index`` restricts the (cross-entropy) loss to those query rows."""
        phi_q, phi_k = self.features(q, k)
        k_rep = repeat_heads(k, self.n_rep)
        teacher = self.teacher if teacher is None else teacher
        if self.hh_config.distill_loss == "mse":
            if v is None:
                raise ValueError("the mse distillation loss needs v")
            if query_index is not None:
                raise ValueError("the mse distillation loss takes every row (query_index applies to 'ce' only)")
            return attention_output_mse_loss(q, k_rep, repeat_heads(v, self.n_rep), phi_q, phi_k,
                                             causal=self.causal, teacher=teacher, hybrid=self.hybrid_settings())
        return attention_distillation_loss(q, k_rep, phi_q, phi_k, causal=self.causal, teacher=teacher,
                                           hybrid=self.hybrid_settings(), query_index=query_index)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states, *args, **kwargs):
        if self.mode is Mode.TEACHER and self.captured is None:  # the original module, untouched
            return self._base_forward(self, hidden_states, *args, **kwargs)
        if self._hedgehog_generic:  # the family's forward; its attention function call comes to attend()
            return self._family_forward(hidden_states, args, kwargs)
        call = self.adapter.parse_call(args, kwargs)
        q, k, v = self.adapter.qkv(self, hidden_states, call)
        cache = call.get("cache")
        if self.mode is Mode.TEACHER and cache is not None:
            k, v = cache.update(k, v, self.adapter.cache_index(self))
        call = AttentionCall(attention_mask=call.get("attention_mask"), position_ids=call.get("position_ids"),
                             cache=cache, teacher=self.teacher)
        call = call.replace(teacher_fn=lambda q_, k_, v_: self.adapter.softmax_attention(self, q_, k_, v_, call))
        return self.adapter.output(self, self.attend(q, k, v, call)), None

    def attend(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        """This layer's mode on post-RoPE q (B,Hq,N,d), k/v (B,Hkv,N,d) -> (B, N, Hq, d)."""
        if self.captured is not None:
            self.captured.append(Capture(q.detach(), k.detach(), v.detach(), call.teacher))
        mode = self.mode
        if mode is Mode.TEACHER:
            return call.teacher_fn(q, k, v)
        if mode is Mode.BASELINE:
            if call.valid_keys(k.shape[2]) is not None or q.shape[2] != k.shape[2]:
                raise ValueError("baseline mode (the no-training window baseline) scores whole unpadded windows "
                                 "without a cache; pass input ids without padding and use_cache=False")
            w, sinks = self.baseline
            return window_softmax_attention(q, repeat_heads(k, self.n_rep), repeat_heads(v, self.n_rep), w, sinks,
                                            scale=call.teacher.scale).transpose(1, 2)
        if mode is Mode.DISTILL:
            self.distill_loss = self.layer_distill_loss(q, k, v, teacher=call.teacher)
            return call.teacher_fn(q, k, v)
        if mode is Mode.MIMIC and torch.is_grad_enabled():
            rows = self.mimic_rows
            if rows is not None and (rows.numel() == 0 or int(rows.max()) >= q.shape[2]):
                raise ValueError(f"mimic rows must be non-empty positions below the sequence length "
                                 f"{q.shape[2]}, got {rows.numel()} rows up to {int(rows.max()) if rows.numel() else None}")
            self.distill_loss = self.layer_distill_loss(q.detach(), k.detach(), v.detach(), query_index=rows,
                                                        teacher=call.teacher)
        return self.student(q, k, v, call).transpose(1, 2)

    def _family_forward(self, hidden_states, args, kwargs):
        """Run the family's own attention forward on an :class:`InterfaceView` of this layer and the call.

        Its projections, norms and rotary run as written; outside teacher mode its cache update sees a
        pass-through cache (our state layers own the decoding state); the attention function it calls,
        :func:`hedgehog.layers.interface.hedgehog_attention_function`, completes the call and runs
        :meth:`attend`."""
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
        if cache is not None and self.mode is not Mode.TEACHER:
            params[key] = PassThroughCache(cache)
        call = AttentionCall(position_ids=params.get("position_ids"), cache=cache, teacher=self.teacher)
        return self._base_forward(InterfaceView(self, call), hidden_states, **params)

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
    head (0: none), chosen every ``chunk`` tokens by ``score`` (None: keep the layer's); used at inference and,
    set before stage 2, in training; saved with the model (:mod:`hedgehog.ops.sparse_cache`)."""
    layers = [m for m in hedgehog_layers(model) if m.hybrid]
    if cache_size and not layers:
        raise ValueError("a sparse cache needs hybrid attention layers (convert with --attention hybrid); this "
                         "model has none")
    for m in layers:
        m.hh_config = dataclasses.replace(m.hh_config, sparse_cache=cache_size,
                                          sparse_chunk=m.hh_config.sparse_chunk if chunk is None else chunk,
                                          sparse_score=m.hh_config.sparse_score if score is None else score)


def set_attention_mode(model: nn.Module, mode) -> None:
    """Every converted layer of ``model`` computes in ``mode`` (a :class:`Mode` or its name) from now on."""
    mode = Mode.of(mode)
    layers = hedgehog_layers(model)
    if not layers:
        raise ValueError("model has no Hedgehog attention layers; convert it first (hedgehog.convert_model)")
    for m in layers:
        m.mode = mode
