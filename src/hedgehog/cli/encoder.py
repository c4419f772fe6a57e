"""`hedgehog convert-encoder`: a BERT encoder, every feature map."""
from __future__ import annotations

import argparse

from hedgehog.cli.common import check_maps, setup_logging


def _convert_encoder(args):
    from hedgehog.jobs.encoder import EncoderJob, format_report, run
    from hedgehog.train.stage1 import Stage1Config

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    check_maps(maps)
    setup_logging()
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


def register(sub) -> None:
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

