"""The main job: pretrained HF model + text -> convert -> stage 1 -> stage 2 -> save -> evaluate -> report.

Cheap checks (numbers, output dir, model config, data) run first. Stage 1 and stage 2 checkpoint into
``OUT/checkpoints/stage{1,2}.pt`` every few steps and at their end (atomic writes); ``resume=True``
continues an interrupted stage where it stopped, and refuses a checkpoint written with other settings. The report (``OUT/report.json``) records settings,
perplexities on the held-out test split, per-layer attention KL before/after stage 1, tokens and wall
seconds per stage, and the validation perplexity curve against tokens.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hedgehog.attention import HedgehogConfig, set_attention_mode
from hedgehog.distill import Stage1Config, Stage2Config, add_lora, attention_transfer, lora_finetune

log = logging.getLogger("hedgehog")


@dataclass
class ConvertJob:
    out: str = "runs/smollm2-hedgehog"
    model: str = "smollm2"
    data: str = "shakespeare"
    feature_map: str = "hedgehog"
    attention: str = "linear"  # or "hybrid": sliding-window softmax + linear attention (LoLCATs)
    window: int = 64
    seq_len: int = 512
    qk_scale: float = 1.0
    distill_loss: str = "ce"
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Optional[Stage2Config] = field(default_factory=Stage2Config)
    eval_tokens: int = 16384
    val_tokens: int = 2048
    kl_windows: int = 2
    curve_points: int = 4
    merge_lora: bool = False
    resume: bool = False
    seed: int = 0
    progress: bool = True


def _write_json(path: Path, obj) -> None:
    from hedgehog.resume import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def load_base(model_name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hedgehog.assets import PLAIN_LOAD, resolve_model_path

    path = resolve_model_path(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 **PLAIN_LOAD).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, path


def resume_settings(job: ConvertJob, fingerprint: Dict) -> Dict:
    """What a mid-stage checkpoint must share with the job resuming it: everything that shapes training
    (not the output, evaluation sizes, progress bars, time caps or checkpoint spacing)."""
    def stage(cfg):
        return None if cfg is None else {k: v for k, v in asdict(cfg).items()
                                         if k not in ("time_budget_s", "checkpoint_every")}

    return {"base_fingerprint": fingerprint, "data": job.data, "feature_map": job.feature_map,
            "attention": job.attention, "window": job.window, "seq_len": job.seq_len, "qk_scale": job.qk_scale,
            "distill_loss": job.distill_loss, "seed": job.seed, "stage1": stage(job.stage1),
            "stage2": stage(job.stage2)}


def _windows(corpus, split: str, tok, L: int, max_tokens=None) -> torch.Tensor:
    from hedgehog.data import tokenize_windows
    from hedgehog.errors import UserError

    try:
        return tokenize_windows(corpus.splits[split], tok, L, max_tokens=max_tokens)
    except ValueError as e:
        raise UserError(f"the {split} split of --data {corpus.name!r} is too short: {e}. Pass a longer text "
                        f"(each split needs at least one window of --seq-len {L} tokens) or a smaller --seq-len.") from e


def run(job: ConvertJob) -> Dict:
    """The main job (see the module docstring). Every cheap check runs before any heavy work."""
    from hedgehog import checkpoint as ckpt
    from hedgehog.assets import portable_model_ref
    from hedgehog.checks import check_convert_job, check_model, check_out_dir, check_text_source
    from hedgehog.convert import convert_model
    from hedgehog.data import load_corpus, shuffled_windows
    from hedgehog.evaluate import layer_attention_kl, perplexity
    from hedgehog.resume import StageCheckpoint

    check_convert_job(job)
    out = check_out_dir(job.out)
    check_text_source(job.data)
    check_model(job.model, job.seq_len)
    torch.manual_seed(job.seed)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}

    t = time.perf_counter()
    model, tok, base_path = load_base(job.model)
    corpus = load_corpus(job.data)
    L = job.seq_len
    train = shuffled_windows(_windows(corpus, "train", tok, L), job.seed)
    val = _windows(corpus, "validation", tok, L, max_tokens=job.val_tokens)
    test = _windows(corpus, "test", tok, L, max_tokens=job.eval_tokens)
    timings["load_s"] = time.perf_counter() - t
    log.info("data: %d train / %d val / %d test windows of %d tokens", len(train), len(val), len(test), L)
    settings = resume_settings(job, ckpt.base_fingerprint(model))
    model_ref = portable_model_ref(job.model)
    curve: List[Dict] = []
    extra = {"curve": curve}
    s1_settings = {k: v for k, v in settings.items() if k != "stage2"}  # stage 1 does not depend on stage 2's
    s1_ckpt = StageCheckpoint(out / "checkpoints" / "stage1.pt", job.stage1.checkpoint_every, s1_settings, extra)
    s2_ckpt = (StageCheckpoint(out / "checkpoints" / "stage2.pt", job.stage2.checkpoint_every, settings, extra)
               if job.stage2 is not None else None)
    if not job.resume:  # a fresh run: earlier checkpoints in this --out are stale
        for c in (s1_ckpt, s2_ckpt):
            if c is not None:
                c.path.unlink(missing_ok=True)
    elif s1_ckpt.path.exists():
        s1_ckpt.load()  # refuse mismatched settings or a corrupt file now, before the teacher evaluation

    t = time.perf_counter()
    teacher_ppl = perplexity(model, test, progress=job.progress, desc="teacher ppl (test)")
    teacher_val_ppl = perplexity(model, val, progress=False)
    timings["teacher_eval_s"] = time.perf_counter() - t

    hh = HedgehogConfig(feature_map=job.feature_map, qk_scale=job.qk_scale, distill_loss=job.distill_loss,
                        attention=job.attention, window=job.window)
    convert_model(model, hh)

    def val_point(stage, tokens, m):
        ppl = perplexity(m, val, progress=False)
        curve.append({"stage": stage, "tokens": tokens, "val_ppl": ppl, "val_ppl_ratio": ppl / teacher_val_ppl})
        log.info("%s @ %d tokens: val ppl %.2f (%.2fx teacher)", stage, tokens, ppl, ppl / teacher_val_ppl)

    t = time.perf_counter()
    kl_windows = val[: job.kl_windows]
    kl_before = layer_attention_kl(model, kl_windows)
    val_point("init", 0, model)
    timings["kl_before_s"] = time.perf_counter() - t

    # ---- stage 1 -------------------------------------------------------------------------------
    every = max(1, (job.stage1.tokens // (job.stage1.batch_size * L)) // max(1, job.curve_points))

    def cb1(rec):
        if rec["batch"] % every == 0:
            set_attention_mode(model, "linear")
            val_point("stage1", rec["tokens"], model)

    s1_report = attention_transfer(model, train, job.stage1, callback=cb1, progress=job.progress,
                                   checkpoint=s1_ckpt)
    ckpt.save_converted(model, out / "checkpoints" / "stage1", base_model=model_ref,
                        extra={"stage1_report": _slim(s1_report)})
    set_attention_mode(model, "linear")
    t = time.perf_counter()
    kl_after = layer_attention_kl(model, kl_windows)
    stage1_ppl = perplexity(model, test, progress=job.progress, desc="student ppl after stage 1 (test)")
    timings["stage1_eval_s"] = time.perf_counter() - t

    # ---- stage 2 -------------------------------------------------------------------------------
    final = model
    s2_report = None
    if job.stage2 is not None and job.stage2.tokens > 0:
        pm = add_lora(model, job.stage2)
        offset = job.stage1.tokens // L  # do not start on stage 1's windows
        train2 = torch.roll(train, -offset % max(1, len(train)), 0)
        every2 = max(1, (job.stage2.tokens // (job.stage2.batch_size * L)) // max(1, job.curve_points))
        s1_tokens = s1_report.get("tokens", 0)

        def cb2(rec):
            if rec["step"] % every2 == 0:
                val_point("stage2", s1_tokens + rec["tokens"], pm)

        s2_report = lora_finetune(pm, train2, job.stage2, callback=cb2, progress=job.progress,
                                  checkpoint=s2_ckpt)
        final = pm

    t = time.perf_counter()
    student_ppl = perplexity(final, test, progress=job.progress, desc="student ppl (test)")
    timings["final_eval_s"] = time.perf_counter() - t

    # ---- save + reload check ---------------------------------------------------------------------
    t = time.perf_counter()
    model_dir = out / "model"
    ckpt.save_converted(final, model_dir, base_model=model_ref, tokenizer=tok, merge_lora=job.merge_lora,
                        extra={"data": job.data, "seq_len": L})
    reloaded, _ = ckpt.load(model_dir, merge_lora=False)  # unmerged: exactly the saved computation
    with torch.no_grad():
        probe = test[:1, :128]
        final.eval()
        ref_logits = final(input_ids=probe, use_cache=False).logits
        new_logits = reloaded(input_ids=probe, use_cache=False).logits
        reload_max_abs_diff = (ref_logits - new_logits).abs().max().item()
    timings["save_reload_s"] = time.perf_counter() - t

    report = {
        "model": job.model,
        "model_path": str(base_path),
        "data": job.data,
        "splits": {k: v for k, v in corpus.documents.items() if k != "train"},
        "teacher_ppl": teacher_ppl,
        "student_ppl_stage1": stage1_ppl,
        "student_ppl": student_ppl,
        "ppl_ratio": student_ppl / teacher_ppl,
        "ppl_ratio_stage1": stage1_ppl / teacher_ppl,
        "test_tokens": int(test.numel()),
        "attention_kl_before": kl_before,
        "attention_kl_after": kl_after,
        "mean_kl_before": sum(d["kl"] for d in kl_before) / len(kl_before),
        "mean_kl_after": sum(d["kl"] for d in kl_after) / len(kl_after),
        "stage1": _slim(s1_report),
        "stage2": _slim(s2_report) if s2_report else None,
        "curve": curve,
        "reload_max_abs_logit_diff": reload_max_abs_diff,
        "timings_s": timings,
        "wall_s": time.perf_counter() - t_start,
        "settings": asdict(job),
        "model_dir": str(model_dir),
    }
    _write_json(out / "report.json", report)
    return report


def _slim(rep: Optional[Dict]) -> Optional[Dict]:
    if rep is None:
        return None
    rep = dict(rep)
    hist = rep.pop("history", None)
    if hist:
        rep["loss_first"] = hist[0]["loss"]
        rep["loss_last"] = hist[-1]["loss"]
        rep["loss_curve"] = [(h["tokens"], round(h["loss"], 4)) for h in hist[:: max(1, len(hist) // 50)]]
    return rep


def format_report(r: Dict) -> str:
    lines = [
        f"{'model':<28} {r['model']}",
        f"{'data (test plays)':<28} {r['data']} {', '.join(r['splits'].get('test', []))}",
        f"{'teacher ppl (test)':<28} {r['teacher_ppl']:.2f}",
        f"{'student ppl after stage 1':<28} {r['student_ppl_stage1']:.2f}  ({r['ppl_ratio_stage1']:.2f}x)",
        f"{'student ppl (final)':<28} {r['student_ppl']:.2f}  ({r['ppl_ratio']:.3f}x teacher)",
        f"{'attention KL / layer':<28} {r['mean_kl_before']:.3f} -> {r['mean_kl_after']:.3f}",
    ]
    for name in ("stage1", "stage2"):
        s = r.get(name)
        if s:
            lines.append(f"{name + ' tokens / seconds':<28} {s.get('tokens', 0)} / {s.get('seconds', 0):.0f}"
                         + (f"  (loss {s['loss_first']:.3f} -> {s['loss_last']:.3f})" if "loss_first" in s else ""))
    lines.append(f"{'reload max |logit diff|':<28} {r['reload_max_abs_logit_diff']:.2e}")
    lines.append(f"{'wall seconds':<28} {r['wall_s']:.0f}")
    if r.get("curve"):
        lines.append("curve (stage, tokens, val ppl ratio): " + ", ".join(
            f"{c['stage']}@{c['tokens']}:{c['val_ppl_ratio']:.2f}x" for c in r["curve"]))
    return "\n".join(lines)


def compare(maps: List[str], base_job: ConvertJob, out: str) -> Dict:
    """Convert with every feature map under the same token budgets; one table + plot in ``out``.

    An entry ``hybrid`` (or ``hybrid:<map>``) runs the sliding-window hybrid with the hedgehog (or that) map.
    """
    import copy

    rows = []
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name in maps:
        job = copy.deepcopy(base_job)
        job.attention, job.feature_map = parse_compare_entry(name)
        job.out = str(root / name.replace(":", "-"))
        log.info("=== compare: %s ===", name)
        r = run(job)
        rows.append({"feature_map": name, "teacher_ppl": r["teacher_ppl"], "student_ppl_stage1": r["student_ppl_stage1"],
                     "student_ppl": r["student_ppl"], "ppl_ratio": r["ppl_ratio"], "ppl_ratio_stage1": r["ppl_ratio_stage1"],
                     "mean_kl_before": r["mean_kl_before"], "mean_kl_after": r["mean_kl_after"],
                     "stage1_tokens": (r["stage1"] or {}).get("tokens", 0),
                     "stage2_tokens": (r["stage2"] or {}).get("tokens", 0), "wall_s": r["wall_s"]})
        result = {"rows": rows, "settings": asdict(base_job)}
        _write_json(root / "compare.json", result)  # after every map: nothing lost on a crash
    _plot_compare(rows, root / "compare.png")
    return result


def parse_compare_entry(name: str):
    """'elu' -> ('linear', 'elu'); 'hybrid' -> ('hybrid', 'hedgehog'); 'hybrid:elu' -> ('hybrid', 'elu')."""
    if name == "hybrid" or name.startswith("hybrid:"):
        return "hybrid", name.partition(":")[2] or "hedgehog"
    return "linear", name


def format_compare(rows: List[Dict]) -> str:
    head = f"{'feature map':<14} {'KL before':>9} {'KL after':>9} {'ppl stage1':>11} {'ppl final':>10} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r["ppl_ratio"]):
        lines.append(f"{r['feature_map']:<14} {r['mean_kl_before']:>9.3f} {r['mean_kl_after']:>9.3f} "
                     f"{r['student_ppl_stage1']:>11.1f} {r['student_ppl']:>10.2f} {r['ppl_ratio']:>6.2f}x")
    if rows:
        lines.append(f"teacher ppl {rows[0]['teacher_ppl']:.2f}")
    return "\n".join(lines)


def _plot_compare(rows: List[Dict], path: Path) -> None:
    from hedgehog.plotting import pyplot

    plt = pyplot()

    rows = sorted(rows, key=lambda r: r["ppl_ratio"])
    names = [r["feature_map"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [r["ppl_ratio"] for r in rows], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("student / teacher perplexity (test)")
    axes[0].set_title("perplexity ratio after conversion")
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r["mean_kl_before"] for r in rows], width=0.4, label="before stage 1")
    axes[1].bar([i + 0.2 for i in x], [r["mean_kl_after"] for r in rows], width=0.4, label="after stage 1")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("KL(softmax || linear) per layer")
    axes[1].set_title("attention fidelity")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
