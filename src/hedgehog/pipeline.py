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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from hedgehog import long_context as lc
from hedgehog.atomic import write_json
from hedgehog.attention import HedgehogConfig, set_attention_mode
from hedgehog.distill import Stage1Config, Stage2Config, add_lora, attention_transfer, lora_finetune
from hedgehog.report import mean_fidelity, plot_compare, slim_stage_report

log = logging.getLogger("hedgehog")


@dataclass
class ConvertJob:
    out: str = "runs/smollm2-hedgehog"
    model: str = "smollm2"
    data: str = "general"
    text_field: Optional[str] = None  # record data (.jsonl, .parquet, ...): the column holding plain text
    data_format: str = "auto"  # record data: "auto", "plain", "instruction" (Alpaca) or "chat" (messages)
    # Held-out texts never trained on, each scored against the teacher after stage 1 and at the end
    # (None: git-docs, debian-devref and Shakespeare's test plays, less any the job trains on).
    eval_data: Optional[Tuple[str, ...]] = None
    feature_map: str = "hedgehog"
    # "hybrid" (LoLCATs): sliding-window softmax + linear attention; "linear": pure Hedgehog (the paper's).
    # The hybrid is the default because it keeps the teacher's quality on held-out text (docs/results.md).
    attention: str = "hybrid"
    window: int = 64
    # Long context (hybrid): the first `sinks` tokens stay in the exact softmax part, and the linear state decays
    # by a learned per-KV-head factor lambda (initially `state_decay`; None: a plain sum). Without them the
    # hybrid's linear part outgrows its window past the training length (docs/results.md, long context).
    sinks: int = 4
    state_decay: Optional[float] = 0.99
    # Inference (hybrid, LoLA): `sparse_cache` older keys per KV head kept exact, those the linear state reads back
    # worst, re-chosen every `sparse_chunk` tokens; training is unchanged. 0: none (docs/results.md, passkey).
    sparse_cache: int = 0
    sparse_chunk: int = 32
    sparse_score: str = "memory"
    seq_len: int = 512
    # Training windows start at random positions up to this offset (both stages), so the maps see the post-RoPE
    # q/k of every position the model is used at (without it the student collapses past the training length,
    # docs/results.md). None ("auto"): the model's context less seq_len (at most 8192 - seq_len); 0: positions
    # 0..seq_len-1 only. The stage configs' own position_offsets are set from this.
    position_offsets: Optional[int] = None
    qk_scale: float = 1.0
    distill_loss: str = "ce"
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Optional[Stage2Config] = field(default_factory=Stage2Config)
    eval_tokens: int = 16384  # the training data's own test split
    fidelity_tokens: int = 4096  # per held-out text
    val_tokens: int = 2048
    kl_windows: int = 2
    curve_points: int = 4
    # Long context, in every report: fidelity on each held-out text at these lengths (up to the model's maximum),
    # `context_tokens` tokens per length and text, beside the teacher limited to the window + `baseline_sinks`
    # tokens with no training; passkey retrieval at `passkey_lengths` (`passkey_trials` keys each). Empty: skip.
    context_lengths: Tuple[int, ...] = lc.DEFAULT_LENGTHS
    context_tokens: int = lc.CONTEXT_TOKENS
    baseline_sinks: int = lc.BASELINE_SINKS
    passkey_lengths: Tuple[int, ...] = lc.PASSKEY_LENGTHS
    passkey_trials: int = lc.PASSKEY_TRIALS
    revision: Optional[str] = None  # of a hub --model: a branch, tag or commit
    trust_remote_code: bool = False  # let a hub --model run its own modelling code
    save_format: str = "hf"  # "hf": every weight (stands alone); "light": only what conversion changed, on the base
    resume: bool = False
    seed: int = 0
    progress: bool = True
    # 'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'; under torchrun / accelerate launch, each rank's own
    device: str = "auto"
    dtype: str = "fp32"  # the base model's weights: fp32, bf16 or fp16 (feature maps and LoRA train in fp32)


def hybrid_settings(job: ConvertJob) -> Dict:
    """The long-context settings of the hybrid (``sinks``, ``state_decay``, the sparse cache) for
    :class:`HedgehogConfig`; none for pure linear attention, which they do not apply to."""
    if job.attention != "hybrid":
        return {}
    return {"sinks": job.sinks, "state_decay": job.state_decay, "sparse_cache": job.sparse_cache,
            "sparse_chunk": job.sparse_chunk, "sparse_score": job.sparse_score}


LONGEST_OFFSET_CONTEXT = 8192  # auto position offsets reach at most this context


def position_offsets(job: ConvertJob, model_config) -> int:
    """The largest training position offset: ``job.position_offsets``, or with None the model's maximum context
    (``max_position_embeddings``, at most :data:`LONGEST_OFFSET_CONTEXT`) less ``seq_len``."""
    if job.position_offsets is not None:
        return job.position_offsets
    top = min(getattr(model_config, "max_position_embeddings", None) or job.seq_len, LONGEST_OFFSET_CONTEXT)
    return max(0, top - job.seq_len)


def with_position_offsets(job: ConvertJob, model_config) -> ConvertJob:
    """``job`` with its stage configs' ``position_offsets`` set from :func:`position_offsets`."""
    off = position_offsets(job, model_config)
    return replace(job, position_offsets=off, stage1=replace(job.stage1, position_offsets=off),
                   stage2=job.stage2 and replace(job.stage2, position_offsets=off))


def load_base(model_name: str, revision: Optional[str] = None, trust_remote_code: bool = False,
              dtype: torch.dtype = torch.float32):
    """The softmax model ``--model`` names (alias, directory, .gguf or hub id at ``revision``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hedgehog.assets import PLAIN_LOAD, hub_kwargs, resolve_model_path

    from hedgehog.convert import teacher_attn_implementation

    path = resolve_model_path(model_name)
    hub = hub_kwargs(revision, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=teacher_attn_implementation(path, **hub),
                                                 **PLAIN_LOAD, **hub).eval()
    tok = AutoTokenizer.from_pretrained(path, **hub)
    return model, tok, path


def resume_settings(job: ConvertJob, fingerprint: Dict) -> Dict:
    """What a mid-stage checkpoint must share with the job resuming it: everything that shapes training
    (not the output, evaluation sizes, progress bars, time caps or checkpoint spacing)."""
    def stage(cfg):
        return None if cfg is None else {k: v for k, v in asdict(cfg).items()
                                         if k not in ("time_budget_s", "checkpoint_every", "layer_block")}

    return {"base_fingerprint": fingerprint, "data": job.data, "feature_map": job.feature_map,
            "attention": job.attention, "window": job.window, "sinks": job.sinks, "state_decay": job.state_decay,
            "seq_len": job.seq_len, "qk_scale": job.qk_scale,
            "distill_loss": job.distill_loss, "seed": job.seed, "dtype": job.dtype, "stage1": stage(job.stage1),
            "stage2": stage(job.stage2)}


def eval_names(job: ConvertJob) -> List[str]:
    from hedgehog.data import HELD_OUT_TEXTS, training_sources

    if job.eval_data is not None:
        return list(job.eval_data)
    own = training_sources(job.data)
    return [n for n in (*HELD_OUT_TEXTS, "shakespeare") if n not in own]


def _windows(corpus, split: str, tok, L: int, max_tokens=None, shuffle_seed=None) -> torch.Tensor:
    from hedgehog.data import shuffled_documents, tokenize_windows
    from hedgehog.errors import UserError

    docs = corpus.splits[split]
    if shuffle_seed is not None:
        docs = shuffled_documents(docs, shuffle_seed)
    try:
        return tokenize_windows(docs, tok, L, max_tokens=max_tokens)
    except ValueError as e:
        raise UserError(f"the {split} split of --data {corpus.name!r} is too short: {e}. Pass a longer text "
                        f"(each split needs at least one window of --seq-len {L} tokens) or a smaller --seq-len.") from e


def run(job: ConvertJob) -> Dict:
    """The main job (see the module docstring). Every cheap check runs before any heavy work."""
    from hedgehog import checkpoint as ckpt
    from hedgehog import formats
    from hedgehog.assets import portable_model_ref
    from hedgehog.checks import check_convert_job, check_model, check_out_dir, check_text_source
    from hedgehog.convert import convert_model
    from hedgehog.data import eval_documents, load_corpus, shuffled_windows, text_label
    from hedgehog.evaluate import fidelity, layer_attention_kl, perplexity
    from hedgehog.resume import StageCheckpoint
    from hedgehog.train.engine import Engine, parse_dtype

    check_convert_job(job)
    dtype = parse_dtype(job.dtype)
    out = check_out_dir(job.out)
    check_text_source(job.data, job.text_field, job.data_format)
    for source in job.eval_data or ():
        check_text_source(source)
    check_model(job.model, job.seq_len, revision=job.revision, trust_remote_code=job.trust_remote_code)
    # One process by default; under torchrun / accelerate launch every rank trains on its share of each
    # batch, and the main process alone evaluates and writes (the others wait at the next collective).
    engine = Engine(job.device, progress=job.progress)
    main = engine.is_main
    torch.manual_seed(job.seed)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}

    t = time.perf_counter()
    model, tok, base_path = load_base(job.model, job.revision, job.trust_remote_code, dtype=dtype)
    job = with_position_offsets(job, model.config)
    model.to(engine.device)
    corpus = load_corpus(job.data, tok, job.text_field, job.data_format)
    held_out = {name: eval_documents(name, job.data, tok) for name in eval_names(job)}
    L = job.seq_len
    # Tokenise only what the stages use (documents in a seeded order, so the cap samples the whole corpus).
    budget = job.stage1.tokens + (job.stage2.tokens if job.stage2 else 0) + L
    train = shuffled_windows(_windows(corpus, "train", tok, L, max_tokens=budget, shuffle_seed=job.seed), job.seed)
    val = _windows(corpus, "validation", tok, L, max_tokens=job.val_tokens)
    test = _windows(corpus, "test", tok, L, max_tokens=job.eval_tokens)
    in_domain = f"{text_label(job.data)} (test split)"
    eval_sets = {in_domain: test}
    for name, c in held_out.items():
        eval_sets[f"{text_label(name)} (held out)"] = _windows(c, "test", tok, L, max_tokens=job.fidelity_tokens,
                                                               shuffle_seed=0)
    timings["load_s"] = time.perf_counter() - t
    log.info("data: %d train / %d val windows of %d tokens; evaluation: %s", len(train), len(val), L,
             ", ".join(f"{k} {v.numel()} tokens" for k, v in eval_sets.items()))
    settings = resume_settings(job, formats.base_fingerprint(model))
    model_ref = portable_model_ref(job.model)
    curve: List[Dict] = []
    extra = {"curve": curve}
    s1_settings = {k: v for k, v in settings.items() if k != "stage2"}  # stage 1 does not depend on stage 2's
    s1_ckpt = StageCheckpoint(out / "checkpoints" / "stage1.pt", job.stage1.checkpoint_every, s1_settings, extra)
    s2_ckpt = (StageCheckpoint(out / "checkpoints" / "stage2.pt", job.stage2.checkpoint_every, settings, extra)
               if job.stage2 is not None else None)
    if not job.resume:  # a fresh run: earlier checkpoints in this --out are stale
        for c in (s1_ckpt, s2_ckpt):
            if c is not None and main:
                c.path.unlink(missing_ok=True)
    elif s1_ckpt.path.exists():
        s1_ckpt.load()  # refuse mismatched settings or a corrupt file now, before the teacher evaluation
    engine.wait()

    t = time.perf_counter()
    teacher_val_ppl = perplexity(model, val, progress=job.progress, desc="teacher ppl (validation)") if main else None
    timings["teacher_eval_s"] = time.perf_counter() - t

    hh = HedgehogConfig(feature_map=job.feature_map, qk_scale=job.qk_scale, distill_loss=job.distill_loss,
                        attention=job.attention, window=job.window, **hybrid_settings(job))
    convert_model(model, hh)

    def val_point(stage, tokens, m):
        if not main:
            return
        ppl = perplexity(m, val, progress=False)
        curve.append({"stage": stage, "tokens": tokens, "val_ppl": ppl, "val_ppl_ratio": ppl / teacher_val_ppl})
        log.info("%s @ %d tokens: val ppl %.2f (%.2fx teacher)", stage, tokens, ppl, ppl / teacher_val_ppl)

    t = time.perf_counter()
    kl_windows = val[: job.kl_windows]
    kl_before = layer_attention_kl(model, kl_windows) if main else None
    val_point("init", 0, model)
    timings["kl_before_s"] = time.perf_counter() - t

    # ---- stage 1 -------------------------------------------------------------------------------
    every = max(1, (job.stage1.tokens // (job.stage1.batch_size * L)) // max(1, job.curve_points))

    def cb1(rec):
        if rec["batch"] % every == 0:
            set_attention_mode(model, "linear")
            val_point("stage1", rec["tokens"], model)

    s1_report = attention_transfer(model, train, job.stage1, callback=cb1, progress=job.progress,
                                   checkpoint=s1_ckpt, engine=engine)
    if main:
        formats.save_converted(model, out / "checkpoints" / "stage1", base_model=model_ref,
                               extra={"stage1_report": slim_stage_report(s1_report)}, format="light")
    set_attention_mode(model, "linear")

    def score(stage, m):
        if not main:
            return None
        res = {}
        for name, w in eval_sets.items():
            res[name] = f = fidelity(m, w, progress=job.progress, desc=f"{stage}: {name}")
            log.info("%s, %s: ppl %.2f vs teacher %.2f (%.3fx), top-1 agreement %.3f, KL %.3f/token", stage, name,
                     f["student_ppl"], f["teacher_ppl"], f["ppl_ratio"], f["top1_agreement"], f["kl_per_token"])
        return res

    t = time.perf_counter()
    kl_after = layer_attention_kl(model, kl_windows) if main else None
    fid_stage1 = score("after stage 1", model)
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
                                  checkpoint=s2_ckpt, engine=engine)
        final = pm
    if not main:  # the main process evaluates, saves and reports; this rank's training work is done
        engine.wait()
        return {"rank": engine.rank, "stage1": slim_stage_report(s1_report), "stage2": slim_stage_report(s2_report)}

    t = time.perf_counter()
    fid_final = score("final", final) if final is not model else fid_stage1
    timings["final_eval_s"] = time.perf_counter() - t
    t = time.perf_counter()
    long_context = None
    if job.context_lengths:
        texts = {text_label(name): c.splits["test"] for name, c in held_out.items()}
        long_context = lc.long_context_report(final, texts, tok, job.window, job.context_lengths, job.context_tokens,
                                           job.baseline_sinks, job.passkey_lengths, job.passkey_trials,
                                           progress=job.progress)
    timings["long_context_s"] = time.perf_counter() - t

    # ---- save + reload check ---------------------------------------------------------------------
    t = time.perf_counter()
    model_dir = out / "model"
    if final is not model:
        final = formats.merge_lora(final)  # what the directory holds, so the reload check compares like with like
    formats.save_converted(final, model_dir, base_model=model_ref, tokenizer=tok,
                           extra={"data": job.data, "seq_len": L, "base_revision": job.revision, "stage1_tokens": job.stage1.tokens,
                                  "stage2_tokens": job.stage2.tokens if job.stage2 else 0},
                           format=job.save_format)
    reloaded, _ = ckpt.load(model_dir, dtype=dtype, device=engine.device)
    with torch.no_grad():
        probe = test[:1, :128].to(engine.device)
        final.eval()
        ref_logits = final(input_ids=probe, use_cache=False).logits
        new_logits = reloaded(input_ids=probe, use_cache=False).logits
        reload_max_abs_diff = (ref_logits - new_logits).abs().max().item()
    timings["save_reload_s"] = time.perf_counter() - t

    held = [k for k in eval_sets if k != in_domain]
    report = {
        "model": job.model,
        "model_path": str(base_path),
        "data": job.data,
        "splits": {k: v for k, v in corpus.documents.items() if k != "train"},
        "teacher_ppl": fid_final[in_domain]["teacher_ppl"],
        "student_ppl_stage1": fid_stage1[in_domain]["student_ppl"],
        "student_ppl": fid_final[in_domain]["student_ppl"],
        "ppl_ratio": fid_final[in_domain]["ppl_ratio"],
        "ppl_ratio_stage1": fid_stage1[in_domain]["ppl_ratio"],
        "test_tokens": int(test.numel()),
        "fidelity": {"stage1": fid_stage1, "final": fid_final},
        # the headline: the mean over the held-out texts the job never trained on
        "held_out": {stage: mean_fidelity([f[k] for k in held]) for stage, f in
                     (("stage1", fid_stage1), ("final", fid_final))} if held else None,
        "held_out_rule": corpus.rule,
        "eval_texts": {name: {"documents": len(c.splits["test"]),
                              "tokens": int(eval_sets[f"{text_label(name)} (held out)"].numel())}
                       for name, c in held_out.items()},
        "attention_kl_before": kl_before,
        "attention_kl_after": kl_after,
        "mean_kl_before": sum(d["kl"] for d in kl_before) / len(kl_before),
        "mean_kl_after": sum(d["kl"] for d in kl_after) / len(kl_after),
        "stage1": slim_stage_report(s1_report),
        "stage2": slim_stage_report(s2_report) if s2_report else None,
        "curve": curve,
        "long_context": long_context,
        "reload_max_abs_logit_diff": reload_max_abs_diff,
        "timings_s": timings,
        "wall_s": time.perf_counter() - t_start,
        "settings": asdict(job),
        "model_dir": str(model_dir),
        "device": str(engine.device),
        "processes": engine.world,
    }
    write_json(out / "report.json", report)
    if long_context:
        from hedgehog.report import plot_long_context

        for where in (out, model_dir):  # the report's figure, and the model card's
            plot_long_context(long_context, where / "long_context.png")
    from hedgehog.modelcard import write_model_card

    write_model_card(model_dir, json.loads((model_dir / "config.json").read_text()), report)
    engine.wait()
    return report


def compare(maps: List[str], base_job: ConvertJob, out: str) -> Dict:
    """Convert with every feature map under the same token budgets; one table + plot in ``out``.

    An entry ``hybrid`` (or ``hybrid:<map>``) runs the sliding-window hybrid with the hedgehog (or that) map.
    """
    import copy

    from hedgehog.errors import UserError

    if not maps:
        raise UserError("compare needs at least one feature map: pass --feature-maps with comma-separated names, "
                        "e.g. --feature-maps hedgehog,elu,hybrid")
    rows: List[Dict] = []
    result: Dict = {"rows": rows, "settings": asdict(base_job)}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name in maps:
        job = copy.deepcopy(base_job)
        job.attention, job.feature_map = parse_compare_entry(name)
        job.out = str(root / name.replace(":", "-"))
        log.info("=== compare: %s ===", name)
        r = run(job)
        if "rank" in r:  # a worker of a multi-process run: the main process writes the table
            result = dict(r, rows=[])
            continue
        rows.append({"feature_map": name, "teacher_ppl": r["teacher_ppl"], "student_ppl_stage1": r["student_ppl_stage1"],
                     "student_ppl": r["student_ppl"], "ppl_ratio": r["ppl_ratio"], "ppl_ratio_stage1": r["ppl_ratio_stage1"],
                     "mean_kl_before": r["mean_kl_before"], "mean_kl_after": r["mean_kl_after"],
                     "stage1_tokens": (r["stage1"] or {}).get("tokens", 0),
                     "stage2_tokens": (r["stage2"] or {}).get("tokens", 0), "wall_s": r["wall_s"],
                     "held_out": (r["held_out"] or {}).get("final")})
        result = {"rows": rows, "settings": asdict(base_job)}
        write_json(root / "compare.json", result)  # after every map: nothing lost on a crash
    if "rank" not in result:
        plot_compare(rows, root / "compare.png")
    return result


def parse_compare_entry(name: str):
    """'elu' -> ('linear', 'elu'); 'hybrid' -> ('hybrid', 'hedgehog'); 'hybrid:elu' -> ('hybrid', 'elu')."""
    if name == "hybrid" or name.startswith("hybrid:"):
        return "hybrid", name.partition(":")[2] or "hedgehog"
    return "linear", name


