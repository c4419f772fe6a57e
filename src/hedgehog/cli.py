"""Command-line interface: ``hedgehog <command> [options]``; every command has ``--help``."""
from __future__ import annotations

import argparse
import sys


def _bench_attention(args):
    from hedgehog.bench import attention

    attention.run_from_args(args)


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
