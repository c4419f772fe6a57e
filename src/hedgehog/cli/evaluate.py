"""`hedgehog eval` (fidelity to the teacher, lm-eval tasks) and `hedgehog lm-eval`."""
from __future__ import annotations

import argparse

from hedgehog.errors import UserError
from hedgehog.cli.common import (add_device, add_dtype, add_long_context_options, add_record_options,
                                 add_sparse_cache_options, apply_sparse_cache, lengths as _lengths,
                                 load_any, split_names, placement, setup_logging)


def _eval(args):
    from hedgehog.jobs.checks import check_text_source
    from hedgehog.data.corpora import (HELD_OUT_TEXTS, eval_documents, load_corpus, split_windows, text_label,
                                       tokenize_windows)
    from hedgehog.eval.fidelity import fidelity, perplexity
    from hedgehog.eval.report import format_fidelity

    setup_logging()
    names = split_names(args.eval_data)
    check_text_source(args.data, args.text_field, args.data_format)
    for source in names or ():
        check_text_source(source)
    if args.tasks:
        return _eval_tasks(args)
    device, dtype = placement(args)
    model, tok, kind = load_any(args.model, args.base_model, device, dtype)
    teacher = None
    if kind == "hedgehog":
        apply_sparse_cache(model, args)
        from hedgehog.models.loading import load_teacher, needs_separate_teacher

        # LoRA merged into the weights: the teacher is the recorded base, not this model in teacher mode
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
    held = {}
    for name in names if names is not None else [n for n in (*HELD_OUT_TEXTS, "shakespeare") if n != args.data]:
        if name != args.data:
            docs = eval_documents(name, args.data, tok)
            held[text_label(name)] = docs.splits["test"]
            sets[f"{text_label(name)} (held out)"] = split_windows(docs, "test", tok, args.seq_len,
                                                              max_tokens=args.fidelity_tokens, shuffle_seed=0)
    res = {k: fidelity(model, w, progress=not args.no_progress, desc=k, teacher=teacher) for k, w in sets.items()}
    print(format_fidelity({"this model": res}))
    lengths = _lengths(args.context_lengths)
    if lengths and held:
        from hedgehog.eval.long_context import long_context_report
        from hedgehog.eval.report import format_long_context
        from hedgehog.layers.attention import hedgehog_layers

        hh = hedgehog_layers(model)[0].hh_config
        window = args.baseline_window or (hh.window if hh.attention == "hybrid" else 64)
        lc = long_context_report(model, held, tok, window, lengths, args.context_tokens, args.baseline_sinks,
                                 _lengths(args.passkey_lengths), args.passkey_trials, teacher=teacher,
                                 progress=not args.no_progress)
        print()
        print(format_long_context(lc))
        res = {**res, "long_context": lc}
    if args.json:
        from pathlib import Path

        from hedgehog.utils.atomic import write_json

        write_json(Path(args.json), res)
        print(f"wrote {args.json}")
    return res


def _eval_tasks(args):
    """``hedgehog eval --tasks``: lm-eval tasks, teacher vs converted model, one table (JSON + Markdown)."""
    from pathlib import Path

    from hedgehog.eval import lmeval
    from hedgehog.models.formats import is_converted_dir, read_meta
    from hedgehog.utils.atomic import write_json

    if not is_converted_dir(args.model):
        raise UserError(f"--tasks compares a converted model with its teacher; {args.model!r} is not a directory "
                        "saved by `hedgehog convert` (OUT/model). Use `hedgehog lm-eval --model hf ...` for a plain "
                        "model.")
    read_meta(args.model)  # refuse a broken directory before lm-eval starts
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    include = args.include_path
    if "heldout_cloze" in tasks and include is None:  # the built-in offline task, from a held-out text
        from hedgehog.data.corpora import eval_documents

        docs = eval_documents(args.cloze_text, "general").splits["test"]
        include = str(lmeval.write_cloze_task(docs, Path(args.out) / "tasks", n=args.cloze_items))
    res = lmeval.compare_tasks(args.model, tasks, include_path=include, limit=args.limit or None,
                               batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    table = lmeval.format_table(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lm_eval.json", res)
    (out / "lm_eval.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/lm_eval.json and {out}/lm_eval.md")
    return res


def _lm_eval_cli(args):
    from hedgehog.eval import lmeval

    lmeval.run_cli(args.lm_eval_args)


def register_eval(sub) -> None:
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
    add_record_options(e)
    e.add_argument("--split", choices=["train", "validation", "test"], default="test", help="which split")
    e.add_argument("--eval-data", default=None, help="comma-separated held-out texts (default: git-docs, "
                   "debian-devref, shakespeare, less --data)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--tokens", type=int, default=16384, help="max tokens evaluated on --data's split")
    e.add_argument("--fidelity-tokens", type=int, default=4096, help="tokens per held-out text")
    add_long_context_options(e)
    e.add_argument("--baseline-window", type=int, default=None,
                   help="the no-training baseline's window (default: a hybrid's own window, 64 for a pure linear "
                        "model); e.g. window + sparse cache + chunk to compare at the same number of exact keys")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_device(e, "where the models score the windows")
    add_sparse_cache_options(e, None, None)
    add_dtype(e)
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


def register_lm_eval(sub) -> None:
    le = sub.add_parser("lm-eval", add_help=False,
                        help="lm-eval-harness's own command line with the `hedgehog` model type registered",
                        description="Everything after `lm-eval` goes to lm-eval, e.g. `hedgehog lm-eval --model "
                                    "hedgehog --model_args pretrained=runs/x/model[,teacher=True] --tasks hellaswag`.")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    le.set_defaults(func=_lm_eval_cli)

