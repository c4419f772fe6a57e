"""`hedgehog train`, `paired-eval` and `mqar`: the from-scratch regime."""
from __future__ import annotations

import argparse

from hedgehog.cli.common import add_device, add_record_options, setup_logging
from hedgehog.errors import UserError


def _train(args):
    from hedgehog.train import resolve_device
    from hedgehog.train.scratch.lm import TrainJob, format_train_table, train_compare, train_lm
    from hedgehog.train.scratch.model import ModelSpec, mimic_rows_for_step, parse_kinds

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
    setup_logging()
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
    from hedgehog.train import resolve_device
    from hedgehog.train.scratch.lm import format_paired_table, paired_eval
    from hedgehog.train.scratch.model import parse_kinds

    try:
        kinds = parse_kinds(args.attention)
        against = parse_kinds(args.against)
        resolve_device(args.device)
    except ValueError as e:
        raise UserError(str(e))
    setup_logging()
    try:
        result = paired_eval(args.out, kinds, against, split=args.split,
                             max_tokens=None if args.tokens < 0 else args.tokens, block=args.block,
                             samples=args.samples, progress=not args.no_progress, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    print(format_paired_table(result))
    print(f"wrote {args.out}/paired_{args.split}.json")


def _mqar(args):
    from hedgehog.train import resolve_device
    from hedgehog.train.scratch.model import parse_kinds
    from hedgehog.train.scratch.mqar import MQARConfig, MQARJob, format_mqar_table, mqar_compare

    try:
        kinds = parse_kinds(args.attention)
        resolve_device(args.device)
        task = MQARConfig(vocab_size=args.vocab_size, num_kv_pairs=args.kv_pairs, seq_len=args.seq_len)
        from hedgehog.train.scratch.mqar import mqar_batch

        mqar_batch(1, task, __import__("torch").Generator())  # validates the task settings
    except ValueError as e:
        raise UserError(str(e))
    setup_logging()
    job = MQARJob(out=args.out, kinds=kinds, task=task, d_model=args.d_model, layers=args.layers, heads=args.heads,
                  arch=args.arch,
                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, mimic_weight=args.mimic_weight,
                  eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress, device=args.device)
    result = mqar_compare(job)
    print(format_mqar_table(result["rows"]))
    print(f"wrote {args.out}/mqar.json and {args.out}/mqar.png")


def kinds_help() -> str:
    from hedgehog.train.scratch.model import KINDS

    return (f"attention kind, a comma list, or 'all' (= softmax,hedgehog,taylor,t2r,elu,performer,cosformer); "
            f"kinds: {', '.join(KINDS)}")


def register_train(sub) -> None:
    t = sub.add_parser("train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="train a small decoder LM from scratch with any attention kind (or compare kinds)",
                       description="Train a randomly initialised Llama-style LM (byte-level) on the Shakespeare "
                                   "training plays with the given attention; report validation/test perplexity per "
                                   "byte on held-out plays. Hedgehog's feature maps also learn to mimic the softmax "
                                   "attention of the same (detached) q/k (weight --mimic-weight). With several kinds "
                                   "(or 'all') every kind trains on the same tokens into OUT/<kind>, and OUT gets "
                                   "train_compare.json and train_compare.png. Checkpoints every 50 steps; --resume "
                                   "continues an interrupted run.")
    t.add_argument("--attention", default="hedgehog", help=kinds_help())
    t.add_argument("--out", default="runs/scratch", help="run directory")
    t.add_argument("--data", default="shakespeare", help="'shakespeare' (split by play), a registry text, a .txt "
                   "file/folder, or record data (.jsonl/.json/.csv/.parquet/.arrow, a saved dataset)")
    add_record_options(t)
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
    add_device(t, "where the models train and evaluate (the init and the data order are the same on every "
                   "device; the numbers differ by rounding). A checkpoint resumes on any device")
    t.set_defaults(func=_train)


def register_paired(sub) -> None:
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
    add_device(pe, "where the models score the windows")
    pe.set_defaults(func=_paired)


def register_mqar(sub) -> None:
    mq = sub.add_parser("mqar", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="multi-query associative recall: train each attention kind, report accuracy",
                        description="Synthetic multi-query associative recall (Zoology/Based; the paper's Table 2): "
                                    "KV pairs, then every key again at a random later position; the model must "
                                    "output its value. Trains a small model per kind on fresh samples and reports "
                                    "accuracy on a fixed held-out set (OUT/mqar.json, OUT/mqar.png).")
    mq.add_argument("--attention", default="all", help=kinds_help())
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
    add_device(mq, "where the models train (the task data is drawn on the CPU, so every device sees the same)")
    mq.set_defaults(func=_mqar)

