"""Swap the self-attention of a Hugging Face model for ``HedgehogAttention``.

An adapter knows, for an architecture, where the attention modules live and how to get post-RoPE q/k/v out
of them. One generic adapter (:class:`InterfaceAdapter`) serves every decoder family whose attention goes
through transformers' attention interface: the module's own forward runs (projections, fused qkv splits,
q/k norms, partial rotary, its cache update), and the attention function it calls is ours, so the teacher is
exactly the model's own attention (its sliding window, soft-cap and scaling included). One small adapter
remains where that does not hold: BERT/RoBERTa encoders (non-causal: every token attends to every other, so no
decoding state).
"""
from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from hedgehog.layers.attention import CACHE_PARAMS, HedgehogAttention, HedgehogConfig, hedgehog_layers
from hedgehog.layers.generation import install_generation_cache
from hedgehog.models.modelclass import mark_converted


class UnsupportedArchitectureError(ValueError):
    pass


class Adapter:
    """What conversion needs to know about one architecture family. Subclasses set the class
    attributes and the methods that differ; the rest is shared."""

    family = ""
    model_types: tuple = ()
    lora_targets = None  # peft target_modules for the attention projections
    lora_targets_all = None  # ... plus the MLP projections
    call_args: tuple = ()  # names of the positional arguments of the attention module's forward (after hidden)
    causal = True  # False: bidirectional (encoder) attention

    def attention_slots(self, model) -> List[Tuple[nn.Module, str]]:
        raise NotImplementedError

    def num_heads(self, m):
        raise NotImplementedError

    def num_kv_heads(self, m):
        return self.num_heads(m)

    def head_dim(self, m):
        return m.head_dim

    def scaling(self, m):
        return m.scaling

    def cache_index(self, m):
        return m.layer_idx

    def parse_call(self, args, kwargs) -> Dict:
        """The attention module's call as one dict; the cache is always under ``cache``."""
        call = dict(kwargs)
        call.update(zip(self.call_args, args))
        if "past_key_values" in call:  # transformers < 5.24 names the layer's cache argument so
            call.setdefault("cache", call.pop("past_key_values"))
        return call

    def qkv(self, m, hidden_states, call):
        """Post-RoPE q (B, Hq, N, d), k and v (B, Hkv, N, d)."""
        raise NotImplementedError

    def softmax_attention(self, m, q, k, v, call):
        """The model's own attention function (its configured implementation) -> (B, N, H, d)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(m.config._attn_implementation, m.family_eager_attention)
        y, _ = fn(m, q, k, v, call.attention_mask, dropout=0.0, scaling=m.scaling)
        return y

    def output(self, m, y):
        raise NotImplementedError

    def lora_target_modules(self, model, which: str):
        """peft ``target_modules`` for ``which`` = "attention" (the attention projections) or "all" (+ MLP)."""
        return self.lora_targets if which == "attention" else self.lora_targets_all


class BertAdapter(Adapter):
    """BertSelfAttention (encoders such as all-MiniLM-L6-v2): query/key/value Linear, absolute positions,
    bidirectional attention; the output projection lives outside the module (BertSelfOutput)."""

    family = "bert"
    model_types = ("bert", "roberta")  # RobertaSelfAttention is BertSelfAttention's copy
    causal = False
    lora_targets = ["query", "key", "value"]
    lora_targets_all = ["query", "key", "value", "dense"]
    call_args = ("attention_mask", "cache")

    def attention_slots(self, model):
        base = getattr(model, getattr(model, "base_model_prefix", "") or "bert", model)
        enc = getattr(base, "encoder", None)
        if enc is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no .encoder")
        return [(layer.attention, "self") for layer in enc.layer]

    def num_heads(self, m):
        return m.num_attention_heads

    def head_dim(self, m):
        return m.attention_head_size

    def qkv(self, m, hidden_states, call):
        shape = (*hidden_states.shape[:-1], -1, m.attention_head_size)
        return (p(hidden_states).view(shape).transpose(1, 2) for p in (m.query, m.key, m.value))

    def output(self, m, y):
        return y.reshape(*y.shape[:2], -1).contiguous()


# What a family's attention module may pass to the attention function besides q, k, v and the mask: we
# understand these (the teacher gets them all; the student reads the window and the soft-cap).
INTERFACE_KWARGS = {"dropout", "scaling", "sliding_window", "softcap", "position_ids", "is_causal"}


def _interface_call_kwargs(cls) -> Optional[set]:
    """The keyword names ``cls.forward`` passes to ``attention_interface(...)``, or None if it never calls one
    after a cache update (then it is not an attention module of the generic kind)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    i = src.find("attention_interface(")
    if i < 0 or "ALL_ATTENTION_FUNCTIONS" not in src:
        return None
    depth, j = 0, i + len("attention_interface")
    for j in range(j, len(src)):
        depth += {"(": 1, ")": -1}.get(src[j], 0)
        if depth == 0:
            break
    return set(re.findall(r"(\w+)\s*=(?!=)", src[i:j]))


@lru_cache(maxsize=None)
def interface_attention_class(cls) -> Tuple[bool, str]:
    """(is it an attention module the generic adapter converts, why not)."""
    kw = _interface_call_kwargs(cls)
    if kw is None:
        return False, "its forward does not call transformers' attention interface"
    params = inspect.signature(cls.forward).parameters
    if not any(p in params for p in CACHE_PARAMS):
        return False, "its forward takes no cache argument"
    unknown = sorted(kw - INTERFACE_KWARGS)
    if unknown:
        return False, (f"it passes {', '.join(unknown)} to the attention function (e.g. attention sinks or a "
                       "position bias), which linear attention does not reproduce")
    return True, ""


def _modeling_module(model_type: str):
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


def _projection_types() -> tuple:
    """The module types peft's LoRA wraps as projections: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


class InterfaceAdapter(Adapter):
    """Every causal family whose attention module computes q/k/v, updates the cache and calls transformers'
    attention interface (GPT-2, Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-NeoX/Pythia, OLMo2, ...). The module's
    own forward runs under :class:`hedgehog.layers.attention.HedgehogAttention`, which supplies the attention function,
    so fused qkv, q/k norms, partial rotary and per-layer sliding windows need no code here."""

    family = "generic"
    generic = True
    causal = True

    def __init__(self, model_type: str = ""):
        self.model_types = (model_type,) if model_type else ()

    @staticmethod
    def _is_slot(m) -> bool:
        return isinstance(m, nn.Module) and hasattr(m, "layer_idx") and interface_attention_class(type(m))[0]

    def attention_slots(self, model):
        slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                 if self._is_slot(child) or getattr(child, "_hedgehog_generic", False)]
        if not slots:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no attention module that calls "
                                               "transformers' attention interface")
        return sorted(slots, key=lambda s: getattr(s[0], s[1]).layer_idx)

    def num_heads(self, m):
        return m.config.num_attention_heads

    def num_kv_heads(self, m):
        """Read from the module's projections where it has them (a config may carry a ``num_key_value_heads`` its
        attention does not use: GPT-NeoX's fused projection has none), else from the config."""
        d, hq = self.head_dim(m), self.num_heads(m)
        k = getattr(m, "k_proj", None)
        if isinstance(getattr(k, "out_features", None), int):
            return k.out_features // d
        for fused in ("query_key_value", "qkv_proj", "Wqkv"):  # q, k, v stacked: (Hq + 2 Hkv) * d outputs
            out = getattr(getattr(m, fused, None), "out_features", None)
            if isinstance(out, int) and out % d == 0 and (out // d - hq) % 2 == 0 and out // d > hq:
                return (out // d - hq) // 2
        return getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads

    def head_dim(self, m):
        d = getattr(m, "head_dim", None) or getattr(m, "head_size", None)
        return d or m.config.hidden_size // m.config.num_attention_heads

    def cache_param(self, cls) -> str:
        params = inspect.signature(cls.forward).parameters
        return next(p for p in CACHE_PARAMS if p in params)

    def lora_target_modules(self, model, which: str):
        projections = _projection_types()
        slots = self.attention_slots(model)
        parent, attr = slots[0]
        attn = getattr(parent, attr)
        own = ("feature_map_q", "feature_map_k", "_grouped_k")  # hedgehog's maps are not LoRA targets
        attn_names = sorted({n for n, c in attn.named_modules() if isinstance(c, projections) and n
                             and not n.startswith(own)})
        if which == "attention":
            return rf".*\.{re.escape(attr)}\.({'|'.join(map(re.escape, attn_names))})"
        mlp = sorted({n.rsplit(".", 1)[-1] for n, c in parent.named_modules()
                      if isinstance(c, projections) and n and not n.startswith(attr + ".")})
        return sorted(set(attn_names) | set(mlp))


ADAPTERS = [BertAdapter()]
# the families the tests check, one tiny random config each (any other interface family converts too)
CHECKED_GENERIC_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "gpt_neox", "olmo2")


def supported_model_types() -> List[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types} | set(CHECKED_GENERIC_TYPES))


def _generic_support(model_type: str) -> Tuple[bool, str]:
    """Whether ``model_type``'s modeling code has an attention module the generic adapter converts (no weights)."""
    mod = _modeling_module(model_type)
    if mod is None:
        return False, "transformers has no modeling code for it"
    reasons = []
    for name, cls in vars(mod).items():
        if isinstance(cls, type) and issubclass(cls, nn.Module) and name.endswith("Attention") \
                and cls.__module__ == mod.__name__:
            ok, why = interface_attention_class(cls)
            if ok:
                return True, ""
            reasons.append(f"{name}: {why}")
    return False, "; ".join(reasons) or "it has no attention module"


def get_adapter(model_or_type):
    mt = model_or_type if isinstance(model_or_type, str) else getattr(getattr(model_or_type, "config", None),
                                                                        "model_type", None)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    if mt:
        ok, why = _generic_support(mt)
        if ok:
            return InterfaceAdapter(mt)
    else:
        why = "the model has no config.model_type"
    raise UnsupportedArchitectureError(
        f"architecture {mt!r} is not supported for conversion: {why}. hedgehog converts every family whose "
        "attention module calls transformers' attention interface after its cache update (checked: "
        f"{', '.join(supported_model_types())}); a model outside that needs an adapter in hedgehog.models.convert."
    )


def teacher_attn_implementation(config_or_path, **hub) -> str:
    """The attention implementation to load a base with so that it is its own exact teacher: ``sdpa``, or
    ``eager`` where the family needs what sdpa does not do (Gemma2's logit soft-capping)."""
    config = config_or_path
    if isinstance(config_or_path, (str, bytes)) or hasattr(config_or_path, "__fspath__"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_or_path, **hub)
    config = getattr(config, "get_text_config", lambda: config)()
    return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"


def convert_model(model: nn.Module, config: HedgehogConfig | None = None) -> nn.Module:
    """Replace the model's self-attention layers by ``HedgehogAttention`` in place; returns the model.

    The converted model stays a ``transformers`` model (forward, loss, ``generate``); all layers start in
    ``linear`` mode with identity-initialised feature maps. Only the listed ``config.layers`` are swapped.
    """
    config = config or HedgehogConfig()
    if hedgehog_layers(model):
        raise ValueError("model is already converted")
    adapter = get_adapter(model)
    if config.attention == "hybrid" and not adapter.causal:
        raise ValueError(f"hybrid (sliding-window) attention is causal only; {adapter.family} attention is "
                         "bidirectional: use attention='linear'")
    if config.feature_map == "cosformer" and "max_len" not in config.feature_map_kwargs:
        # a fixed M keeps the map blockwise and decodable; positions beyond it would go negative
        config.feature_map_kwargs["max_len"] = int(getattr(model.config, "max_position_embeddings", 8192))
    slots = adapter.attention_slots(model)
    chosen = range(len(slots)) if config.layers is None else config.layers
    for idx in chosen:
        if not 0 <= idx < len(slots):
            raise ValueError(f"layer {idx} out of range: the model has {len(slots)} attention layers")
        parent, attr = slots[idx]
        base = getattr(parent, attr)
        new = HedgehogAttention(base, adapter, config, idx)
        p = next(base.parameters())
        new.to(device=p.device)
        new.train(base.training)
        setattr(parent, attr, new)
    model.config.hedgehog = config.to_dict()
    mark_converted(model)  # save_pretrained writes the hedgehog format
    if adapter.causal:
        install_generation_cache(model)
    return model
