"""`hedgehog bench attention | decode | prefill | train-step | stages`."""
from __future__ import annotations

import argparse

from hedgehog.cli.common import setup_logging


def _bench_decode(args):
    from hedgehog.bench import decode

    setup_logging()
    decode.run_from_args(args)


def _bench_prefill(args):
    from hedgehog.bench import prefill

    setup_logging()
    prefill.run_from_args(args)


def _bench_train_step(args):
    from hedgehog.bench import train_step

    setup_logging()
    train_step.run_from_args(args)


def _bench_stages(args):
    from hedgehog.bench import stages

    setup_logging()
    stages.run_from_args(args)


def _bench_attention(args):
    from hedgehog.bench import attention

    attention.run_from_args(args)


# measured as a library caller would run them: main() leaves malloc alone for these
BENCHMARKS = (_bench_attention, _bench_decode, _bench_prefill, _bench_train_step, _bench_stages)


def register(sub) -> None:
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
    from hedgehog.bench import stages

    bs = bsub.add_parser("stages", help="conversion throughput: stage 1 and stage 2 tokens/s of the default job, on "
                         "a model of SmolLM2's shape (no download)", description=stages.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    stages.add_arguments(bs)
    bs.set_defaults(func=_bench_stages)

