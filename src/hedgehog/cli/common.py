"""Helpers shared by the command modules: logging, option groups, model loading."""
from __future__ import annotations

import argparse

from hedgehog.errors import UserError
from hedgehog.ops.sparse_cache import SCORES as SPARSE_SCORES


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
        from hedgehog.jobs.config import ConvertJob

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
                        "spread depths beyond the window, scored for the teacher and the model (one forward each; "
                        "not for the window baseline, which cannot see a key beyond its window)")
    p.add_argument("--passkey-trials", type=int, default=job.passkey_trials, help="passkey keys per length")


def add_sparse_cache_options(p: argparse.ArgumentParser, cache_default, chunk_default, score_default=None) -> None:
    """--sparse-cache / --sparse-chunk / --sparse-score (defaults: the convert job's; None on eval and generate: as
    saved)."""
    saved = " (default: as saved with the model)" if cache_default is None else ""
    p.add_argument("--sparse-cache", type=int, default=cache_default,
                   help="hybrid (LoLA): keep this many older keys per KV head exact beside the window, the ones "
                        "the linear state reads back worst, so a detail far back (a passkey) stays retrievable; "
                        "costs that many more keys per query and per decoding state, constant in length (on the "
                        "CPU ~1.7x the prefill of the plain hybrid). On convert, stage 2 trains with it, so the "
                        "LoRA fits the model it will be; 0: none" + (saved or " (stage 2 then needs its former budget "
                        "to converge: --stage2-tokens 98304)"))
    p.add_argument("--sparse-chunk", type=int, default=chunk_default,
                   help="sparse cache: keys leave the window and the cache is re-chosen every this many tokens "
                        "(a query then sees between window and window + chunk - 1 recent keys exactly)" + saved)
    p.add_argument("--sparse-score", choices=SPARSE_SCORES, default=score_default,
                   help="sparse cache: which keys stay, those read back worst by the linear state with every other "
                        "candidate folded in ('memory'), by the state as it is ('state', LoLA's rule, which fills "
                        "the cache with copies of repeated tokens), or 'unique': 'memory', and a key whose value "
                        "another cached or candidate key holds as well leaves too, so the slots go to what the text "
                        "says once (passkey 8/8 at 2k on SmolLM2 against 5/8 for 'memory')" + saved)


def apply_sparse_cache(model, args) -> None:
    """Set a loaded converted model's sparse cache from --sparse-cache/--sparse-chunk where given."""
    from hedgehog.layers.attention import hedgehog_layers, set_sparse_cache

    if args.sparse_cache is None and args.sparse_chunk is None and args.sparse_score is None:
        return
    hybrid = [m for m in hedgehog_layers(model) if m.hybrid]
    if not hybrid:
        raise UserError(f"--sparse-cache needs a hybrid model; {args.model} is pure linear attention (convert with "
                        "--attention hybrid), so drop --sparse-cache/--sparse-chunk/--sparse-score")
    if (args.sparse_chunk is not None and args.sparse_chunk < 1) or (args.sparse_cache or 0) < 0:
        raise UserError(f"--sparse-cache must be >= 0 and --sparse-chunk >= 1 (got {args.sparse_cache} and "
                        f"{args.sparse_chunk})")
    cache = hybrid[0].hh_config.sparse_cache if args.sparse_cache is None else args.sparse_cache
    set_sparse_cache(model, cache, args.sparse_chunk, args.sparse_score)


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


def add_dtype(parser, default: str = "fp32", auto: bool = False) -> None:
    from hedgehog.train.engine import DTYPES

    parser.add_argument("--dtype", choices=(["auto"] if auto else []) + list(DTYPES), default=default,
                        help="the model's weights: fp32, or bf16/fp16 for half the memory and faster matmuls on "
                             "hardware with half-precision units (feature maps and LoRA stay fp32)"
                             + ("; auto: bf16 on CUDA, fp32 on the CPU" if auto else ""))


def check_maps(names):
    from hedgehog.modules.feature_maps import available_feature_maps

    bad = [n for n in names if n not in available_feature_maps()]
    if bad:
        raise UserError(f"unknown feature map(s) {bad}; choose from {', '.join(available_feature_maps())}")


def placement(args):
    """``(device, dtype)`` from ``--device``/``--dtype`` (checked before anything loads)."""
    from hedgehog.train.engine import device_arg, parse_dtype

    return device_arg(getattr(args, "device", "cpu")), parse_dtype(getattr(args, "dtype", "fp32"))


def load_any(model_arg, base_model=None, device="cpu", dtype=None):
    """A converted dir -> (model, tok, 'hedgehog'); otherwise the plain softmax model."""
    import torch

    from hedgehog.models.loading import load, load_base
    from hedgehog.models.formats import is_converted_dir

    dtype = dtype or torch.float32
    if is_converted_dir(model_arg):
        model, tok = load(model_arg, base_model=base_model, dtype=dtype, device=device)
        return model, tok, "hedgehog"
    model, tok, _ = load_base(model_arg, dtype=dtype)
    return model.to(device), tok, "softmax"
