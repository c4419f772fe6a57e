"""Models trained from scratch: every attention kind in a small Llama-style decoder, the short conv, and the
mimic loss (the paper's recipe: the feature maps also learn to mimic softmax on detached q/k).


The model is a Hugging Face ``LlamaForCausalLM`` (RoPE, SwiGLU MLP, RMSNorm, tied embeddings), built
randomly initialised from a ``LlamaConfig``; every kind except ``softmax`` swaps its attention layers
for ``HedgehogAttention`` through the same ``convert_model`` as pretrained conversion, so a model trained
here decodes with the same recurrent cache.

Kinds: ``softmax`` (torch SDPA), the feature maps ``hedgehog``, ``t2r``, ``taylor``, ``elu``, ``relu``,
``performer``, ``cosformer`` (and ``hedgehog_exp``), and ``hybrid`` (sliding-window softmax + Hedgehog).

Hedgehog follows the paper: during training its feature maps also learn to mimic the softmax attention
of the same q/k. Each layer runs in ``mimic`` mode: its output is the linear attention (what the LM loss
trains), and it adds the attention cross-entropy between ``softmax(q k^T / sqrt d)`` and its own linear
weights, computed on *detached* q/k so that this term trains only the feature maps (and the hybrid's
window factor), never the projections. Total loss = LM loss + ``mimic_weight`` x mean over layers of
that cross-entropy (default ``mimic_weight = 1``; the LM loss alone also trains the maps). That term costs
O(N^2) per layer, like the teacher; ``mimic_rows = R`` takes it over R random query rows per step (an unbiased
estimate at O(R N), rows drawn from the seed and step so resume draws the same ones).

Text is byte-level by default (257 ids: the 256 bytes + end-of-document), so nothing needs fetching but
the Shakespeare plays; validation/test perplexities are per byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.layers.attention import Mode, HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.layers.generation import cache_argument


LINEAR_KINDS = ("hedgehog", "t2r", "taylor", "elu", "relu", "performer", "cosformer", "hedgehog_exp")
KINDS = ("softmax", *LINEAR_KINDS, "hybrid")
PAPER_KINDS = ("softmax", "hedgehog", "taylor", "t2r", "elu", "performer", "cosformer")
MIMIC_KINDS = ("hedgehog", "hedgehog_exp", "hybrid")  # maps trained to mimic softmax during training
WIDTH_KINDS = ("hedgehog", "hedgehog_exp", "t2r")  # maps with a projection width (ModelSpec.feature_dim)


def parse_kinds(spec: str) -> List[str]:
    """'all' -> the paper's kinds; else a comma list, each checked against KINDS."""
    if spec.strip() == "all":
        return list(PAPER_KINDS)
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown attention kind(s) {bad or spec!r}; choose from {', '.join(KINDS)} (or 'all')")
    return kinds


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus 256 = end of document; the interface ``tokenize_windows`` uses."""

    vocab_size = 257
    eos_token_id = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> Dict[str, List[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@dataclass


class ModelSpec:
    vocab_size: int = ByteTokenizer.vocab_size
    d_model: int = 256
    layers: int = 4
    heads: int = 8  # head_dim 32: Taylor's feature dim is then 1 + 32 + 528 = 561
    mlp_mult: float = 8 / 3  # SwiGLU hidden = mult * d_model (rounded up to a multiple of 32)
    max_len: int = 4096
    window: int = 64  # hybrid only
    # "llama": RoPE, SwiGLU, RMSNorm; "gpt2": learned absolute positions, GELU MLP, LayerNorm (position
    # lives in q/k before any feature map, which linear attention needs for positional heads)
    arch: str = "llama"
    short_conv: int = 0  # > 0: a causal depthwise conv of this kernel in front of every attention (ShortConv)
    # > 0: the projection width d' of the maps that have one (WIDTH_KINDS and hybrid; hedgehog: F = 2 d',
    # t2r: F = d'); other kinds keep their own size. 0: d' = head_dim
    feature_dim: int = 0
    # llama arch only. False: no rotary embedding in any layer (NoPE; the causal mask and a short conv carry
    # order). RoPE makes q.k relative, which Taylor's kernel (a function of q.k) keeps but a learned map's
    # phi(q).phi(k) does not: under RoPE, Hedgehog's kernel depends on absolute positions.
    rope: bool = True
    # > 0 and != head_dim: Taylor's q/k go through a trainable per-head projection to this many dims first
    # (F = 1 + p + p(p+1)/2, as Based's small "feature dimension"), to compare maps at an equal decode state
    taylor_dim: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the bad setting (``build_model`` and the CLI both call this)."""
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        for name in ("feature_dim", "taylor_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the head size), got {getattr(self, name)}")
        if not self.rope and self.arch != "llama":
            raise ValueError(f"rope=False applies to arch 'llama' only (--no-rope applies to --arch llama); "
                             f"{self.arch!r} has no rotary embedding (its positions are learned absolute embeddings)")


class ShortConv(nn.Module):
    """Causal depthwise convolution over the sequence in front of an attention layer (kernel K).

    Like the short convolutions of Based and fla's linear-attention layers: each position's attention input
    mixes in its K - 1 predecessors, the local precision that linear attention (one running sum over all
    keys) lacks. Identity initialisation (last tap 1, others 0): a model starts exactly as without it.
    With a cache (generation) the last K - 1 inputs of each layer are kept on the cache object, so decoding
    one token at a time equals the full forward; a new cache starts from zeros.
    """

    def __init__(self, hidden: int, kernel: int, layer_idx: int):
        super().__init__()
        if kernel < 1:
            raise ValueError(f"short_conv kernel must be >= 1, got {kernel}")
        self.kernel, self.layer_idx = kernel, layer_idx
        w = torch.zeros(hidden, 1, kernel)
        w[:, 0, -1] = 1.0
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        tails = None if cache is None else cache.__dict__.setdefault("_short_conv_tails", {})
        tail = None if tails is None else tails.get(self.layer_idx)
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[-1])
        xx = torch.cat([tail.to(x.dtype), x], 1)
        y = F.conv1d(xx.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[-1]).transpose(1, 2).contiguous()
        if tails is not None:
            tails[self.layer_idx] = xx[:, xx.shape[1] - (self.kernel - 1):].detach()
        return y


def _short_conv_hook(module, args, kwargs):
    """Forward pre-hook of an attention module: its hidden states go through ``module.short_conv`` first."""
    cache = cache_argument(kwargs)
    if args:
        return (module.short_conv(args[0], cache), *args[1:]), kwargs
    kwargs["hidden_states"] = module.short_conv(kwargs["hidden_states"], cache)
    return args, kwargs


def add_short_conv(model: nn.Module, kernel: int) -> None:
    """Put a :class:`ShortConv` (identity-initialised) in front of every attention layer of ``model``."""
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    for i, block in enumerate(blocks):
        attn = block.self_attn if hasattr(block, "self_attn") else block.attn
        attn.short_conv = ShortConv(model.config.hidden_size, kernel, i)
        attn.register_forward_pre_hook(_short_conv_hook, with_kwargs=True)


def disable_rope(model: nn.Module) -> None:
    """No rotary embedding in a Llama-family model: every rotation becomes the identity (cos 1, sin 0).

    Zeroes the rotary module's inverse frequencies (a non-persistent buffer, so a checkpoint does not carry it:
    ``build_model`` redoes this from the spec on every load). Prefill and decoding alike then see unrotated q/k.
    """
    rot = model.model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        buf = getattr(rot, name, None)
        if isinstance(buf, torch.Tensor):
            buf.zero_()


def build_model(kind: str, spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (or GPT2LMHeadModel); converted to ``kind`` unless 'softmax'."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from hedgehog.models.convert import convert_model

    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
    spec.validate()
    hidden = int(math.ceil(spec.mlp_mult * spec.d_model / 32) * 32)
    torch.manual_seed(seed)
    if spec.arch == "llama":
        cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=hidden,
                          num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          num_key_value_heads=spec.heads, max_position_embeddings=spec.max_len,
                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=spec.vocab_size - 1,
                          pad_token_id=None, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
        if not spec.rope:
            disable_rope(model)
    elif spec.arch == "gpt2":
        cfg = GPT2Config(vocab_size=spec.vocab_size, n_embd=spec.d_model, n_layer=spec.layers, n_head=spec.heads,
                         n_inner=hidden, n_positions=spec.max_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=spec.vocab_size - 1, eos_token_id=spec.vocab_size - 1,
                         attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown arch {spec.arch!r}; choose 'llama' or 'gpt2'")
    if kind != "softmax":
        fm = "hedgehog" if kind == "hybrid" else kind
        # the width applies to the maps that have one; the others keep their fixed size (so one setting
        # can serve a whole comparison, and each report records its kind's actual F)
        kw = {"feature_dim": spec.feature_dim} if spec.feature_dim and fm in WIDTH_KINDS else {}
        if fm == "taylor" and spec.taylor_dim:
            kw = {"feature_dim": spec.taylor_dim}
        convert_model(model, HedgehogConfig(feature_map=fm, feature_map_kwargs=kw,
                                            attention="hybrid" if kind == "hybrid" else "linear", window=spec.window))
        # conversion draws random features (performer) from the global generator: keep runs reproducible
    if spec.short_conv:
        add_short_conv(model, spec.short_conv)
    return model


def _mimic_loss(model: nn.Module) -> Optional[torch.Tensor]:
    losses = [m.distill_loss for m in hedgehog_layers(model) if m.distill_loss is not None]
    for m in hedgehog_layers(model):
        m.distill_loss = None
    return torch.stack(losses).mean() if losses else None


def _with_mimic(model: nn.Module, loss: torch.Tensor, weight: float):
    """``loss + weight * mimic`` and the mimic loss the layers stored in this forward (``loss, None`` if none)."""
    mimic = _mimic_loss(model)
    return (loss, None) if mimic is None else (loss + weight * mimic, mimic)


def mimic_rows_for_step(seq_len: int, rows: int, seed: int, step: int) -> Optional[torch.Tensor]:
    """The sorted query rows a step's mimic loss uses: ``rows`` of ``seq_len`` drawn from (seed, step) alone,
    so a resumed run draws what the uninterrupted one did; None (every row) when ``rows`` is 0 or >= seq_len."""
    if rows < 0:
        raise ValueError(f"mimic_rows must be >= 0 (0: every row), got {rows}")
    if rows == 0 or rows >= seq_len:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(seq_len, generator=gen)[:rows].sort().values


def set_mimic_rows(model: nn.Module, rows: Optional[torch.Tensor]) -> None:
    for layer in hedgehog_layers(model):
        layer.mimic_rows = rows


def set_train_mode(model: nn.Module, kind: str, mimic_weight: float) -> None:
    """``mimic`` mode for Hedgehog kinds with a positive weight, plain ``linear`` otherwise (eval too)."""
    if kind == "softmax":
        return
    set_attention_mode(model, Mode.MIMIC if kind in MIMIC_KINDS and mimic_weight > 0 else Mode.STUDENT)
