"""Is a converted model position-invariant? The same 512-token windows of git-docs, scored with their position ids
shifted by each offset, against the model's own softmax mode (LoRA merged): ratio and top-1 agreement per offset.

    .venv/bin/python scripts/position_probe.py runs/smollm2-hedgehog/model 0,1536,3584,7680
"""
import math
import sys

import torch
import torch.nn.functional as F

from hedgehog import load
from hedgehog.data.corpora import eval_documents
from hedgehog.eval.fidelity import teacher_mode
from hedgehog.eval.long_context import text_ids


def main(model_dir: str, offsets: str, windows: int = 4, length: int = 512) -> None:
    model, tok = load(model_dir)
    model.eval()
    ids = text_ids(eval_documents("git-docs", "general", tok).splits["test"], tok, windows * length).view(-1, length)

    def forward(w, p):
        return model(input_ids=w, position_ids=p, use_cache=False).logits

    def teacher(w, p):
        with teacher_mode(model):
            return forward(w, p)

    def score(fn, off):
        pos = torch.arange(off, off + length)[None]
        lps = [F.log_softmax(fn(w[None], pos)[0, :-1].float(), -1) for w in ids]
        nll = -sum(lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(lps, ids)) / ((length - 1) * len(ids))
        return nll, lps

    with torch.no_grad():
        for off in map(int, offsets.split(",")):
            (t, tl), (s, sl) = score(teacher, off), score(forward, off)
            agree = sum((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(tl, sl)) / len(tl)
            print(f"offset {off}: ratio {math.exp(s - t):.3f}x, top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "0,1536,3584,7680")
