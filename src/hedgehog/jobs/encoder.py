"""Finetuned conversion of a real encoder: all-MiniLM-L6-v2 (BERT) on a Shakespeare genre task.

The paper's second regime: take a softmax encoder *finetuned* for a task, convert its attention to
Hedgehog (stage 1: attention distillation against the finetuned model's own softmax attention,
bidirectional), then finetune the converted model briefly on the task (stage 2), and see how much
accuracy it keeps.

Task: which genre (comedy / history / tragedy, as grouped in the First Folio) a passage comes from.
Every play is cut into passages of ``seq_len`` word pieces (``[CLS] ... [SEP]``, no overlap); within each
play the first 80% of passages train, the next 10% validate and the last 10% test, so no text is shared
between splits and every play appears in each. Pericles (not in the Folio) and the poems are left out.

Steps (``run``), each checkpointed in ``OUT/checkpoints`` (``resume`` reuses what finished):
1. finetune the softmax classifier (``BertForSequenceClassification`` from all-MiniLM-L6-v2);
2. per feature map: convert a copy, stage 1 (feature maps only), stage 2 (whole model, task loss);
3. report test accuracy of teacher and students (``accuracy_recovery = student / teacher``), attention KL
   per layer before/after stage 1, and the cosine similarity of mean-pooled sentence embeddings (last
   hidden state) between the softmax encoder and the converted one on test passages.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hedgehog.eval.fidelity import eval_batches
from hedgehog.layers.attention import Mode, HedgehogConfig, hedgehog_layers, set_attention_mode
from hedgehog.train.stage1 import Stage1Config, attention_transfer
from hedgehog.train.engine import Engine
from hedgehog.utils.atomic import write_json

log = logging.getLogger("hedgehog")

GENRES = {
    "comedy": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
               "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
               "much_ado_about_nothing", "taming_of_the_shrew", "tempest", "twelfth_night",
               "two_gentlemen_of_verona", "winters_tale"),
    "history": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"),
    "tragedy": ("antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
                "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus",
                "troilus_and_cressida"),
}
LABELS = tuple(GENRES)


@dataclass
class GenreData:
    splits: Dict[str, torch.Tensor]  # split -> (n, seq_len) input ids
    labels: Dict[str, torch.Tensor]  # split -> (n,) class index


def genre_dataset(texts_dir: Path, tokenizer, seq_len: int = 128, fractions=(0.8, 0.1)) -> GenreData:
    texts_dir = Path(texts_dir)
    splits = {s: [] for s in ("train", "validation", "test")}
    labels = {s: [] for s in splits}
    body = seq_len - 2
    for label, plays in enumerate(GENRES.values()):
        for play in plays:
            path = texts_dir / f"{play}_gut.txt"
            if not path.exists():
                raise FileNotFoundError(f"{path} missing: the Shakespeare texts are incomplete")
            ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
            n = len(ids) // body
            a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
            for i in range(n):
                split = "train" if i < a else "validation" if i < b else "test"
                splits[split].append([tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id])
                labels[split].append(label)
    return GenreData({s: torch.tensor(v, dtype=torch.long) for s, v in splits.items()},
                     {s: torch.tensor(v, dtype=torch.long) for s, v in labels.items()})


@dataclass
class EncoderJob:
    out: str = "runs/encoder"
    model: str = "minilm"
    texts: Optional[str] = None  # folder of <play>_gut.txt files; None: Shakespeare from the registry
    feature_maps: Sequence[str] = ("hedgehog",)
    seq_len: int = 128
    batch_size: int = 16
    teacher_steps: int = 300
    teacher_lr: float = 1e-4
    stage1: Stage1Config = field(default_factory=lambda: Stage1Config(tokens=65536, lr=1e-2, batch_size=4,
                                                                        time_budget_s=None))
    stage2_steps: int = 150
    stage2_lr: float = 5e-5
    eval_examples: Optional[int] = None  # None: the whole test split
    kl_windows: int = 2
    resume: bool = False
    seed: int = 0
    progress: bool = True


def _shuffled(labels: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(labels), generator=g)


def finetune(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch_size: int,
             seed: int, desc: str, progress: bool, warmup: int = 20) -> Dict:
    """Task finetune of every trainable parameter (AdamW, warmup + cosine), cross-entropy on the labels."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    engine = Engine(str(params[0].device), progress=progress)
    order = _shuffled(labels, seed)
    model.train()
    hist, t0 = [], time.perf_counter()
    for step in engine.bar(iterable=range(steps), desc=desc, unit="step"):
        idx = order[[(step * batch_size + j) % len(order) for j in range(batch_size)]]
        engine.set_lr(opt, lr, step, steps, warmup)
        loss = F.cross_entropy(model(input_ids=ids[idx]).logits, labels[idx])
        hist.append(engine.backward(loss, f"{desc}, step {step}"))
        engine.step(opt, params, lr=lr, clip=1.0)
    model.eval()
    return {"steps": steps, "examples": steps * batch_size, "seconds": time.perf_counter() - t0,
            "final_loss": float(sum(hist[-20:]) / max(1, len(hist[-20:])))}


@torch.no_grad()
def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    right = 0
    for x, y in eval_batches(model, ids, labels, batch_size=batch_size):
        right += (model(input_ids=x).logits.argmax(-1) == y).sum().item()
    return right / len(ids)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states (sentence-transformers' pooling for all-MiniLM-L6-v2)."""
    enc = getattr(model, "bert", model)
    return torch.cat([enc(input_ids=x).last_hidden_state.mean(1) for x in eval_batches(enc, ids, batch_size=batch_size)])


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def load_classifier(model_name: str):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from hedgehog.data.assets import PLAIN_LOAD, resolve_model_path

    path = resolve_model_path(model_name)
    model = BertForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
        attn_implementation="sdpa", dtype=torch.float32, **PLAIN_LOAD)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, path


def save_encoder(model: nn.Module, out: Path, tokenizer=None, extra: Optional[Dict] = None) -> None:
    """A converted classifier in the hf format (:func:`hedgehog.models.formats.save_hf`; ``extra`` is recorded, its
    ``base_model`` as the base); a softmax one as transformers saves it. Either is written whole or not at all."""
    from hedgehog.models.formats import save_hf

    if hedgehog_layers(model):
        extra = dict(extra or {})
        save_hf(model, out, tokenizer=tokenizer, base_model=extra.pop("base_model", None), extra=extra)
        return
    from hedgehog.utils.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def load_encoder(path: Path) -> nn.Module:
    """A classifier saved by ``save_encoder`` (converted or softmax), through ``AutoModelForSequenceClassification``."""
    from transformers import AutoModelForSequenceClassification

    from hedgehog.data.assets import PLAIN_LOAD

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors: not a directory written by save_encoder")
    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa", **PLAIN_LOAD).eval()


def run(job: EncoderJob) -> Dict:
    from hedgehog.data.assets import shakespeare_texts_dir
    from hedgehog.eval.fidelity import layer_attention_kl
    from hedgehog.models.convert import convert_model

    torch.manual_seed(job.seed)
    out = Path(job.out)
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok, path = load_classifier(job.model)
    data = genre_dataset(Path(job.texts) if job.texts else shakespeare_texts_dir(), tok, job.seq_len)
    tr_x, tr_y = data.splits["train"], data.labels["train"]
    te_x, te_y = data.splits["test"], data.labels["test"]
    if job.eval_examples:
        sel = _shuffled(te_y, 1)[: job.eval_examples]
        te_x, te_y = te_x[sel], te_y[sel]
    counts = {s: {lab: int((data.labels[s] == i).sum()) for i, lab in enumerate(LABELS)} for s in data.splits}
    log.info("genre passages: %s", counts)

    # ---- the softmax teacher: finetuned once, reused by every map and on resume ----------------------
    teacher_dir = ck / "teacher"
    if job.resume and (teacher_dir / "model.safetensors").exists():
        teacher = load_encoder(teacher_dir)
        t_rep = json.loads((ck / "teacher.json").read_text())
        log.info("teacher: resumed from %s", teacher_dir)
    else:
        t_rep = finetune(model, tr_x, tr_y, job.teacher_steps, job.teacher_lr, job.batch_size, job.seed,
                         "finetune softmax encoder", job.progress)
        teacher = model
        save_encoder(teacher, teacher_dir, tok)
        write_json(ck / "teacher.json", t_rep)
    teacher.eval()
    teacher_acc = accuracy(teacher, te_x, te_y)
    teacher_val_acc = accuracy(teacher, data.splits["validation"], data.labels["validation"])
    teacher_emb = sentence_embeddings(teacher, te_x)
    log.info("softmax teacher: test accuracy %.4f (validation %.4f)", teacher_acc, teacher_val_acc)

    rows = []
    for fm in job.feature_maps:
        t_map = time.perf_counter()
        student = copy.deepcopy(teacher)
        convert_model(student, HedgehogConfig(feature_map=fm))
        kl_before = layer_attention_kl(student, data.splits["validation"][: job.kl_windows])
        acc_init = accuracy(student, te_x, te_y)
        s1 = attention_transfer(student, tr_x, job.stage1, progress=job.progress)
        set_attention_mode(student, Mode.STUDENT)
        kl_after = layer_attention_kl(student, data.splits["validation"][: job.kl_windows])
        acc1 = accuracy(student, te_x, te_y)
        cos1 = embedding_cosine(teacher_emb, sentence_embeddings(student, te_x))
        for p in student.parameters():
            p.requires_grad_(True)
        s2 = finetune(student, tr_x, tr_y, job.stage2_steps, job.stage2_lr, job.batch_size, job.seed + 1,
                      f"finetune {fm} encoder", job.progress)
        set_attention_mode(student, Mode.STUDENT)
        acc2 = accuracy(student, te_x, te_y)
        cos2 = embedding_cosine(teacher_emb, sentence_embeddings(student, te_x))
        model_dir = out / fm / "model"
        save_encoder(student, model_dir, tok, extra={"base_model": str(path), "task": "shakespeare-genre"})
        reloaded = load_encoder(model_dir)
        with torch.no_grad():
            diff = (reloaded(input_ids=te_x[:4]).logits - student(input_ids=te_x[:4]).logits).abs().max().item()
        row = {"feature_map": fm, "accuracy_init": acc_init, "accuracy_stage1": acc1, "accuracy": acc2,
               "accuracy_recovery": acc2 / teacher_acc, "accuracy_recovery_stage1": acc1 / teacher_acc,
               "embedding_cosine_stage1": cos1, "embedding_cosine": cos2,
               "mean_kl_before": sum(d["kl"] for d in kl_before) / len(kl_before),
               "mean_kl_after": sum(d["kl"] for d in kl_after) / len(kl_after),
               "attention_kl_before": kl_before, "attention_kl_after": kl_after,
               "stage1": {k: v for k, v in s1.items() if k != "history"}, "stage2": s2,
               "reload_max_abs_logit_diff": diff, "seconds": time.perf_counter() - t_map, "model_dir": str(model_dir)}
        log.info("%s: accuracy init %.4f, after stage 1 %.4f, after finetune %.4f (%.1f%% of softmax); "
                 "embedding cosine %.4f -> %.4f", fm, acc_init, acc1, acc2, 100 * acc2 / teacher_acc, cos1, cos2)
        rows.append(row)
        report = {"model": job.model, "model_path": str(path), "task": "shakespeare genre (comedy/history/tragedy)",
                  "passages": counts, "test_examples": len(te_y), "teacher_accuracy": teacher_acc,
                  "teacher_val_accuracy": teacher_val_acc, "teacher": t_rep, "rows": rows,
                  "wall_s": time.perf_counter() - t_start, "settings": asdict(job)}
        write_json(out / "report.json", report)
    return report


def format_report(rep: Dict) -> str:
    lines = [f"task: {rep['task']}, {rep['test_examples']} test passages; softmax teacher accuracy "
             f"{100 * rep['teacher_accuracy']:.2f}%",
             "| feature map | acc. untrained | after stage 1 | after finetune | recovery | emb. cosine (s1 -> final) | "
             "attn KL/layer |", "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['feature_map']} | {100 * r['accuracy_init']:.2f}% | {100 * r['accuracy_stage1']:.2f}% | "
                     f"{100 * r['accuracy']:.2f}% | {100 * r['accuracy_recovery']:.1f}% | "
                     f"{r['embedding_cosine_stage1']:.3f} -> {r['embedding_cosine']:.3f} | "
                     f"{r['mean_kl_before']:.3f} -> {r['mean_kl_after']:.3f} |")
    return "\n".join(lines)
