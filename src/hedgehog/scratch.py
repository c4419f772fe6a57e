"""Training from scratch: a small decoder LM whose attention is any registered kind, and MQAR.

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

Associative recall (``mqar_*``): multi-query associative recall as in Zoology/Based. A sequence opens with
``num_kv_pairs`` key-value pairs (keys from the lower half of the vocabulary, values from the upper half),
then every key reappears once, in random order, at random later positions among filler tokens (id 0);
at each such position the model must predict the key's value. Accuracy = share of those predictions
that are right, on a fixed held-out set.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.attention import HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.train.engine import Engine, resolve_device
from hedgehog.evaluate import model_device, perplexity
from hedgehog.generation import cache_argument
from hedgehog.pipeline import _write_json

log = logging.getLogger("hedgehog")

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

    from hedgehog.convert import convert_model

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
    set_attention_mode(model, "mimic" if kind in MIMIC_KINDS and mimic_weight > 0 else "linear")


# ------------------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoint/{model.safetensors, optimizer.pt, state.json}, swapped in atomically
# ------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: Dict) -> None:
    from safetensors.torch import save_model

    final = out / "checkpoint"
    tmp = out / "checkpoint.tmp"
    old = out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)  # a crash from here on leaves checkpoint.old, which resume also reads
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Optional[Path]:
    for name in ("checkpoint", "checkpoint.old"):
        p = out / name
        if (p / "state.json").exists():
            return p
    return None


def load_checkpoint(path: Path, model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> Dict:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    if opt is not None:
        # via the CPU: a run resumes on another device (load_state_dict moves the state to the parameters')
        opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


# ------------------------------------------------------------------------------------------------
# language modelling from scratch
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainJob:
    out: str = "runs/scratch/hedgehog"
    attention: str = "hedgehog"
    data: str = "shakespeare"
    text_field: Optional[str] = None  # record data: as ConvertJob.text_field
    data_format: str = "auto"
    seq_len: int = 256
    batch_size: int = 16
    tokens: int = 1_048_576  # training budget (equal across kinds in a comparison)
    minutes: Optional[float] = None  # optional wall-clock cap
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mimic_weight: float = 1.0
    # > 0: the mimic loss over this many random query rows per step (fresh each step, every row against all
    # its keys): an unbiased estimate at O(rows x seq_len) instead of O(seq_len^2). 0: every row
    mimic_rows: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    eval_points: int = 8  # validation perplexity measurements along training
    val_tokens: int = 32768
    test_tokens: int = 131072
    checkpoint_every: int = 50  # optimizer steps
    resume: bool = False
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'auto' (resolve_device); windows move there per batch


def _lm_perplexity(model, windows) -> float:
    return perplexity(model, windows, batch_size=16, progress=False)


def _lm_spec(model: ModelSpec, seq_len: int) -> ModelSpec:
    """The model a ``train_lm`` job builds from its ``model`` setting: byte vocabulary, room for one window."""
    return ModelSpec(**{**asdict(model), "vocab_size": ByteTokenizer.vocab_size,
                        "max_len": max(model.max_len, seq_len)})


def train_lm(job: TrainJob) -> Dict:
    """Train one kind on the corpus' training split; report validation/test perplexity (per byte)."""
    from hedgehog.data import load_corpus, shuffled_windows, tokenize_windows

    kind = job.attention
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
    engine = Engine(job.device, progress=job.progress)
    engine.check_batch(job.batch_size, "the batch (--batch-size)")
    dev = engine.device
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    corpus = load_corpus(job.data, text_field=job.text_field, data_format=job.data_format)
    L = job.seq_len
    mimic_rows_for_step(L, job.mimic_rows, job.seed, 0)  # a bad setting stops here, before any work
    train = shuffled_windows(tokenize_windows(corpus.splits["train"], tok, L), job.seed)
    val = tokenize_windows(corpus.splits["validation"], tok, L, max_tokens=job.val_tokens)
    test = tokenize_windows(corpus.splits["test"], tok, L, max_tokens=job.test_tokens)
    spec = _lm_spec(job.model, L)
    model = build_model(kind, spec, seed=job.seed).to(dev)  # built on the CPU: the same init on every device
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "feature_map" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "feature_map" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": job.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=job.lr, betas=(0.9, 0.95))
    total = max(1, job.tokens // (job.batch_size * L))
    eval_every = max(1, total // max(1, job.eval_points))
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "history": [], "curve": []}
    ck = find_checkpoint(out) if job.resume else None
    if ck is not None:
        state = load_checkpoint(ck, model, opt)
        log.info("%s: resumed at step %d from %s", kind, state["step"], ck)
    wrapped, opt = engine.prepare(model, opt)
    set_train_mode(model, kind, job.mimic_weight)
    model.train()
    bar = engine.bar(total=total, initial=state["step"], desc=f"train {kind}", unit="step")
    t0 = time.perf_counter() - state["seconds"]
    while state["step"] < total:
        if job.minutes and engine.any(time.perf_counter() - t0 > job.minutes * 60):
            log.info("%s: stopping at the %.1f-minute cap (step %d of %d)", kind, job.minutes, state["step"], total)
            break
        step = state["step"]
        idx = [(step * job.batch_size + j) % len(train) for j in range(job.batch_size)]
        (batch,) = engine.local(train[idx])
        engine.set_lr(opt, job.lr, step, total, job.warmup_steps)
        if job.mimic_rows:
            rows = mimic_rows_for_step(L, job.mimic_rows, job.seed, step)
            set_mimic_rows(model, None if rows is None else rows.to(dev))
        lm = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
        loss, mimic = _with_mimic(model, lm, job.mimic_weight)
        engine.backward(loss, f"training {kind}, step {step}")
        engine.step(opt, model.parameters(), lr=job.lr, clip=job.grad_clip)
        state["step"] += 1
        state["tokens"] += batch.numel() * engine.world
        state["seconds"] = time.perf_counter() - t0
        losses = engine.means([lm.item()] + ([] if mimic is None else [mimic.item()]))
        rec = {"step": state["step"], "tokens": state["tokens"], "lm_loss": losses[0]}
        if mimic is not None:
            rec["mimic_loss"] = losses[1]
        state["history"].append(rec)
        bar.update(1)
        bar.set_postfix(lm=f"{rec['lm_loss']:.3f}")
        if engine.is_main and (state["step"] % eval_every == 0 or state["step"] == total):
            if kind != "softmax":
                set_attention_mode(model, "linear")
            ppl = _lm_perplexity(model, val)
            set_train_mode(model, kind, job.mimic_weight)
            state["curve"].append({"step": state["step"], "tokens": state["tokens"], "val_ppl": ppl})
            log.info("%s step %d (%d tokens): val ppl %.3f", kind, state["step"], state["tokens"], ppl)
        if state["step"] % job.checkpoint_every == 0 or state["step"] == total:
            _save_on_main(engine, out, model, opt, state)
    bar.close()
    set_mimic_rows(model, None)
    if kind != "softmax":
        set_attention_mode(model, "linear")
    model.eval()
    _save_on_main(engine, out, model, opt, state)
    if not engine.is_main:  # the main process evaluates and writes the report
        return {"attention": kind, "steps": state["step"], "tokens": state["tokens"], "rank": engine.rank}
    val_ppl = _lm_perplexity(model, val)
    test_ppl = _lm_perplexity(model, test)
    maps = hedgehog_layers(model)
    report = {
        "attention": kind, "data": job.data, "tokenizer": "bytes", "params": n_params,
        # features per head (the decode state is feature_dim x head_dim per head); None for softmax
        "feature_dim": maps[0].feature_map_q.feature_dim if maps else None,
        "steps": state["step"], "tokens": state["tokens"], "seconds": state["seconds"],
        "val_ppl": val_ppl, "test_ppl": test_ppl, "test_bits_per_byte": math.log2(test_ppl), "device": str(dev),
        "processes": engine.world,
        "final_train_loss": sum(r["lm_loss"] for r in state["history"][-20:]) / max(1, len(state["history"][-20:])),
        "curve": state["curve"], "history": state["history"], "settings": asdict(job),
        "splits": {k: v for k, v in corpus.documents.items() if k != "train"},
    }
    _write_json(out / "report.json", report)
    return report


def _save_on_main(engine: Engine, out: Path, model, opt, state) -> None:
    if engine.is_main:
        save_checkpoint(out, model, opt, state)
    engine.wait()


def train_compare(kinds: Sequence[str], job: TrainJob, out: str) -> Dict:
    """Every kind with the same data, budget and settings; one table (JSON) and a loss-curve PNG."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in kinds:
        sub = root / kind
        if job.resume and (sub / "report.json").exists():
            rep = json.loads((sub / "report.json").read_text())
            if rep.get("steps", 0) * job.batch_size * job.seq_len >= job.tokens:
                log.info("%s: finished run found in %s", kind, sub)
                rows.append(rep)
                continue
        rep = train_lm(TrainJob(**{**asdict(job), "model": job.model, "out": str(sub), "attention": kind}))
        if "rank" in rep:  # a worker of a multi-process run: the main process writes the table
            worker = rep
            continue
        rows.append(rep)
        _write_compare(root, rows)
    if "worker" in locals():
        return {"rows": [], **worker}
    return _write_compare(root, rows)


def _write_compare(root: Path, rows: List[Dict]) -> Dict:
    soft = next((r for r in rows if r["attention"] == "softmax"), None)
    table = []
    for r in rows:
        row = {k: r.get(k) for k in ("attention", "feature_dim", "params", "tokens", "seconds", "val_ppl", "test_ppl",
                                     "test_bits_per_byte", "final_train_loss")}
        if soft:
            row["test_ppl_vs_softmax"] = r["test_ppl"] / soft["test_ppl"]
        table.append(row)
    result = {"rows": table, "curves": {r["attention"]: r["curve"] for r in rows}}
    _write_json(root / "train_compare.json", result)
    plot_curves(rows, root / "train_compare.png")
    return result


def load_trained(run: Path, device: str = "cpu"):
    """A finished ``train_lm`` run (OUT/<kind> with report.json and checkpoint) as an eval-mode model on ``device``
    (whatever device it trained on) + its report."""
    run = Path(run)
    if not (run / "report.json").exists():
        raise FileNotFoundError(f"{run} has no report.json: not a finished `hedgehog train` run (finish it with --resume)")
    rep = json.loads((run / "report.json").read_text())
    ck = find_checkpoint(run)
    if ck is None:
        raise FileNotFoundError(f"{run} has no checkpoint/ to load the trained weights from")
    st = rep["settings"]
    model = build_model(rep["attention"], _lm_spec(ModelSpec(**st["model"]), st["seq_len"]), seed=st.get("seed", 0))
    load_checkpoint(ck, model, None)
    if rep["attention"] != "softmax":
        set_attention_mode(model, "linear")
    return model.to(resolve_device(device)).eval(), rep


@torch.no_grad()
def paired_eval(root: str, kinds: Sequence[str], against: Sequence[str], split: str = "test",
                max_tokens: Optional[int] = None, block: int = 16, samples: int = 2000,
                progress: bool = True, device: str = "cpu") -> Dict:
    """Per-window NLL of finished runs ``root/<kind>`` on the same held-out windows, and for each reference in
    ``against`` every other kind's perplexity ratio to it with a paired block-bootstrap 95% interval.

    ``max_tokens``: None = the bytes the runs were evaluated on (their ``val_tokens``/``test_tokens``), 0 = the
    whole split. Writes ``root/paired_<split>.json``.
    """
    from hedgehog.data import load_corpus, tokenize_windows
    from hedgehog.evaluate import window_nll
    from hedgehog.metrics import paired_bootstrap_ratio

    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    missing = [k for k in against if k not in kinds]
    if missing:
        raise ValueError(f"reference kinds {missing} are not among the compared kinds {list(kinds)}")
    root_p = Path(root)
    nll, reports, setting = {}, {}, None
    for kind in kinds:
        model, rep = load_trained(root_p / kind, device)
        st = rep["settings"]
        key = (st["data"], st["seq_len"], st["val_tokens"], st["test_tokens"])
        if setting is None:
            setting = key
            corpus = load_corpus(st["data"], text_field=st.get("text_field"), data_format=st.get("data_format", "auto"))
            cap = st["test_tokens" if split == "test" else "val_tokens"] if max_tokens is None else (max_tokens or None)
            windows = tokenize_windows(corpus.splits[split], ByteTokenizer(), st["seq_len"], max_tokens=cap)
        elif key != setting:
            raise ValueError(f"{kind} was trained/evaluated with (data, seq_len, val, test) = {key}, not {setting}: "
                             "paired windows need runs of one comparison")
        nll[kind] = window_nll(model, windows, batch_size=16, progress=progress, desc=f"{kind} [{split}]")
        reports[kind] = rep
    rows = {k: {"ppl": math.exp(v.mean().item()), "tokens": reports[k]["tokens"]} for k, v in nll.items()}
    pairs = []
    for ref in against:
        for kind in kinds:
            if kind != ref:
                r = paired_bootstrap_ratio(nll[kind], nll[ref], block=block, samples=samples)
                pairs.append({"kind": kind, "reference": ref, **r})
    result = {"split": split, "windows": int(windows.shape[0]), "bytes": int(windows.numel()), "block": block,
              "samples": samples, "ppl": rows, "pairs": pairs}
    _write_json(root_p / f"paired_{split}.json", result)
    return result


def format_paired_table(result: Dict) -> str:
    lines = [f"{result['split']}: {result['windows']} windows, {result['bytes']} bytes; perplexity per byte: " +
             ", ".join(f"{k} {v['ppl']:.3f}" for k, v in result["ppl"].items()),
             "| kind | vs | ppl ratio | 95% interval | P(kind lower) |", "|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['kind']} | {p['reference']} | {p['ratio']:.4f} | {p['lo']:.4f} – {p['hi']:.4f} | "
                     f"{p['p_a_better']:.3f} |")
    return "\n".join(lines)


def plot_curves(rows: List[Dict], path: Path) -> None:
    from hedgehog.plotting import pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        h = r["history"]
        k = max(1, len(h) // 50)  # moving average over ~2% of training
        xs = [h[i]["tokens"] for i in range(k - 1, len(h))]
        ys = [sum(x["lm_loss"] for x in h[i - k + 1:i + 1]) / k for i in range(k - 1, len(h))]
        a1.plot(xs, ys, label=r["attention"])
        c = r["curve"]
        a2.plot([p["tokens"] for p in c], [p["val_ppl"] for p in c], marker="o", label=r["attention"])
    a1.set(xlabel="training tokens", ylabel="train LM loss (nats/byte, smoothed)", title="training loss")
    a2.set(xlabel="training tokens", ylabel="validation perplexity (per byte)", yscale="log",
           title="held-out plays")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_train_table(rows: List[Dict]) -> str:
    lines = ["| attention | F | params | tokens | minutes | val ppl | test ppl | bits/byte | vs softmax |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['test_ppl_vs_softmax']:.3f}x" if "test_ppl_vs_softmax" in r else "-"
        lines.append(f"| {r['attention']} | {r.get('feature_dim') or '-'} | {r['params'] / 1e6:.2f}M | {r['tokens']} | "
                     f"{r['seconds'] / 60:.1f} | "
                     f"{r['val_ppl']:.3f} | {r['test_ppl']:.3f} | {r['test_bits_per_byte']:.3f} | {vs} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# multi-query associative recall
# ------------------------------------------------------------------------------------------------
@dataclass
class MQARConfig:
    vocab_size: int = 32
    num_kv_pairs: int = 4
    seq_len: int = 32


def mqar_batch(n: int, cfg: MQARConfig, generator: torch.Generator):
    """``n`` MQAR sequences -> (input_ids (n, L), targets (n, L) with -100 where nothing is asked).

    Layout: ``k1 v1 ... kP vP`` then filler (0) with each key once more at a random position; the target
    at a repeated key's position is its value.
    """
    V, P, L = cfg.vocab_size, cfg.num_kv_pairs, cfg.seq_len
    half = V // 2
    if half - 1 < P:
        raise ValueError(f"vocab_size {V} too small for {P} distinct keys (keys use ids 1..{half - 1})")
    if L < 3 * P:
        raise ValueError(f"seq_len {L} too short for {P} pairs and {P} queries (need >= {3 * P})")
    keys = torch.argsort(torch.rand(n, half - 1, generator=generator), -1)[:, :P] + 1
    values = torch.randint(half, V, (n, P), generator=generator)
    ids = torch.zeros(n, L, dtype=torch.long)
    ids[:, 0:2 * P:2] = keys
    ids[:, 1:2 * P:2] = values
    targets = torch.full((n, L), -100, dtype=torch.long)
    slots = torch.argsort(torch.rand(n, L - 2 * P, generator=generator), -1)[:, :P] + 2 * P  # query positions
    order = torch.argsort(torch.rand(n, P, generator=generator), -1)  # which key is asked where
    rows = torch.arange(n)[:, None]
    ids[rows, slots] = keys.gather(1, order)
    targets[rows, slots] = values.gather(1, order)
    return ids, targets


@dataclass
class MQARJob:
    out: str = "runs/mqar"
    kinds: Sequence[str] = PAPER_KINDS
    task: MQARConfig = field(default_factory=MQARConfig)
    d_model: int = 64
    layers: int = 2
    heads: int = 4  # head_dim 16 (as Based's Taylor feature dim)
    arch: str = "llama"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    mimic_weight: float = 1.0
    eval_examples: int = 1000
    eval_every: int = 250
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # as TrainJob.device


@torch.no_grad()
def mqar_accuracy(model, ids, targets, batch_size=250) -> float:
    was = model.training
    model.eval()
    right = total = 0
    dev = model_device(model)
    for i in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[i:i + batch_size].to(dev), use_cache=False).logits
        t = targets[i:i + batch_size].to(dev)
        m = t != -100
        right += (logits.argmax(-1)[m] == t[m]).sum().item()
        total += m.sum().item()
    model.train(was)
    return right / max(1, total)


def train_mqar(kind: str, job: MQARJob) -> Dict:
    spec = ModelSpec(vocab_size=job.task.vocab_size, d_model=job.d_model, layers=job.layers, heads=job.heads,
                     max_len=job.task.seq_len, mlp_mult=2.0, arch=job.arch)
    engine = Engine(job.device, progress=job.progress)
    dev = engine.device
    model = build_model(kind, spec, seed=job.seed).to(dev)
    g_eval = torch.Generator().manual_seed(10_000 + job.seed)
    eval_ids, eval_t = mqar_batch(job.eval_examples, job.task, g_eval)
    g = torch.Generator().manual_seed(job.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.1)
    set_train_mode(model, kind, job.mimic_weight)
    model.train()
    curve, t0 = [], time.perf_counter()
    bar = engine.bar(iterable=range(job.steps), desc=f"MQAR {kind}", unit="step")
    for step in bar:
        ids, t = mqar_batch(job.batch_size, job.task, g)  # drawn on the CPU: the same data on every device
        ids, t = ids.to(dev), t.to(dev)
        engine.set_lr(opt, job.lr, step, job.steps, job.warmup_steps)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=-100)
        total, _ = _with_mimic(model, loss, job.mimic_weight)
        engine.backward(total, f"MQAR {kind}, step {step}")
        engine.step(opt, model.parameters(), lr=job.lr, clip=1.0)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % job.eval_every == 0 or step + 1 == job.steps:
            if kind != "softmax":
                set_attention_mode(model, "linear")
            acc = mqar_accuracy(model, eval_ids, eval_t)
            set_train_mode(model, kind, job.mimic_weight)
            curve.append({"step": step + 1, "loss": loss.item(), "accuracy": acc})
            log.info("MQAR %s step %d: loss %.3f accuracy %.3f", kind, step + 1, loss.item(), acc)
    return {"attention": kind, "accuracy": curve[-1]["accuracy"], "best_accuracy": max(c["accuracy"] for c in curve),
            "curve": curve, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def mqar_compare(job: MQARJob) -> Dict:
    root = Path(job.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in job.kinds:
        rows.append(train_mqar(kind, job))
        result = {"task": asdict(job.task), "settings": {k: v for k, v in asdict(job).items() if k != "task"},
                  "rows": rows}
        _write_json(root / "mqar.json", result)
    _plot_mqar(rows, root / "mqar.png")
    return result


def _plot_mqar(rows, path):
    from hedgehog.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.plot([c["step"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], marker="o", label=r["attention"])
    ax.set(xlabel="training step", ylabel="held-out MQAR accuracy", ylim=(0, 1.02), title="associative recall")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_mqar_table(rows: List[Dict]) -> str:
    lines = ["| attention | accuracy | best | minutes |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attention']} | {100 * r['accuracy']:.1f}% | {100 * r['best_accuracy']:.1f}% | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines)
