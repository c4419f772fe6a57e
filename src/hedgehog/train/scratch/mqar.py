"""Multi-query associative recall (`hedgehog mqar`), as in Zoology/Based.

Associative recall (``mqar_*``): multi-query associative recall as in Zoology/Based. A sequence opens with
``num_kv_pairs`` key-value pairs (keys from the lower half of the vocabulary, values from the upper half),
then every key reappears once, in random order, at random later positions among filler tokens (id 0);
at each such position the model must predict the key's value. Accuracy = share of those predictions
that are right, on a fixed held-out set.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from hedgehog.eval.fidelity import eval_batches
from hedgehog.layers.attention import Mode, set_attention_mode
from hedgehog.train.engine import Engine
from hedgehog.utils.atomic import write_json
from hedgehog.train.scratch.model import (ModelSpec, PAPER_KINDS, _with_mimic, build_model, set_train_mode)

log = logging.getLogger("hedgehog")


@dataclass


class MQARConfig:
    vocab_size: int = 32
    num_kv_pairs: int = 4
    seq_len: int = 32


def mqar_batch(n: int, cfg: MQARConfig, generator: torch.Generator):
    """``n`` MQAR sequences -> (input_ids (n, L), targets (n, L) with -100 where nothing is asked).

    Layout: ``k1 v1 ... kP vP`` then filler (0) with each key once more at a random position; the target
    at a repeated key's position is its value.
    """
    V, P, L = cfg.vocab_size, cfg.num_kv_pairs, cfg.seq_len
    half = V // 2
    if half - 1 < P:
        raise ValueError(f"vocab_size {V} too small for {P} distinct keys (keys use ids 1..{half - 1})")
    if L < 3 * P:
        raise ValueError(f"seq_len {L} too short for {P} pairs and {P} queries (need >= {3 * P})")
    keys = torch.argsort(torch.rand(n, half - 1, generator=generator), -1)[:, :P] + 1
    values = torch.randint(half, V, (n, P), generator=generator)
    ids = torch.zeros(n, L, dtype=torch.long)
    ids[:, 0:2 * P:2] = keys
    ids[:, 1:2 * P:2] = values
    targets = torch.full((n, L), -100, dtype=torch.long)
    slots = torch.argsort(torch.rand(n, L - 2 * P, generator=generator), -1)[:, :P] + 2 * P  # query positions
    order = torch.argsort(torch.rand(n, P, generator=generator), -1)  # which key is asked where
    rows = torch.arange(n)[:, None]
    ids[rows, slots] = keys.gather(1, order)
    targets[rows, slots] = values.gather(1, order)
    return ids, targets


@dataclass


class MQARJob:
    out: str = "runs/mqar"
    kinds: Sequence[str] = PAPER_KINDS
    task: MQARConfig = field(default_factory=MQARConfig)
    d_model: int = 64
    layers: int = 2
    heads: int = 4  # head_dim 16 (as Based's Taylor feature dim)
    arch: str = "llama"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    mimic_weight: float = 1.0
    eval_examples: int = 1000
    eval_every: int = 250
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # as TrainJob.device


@torch.no_grad()


def mqar_accuracy(model, ids, targets, batch_size=250) -> float:
    right = total = 0
    for x, t in eval_batches(model, ids, targets, batch_size=batch_size):
        logits = model(input_ids=x, use_cache=False).logits
        m = t != -100
        right += (logits.argmax(-1)[m] == t[m]).sum().item()
        total += m.sum().item()
    return right / max(1, total)


def train_mqar(kind: str, job: MQARJob) -> Dict:
    spec = ModelSpec(vocab_size=job.task.vocab_size, d_model=job.d_model, layers=job.layers, heads=job.heads,
                     max_len=job.task.seq_len, mlp_mult=2.0, arch=job.arch)
    engine = Engine(job.device, progress=job.progress)
    dev = engine.device
    model = build_model(kind, spec, seed=job.seed).to(dev)
    g_eval = torch.Generator().manual_seed(10_000 + job.seed)
    eval_ids, eval_t = mqar_batch(job.eval_examples, job.task, g_eval)
    g = torch.Generator().manual_seed(job.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.1)
    set_train_mode(model, kind, job.mimic_weight)
    model.train()
    curve, t0 = [], time.perf_counter()
    bar = engine.bar(iterable=range(job.steps), desc=f"MQAR {kind}", unit="step")
    for step in bar:
        ids, t = mqar_batch(job.batch_size, job.task, g)  # drawn on the CPU: the same data on every device
        ids, t = ids.to(dev), t.to(dev)
        engine.set_lr(opt, job.lr, step, job.steps, job.warmup_steps)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=-100)
        total, _ = _with_mimic(model, loss, job.mimic_weight)
        engine.backward(total, f"MQAR {kind}, step {step}")
        engine.step(opt, model.parameters(), lr=job.lr, clip=1.0)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % job.eval_every == 0 or step + 1 == job.steps:
            if kind != "softmax":
                set_attention_mode(model, Mode.STUDENT)
            acc = mqar_accuracy(model, eval_ids, eval_t)
            set_train_mode(model, kind, job.mimic_weight)
            curve.append({"step": step + 1, "loss": loss.item(), "accuracy": acc})
            log.info("MQAR %s step %d: loss %.3f accuracy %.3f", kind, step + 1, loss.item(), acc)
    return {"attention": kind, "accuracy": curve[-1]["accuracy"], "best_accuracy": max(c["accuracy"] for c in curve),
            "curve": curve, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def mqar_compare(job: MQARJob) -> Dict:
    root = Path(job.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in job.kinds:
        rows.append(train_mqar(kind, job))
        result = {"task": asdict(job.task), "settings": {k: v for k, v in asdict(job).items() if k != "task"},
                  "rows": rows}
        write_json(root / "mqar.json", result)
    _plot_mqar(rows, root / "mqar.png")
    return result


def _plot_mqar(rows, path):
    from hedgehog.eval.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.plot([c["step"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], marker="o", label=r["attention"])
    ax.set(xlabel="training step", ylabel="held-out MQAR accuracy", ylim=(0, 1.02), title="associative recall")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


def format_mqar_table(rows: List[Dict]) -> str:
    lines = ["| attention | accuracy | best | minutes |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attention']} | {100 * r['accuracy']:.1f}% | {100 * r['best_accuracy']:.1f}% | "
                     f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines)
