"""`hedgehog analyze`: attention fidelity of a converted model, per layer and head."""
from __future__ import annotations

import argparse

from hedgehog.cli.common import check_maps, setup_logging


def _analyze(args):
    from hedgehog.eval import analyze

    maps = [m.strip() for m in args.feature_maps.split(",") if m.strip()]
    check_maps(maps)
    setup_logging()
    a = analyze.run(args.model, args.out, maps, args.data, args.windows, args.seq_len, args.layer, args.head, args.span)
    print(analyze.summary_markdown(a))
    print(f"wrote {args.out}/analysis.json, summary.md and PNGs")


def register(sub) -> None:
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
