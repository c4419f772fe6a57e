"""Command-line interface: ``hedgehog <command> [options]``; every command has ``--help``.

One module per command (or per family of commands): each registers its parser and its handler.
"""
from __future__ import annotations

import argparse
import sys

from hedgehog.errors import EXIT_USER_ERROR, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedgehog",
        description="Hedgehog: learned linear attention for transformers (Zhang et al., ICLR 2024).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from hedgehog.cli import analyze, bench, convert, encoder, evaluate, generate, scratch

    bench.register(sub)
    convert.register_convert(sub)
    encoder.register(sub)
    convert.register_compare(sub)
    generate.register(sub)
    analyze.register(sub)
    scratch.register_train(sub)
    scratch.register_paired(sub)
    scratch.register_mqar(sub)
    evaluate.register_eval(sub)
    evaluate.register_lm_eval(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from hedgehog.cli.bench import BENCHMARKS
    from hedgehog.cli.evaluate import _lm_eval_cli

    if argv[:1] == ["lm-eval"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `lm-eval` is lm-eval's (argparse's REMAINDER cannot start with an option)
        args = argparse.Namespace(func=_lm_eval_cli, lm_eval_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    if getattr(args, "func", None) not in BENCHMARKS:
        from hedgehog.utils.runtime import keep_freed_memory

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
