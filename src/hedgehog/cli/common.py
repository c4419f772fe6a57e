"""Helpers shared by the command modules: logging, option groups, model loading."""
from __future__ import annotations

import argparse

from hedgehog.errors import UserError


def setup_logging():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def seconds_or_none(m):
    """--stageN-minutes -> seconds (0 or None: no cap)."""
    return m * 60 if m else None


def split_names(arg):
    return None if arg is None else tuple(n.strip() for n in arg.split(",") if n.strip())


def lengths(arg: str):
    """'512,2048' -> (512, 2048); '' -> ()."""
    from hedgehog.errors import UserError

    try:
        return tuple(int(x) for x in split_names(arg))
    except ValueError:
        raise UserError(f"expected comma-separated token counts such as 512,2048,4096, got {arg!r}") from None


def add_long_context_options(p: argparse.ArgumentParser, job=None) -> None:
    """The long-context evaluation flags (defaults from the convert job's dataclass)."""
    if job is None:
        from hedgehog.pipeline import ConvertJob

        job = ConvertJob()
    p.add_argument("--context-lengths", default=",".join(map(str, job.context_lengths)),
                   help="long-context evaluation: context lengths (tokens) at which the converted model, its teacher "
                        "and the no-training window baseline are scored on each held-out text (lengths above the "
                        "model's maximum are dropped; '' skips it). Each window costs about one student and two "
                        "teacher forwards")
    p.add_argument("--context-tokens", type=int, default=job.context_tokens,
                   help="long-context evaluation: tokens scored per length and held-out text (at least one window)")
    p.add_argument("--baseline-sinks", type=int, default=job.baseline_sinks,
                   help="the no-training baseline: the teacher's softmax over the last window keys plus this many "
                        "first tokens")
    p.add_argument("--passkey-lengths", default=",".join(map(str, job.passkey_lengths)),
                   help="passkey retrieval: prompt lengths (tokens); each hides --passkey-trials 5-digit keys at "
                        "spread depths beyond the window, scored for the teacher, the baseline and the model "
                        "(one forward each)")
    p.add_argument("--passkey-trials", type=int, default=job.passkey_trials, help="passkey keys per length")


def add_record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default=None,
                   help="record data (.jsonl/.json/.csv/.parquet/.arrow or a saved dataset): the column with plain "
                        "text (default: 'text', or the format detected from the columns)")
    p.add_argument("--data-format", choices=["auto", "plain", "instruction", "chat"], default="auto",
                   help="record data: plain text, Alpaca instruction/input/output, or chat 'messages' (the last "
                        "two through the tokenizer's chat template); auto detects it from the columns")


def add_device(parser, what: str, default: str = "auto") -> None:
    parser.add_argument("--device", default=default,
                        help=f"'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N': {what}")


def add_dtype(parser, default: str = "fp32") -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=default,
                        help="the model's weights: fp32, or bf16/fp16 for half the memory and faster matmuls on "
                             "hardware with half-precision units (feature maps and LoRA stay fp32)")


def check_maps(names):
    from hedgehog.feature_maps import available_feature_maps

    bad = [n for n in names if n not in available_feature_maps()]
    if bad:
        raise UserError(f"unknown feature map(s) {bad}; choose from {', '.join(available_feature_maps())}")


def placement(args):
    """``(device, dtype)`` from ``--device``/``--dtype`` (checked before anything loads)."""
    from hedgehog.train.engine import parse_dtype, resolve_device

    try:
        device = resolve_device(getattr(args, "device", "cpu"))
    except ValueError as e:
        raise UserError(str(e)) from None
    return device, parse_dtype(getattr(args, "dtype", "fp32"))


def load_any(model_arg, base_model=None, device="cpu", dtype=None):
    """A converted dir -> (model, tok, 'hedgehog'); otherwise the plain softmax model."""
    import torch

    from hedgehog.checkpoint import load
    from hedgehog.formats import is_converted_dir
    from hedgehog.pipeline import load_base

    dtype = dtype or torch.float32
    if is_converted_dir(model_arg):
        model, tok = load(model_arg, base_model=base_model, dtype=dtype, device=device)
        return model, tok, "hedgehog"
    model, tok, _ = load_base(model_arg, dtype=dtype)
    return model.to(device), tok, "softmax"
