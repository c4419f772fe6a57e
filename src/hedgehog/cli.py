"""Command-line interface: ``hedgehog <command> [options]``; every command has ``--help``."""
from __future__ import annotations

import argparse
import sys

from hedgehog.errors import EXIT_USER_ERROR, UserError


def _bench_decode(args):
    from hedgehog.bench import decode

    _setup_logging()
    decode.run_from_args(args)


def _bench_prefill(args):
    from hedgehog.bench import prefill

    _setup_logging()
    prefill.run_from_args(args)


def _bench_train_step(args):
    from hedgehog.bench import train_step

    _setup_logging()
    train_step.run_from_args(args)


def _bench_attention(args):
    from hedgehog.bench import attention

    attention.run_from_args(args)


# measured as a library caller would run them: main() leaves malloc alone for these
BENCHMARKS = (_bench_attention, _bench_decode, _bench_prefill, _bench_train_step)


def _setup_logging():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _minutes(m):
    return m * 60 if m else None


def _job_from_args(args):
    from hedgehog.distill import Stage1Config, Stage2Config
    from hedgehog.pipeline import ConvertJob

    s1 = Stage1Config(tokens=args.stage1_tokens, lr=args.stage1_lr, batch_size=args.stage1_batch,
                      steps_per_capture=args.stage1_steps_per_batch, time_budget_s=_minutes(args.stage1_minutes),
                      checkpoint_every=args.stage1_checkpoint_every, layer_block=args.stage1_layer_block)
    s2 = None
    if args.stage2_tokens > 0:
        s2 = Stage2Config(tokens=args.stage2_tokens, lr=args.stage2_lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                          train_feature_maps=not args.freeze_feature_maps, loss=args.stage2_loss,
                          lora_targets=args.lora_targets, time_budget_s=_minutes(args.stage2_minutes),
                          checkpoint_every=args.stage2_checkpoint_every, batch_size=args.stage2_batch,
                          grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
    job = ConvertJob(out=args.out, model=args.model, data=args.data, feature_map=getattr(args, "feature_map", "hedgehog"),
                     attention=getattr(args, "attention", "linear"), window=args.window, seq_len=args.seq_len,
                     qk_scale=args.qk_scale, distill_loss=args.distill_loss, stage1=s1, stage2=s2,
                     text_field=args.text_field, data_format=args.data_format,
                     eval_tokens=args.eval_tokens, eval_data=_names(args.eval_data),
                     fidelity_tokens=args.fidelity_tokens, revision=args.revision,
                     trust_remote_code=args.trust_remote_code, save_format=args.save_format, merge_lora=args.merge_lora, resume=args.resume,
                     seed=args.seed, progress=not args.no_progress, device=args.device, dtype=args.dtype)
    return job


def _names(arg):
    return None if arg is None else tuple(n.strip() for n in arg.split(",") if n.strip())


def _add_record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default=None,
                   help="record data (.jsonl/.json/.csv/.parquet/.arrow or a saved dataset): the column with plain "
                        "text (default: 'text', or the format detected from the columns)")
    p.add_argument("--data-format", choices=["auto", "plain", "instruction", "chat"], default="auto",
                   help="record data: plain text, Alpaca instruction/input/output, or chat 'messages' (the last "
                        "two through the tokenizer's chat template); auto detects it from the columns")


def _add_device(parser, what: str) -> None:
    parser.add_argument("--device", default="auto",
                        help=f"'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N': {what}")


def _add_dtype(parser, default: str = "fp32") -> None:
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=default,
                        help="the model's weights: fp32, or bf16/fp16 for half the memory and faster matmuls on "
                             "hardware with half-precision units (feature maps and LoRA stay fp32)")


def _check_maps(names):
    from hedgehog.feature_maps import available_feature_maps

    bad = [n for n in names if n not in available_feature_maps()]
    if bad:
        raise UserError(f"unknown feature map(s) {bad}; choose from {', '.join(available_feature_maps())}")


def _convert(args):
    from hedgehog.pipeline import format_report, run

    _check_maps([args.feature_map])
    _setup_logging()
    report = run(_job_from_args(args))
    if "rank" in report:  # a worker process of a multi-process run: the main process reports
        return
    print(format_report(report))
    print(f"wrote {args.out}/report.json and {report['model_dir']}")


def _compare(args):
    from hedgehog.pipeline import compare, format_compare

    from hedgehog.pipeline import parse_compare_entry

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    _check_maps([parse_compare_entry(m)[1] for m in maps])
    _setup_logging()
    result = compare(maps, _job_from_args(args), args.out)
    if "rank" in result:  # a worker process of a multi-process run: the main process reports
        return
    print(format_compare(result["rows"]))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")


def _eval(args):
    from hedgehog.checks import check_text_source
    from hedgehog.data import HELD_OUT_TEXTS, eval_documents, load_corpus, text_label, tokenize_windows
    from hedgehog.evaluate import fidelity, perplexity
    from hedgehog.pipeline import _windows, format_fidelity

    _setup_logging()
    names = _names(args.eval_data)
    check_text_source(args.data, args.text_field, args.data_format)
    for source in names or ():
        check_text_source(source)
    if args.tasks:
        return _eval_tasks(args)
    device, dtype = _placement(args)
    model, tok, kind = _load_any(args.model, args.base_model, device, dtype)
    teacher = None
    if kind == "hedgehog":
        from hedgehog.checkpoint import load_teacher, needs_separate_teacher

        # LoRA merged into the weights: the teacher is the recorded base, not this model in softmax mode
        if needs_separate_teacher(args.model) or args.base_model:
            teacher = load_teacher(args.model, args.base_model, dtype=dtype, device=device)
    corpus = load_corpus(args.data, tok, args.text_field, args.data_format)
    windows = tokenize_windows(corpus.splits[args.split], tok, args.seq_len, max_tokens=args.tokens)
    if kind == "softmax":
        ppl = perplexity(model, windows, progress=not args.no_progress)
        print(f"{kind} model {args.model} on {args.data} [{args.split}], {windows.numel()} tokens in windows of "
              f"{args.seq_len}: perplexity {ppl:.3f}")
        return ppl
    sets = {f"{text_label(args.data)} ({args.split})": windows}
    for name in names if names is not None else [n for n in (*HELD_OUT_TEXTS, "shakespeare") if n != args.data]:
        if name != args.data:
            docs = eval_documents(name, args.data, tok)
            sets[f"{text_label(name)} (held out)"] = _windows(docs, "test", tok, args.seq_len,
                                                              max_tokens=args.fidelity_tokens, shuffle_seed=0)
    res = {k: fidelity(model, w, progress=not args.no_progress, desc=k, teacher=teacher) for k, w in sets.items()}
    print(format_fidelity({"this model": res}))
    if args.json:
        from pathlib import Path

        from hedgehog.pipeline import _write_json

        _write_json(Path(args.json), res)
        print(f"wrote {args.json}")
    return res


def _eval_tasks(args):
    """``hedgehog eval --tasks``: lm-eval tasks, teacher vs converted model, one table (JSON + Markdown)."""
    from pathlib import Path

    from hedgehog import lmeval
    from hedgehog.checkpoint import is_converted_dir, read_meta
    from hedgehog.pipeline import _write_json

    if not is_converted_dir(args.model):
        raise UserError(f"--tasks compares a converted model with its teacher; {args.model!r} is not a directory "
                        "saved by `hedgehog convert` (OUT/model). Use `hedgehog lm-eval --model hf ...` for a plain "
                        "model.")
    read_meta(args.model)  # refuse a broken directory before lm-eval starts
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    include = args.include_path
    if "heldout_cloze" in tasks and include is None:  # the built-in offline task, from a held-out text
        from hedgehog.data import eval_documents

        docs = eval_documents(args.cloze_text, "general").splits["test"]
        include = str(lmeval.write_cloze_task(docs, Path(args.out) / "tasks", n=args.cloze_items))
    res = lmeval.compare_tasks(args.model, tasks, include_path=include, limit=args.limit or None,
                               batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    table = lmeval.format_table(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "lm_eval.json", res)
    (out / "lm_eval.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/lm_eval.json and {out}/lm_eval.md")
    return res


def _lm_eval_cli(args):
    from hedgehog import lmeval

    lmeval.run_cli(args.lm_eval_args)


def _train(args):
    from hedgehog.scratch import (ModelSpec, TrainJob, format_train_table, mimic_rows_for_step, parse_kinds,
                                  train_compare, train_lm)
    from hedgehog.train import resolve_device

    spec = ModelSpec(d_model=args.d_model, layers=args.layers, heads=args.heads, window=args.window, arch=args.arch,
                     short_conv=args.short_conv, feature_dim=args.feature_dim,
                     rope=not args.no_rope, taylor_dim=args.taylor_dim)
    try:  # bad kinds or model settings stop with their message, before any data or model is loaded
        kinds = parse_kinds(args.attention)
        spec.validate()
        mimic_rows_for_step(args.seq_len, args.mimic_rows, args.seed, 0)
        resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e))
    _setup_logging()
    job = TrainJob(out=args.out, attention=kinds[0], data=args.data, text_field=args.text_field,
                   data_format=args.data_format, seq_len=args.seq_len, batch_size=args.batch_size,
                   tokens=args.tokens, minutes=args.minutes or None, lr=args.lr, mimic_weight=args.mimic_weight,
                   mimic_rows=args.mimic_rows, model=spec, eval_points=args.eval_points, val_tokens=args.val_tokens,
                   test_tokens=args.test_tokens, resume=args.resume, seed=args.seed, progress=not args.no_progress,
                   device=args.device)
    if len(kinds) == 1 and args.attention.strip() != "all":
        rep = train_lm(job)
        if "rank" in rep:  # a worker process of a multi-process run: the main process reports
            return
        print(format_train_table([{**rep}]))
        print(f"wrote {args.out}/report.json and {args.out}/checkpoint")
        return
    result = train_compare(kinds, job, args.out)
    if "rank" in result:
        return
    print(format_train_table(result["rows"]))
    print(f"wrote {args.out}/train_compare.json and {args.out}/train_compare.png")


def _paired(args):
    from hedgehog.scratch import format_paired_table, paired_eval, parse_kinds
    from hedgehog.train import resolve_device

    try:
        kinds = parse_kinds(args.attention)
        against = parse_kinds(args.against)
        resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e))
    _setup_logging()
    try:
        result = paired_eval(args.out, kinds, against, split=args.split,
                             max_tokens=None if args.tokens < 0 else args.tokens, block=args.block,
                             samples=args.samples, progress=not args.no_progress, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    print(format_paired_table(result))
    print(f"wrote {args.out}/paired_{args.split}.json")


def _mqar(args):
    from hedgehog.scratch import MQARConfig, MQARJob, format_mqar_table, mqar_compare, parse_kinds
    from hedgehog.train import resolve_device

    try:
        kinds = parse_kinds(args.attention)
        resolve_device(args.device)
        task = MQARConfig(vocab_size=args.vocab_size, num_kv_pairs=args.kv_pairs, seq_len=args.seq_len)
        from hedgehog.scratch import mqar_batch

        mqar_batch(1, task, __import__("torch").Generator())  # validates the task settings
    except ValueError as e:
        raise UserError(str(e))
    _setup_logging()
    job = MQARJob(out=args.out, kinds=kinds, task=task, d_model=args.d_model, layers=args.layers, heads=args.heads,
                  arch=args.arch,
                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, mimic_weight=args.mimic_weight,
                  eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress, device=args.device)
    result = mqar_compare(job)
    print(format_mqar_table(result["rows"]))
    print(f"wrote {args.out}/mqar.json and {args.out}/mqar.png")


def _convert_encoder(args):
    from hedgehog.distill import Stage1Config
    from hedgehog.encoder import EncoderJob, format_report, run

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    _check_maps(maps)
    _setup_logging()
    s1 = Stage1Config(tokens=args.stage1_tokens, lr=args.stage1_lr, batch_size=args.stage1_batch,
                      time_budget_s=args.stage1_minutes * 60 if args.stage1_minutes else None)
    job = EncoderJob(out=args.out, model=args.model, texts=args.texts, feature_maps=maps, seq_len=args.seq_len,
                     batch_size=args.batch_size, teacher_steps=args.teacher_steps, teacher_lr=args.teacher_lr,
                     stage1=s1, stage2_steps=args.stage2_steps, stage2_lr=args.stage2_lr,
                     eval_examples=args.eval_examples or None, resume=args.resume, seed=args.seed,
                     progress=not args.no_progress)
    report = run(job)
    print(format_report(report))
    print(f"wrote {args.out}/report.json and {args.out}/<map>/model")


def _add_job_options(c: argparse.ArgumentParser, out_default: str) -> None:
    """The convert/compare flags; every default is read from the job's dataclasses (one source)."""
    from hedgehog.distill import Stage1Config, Stage2Config
    from hedgehog.pipeline import ConvertJob

    job, s1, s2 = ConvertJob(), Stage1Config(), Stage2Config()
    c.add_argument("--out", default=out_default, help="run directory (report, checkpoints, model)")
    c.add_argument("--model", default=job.model, help="'smollm2' (fetched from the package registry), a local "
                   "from_pretrained directory, a .gguf file, or a hub id")
    c.add_argument("--data", default=job.data,
                   help="training text: 'general' (modern English manuals from Debian packages: the Python docs and "
                        "the Debian Administrator's Handbook), 'shakespeare' (split by play), a registry text name "
                        "(python-docs, debian-handbook, git-docs, debian-devref), a .txt file/folder, or records: a "
                        ".jsonl/.json/.csv/.parquet/.arrow file or a saved `datasets` directory")
    _add_record_options(c)
    c.add_argument("--eval-data", default=None,
                   help="comma-separated held-out texts scored against the teacher after each stage (registry "
                        "names or .txt files/folders, never trained on); default: git-docs, debian-devref and "
                        "Shakespeare's test plays, less any that --data trains on")
    c.add_argument("--fidelity-tokens", type=int, default=job.fidelity_tokens,
                   help="tokens scored per held-out text")
    c.add_argument("--window", type=int, default=job.window,
                   help="hybrid attention: keys per query seen with exact softmax (the rest through the feature maps)")
    c.add_argument("--seq-len", type=int, default=job.seq_len, help="tokens per training/eval window")
    c.add_argument("--qk-scale", type=float, default=job.qk_scale,
                   help="q and k are multiplied by this before the feature maps")
    c.add_argument("--distill-loss", choices=["ce", "mse"], default=job.distill_loss,
                   help="stage 1 loss: attention-weight cross-entropy (Hedgehog) or output MSE (LoLCATs)")
    c.add_argument("--stage1-tokens", type=int, default=s1.tokens, help="stage 1 token budget")
    c.add_argument("--stage1-lr", type=float, default=s1.lr, help="stage 1 learning rate (Adam, cosine)")
    c.add_argument("--stage1-batch", type=int, default=s1.batch_size, help="windows per stage 1 step")
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
    c.add_argument("--stage2-tokens", type=int, default=s2.tokens, help="stage 2 (LoRA) token budget; 0 skips stage 2")
    c.add_argument("--stage2-lr", type=float, default=s2.lr, help="stage 2 learning rate (AdamW, cosine)")
    c.add_argument("--stage2-batch", type=int, default=s2.batch_size,
                   help="windows per stage 2 optimizer step, over all processes")
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
                        "only the feature maps and LoRA, on top of the base model it names")
    c.add_argument("--merge-lora", action="store_true",
                   help="light format: save LoRA merged into the weights instead of as an adapter")
    c.add_argument("--eval-tokens", type=int, default=job.eval_tokens, help="held-out test tokens for perplexity")
    c.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints: finished stages are reused and an interrupted stage goes on "
                        "where it stopped (refused if the checkpoint's settings differ)")
    c.add_argument("--seed", type=int, default=job.seed, help="data order seed")
    _add_device(c, "where the model converts; under torchrun / accelerate launch each process takes its own")
    _add_dtype(c, job.dtype)
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _placement(args):
    """``(device, dtype)`` from ``--device``/``--dtype`` (checked before anything loads)."""
    from hedgehog.train.engine import parse_dtype, resolve_device

    try:
        device = resolve_device(getattr(args, "device", "cpu"))
    except ValueError as e:
        raise UserError(str(e)) from None
    return device, parse_dtype(getattr(args, "dtype", "fp32"))


def _load_any(model_arg, base_model=None, device="cpu", dtype=None):
    """A converted dir -> (model, tok, 'hedgehog'); otherwise the plain softmax model."""
    import torch

    from hedgehog.checkpoint import is_converted_dir, load
    from hedgehog.pipeline import load_base

    dtype = dtype or torch.float32
    if is_converted_dir(model_arg):
        model, tok = load(model_arg, base_model=base_model, dtype=dtype, device=device)
        return model, tok, "hedgehog"
    model, tok, _ = load_base(model_arg, dtype=dtype)
    return model.to(device), tok, "softmax"


def _analyze(args):
    from hedgehog import analyze

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    _check_maps(maps)
    _setup_logging()
    a = analyze.run(args.model, args.out, maps, args.data, args.windows, args.seq_len, args.layer, args.head, args.span)
    print(analyze.summary_markdown(a))
    print(f"wrote {args.out}/analysis.json, summary.md and PNGs")


def _generate(args):
    import time

    import torch
    from transformers import TextStreamer

    from hedgehog.generation import output_cache

    _setup_logging()
    device, dtype = _placement(args)
    model, tok, kind = _load_any(args.model, args.base_model, device, dtype)
    if tok is None:
        raise UserError(f"{args.model} has no tokenizer; save one with the model")
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature if args.temperature > 0 else None, top_k=args.top_k or None,
                         streamer=streamer, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out.sequences.shape[1] - ids.shape[1]
    cache = output_cache(out)
    if hasattr(cache, "state_nbytes"):
        mem = f"recurrent state {cache.state_nbytes() / 2**20:.2f} MiB (constant in length)"
    else:
        kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if getattr(l, "keys", None) is not None)
        mem = f"KV cache {kv / 2**20:.2f} MiB (grows with length)"
    print(f"\n[{kind}] {new} new tokens in {dt:.2f} s ({new / dt:.1f} tok/s incl. prefill of {ids.shape[1]}); {mem}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedgehog",
        description="Hedgehog: learned linear attention for transformers (Zhang et al., ICLR 2024).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser("bench", help="speed and memory benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True
    from hedgehog.bench import attention

    ba = bsub.add_parser("attention", help="causal Hedgehog attention vs torch SDPA, N = 256 ... 32768",
                         description=attention.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    attention.add_arguments(ba)
    ba.set_defaults(func=_bench_attention)
    from hedgehog.bench import decode

    bd = bsub.add_parser("decode", help="per-token decode latency/memory vs context, Hedgehog state vs softmax KV cache",
                         description=decode.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode.add_arguments(bd)
    bd.set_defaults(func=_bench_decode)
    from hedgehog.bench import prefill

    bp = bsub.add_parser("prefill", help="whole-model prefill time, converted model vs its softmax base",
                         description=prefill.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prefill.add_arguments(bp)
    bp.set_defaults(func=_bench_prefill)
    from hedgehog.bench import train_step

    bt = bsub.add_parser("train-step", help="from-scratch training step time: softmax vs Hedgehog, mimic loss over "
                         "every row or --mimic-rows rows", description=train_step.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    train_step.add_arguments(bt)
    bt.set_defaults(func=_bench_train_step)

    c = sub.add_parser(
        "convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="convert a pretrained causal LM to Hedgehog linear attention (distill -> LoRA -> save -> eval)",
        description="Fetch the model and text, swap every attention layer for Hedgehog linear attention, "
                    "train the feature maps to mimic softmax (stage 1), LoRA fine-tune (stage 2), save to OUT/model, "
                    "and report perplexity vs the softmax teacher on held-out text (OUT/report.json). Defaults "
                    "run the real SmolLM2-135M-Instruct on Shakespeare (held-out plays) in ~25 min on 2 CPU cores.")
    _add_job_options(c, out_default="runs/smollm2-hedgehog")
    c.add_argument("--feature-map", default="hedgehog", help="hedgehog | hedgehog_exp | elu | relu | performer | "
                   "cosformer | t2r | taylor")
    from hedgehog.pipeline import ConvertJob

    c.add_argument("--attention", choices=["linear", "hybrid"], default=ConvertJob.attention,
                   help="hybrid (default, LoLCATs): the last --window keys with exact softmax (a learned per-head "
                   "factor), older keys through the feature maps; linear: every key through the feature maps "
                   "(the paper's pure Hedgehog)")
    c.set_defaults(func=_convert)

    ce = sub.add_parser(
        "convert-encoder", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="finetuned conversion of a BERT encoder (all-MiniLM-L6-v2) on a Shakespeare genre task",
        description="Finetune the softmax encoder as a comedy/history/tragedy classifier of Shakespeare passages "
                    "(split by passage within each play), convert a copy per feature map (stage 1: bidirectional "
                    "attention distillation; stage 2: short task finetune), and report test accuracy against the "
                    "softmax classifier, attention KL, and the cosine similarity of sentence embeddings "
                    "(OUT/report.json, models in OUT/<map>/model). The teacher is checkpointed; --resume reuses it.")
    ce.add_argument("--out", default="runs/encoder", help="run directory")
    ce.add_argument("--model", default="minilm", help="'minilm' (all-MiniLM-L6-v2 from the package registry) or a "
                    "BERT directory")
    ce.add_argument("--texts", default=None, help="folder of <play>_gut.txt files (default: Shakespeare from the "
                    "package registry)")
    ce.add_argument("--feature-maps", default="hedgehog", help="comma-separated feature maps, one student each")
    ce.add_argument("--seq-len", type=int, default=128, help="word pieces per passage ([CLS] and [SEP] included)")
    ce.add_argument("--batch-size", type=int, default=16, help="passages per finetune step")
    ce.add_argument("--teacher-steps", type=int, default=300, help="softmax classifier finetune steps")
    ce.add_argument("--teacher-lr", type=float, default=1e-4, help="softmax finetune learning rate")
    ce.add_argument("--stage1-tokens", type=int, default=65536, help="attention-distillation tokens per map")
    ce.add_argument("--stage1-lr", type=float, default=1e-2, help="stage 1 learning rate")
    ce.add_argument("--stage1-batch", type=int, default=4, help="passages per stage 1 step")
    ce.add_argument("--stage1-minutes", type=float, default=0, help="stage 1 time cap (0: none)")
    ce.add_argument("--stage2-steps", type=int, default=150, help="converted-model finetune steps")
    ce.add_argument("--stage2-lr", type=float, default=5e-5, help="converted-model finetune learning rate")
    ce.add_argument("--eval-examples", type=int, default=0, help="test passages evaluated (0: all)")
    ce.add_argument("--resume", action="store_true", help="reuse the finetuned teacher in OUT/checkpoints")
    ce.add_argument("--seed", type=int, default=0, help="seed")
    ce.add_argument("--no-progress", action="store_true", help="no progress bars")
    ce.set_defaults(func=_convert_encoder)

    cp = sub.add_parser(
        "compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="convert with every feature map under the same budget; one table of perplexity and attention KL",
        description="Runs `hedgehog convert` once per feature map with identical data, budgets and settings, and "
                    "writes OUT/compare.json, OUT/compare.png and a table. Each map's run lands in OUT/<map>.")
    _add_job_options(cp, out_default="runs/compare")
    cp.add_argument("--feature-maps", default="hedgehog,elu,relu,performer,cosformer,t2r,taylor",
                    help="comma-separated feature maps; 'hybrid' (or 'hybrid:MAP') adds the sliding-window hybrid")
    cp.set_defaults(func=_compare, feature_map="hedgehog")

    g = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="stream a continuation from a converted (or original) model",
                       description="Generate text with a model saved by `hedgehog convert` (decodes with a constant-size "
                                   "recurrent state) or with the original softmax model ('smollm2', a dir or hub id) "
                                   "for comparison. Tokens are streamed to the terminal.")
    g.add_argument("--model", required=True, help="converted model dir (e.g. runs/smollm2-hedgehog/model), 'smollm2', "
                   "a model dir or hub id")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--base-model", default=None, help="override the base model recorded in a converted dir")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_device(g, "where the model runs")
    _add_dtype(g)
    g.set_defaults(func=_generate)

    an = sub.add_parser("analyze", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="attention fidelity per layer/head: KL, entropy (spikiness), monotonicity, with pictures",
                        description="Compare the softmax teacher with every feature map (untrained, and trained when "
                                    "MODEL is a converted run) on held-out text: KL, row entropy, Spearman(q·k, weight) "
                                    "for every layer and head. Writes analysis.json, summary.md and PNGs.")
    an.add_argument("--model", default="smollm2", help="'smollm2', a model dir/hub id, or a converted run's model dir")
    an.add_argument("--feature-maps", default=",".join(["hedgehog", "elu", "relu", "performer", "cosformer", "t2r",
                                                         "taylor"]), help="comma-separated feature maps (untrained)")
    an.add_argument("--data", default="shakespeare", help="'shakespeare' or a .txt file/folder (test split is used)")
    an.add_argument("--windows", type=int, default=2, help="text windows")
    an.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    an.add_argument("--layer", type=int, default=None, help="layer for the pictures (default: the middle one)")
    an.add_argument("--head", type=int, default=0, help="head for the pictures")
    an.add_argument("--span", type=int, default=32, help="tokens shown in the heatmaps")
    an.add_argument("--out", default="runs/analysis", help="output directory")
    an.set_defaults(func=_analyze)

    from hedgehog.scratch import KINDS

    kinds_help = f"attention kind, a comma list, or 'all' (= softmax,hedgehog,taylor,t2r,elu,performer,cosformer); " \
                 f"kinds: {', '.join(KINDS)}"
    t = sub.add_parser("train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="train a small decoder LM from scratch with any attention kind (or compare kinds)",
                       description="Train a randomly initialised Llama-style LM (byte-level) on the Shakespeare "
                                   "training plays with the given attention; report validation/test perplexity per "
                                   "byte on held-out plays. Hedgehog's feature maps also learn to mimic the softmax "
                                   "attention of the same (detached) q/k (weight --mimic-weight). With several kinds "
                                   "(or 'all') every kind trains on the same tokens into OUT/<kind>, and OUT gets "
                                   "train_compare.json and train_compare.png. Checkpoints every 50 steps; --resume "
                                   "continues an interrupted run.")
    t.add_argument("--attention", default="hedgehog", help=kinds_help)
    t.add_argument("--out", default="runs/scratch", help="run directory")
    t.add_argument("--data", default="shakespeare", help="'shakespeare' (split by play), a registry text, a .txt "
                   "file/folder, or record data (.jsonl/.json/.csv/.parquet/.arrow, a saved dataset)")
    _add_record_options(t)
    t.add_argument("--tokens", type=int, default=1_048_576, help="training tokens (bytes) per kind")
    t.add_argument("--minutes", type=float, default=0, help="wall-clock cap per kind (0: none; budgets then differ)")
    t.add_argument("--seq-len", type=int, default=256, help="bytes per training window")
    t.add_argument("--batch-size", type=int, default=16, help="windows per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warmup + cosine)")
    t.add_argument("--d-model", type=int, default=256, help="model width")
    t.add_argument("--layers", type=int, default=4, help="transformer blocks")
    t.add_argument("--heads", type=int, default=8, help="attention heads")
    t.add_argument("--window", type=int, default=64, help="hybrid kind: softmax window")
    t.add_argument("--arch", choices=["llama", "gpt2"], default="llama",
                   help="llama: RoPE, SwiGLU, RMSNorm; gpt2: learned absolute positions, GELU, LayerNorm")
    t.add_argument("--short-conv", type=int, default=0, metavar="K",
                   help="a causal depthwise conv of kernel K (identity init) in front of every attention, "
                        "for every kind alike (0: none)")
    t.add_argument("--taylor-dim", type=int, default=0, metavar="D",
                   help="taylor kind: project q/k per head to D dims (trainable) before the Taylor features, "
                        "F = 1 + D + D(D+1)/2, as Based's feature dimension; e.g. 10 gives F = 66, Hedgehog's "
                        "64-feature state (0: D = head_dim, F = 561 at head_dim 32)")
    t.add_argument("--no-rope", action="store_true",
                   help="llama arch: no rotary embedding, for every kind alike (NoPE: order comes from the causal "
                        "mask and --short-conv). RoPE keeps Taylor's kernel relative but not a learned map's")
    t.add_argument("--mimic-weight", type=float, default=1.0,
                   help="weight of the Hedgehog maps' softmax-mimicry loss added to the LM loss (0: LM loss only)")
    t.add_argument("--mimic-rows", type=int, default=0, metavar="R",
                   help="take the mimic loss over R random query rows per step (each against all its keys): an "
                        "unbiased estimate at O(R x seq-len) cost, so long windows stay linear (0: every row, "
                        "O(seq-len^2))")
    t.add_argument("--feature-dim", type=int, default=0, metavar="P",
                   help="projection width of the trainable maps (hedgehog, hedgehog_exp, t2r, hybrid): Hedgehog "
                        "features F = 2P, so a decode state of 2P x head_dim per head (0: P = head_dim)")
    t.add_argument("--eval-points", type=int, default=8, help="validation measurements along training")
    t.add_argument("--val-tokens", type=int, default=32768, help="validation bytes")
    t.add_argument("--test-tokens", type=int, default=131072, help="test bytes")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (and skip finished kinds)")
    t.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(t, "where the models train and evaluate (the init and the data order are the same on every "
                   "device; the numbers differ by rounding). A checkpoint resumes on any device")
    t.set_defaults(func=_train)

    pe = sub.add_parser("paired-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="compare finished `train` runs on the same held-out windows, with bootstrap intervals",
                        description="Loads the final checkpoints of OUT/<kind> (finished `hedgehog train` runs of one "
                                    "comparison), scores every held-out window with each, and reports each kind's "
                                    "perplexity ratio to every --against kind with a 95% paired block-bootstrap "
                                    "interval (runs of --block consecutive windows are resampled, both models "
                                    "together). Writes OUT/paired_<split>.json.")
    pe.add_argument("--out", required=True, help="the comparison's run directory (holds <kind>/report.json)")
    pe.add_argument("--attention", default="all", help="kinds to load (comma list or 'all')")
    pe.add_argument("--against", default="softmax", help="reference kinds (comma list), each among --attention")
    pe.add_argument("--split", choices=["test", "validation"], default="test", help="held-out plays to score")
    pe.add_argument("--tokens", type=int, default=-1,
                    help="bytes to score: -1 = what the runs were evaluated on, 0 = the whole split")
    pe.add_argument("--block", type=int, default=16, help="consecutive windows per bootstrap block")
    pe.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    pe.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(pe, "where the models score the windows")
    pe.set_defaults(func=_paired)

    mq = sub.add_parser("mqar", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="multi-query associative recall: train each attention kind, report accuracy",
                        description="Synthetic multi-query associative recall (Zoology/Based; the paper's Table 2): "
                                    "KV pairs, then every key again at a random later position; the model must "
                                    "output its value. Trains a small model per kind on fresh samples and reports "
                                    "accuracy on a fixed held-out set (OUT/mqar.json, OUT/mqar.png).")
    mq.add_argument("--attention", default="all", help=kinds_help)
    mq.add_argument("--out", default="runs/mqar", help="output directory")
    mq.add_argument("--vocab-size", type=int, default=32, help="vocabulary (keys: lower half, values: upper half)")
    mq.add_argument("--kv-pairs", type=int, default=4, help="key-value pairs per sequence (= queries)")
    mq.add_argument("--seq-len", type=int, default=32, help="sequence length")
    mq.add_argument("--d-model", type=int, default=64, help="model width")
    mq.add_argument("--layers", type=int, default=2, help="blocks")
    mq.add_argument("--heads", type=int, default=4, help="attention heads")
    mq.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="model family (see `train --help`)")
    mq.add_argument("--steps", type=int, default=2000, help="training steps per kind")
    mq.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    mq.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    mq.add_argument("--mimic-weight", type=float, default=1.0, help="Hedgehog softmax-mimicry loss weight")
    mq.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    mq.add_argument("--seed", type=int, default=0, help="seed")
    mq.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(mq, "where the models train (the task data is drawn on the CPU, so every device sees the same)")
    mq.set_defaults(func=_mqar)

    e = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="fidelity of a converted model to its teacher (or perplexity of a plain model)",
                       description="For a model saved by `hedgehog convert` (OUT/model): on a split of --data and on "
                                   "held-out texts, the teacher's and the converted model's perplexity, their ratio, "
                                   "next-token top-1 agreement and KL(teacher || student) per token; the teacher is "
                                   "the same model with softmax attention and no adapter. For a plain softmax model "
                                   "('smollm2', a directory or hub id): its perplexity.")
    e.add_argument("--model", required=True, help="converted model dir, 'smollm2', a model dir or hub id")
    e.add_argument("--base-model", default=None, help="override the base model recorded in a converted dir")
    e.add_argument("--data", default="general", help="'general', 'shakespeare', a registry text, a .txt file/folder "
                   "or record data")
    _add_record_options(e)
    e.add_argument("--split", choices=["train", "validation", "test"], default="test", help="which split")
    e.add_argument("--eval-data", default=None, help="comma-separated held-out texts (default: git-docs, "
                   "debian-devref, shakespeare, less --data)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--tokens", type=int, default=16384, help="max tokens evaluated on --data's split")
    e.add_argument("--fidelity-tokens", type=int, default=4096, help="tokens per held-out text")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_device(e, "where the models score the windows")
    _add_dtype(e)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks: score the converted model and its teacher side by side "
                        "(needs `pip install 'hedgehog[eval]'`); 'heldout_cloze' is a built-in offline task "
                        "(continuations of a held-out text); hub tasks such as hellaswag,piqa,arc_easy need a hub")
    e.add_argument("--include-path", default=None, help="folder of local lm-eval task YAML files")
    e.add_argument("--limit", type=float, default=0, help="lm-eval: examples per task (0: all)")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    e.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size")
    e.add_argument("--cloze-text", default="git-docs", help="held-out text for the heldout_cloze task")
    e.add_argument("--cloze-items", type=int, default=200, help="items of the heldout_cloze task")
    e.add_argument("--out", default="runs/eval", help="where --tasks writes lm_eval.json and lm_eval.md")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval)

    le = sub.add_parser("lm-eval", add_help=False,
                        help="lm-eval-harness's own command line with the `hedgehog` model type registered",
                        description="Everything after `lm-eval` goes to lm-eval, e.g. `hedgehog lm-eval --model "
                                    "hedgehog --model_args pretrained=runs/x/model[,teacher=True] --tasks hellaswag`.")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    le.set_defaults(func=_lm_eval_cli)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `lm-eval` is lm-eval's (argparse's REMAINDER cannot start with an option)
        args = argparse.Namespace(func=_lm_eval_cli, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    if getattr(args, "func", None) not in BENCHMARKS:
        from hedgehog.runtime import keep_freed_memory

        # training and evaluation allocate many large autograd temporaries: keep freed memory for reuse
        # (HEDGEHOG_MALLOC_TUNING=0: off). The benchmarks measure what a library caller gets, so they leave
        # malloc alone; the kernels reuse their own outputs.
        keep_freed_memory()
    try:
        args.func(args)
    except UserError as e:  # the user can fix it: one paragraph, no traceback
        print(f"hedgehog: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
