"""The main job in four steps over one :class:`JobContext`:

    prepare  cheap checks (numbers, output dir, model config, data), then the base model, the data, the teacher's
             validation perplexity, conversion and the attention KL before training
    stage_1  attention transfer (the feature maps), the attention KL after it, fidelity on every text
    stage_2  LoRA (KD to the teacher by default)
    finalize fidelity, long context and passkey; LoRA merged, the model saved with its card, reloaded and checked;
             ``OUT/report.json`` and ``long_context.png``

Stage 1 and stage 2 checkpoint their training state into ``OUT/checkpoints/stage{1,2}.pt`` every few steps and
at their end (atomic writes; nothing else lives under ``checkpoints/``); ``resume=True`` continues an interrupted stage where it stopped, and refuses a checkpoint written with
other settings. Under ``torchrun`` every rank trains its share; the main process alone evaluates, saves and reports,
so :func:`run` returns the report there and None on the other ranks. :func:`compare` runs the job once per
feature map under the same budgets.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from hedgehog.eval import long_context as lc
from hedgehog.eval.report import mean_fidelity, plot_compare, slim_stage_report
from hedgehog.jobs.config import (ConvertJob, eval_names, for_device, hedgehog_config, parse_compare_entry,
                                  resume_settings, stage2_seq_len, with_position_offsets)
from hedgehog.layers.attention import Mode, set_attention_mode
from hedgehog.train.stage1 import attention_transfer
from hedgehog.train.stage2 import add_lora, lora_finetune
from hedgehog.train.engine import Engine
from hedgehog.train.resume import StageCheckpoint
from hedgehog.utils.atomic import write_json

log = logging.getLogger("hedgehog")


@dataclass
class JobContext:
    """What the steps share: the job (position offsets resolved), where it runs, the model and its data, and what
    the steps have measured so far (each step fills its fields). Built by :func:`prepare`."""
    job: ConvertJob
    out: Path
    engine: Engine
    dtype: torch.dtype
    model: nn.Module  # converted in place by prepare; stage 2 wraps it in ``final``
    tok: Any
    base_path: str
    model_ref: str  # the base as the saved directory records it
    corpus: Any
    held_out: Dict[str, Any]  # name -> corpus of each held-out text
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    eval_sets: Dict[str, torch.Tensor]  # label -> windows scored for fidelity (the test split first)
    in_domain: str
    t_start: float
    checkpoints: Dict[str, Optional[StageCheckpoint]] = field(default_factory=dict)  # stage -> its file
    timings: Dict[str, float] = field(default_factory=dict)
    curve: List[Dict] = field(default_factory=list)
    teacher_val_ppl: Optional[float] = None
    kl_before: Optional[List[Dict]] = None
    kl_after: Optional[List[Dict]] = None
    s1_report: Optional[Dict] = None
    s2_report: Optional[Dict] = None
    fid_stage1: Optional[Dict] = None
    final: Optional[nn.Module] = None  # the model stage 2 trained (peft), else ``model``

    @property
    def main(self) -> bool:
        return self.engine.is_main

    @contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t

    def val_point(self, stage: str, tokens: int, m: nn.Module) -> None:
        """A point of the validation curve (main process only)."""
        if not self.main:
            return
        from hedgehog.eval.fidelity import perplexity

        ppl = perplexity(m, self.val, progress=False)
        self.curve.append({"stage": stage, "tokens": tokens, "val_ppl": ppl,
                           "val_ppl_ratio": ppl / self.teacher_val_ppl})
        log.info("%s @ %d tokens: val ppl %.2f (%.2fx teacher)", stage, tokens, ppl, ppl / self.teacher_val_ppl)

    def score(self, stage: str, m: nn.Module) -> Optional[Dict]:
        """Fidelity to the teacher on every text (main process only)."""
        if not self.main:
            return None
        from hedgehog.eval.fidelity import fidelity

        res = {}
        for name, w in self.eval_sets.items():
            res[name] = f = fidelity(m, w, progress=self.job.progress, desc=f"{stage}: {name}")
            log.info("%s, %s: ppl %.2f vs teacher %.2f (%.3fx), top-1 agreement %.3f, KL %.3f/token", stage, name,
                     f["student_ppl"], f["teacher_ppl"], f["ppl_ratio"], f["top1_agreement"], f["kl_per_token"])
        return res

    def attention_kl(self) -> Optional[List[Dict]]:
        from hedgehog.eval.fidelity import layer_attention_kl

        return layer_attention_kl(self.model, self.val[: self.job.kl_windows]) if self.main else None


@dataclass(frozen=True)
class ConvertResult:
    """What the main job made: ``report`` (``report.json``'s content), the converted model's directory and the
    report's file, both under the job's ``out``."""

    report: Dict[str, Any]
    model_dir: Path
    report_path: Path


def run(job: ConvertJob) -> Optional[ConvertResult]:
    """The main job (see the module docstring): its result on the main process, None on the other ranks."""
    ctx = prepare(job)
    stage_1(ctx)
    stage_2(ctx)
    if not ctx.main:  # the main process evaluates, saves and reports; this rank's training work is done
        ctx.engine.wait()
        return None
    report = finalize(ctx)
    return ConvertResult(report=report, model_dir=ctx.out / "model", report_path=ctx.out / "report.json")


def prepare(job: ConvertJob) -> JobContext:
    """Every cheap check before any heavy work; then the base, the data, the teacher's validation perplexity,
    the conversion and the attention KL before training."""
    from hedgehog.data.assets import portable_model_ref
    from hedgehog.data.corpora import eval_documents, load_corpus, split_windows, text_label
    from hedgehog.eval.fidelity import perplexity
    from hedgehog.jobs.checks import check_convert_job, check_model, check_out_dir, check_text_source
    from hedgehog.models import formats
    from hedgehog.models.loading import load_base
    from hedgehog.models.convert import convert_model
    from hedgehog.train.engine import parse_dtype

    check_convert_job(job)
    out = check_out_dir(job.out)
    check_text_source(job.data, job.text_field, job.data_format)
    for source in job.eval_data or ():
        check_text_source(source)
    L2 = stage2_seq_len(job)  # stage 2's windows, the longest when they differ from --seq-len's
    check_model(job.model, max(job.seq_len, L2), revision=job.revision, trust_remote_code=job.trust_remote_code,
                flag="--stage2-seq-len" if L2 > job.seq_len else "--seq-len")
    # One process by default; under torchrun / accelerate launch every rank trains on its share of each
    # batch, and the main process alone evaluates and writes (the others wait at the next collective).
    engine = Engine(job.device, progress=job.progress)
    job = for_device(job, engine.device)  # dtype "auto" and the batch scale (larger batches on CUDA)
    dtype = parse_dtype(job.dtype)
    log.info("device %s: weights %s, stage 1 batch %d / %d tokens, stage 2 batch %s / %s tokens (batch scale %d)",
             engine.device, job.dtype, job.stage1.batch_size, job.stage1.tokens,
             job.stage2 and job.stage2.batch_size, job.stage2 and job.stage2.tokens, job.batch_scale)
    torch.manual_seed(job.seed)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    t = time.perf_counter()
    model, tok, base_path = load_base(job.model, job.revision, job.trust_remote_code, dtype=dtype)
    job = with_position_offsets(job, model.config)
    model.to(engine.device)
    corpus = load_corpus(job.data, tok, job.text_field, job.data_format)
    held_out = {name: eval_documents(name, job.data, tok) for name in eval_names(job)}
    L = job.seq_len
    train = train_windows(job, corpus, tok, L)
    val = split_windows(corpus, "validation", tok, L, max_tokens=job.val_tokens)
    test = split_windows(corpus, "test", tok, L, max_tokens=job.eval_tokens)
    in_domain = f"{text_label(job.data)} (test split)"
    eval_sets = {in_domain: test}
    for name, c in held_out.items():
        eval_sets[f"{text_label(name)} (held out)"] = split_windows(c, "test", tok, L, max_tokens=job.fidelity_tokens,
                                                                    shuffle_seed=0)
    load_s = time.perf_counter() - t
    log.info("data: %d train / %d val windows of %d tokens; evaluation: %s", len(train), len(val), L,
             ", ".join(f"{k} {v.numel()} tokens" for k, v in eval_sets.items()))

    ctx = JobContext(job=job, out=out, engine=engine, dtype=dtype, model=model, tok=tok, base_path=str(base_path),
                     model_ref=portable_model_ref(job.model), corpus=corpus, held_out=held_out, train=train, val=val,
                     test=test, eval_sets=eval_sets, in_domain=in_domain, t_start=t_start,
                     timings={"load_s": load_s})
    ctx.checkpoints = _stage_checkpoints(ctx, resume_settings(job, formats.base_fingerprint(model)))

    with ctx.timed("teacher_eval_s"):
        if ctx.main:
            ctx.teacher_val_ppl = perplexity(model, val, progress=job.progress, desc="teacher ppl (validation)")
    convert_model(model, hedgehog_config(job))
    with ctx.timed("kl_before_s"):
        ctx.kl_before = ctx.attention_kl()
        ctx.val_point("init", 0, model)
    return ctx


def _stage_checkpoints(ctx: JobContext, settings: Dict) -> Dict[str, Optional[StageCheckpoint]]:
    """Each stage's checkpoint file; a fresh run deletes stale ones, a resumed run checks stage 1's now (settings,
    a corrupt file), before the teacher evaluation."""
    job, ck = ctx.job, ctx.out / "checkpoints"
    extra = {"curve": ctx.curve}  # the validation curve resumes with the stage
    s1_settings = {k: v for k, v in settings.items() if k != "stage2"}  # stage 1 does not depend on stage 2's
    out = {"stage1": StageCheckpoint(ck / "stage1.pt", job.stage1.checkpoint_every, s1_settings, extra),
           "stage2": (StageCheckpoint(ck / "stage2.pt", job.stage2.checkpoint_every, settings, extra)
                      if job.stage2 is not None else None)}
    if not job.resume:  # a fresh run: earlier checkpoints in this --out are stale
        for c in out.values():
            if c is not None and ctx.main:
                c.path.unlink(missing_ok=True)
    elif out["stage1"].path.exists():
        out["stage1"].load()
    ctx.engine.wait()
    return out


def stage_1(ctx: JobContext) -> None:
    """Attention transfer; the model after it saved (light: the maps, on the recorded base) to
    ``OUT/stage1_model``, which ``hedgehog eval`` and ``generate`` load; KL and fidelity after it."""
    from hedgehog.models import formats

    job, model, L = ctx.job, ctx.model, ctx.job.seq_len
    every = max(1, (job.stage1.tokens // (job.stage1.batch_size * L)) // max(1, job.curve_points))

    def on_batch(rec):
        if rec["batch"] % every == 0:
            set_attention_mode(model, Mode.STUDENT)
            ctx.val_point("stage1", rec["tokens"], model)

    ctx.s1_report = attention_transfer(model, ctx.train, job.stage1, callback=on_batch, progress=job.progress,
                                       checkpoint=ctx.checkpoints["stage1"], engine=ctx.engine)
    if ctx.main:
        formats.save_converted(model, ctx.out / "stage1_model", base_model=ctx.model_ref,
                               extra={"stage1_report": slim_stage_report(ctx.s1_report)}, format="light")
    set_attention_mode(model, Mode.STUDENT)
    with ctx.timed("stage1_eval_s"):
        ctx.kl_after = ctx.attention_kl()
        ctx.fid_stage1 = ctx.score("after stage 1", model)
    ctx.final = model


def stage_2(ctx: JobContext) -> None:
    """LoRA on the converted model (``ctx.final`` becomes the peft model); nothing when the job has no stage 2."""
    job, L = ctx.job, stage2_seq_len(ctx.job)
    if job.stage2 is None or job.stage2.tokens <= 0:
        return
    pm = add_lora(ctx.model, job.stage2)
    train2 = ctx.train if L == job.seq_len else train_windows(job, ctx.corpus, ctx.tok, L)
    offset = job.stage1.tokens // L  # do not start on stage 1's windows
    train2 = torch.roll(train2, -offset % max(1, len(train2)), 0)
    every = max(1, (job.stage2.tokens // (job.stage2.batch_size * L)) // max(1, job.curve_points))
    s1_tokens = ctx.s1_report.get("tokens", 0)

    def on_step(rec):
        if rec["step"] % every == 0:
            ctx.val_point("stage2", s1_tokens + rec["tokens"], pm)

    ctx.s2_report = lora_finetune(pm, train2, job.stage2, callback=on_step, progress=job.progress,
                                  checkpoint=ctx.checkpoints["stage2"], engine=ctx.engine)
    ctx.final = pm


def train_windows(job: ConvertJob, corpus, tok, L: int) -> torch.Tensor:
    """The training split in shuffled windows of ``L`` tokens: stage 1's, and stage 2's where its windows are
    longer. Only what the stages use is tokenised (documents in a seeded order, so the cap samples the whole
    corpus)."""
    from hedgehog.data.corpora import shuffled_windows, split_windows

    budget = job.stage1.tokens + (job.stage2.tokens if job.stage2 else 0) + L
    return shuffled_windows(split_windows(corpus, "train", tok, L, max_tokens=budget, shuffle_seed=job.seed),
                            job.seed)


def finalize(ctx: JobContext) -> Dict:
    """Main process: final fidelity, long context, the saved model (LoRA merged, its card written once from the
    report), the reload check, ``report.json`` and the long-context figure. Returns the report."""
    from hedgehog.data.corpora import text_label
    from hedgehog.models import formats, loading

    job, final = ctx.job, ctx.final
    with ctx.timed("final_eval_s"):
        fid_final = ctx.score("final", final) if final is not ctx.model else ctx.fid_stage1
    with ctx.timed("long_context_s"):
        long_context = None
        if job.context_lengths:
            texts = {text_label(name): c.splits["test"] for name, c in ctx.held_out.items()}
            long_context = lc.long_context_report(final, texts, ctx.tok, job.window, job.context_lengths,
                                                  job.context_tokens, job.baseline_sinks, job.passkey_lengths,
                                                  job.passkey_trials, progress=job.progress)
    report = _report(ctx, fid_final, long_context)

    t = time.perf_counter()
    model_dir = ctx.out / "model"
    if final is not ctx.model:
        final = formats.merge_lora(final)  # what the directory holds, so the reload check compares like with like
    formats.save_converted(final, model_dir, base_model=ctx.model_ref, tokenizer=ctx.tok,
                           extra={"data": job.data, "seq_len": job.seq_len, "base_revision": job.revision,
                                  "stage1_tokens": job.stage1.tokens,
                                  "stage2_tokens": job.stage2.tokens if job.stage2 else 0},
                           format=job.save_format, report=report)
    reloaded, _ = loading.load(model_dir, dtype=ctx.dtype, device=ctx.engine.device)
    with torch.no_grad():
        probe = ctx.test[:1, :128].to(ctx.engine.device)
        final.eval()
        diff = (final(input_ids=probe, use_cache=False).logits - reloaded(input_ids=probe, use_cache=False).logits)
    ctx.timings["save_reload_s"] = time.perf_counter() - t

    report.update(reload_max_abs_logit_diff=diff.abs().max().item(), timings_s=ctx.timings,
                  wall_s=time.perf_counter() - ctx.t_start)
    write_json(ctx.out / "report.json", report)
    if long_context:
        from hedgehog.eval.report import plot_long_context

        for where in (ctx.out, model_dir):  # the report's figure, and the model card's
            plot_long_context(long_context, where / "long_context.png")
    ctx.engine.wait()
    return report


def _report(ctx: JobContext, fid_final: Dict, long_context: Optional[Dict]) -> Dict:
    """``report.json``'s content (the reload check, timings and wall time are added once they are known)."""
    from hedgehog.data.corpora import text_label

    job, dom, fid1 = ctx.job, ctx.in_domain, ctx.fid_stage1
    held = [k for k in ctx.eval_sets if k != dom]
    return {
        "model": job.model,
        "model_path": ctx.base_path,
        "data": job.data,
        "splits": {k: v for k, v in ctx.corpus.documents.items() if k != "train"},
        "teacher_ppl": fid_final[dom]["teacher_ppl"],
        "student_ppl_stage1": fid1[dom]["student_ppl"],
        "student_ppl": fid_final[dom]["student_ppl"],
        "ppl_ratio": fid_final[dom]["ppl_ratio"],
        "ppl_ratio_stage1": fid1[dom]["ppl_ratio"],
        "test_tokens": int(ctx.test.numel()),
        "fidelity": {"stage1": fid1, "final": fid_final},
        # the headline: the mean over the held-out texts the job never trained on
        "held_out": {stage: mean_fidelity([f[k] for k in held]) for stage, f in
                     (("stage1", fid1), ("final", fid_final))} if held else None,
        "held_out_rule": ctx.corpus.rule,
        "eval_texts": {name: {"documents": len(c.splits["test"]),
                              "tokens": int(ctx.eval_sets[f"{text_label(name)} (held out)"].numel())}
                       for name, c in ctx.held_out.items()},
        "attention_kl_before": ctx.kl_before,
        "attention_kl_after": ctx.kl_after,
        "mean_kl_before": sum(d["kl"] for d in ctx.kl_before) / len(ctx.kl_before),
        "mean_kl_after": sum(d["kl"] for d in ctx.kl_after) / len(ctx.kl_after),
        "stage1": slim_stage_report(ctx.s1_report),
        "stage2": slim_stage_report(ctx.s2_report) if ctx.s2_report else None,
        "curve": ctx.curve,
        "long_context": long_context,
        "settings": asdict(job),
        "model_dir": str(ctx.out / "model"),
        "device": str(ctx.engine.device),
        "processes": ctx.engine.world,
    }


def compare(maps: List[str], base_job: ConvertJob, out: str) -> Optional[Dict]:
    """Convert with every feature map under the same token budgets; one table + plot in ``out``. None on the
    worker ranks of a multi-process run (the main process writes the table).

    An entry ``hybrid`` (or ``hybrid:<map>``) runs the sliding-window hybrid with the hedgehog (or that) map.
    """
    import copy

    from hedgehog.errors import UserError

    if not maps:
        raise UserError("compare needs at least one feature map: pass --feature-maps with comma-separated names, "
                        "e.g. --feature-maps hedgehog,elu,hybrid")
    rows: List[Dict] = []
    result: Optional[Dict] = {"rows": rows, "settings": asdict(base_job)}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name in maps:
        job = copy.deepcopy(base_job)
        job.attention, job.feature_map = parse_compare_entry(name)
        job.out = str(root / name.replace(":", "-"))
        log.info("=== compare: %s ===", name)
        res = run(job)
        if res is None:  # a worker of a multi-process run
            result = None
            continue
        r = res.report
        rows.append({"feature_map": name, "teacher_ppl": r["teacher_ppl"], "student_ppl_stage1": r["student_ppl_stage1"],
                     "student_ppl": r["student_ppl"], "ppl_ratio": r["ppl_ratio"], "ppl_ratio_stage1": r["ppl_ratio_stage1"],
                     "mean_kl_before": r["mean_kl_before"], "mean_kl_after": r["mean_kl_after"],
                     "stage1_tokens": (r["stage1"] or {}).get("tokens", 0),
                     "stage2_tokens": (r["stage2"] or {}).get("tokens", 0), "wall_s": r["wall_s"],
                     "held_out": (r["held_out"] or {}).get("final")})
        write_json(root / "compare.json", result)  # after every map: nothing lost on a crash
    if result is not None:
        plot_compare(rows, root / "compare.png")
    return result
