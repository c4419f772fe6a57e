"""Language modelling from scratch (`hedgehog train`): training with checkpoints and resume, several kinds on
the same tokens, paired evaluation of finished runs, tables and curves."""
from __future__ import annotations

import logging
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from hedgehog.eval.fidelity import perplexity
from hedgehog.layers.attention import Mode, hedgehog_layers, set_attention_mode
from hedgehog.train.engine import Engine, resolve_device
from hedgehog.train.resume import StageCheckpoint, restore_params, restore_training_state, training_state
from hedgehog.utils.atomic import write_json
from hedgehog.train.scratch.model import (ByteTokenizer, KINDS, ModelSpec, _with_mimic, build_model, mimic_rows_for_step,
                                    set_mimic_rows, set_train_mode)

log = logging.getLogger("hedgehog")


# ------------------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoint.pt, the one resumable-training format (hedgehog.train.resume); it holds every weight,
# so a finished run reloads from it too
# ------------------------------------------------------------------------------------------------
CHECKPOINT_NAME = "checkpoint.pt"
# what may differ between a run and its resume: where it runs and how long (a resume may extend the budget)
_NOT_SETTINGS = ("out", "resume", "progress", "device", "minutes", "checkpoint_every", "tokens")


def _run_checkpoint(out: Path, settings: Dict, every: int, extra: Optional[Dict] = None) -> StageCheckpoint:
    """``OUT/checkpoint.pt`` for a job whose settings (``asdict(TrainJob)``) are ``settings``."""
    fixed = {k: v for k, v in settings.items() if k not in _NOT_SETTINGS}
    return StageCheckpoint(Path(out) / CHECKPOINT_NAME, every, fixed, extra)


# ------------------------------------------------------------------------------------------------
# language modelling from scratch
# ------------------------------------------------------------------------------------------------


@dataclass


class TrainJob:
    out: str = "runs/scratch/hedgehog"
    attention: str = "hedgehog"
    data: str = "shakespeare"
    text_field: Optional[str] = None  # record data: as ConvertJob.text_field
    data_format: str = "auto"
    seq_len: int = 256
    batch_size: int = 16
    tokens: int = 1_048_576  # training budget (equal across kinds in a comparison)
    minutes: Optional[float] = None  # optional wall-clock cap
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mimic_weight: float = 1.0
    # > 0: the mimic loss over this many random query rows per step (fresh each step, every row against all
    # its keys): an unbiased estimate at O(rows x seq_len) instead of O(seq_len^2). 0: every row
    mimic_rows: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    eval_points: int = 8  # validation perplexity measurements along training
    val_tokens: int = 32768
    test_tokens: int = 131072
    checkpoint_every: int = 50  # optimizer steps
    resume: bool = False
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'auto' (resolve_device); windows move there per batch


def _lm_perplexity(model, windows) -> float:
    return perplexity(model, windows, batch_size=16, progress=False)


def _lm_spec(model: ModelSpec, seq_len: int) -> ModelSpec:
    """The model a ``train_lm`` job builds from its ``model`` setting: byte vocabulary, room for one window."""
    return ModelSpec(**{**asdict(model), "vocab_size": ByteTokenizer.vocab_size,
                        "max_len": max(model.max_len, seq_len)})


def train_lm(job: TrainJob) -> Dict:
    """Train one kind on the corpus' training split; report validation/test perplexity (per byte)."""
    from hedgehog.data.corpora import load_corpus, shuffled_windows, tokenize_windows

    kind = job.attention
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
    engine = Engine(job.device, progress=job.progress)
    engine.check_batch(job.batch_size, "the batch (--batch-size)")
    dev = engine.device
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    corpus = load_corpus(job.data, text_field=job.text_field, data_format=job.data_format)
    L = job.seq_len
    mimic_rows_for_step(L, job.mimic_rows, job.seed, 0)  # a bad setting stops here, before any work
    train = shuffled_windows(tokenize_windows(corpus.splits["train"], tok, L), job.seed)
    val = tokenize_windows(corpus.splits["validation"], tok, L, max_tokens=job.val_tokens)
    test = tokenize_windows(corpus.splits["test"], tok, L, max_tokens=job.test_tokens)
    spec = _lm_spec(job.model, L)
    model = build_model(kind, spec, seed=job.seed).to(dev)  # built on the CPU: the same init on every device
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "feature_map" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "feature_map" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": job.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=job.lr, betas=(0.9, 0.95))
    total = max(1, job.tokens // (job.batch_size * L))
    eval_every = max(1, total // max(1, job.eval_points))
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "history": [], "curve": []}
    params = list(model.parameters())
    ck = _run_checkpoint(out, asdict(job), job.checkpoint_every,
                         extra={"history": state["history"], "curve": state["curve"]})
    saved = ck.load() if job.resume else None
    if saved is not None:
        restore_training_state(saved, params, opt, ck.path)
        state.update({k: saved[k] for k in ("step", "tokens", "seconds")})
        log.info("%s: resumed at step %d from %s", kind, state["step"], ck.path)

    def save():
        ck.save(training_state(params, opt, **{k: state[k] for k in ("step", "tokens", "seconds")}))
    wrapped, opt = engine.prepare(model, opt)
    set_train_mode(model, kind, job.mimic_weight)
    model.train()
    bar = engine.bar(total=total, initial=state["step"], desc=f"train {kind}", unit="step")
    t0 = time.perf_counter() - state["seconds"]
    while state["step"] < total:
        if job.minutes and engine.any(time.perf_counter() - t0 > job.minutes * 60):
            log.info("%s: stopping at the %.1f-minute cap (step %d of %d)", kind, job.minutes, state["step"], total)
            break
        step = state["step"]
        idx = [(step * job.batch_size + j) % len(train) for j in range(job.batch_size)]
        (batch,) = engine.local(train[idx])
        engine.set_lr(opt, job.lr, step, total, job.warmup_steps)
        if job.mimic_rows:
            rows = mimic_rows_for_step(L, job.mimic_rows, job.seed, step)
            set_mimic_rows(model, None if rows is None else rows.to(dev))
        lm = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
        loss, mimic = _with_mimic(model, lm, job.mimic_weight)
        engine.backward(loss, f"training {kind}, step {step}")
        engine.step(opt, model.parameters(), lr=job.lr, clip=job.grad_clip)
        state["step"] += 1
        state["tokens"] += batch.numel() * engine.world
        state["seconds"] = time.perf_counter() - t0
        losses = engine.means([lm] + ([] if mimic is None else [mimic]))  # one read of both
        rec = {"step": state["step"], "tokens": state["tokens"], "lm_loss": losses[0]}
        if mimic is not None:
            rec["mimic_loss"] = losses[1]
        state["history"].append(rec)
        bar.update(1)
        bar.set_postfix(lm=f"{rec['lm_loss']:.3f}")
        if engine.is_main and (state["step"] % eval_every == 0 or state["step"] == total):
            if kind != "softmax":
                set_attention_mode(model, Mode.STUDENT)
            ppl = _lm_perplexity(model, val)
            set_train_mode(model, kind, job.mimic_weight)
            state["curve"].append({"step": state["step"], "tokens": state["tokens"], "val_ppl": ppl})
            log.info("%s step %d (%d tokens): val ppl %.3f", kind, state["step"], state["tokens"], ppl)
        if ck.due(state["step"]) or state["step"] == total:
            engine.on_main(save)
    bar.close()
    set_mimic_rows(model, None)
    if kind != "softmax":
        set_attention_mode(model, Mode.STUDENT)
    model.eval()
    engine.on_main(save)
    if not engine.is_main:  # the main process evaluates and writes the report
        return {"attention": kind, "steps": state["step"], "tokens": state["tokens"], "rank": engine.rank}
    val_ppl = _lm_perplexity(model, val)
    test_ppl = _lm_perplexity(model, test)
    maps = hedgehog_layers(model)
    report = {
        "attention": kind, "data": job.data, "tokenizer": "bytes", "params": n_params,
        # features per head (the decode state is feature_dim x head_dim per head); None for softmax
        "feature_dim": maps[0].feature_map_q.feature_dim if maps else None,
        "steps": state["step"], "tokens": state["tokens"], "seconds": state["seconds"],
        "val_ppl": val_ppl, "test_ppl": test_ppl, "test_bits_per_byte": math.log2(test_ppl), "device": str(dev),
        "processes": engine.world,
        "final_train_loss": sum(r["lm_loss"] for r in state["history"][-20:]) / max(1, len(state["history"][-20:])),
        "curve": state["curve"], "history": state["history"], "settings": asdict(job),
        "splits": {k: v for k, v in corpus.documents.items() if k != "train"},
    }
    write_json(out / "report.json", report)
    return report


def train_compare(kinds: Sequence[str], job: TrainJob, out: str) -> Dict:
    """Every kind with the same data, budget and settings; one table (JSON) and a loss-curve PNG."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in kinds:
        sub = root / kind
        if job.resume and (sub / "report.json").exists():
            rep = json.loads((sub / "report.json").read_text())
            if rep.get("steps", 0) * job.batch_size * job.seq_len >= job.tokens:
                log.info("%s: finished run found in %s", kind, sub)
                rows.append(rep)
                continue
        rep = train_lm(TrainJob(**{**asdict(job), "model": job.model, "out": str(sub), "attention": kind}))
        if "rank" in rep:  # a worker of a multi-process run: the main process writes the table
            worker = rep
            continue
        rows.append(rep)
        _write_compare(root, rows)
    if "worker" in locals():
        return {"rows": [], **worker}
    return _write_compare(root, rows)


def _write_compare(root: Path, rows: List[Dict]) -> Dict:
    soft = next((r for r in rows if r["attention"] == "softmax"), None)
    table = []
    for r in rows:
        row = {k: r.get(k) for k in ("attention", "feature_dim", "params", "tokens", "seconds", "val_ppl", "test_ppl",
                                     "test_bits_per_byte", "final_train_loss")}
        if soft:
            row["test_ppl_vs_softmax"] = r["test_ppl"] / soft["test_ppl"]
        table.append(row)
    result = {"rows": table, "curves": {r["attention"]: r["curve"] for r in rows}}
    write_json(root / "train_compare.json", result)
    plot_curves(rows, root / "train_compare.png")
    return result


def load_trained(run: Path, device: str = "cpu"):
    """A finished ``train_lm`` run (OUT/<kind> with report.json and checkpoint.pt) as an eval-mode model on
    ``device`` (whatever device it trained on) + its report."""
    run = Path(run)
    if not (run / "report.json").exists():
        raise FileNotFoundError(f"{run} has no report.json: not a finished `hedgehog train` run (finish it with --resume)")
    rep = json.loads((run / "report.json").read_text())
    st = rep["settings"]
    saved = _run_checkpoint(run, st, 1).load()  # refuses a checkpoint of other settings than the report's
    if saved is None:
        raise FileNotFoundError(f"{run} has no {CHECKPOINT_NAME} to load the trained weights from")
    model = build_model(rep["attention"], _lm_spec(ModelSpec(**st["model"]), st["seq_len"]), seed=st.get("seed", 0))
    restore_params(saved, list(model.parameters()), run / CHECKPOINT_NAME)
    if rep["attention"] != "softmax":
        set_attention_mode(model, Mode.STUDENT)
    return model.to(resolve_device(device)).eval(), rep


@torch.no_grad()


def paired_eval(root: str, kinds: Sequence[str], against: Sequence[str], split: str = "test",
                max_tokens: Optional[int] = None, block: int = 16, samples: int = 2000,
                progress: bool = True, device: str = "cpu") -> Dict:
    """Per-window NLL of finished runs ``root/<kind>`` on the same held-out windows, and for each reference in
    ``against`` every other kind's perplexity ratio to it with a paired block-bootstrap 95% interval.

    ``max_tokens``: None = the bytes the runs were evaluated on (their ``val_tokens``/``test_tokens``), 0 = the
    whole split. Writes ``root/paired_<split>.json``.
    """
    from hedgehog.data.corpora import load_corpus, tokenize_windows
    from hedgehog.eval.fidelity import window_nll
    from hedgehog.modules.metrics import paired_bootstrap_ratio

    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    missing = [k for k in against if k not in kinds]
    if missing:
        raise ValueError(f"reference kinds {missing} are not among the compared kinds {list(kinds)}")
    root_p = Path(root)
    nll, reports, setting = {}, {}, None
    for kind in kinds:
        model, rep = load_trained(root_p / kind, device)
        st = rep["settings"]
        key = (st["data"], st["seq_len"], st["val_tokens"], st["test_tokens"])
        if setting is None:
            setting = key
            corpus = load_corpus(st["data"], text_field=st.get("text_field"), data_format=st.get("data_format", "auto"))
            cap = st["test_tokens" if split == "test" else "val_tokens"] if max_tokens is None else (max_tokens or None)
            windows = tokenize_windows(corpus.splits[split], ByteTokenizer(), st["seq_len"], max_tokens=cap)
        elif key != setting:
            raise ValueError(f"{kind} was trained/evaluated with (data, seq_len, val, test) = {key}, not {setting}: "
                             "paired windows need runs of one comparison")
        nll[kind] = window_nll(model, windows, batch_size=16, progress=progress, desc=f"{kind} [{split}]")
        reports[kind] = rep
    rows = {k: {"ppl": math.exp(v.mean().item()), "tokens": reports[k]["tokens"]} for k, v in nll.items()}
    pairs = []
    for ref in against:
        for kind in kinds:
            if kind != ref:
                r = paired_bootstrap_ratio(nll[kind], nll[ref], block=block, samples=samples)
                pairs.append({"kind": kind, "reference": ref, **r})
    result = {"split": split, "windows": int(windows.shape[0]), "bytes": int(windows.numel()), "block": block,
              "samples": samples, "ppl": rows, "pairs": pairs}
    write_json(root_p / f"paired_{split}.json", result)
    return result


def format_paired_table(result: Dict) -> str:
    lines = [f"{result['split']}: {result['windows']} windows, {result['bytes']} bytes; perplexity per byte: " +
             ", ".join(f"{k} {v['ppl']:.3f}" for k, v in result["ppl"].items()),
             "| kind | vs | ppl ratio | 95% interval | P(kind lower) |", "|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['kind']} | {p['reference']} | {p['ratio']:.4f} | {p['lo']:.4f} – {p['hi']:.4f} | "
                     f"{p['p_a_better']:.3f} |")
    return "\n".join(lines)


def plot_curves(rows: List[Dict], path: Path) -> None:
    from hedgehog.eval.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        h = r["history"]
        k = max(1, len(h) // 50)  # moving average over ~2% of training
        xs = [h[i]["tokens"] for i in range(k - 1, len(h))]
        ys = [sum(x["lm_loss"] for x in h[i - k + 1:i + 1]) / k for i in range(k - 1, len(h))]
        a1.plot(xs, ys, label=r["attention"])
        c = r["curve"]
        a2.plot([p["tokens"] for p in c], [p["val_ppl"] for p in c], marker="o", label=r["attention"])
    a1.set(xlabel="training tokens", ylabel="train LM loss (nats/byte, smoothed)", title="training loss")
    a2.set(xlabel="training tokens", ylabel="validation perplexity (per byte)", yscale="log",
           title="held-out plays")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    save_figure(fig, path, dpi=120)


def format_train_table(rows: List[Dict]) -> str:
    lines = ["| attention | F | params | tokens | minutes | val ppl | test ppl | bits/byte | vs softmax |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['test_ppl_vs_softmax']:.3f}x" if "test_ppl_vs_softmax" in r else "-"
        lines.append(f"| {r['attention']} | {r.get('feature_dim') or '-'} | {r['params'] / 1e6:.2f}M | {r['tokens']} | "
                     f"{r['seconds'] / 60:.1f} | "
                     f"{r['val_ppl']:.3f} | {r['test_ppl']:.3f} | {r['test_bits_per_byte']:.3f} | {vs} |")
    return "\n".join(lines)
