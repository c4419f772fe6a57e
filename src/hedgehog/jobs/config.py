"""The main job's settings: :class:`ConvertJob` (every default the CLI shows) and what is derived from it (the
hybrid's long-context settings, position offsets, the settings a resumed checkpoint must share, the texts scored)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from hedgehog.eval import long_context as lc
from hedgehog.train.stage1 import Stage1Config
from hedgehog.train.stage2 import Stage2Config


@dataclass
class ConvertJob:
    out: str = "runs/smollm2-hedgehog"
    model: str = "smollm2"
    data: str = "general"
    text_field: Optional[str] = None  # record data (.jsonl, .parquet, ...): the column holding plain text
    data_format: str = "auto"  # record data: "auto", "plain", "instruction" (Alpaca) or "chat" (messages)
    # Held-out texts never trained on, each scored against the teacher after stage 1 and at the end
    # (None: git-docs, debian-devref and Shakespeare's test plays, less any the job trains on).
    eval_data: Optional[Tuple[str, ...]] = None
    feature_map: str = "hedgehog"
    # "hybrid" (LoLCATs): sliding-window softmax + linear attention; "linear": pure Hedgehog (the paper's).
    # The hybrid is the default because it keeps the teacher's quality on held-out text (docs/results.md).
    attention: str = "hybrid"
    window: int = 64
    # Long context (hybrid): the first `sinks` tokens stay in the exact softmax part, and the linear state decays
    # by a learned per-KV-head factor lambda (initially `state_decay`; None: a plain sum). Without them the
    # hybrid's linear part outgrows its window past the training length (docs/results.md, long context).
    sinks: int = 4
    state_decay: Optional[float] = 0.99
    # Hybrid (LoLA): `sparse_cache` older keys per KV head kept exact, those the linear state reads back worst,
    # re-chosen every `sparse_chunk` tokens; stage 2 trains with it (LoRA trained without it fits a student that sees
    # old keys only through the state, and the cache then finds the passkey at 4k 1/8 times instead of 6/8). 0: none
    # (docs/results.md, passkey).
    sparse_cache: int = 128
    sparse_chunk: int = 32
    sparse_score: str = "unique"
    seq_len: int = 512
    # Training windows start at random positions up to this offset (both stages), so the maps see the post-RoPE
    # q/k of every position the model is used at (without it the student collapses past the training length,
    # docs/results.md). None ("auto"): the model's context less seq_len (at most 8192 - seq_len); 0: positions
    # 0..seq_len-1 only. The stage configs' own position_offsets are set from this.
    position_offsets: Optional[int] = None
    qk_scale: float = 1.0
    distill_loss: str = "ce"
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Optional[Stage2Config] = field(default_factory=Stage2Config)
    eval_tokens: int = 16384  # the training data's own test split
    fidelity_tokens: int = 4096  # per held-out text
    val_tokens: int = 2048
    kl_windows: int = 2
    curve_points: int = 4
    # Long context, in every report: fidelity on each held-out text at these lengths (up to the model's maximum),
    # `context_tokens` tokens per length and text, beside the teacher limited to the window + `baseline_sinks`
    # tokens with no training; passkey retrieval at `passkey_lengths` (`passkey_trials` keys each). Empty: skip.
    context_lengths: Tuple[int, ...] = lc.DEFAULT_LENGTHS
    context_tokens: int = lc.CONTEXT_TOKENS
    baseline_sinks: int = lc.BASELINE_SINKS
    passkey_lengths: Tuple[int, ...] = lc.PASSKEY_LENGTHS
    passkey_trials: int = lc.PASSKEY_TRIALS
    revision: Optional[str] = None  # of a hub --model: a branch, tag or commit
    trust_remote_code: bool = False  # let a hub --model run its own modelling code
    save_format: str = "hf"  # "hf": every weight (stands alone); "light": only what conversion changed, on the base
    resume: bool = False
    seed: int = 0
    progress: bool = True
    # 'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'; under torchrun / accelerate launch, each rank's own
    device: str = "auto"
    # the base model's weights: fp32, bf16 or fp16 (feature maps and LoRA train in fp32); "auto": bf16 on CUDA, fp32
    # on the CPU (:func:`for_device`)
    dtype: str = "auto"
    # Both stages' batches and token budgets are multiplied by this: the same optimizer steps as the CPU job, each on
    # more data, which is what feeds a GPU (#37). None ("auto"): CUDA_BATCH_SCALE on CUDA, 1 on the CPU.
    batch_scale: Optional[int] = None


CUDA_BATCH_SCALE = 8  # stage 1 batch 16, stage 2 batch 8 on CUDA (the CPU's 2 and 1), 8x the tokens


def for_device(job: ConvertJob, device) -> ConvertJob:
    """``job`` as it runs on ``device`` (a torch.device): ``dtype`` "auto" resolved (bf16 on CUDA, fp32 elsewhere)
    and ``batch_scale`` applied to both stages (None: :data:`CUDA_BATCH_SCALE` on CUDA, 1 elsewhere), so the job
    records the batches and budgets it ran. The CPU job is the one the defaults describe, unchanged."""
    cuda = getattr(device, "type", str(device)) == "cuda"
    dtype = ("bf16" if cuda else "fp32") if job.dtype == "auto" else job.dtype
    scale = job.batch_scale if job.batch_scale is not None else (CUDA_BATCH_SCALE if cuda else 1)
    scaled = lambda cfg: cfg and replace(cfg, batch_size=cfg.batch_size * scale, tokens=cfg.tokens * scale)
    return replace(job, dtype=dtype, batch_scale=scale, stage1=scaled(job.stage1), stage2=scaled(job.stage2))


def batch_scale_arg(arg: str) -> Optional[int]:
    """``--batch-scale`` as argparse's ``type`` (convert, bench stages): None for 'auto', else a whole number >= 1."""
    import argparse

    if arg.lower() == "auto":
        return None
    if not arg.isdigit() or int(arg) < 1:
        raise argparse.ArgumentTypeError(f"{arg!r} is not 'auto' or a whole number >= 1")
    return int(arg)


def hedgehog_config(job: ConvertJob):
    """The :class:`HedgehogConfig` the job converts its model with: its feature map, scale, distillation loss,
    attention and window, and the hybrid's long-context settings."""
    from hedgehog.layers.attention import HedgehogConfig

    return HedgehogConfig(feature_map=job.feature_map, qk_scale=job.qk_scale, distill_loss=job.distill_loss,
                          attention=job.attention, window=job.window, **hybrid_settings(job))


def hybrid_settings(job: ConvertJob) -> Dict:
    """The long-context settings of the hybrid (``sinks``, ``state_decay``, the sparse cache) for
    :class:`HedgehogConfig`; none for pure linear attention, which they do not apply to."""
    if job.attention != "hybrid":
        return {}
    return {"sinks": job.sinks, "state_decay": job.state_decay, "sparse_cache": job.sparse_cache,
            "sparse_chunk": job.sparse_chunk, "sparse_score": job.sparse_score}


LONGEST_OFFSET_CONTEXT = 8192  # auto position offsets reach at most this context


def position_offsets(job: ConvertJob, model_config) -> int:
    """The largest training position offset: ``job.position_offsets``, or with None the model's maximum context
    (``max_position_embeddings``, at most :data:`LONGEST_OFFSET_CONTEXT`) less ``seq_len``."""
    if job.position_offsets is not None:
        return job.position_offsets
    top = min(getattr(model_config, "max_position_embeddings", None) or job.seq_len, LONGEST_OFFSET_CONTEXT)
    return max(0, top - job.seq_len)


def stage2_seq_len(job: ConvertJob) -> int:
    """Tokens per stage-2 window: ``stage2.seq_len``, or the job's ``seq_len`` when that is None."""
    return (job.stage2 and job.stage2.seq_len) or job.seq_len


def with_position_offsets(job: ConvertJob, model_config) -> ConvertJob:
    """``job`` with its stage configs' ``position_offsets`` set from :func:`position_offsets` (with "auto", stage 2's
    range ends where its own, possibly longer, windows still fit in the context)."""
    off = position_offsets(job, model_config)
    off2 = off
    if job.stage2 is not None and job.position_offsets is None:
        off2 = max(0, off + job.seq_len - stage2_seq_len(job))
    return replace(job, position_offsets=off, stage1=replace(job.stage1, position_offsets=off),
                   stage2=job.stage2 and replace(job.stage2, position_offsets=off2))


def resume_settings(job: ConvertJob, fingerprint: Dict) -> Dict:
    """What a mid-stage checkpoint must share with the job resuming it: everything that shapes training
    (not the output, evaluation sizes, progress bars, time caps or checkpoint spacing)."""
    def stage(cfg):
        return None if cfg is None else {k: v for k, v in asdict(cfg).items()
                                         if k not in ("time_budget_s", "checkpoint_every", "layer_block")}

    return {"base_fingerprint": fingerprint, "data": job.data, "feature_map": job.feature_map,
            "attention": job.attention, "window": job.window, "sinks": job.sinks, "state_decay": job.state_decay,
            "seq_len": job.seq_len, "qk_scale": job.qk_scale,
            "distill_loss": job.distill_loss, "seed": job.seed, "dtype": job.dtype, "stage1": stage(job.stage1),
            "stage2": stage(job.stage2)}


def eval_names(job: ConvertJob) -> List[str]:
    from hedgehog.data.corpora import HELD_OUT_TEXTS, training_sources

    if job.eval_data is not None:
        return list(job.eval_data)
    own = training_sources(job.data)
    return [n for n in (*HELD_OUT_TEXTS, "shakespeare") if n not in own]


def parse_compare_entry(name: str):
    """'elu' -> ('linear', 'elu'); 'hybrid' -> ('hybrid', 'hedgehog'); 'hybrid:elu' -> ('hybrid', 'elu')."""
    if name == "hybrid" or name.startswith("hybrid:"):
        return "hybrid", name.partition(":")[2] or "hedgehog"
    return "linear", name


