"""Swap the self-attention of a Hugging Face model for ``HedgehogAttention``, one adapter per family.

An adapter knows, for one architecture family, where the attention modules live, how to get
post-RoPE q/k/v out of them, how to run the original softmax attention, and how to project the
output back. Everything else (feature maps, modes, caching) is shared in ``HedgehogAttention``.

Supported: Llama-family (llama, mistral, qwen2; SmolLM/SmolLM2 are llama) and GPT-2 (causal), and
BERT encoders (non-causal: every token attends to every other, so no decoding state).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch.nn as nn

from hedgehog.attention import HedgehogAttention, HedgehogConfig, hedgehog_layers


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

    def softmax_kwargs(self, m) -> Dict:
        return {}

    def softmax_attention(self, m, q, k, v, call):
        """The model's own attention function (its configured implementation) -> (B, N, H, d)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = sys.modules[m._base_forward.__module__].eager_attention_forward
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(m.config._attn_implementation, eager)
        y, _ = fn(m, q, k, v, call.get("attention_mask"), dropout=0.0, scaling=m.scaling, **self.softmax_kwargs(m))
        return y

    def output(self, m, y):
        raise NotImplementedError


class LlamaFamilyAdapter(Adapter):
    """LlamaAttention and its copies (Mistral, Qwen2): q/k/v/o_proj, RoPE, GQA."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora_targets_all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    call_args = ("position_embeddings", "attention_mask", "cache")

    def attention_slots(self, model):
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no .model.layers")
        return [(layer, "self_attn") for layer in layers]

    def num_heads(self, m):
        return m.config.num_attention_heads

    def num_kv_heads(self, m):
        return getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads

    def qkv(self, m, hidden_states, call):
        shape = (*hidden_states.shape[:-1], -1, m.head_dim)
        q = m.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = m.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = m.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = call["position_embeddings"]
        rope = sys.modules[m._base_forward.__module__].apply_rotary_pos_emb
        return (*rope(q, k, cos, sin), v)

    def softmax_kwargs(self, m):
        if getattr(m.config, "sliding_window", None) is not None and getattr(m.config, "use_sliding_window", True):
            return {"sliding_window": m.config.sliding_window}
        return {}

    def output(self, m, y):
        return m.o_proj(y.reshape(*y.shape[:2], -1).contiguous())


class GPT2Adapter(Adapter):
    """GPT2Attention: fused c_attn (Conv1D), c_proj, learned absolute positions (no RoPE)."""

    family = "gpt2"
    model_types = ("gpt2",)
    lora_targets = r".*\.attn\.(c_attn|c_proj)"
    lora_targets_all = ["c_attn", "c_proj", "c_fc"]
    call_args = ("cache", "attention_mask")

    def attention_slots(self, model):
        tr = getattr(model, "transformer", model)
        return [(block, "attn") for block in tr.h]

    def num_heads(self, m):
        return m.num_heads

    def qkv(self, m, hidden_states, call):
        q, k, v = m.c_attn(hidden_states).split(m.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, m.head_dim)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))

    def output(self, m, y):
        return m.resid_dropout(m.c_proj(y.reshape(*y.shape[:2], -1).contiguous()))


class BertAdapter(Adapter):
    """BertSelfAttention (encoders such as all-MiniLM-L6-v2): query/key/value Linear, absolute positions,
    bidirectional attention; the output projection lives outside the module (BertSelfOutput)."""

    family = "bert"
    model_types = ("bert",)
    causal = False
    lora_targets = ["query", "key", "value"]
    lora_targets_all = ["query", "key", "value", "dense"]
    call_args = ("attention_mask", "cache")

    def attention_slots(self, model):
        base = getattr(model, "bert", model)
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


ADAPTERS = [LlamaFamilyAdapter(), GPT2Adapter(), BertAdapter()]


def supported_model_types() -> List[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_or_type):
    mt = model_or_type if isinstance(model_or_type, str) else getattr(getattr(model_or_type, "config", None),
                                                                        "model_type", None)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    raise UnsupportedArchitectureError(
        f"architecture {mt!r} is not supported for conversion; supported model types: "
        f"{', '.join(supported_model_types())}. Families that differ from Llama (q/k norms, fused qkv, "
        "soft-capping) need their own adapter, so do not add the type to an existing adapter's list."
    )


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
    if adapter.causal:
        from hedgehog.generation import install_generation_cache

        install_generation_cache(model)
    return model
