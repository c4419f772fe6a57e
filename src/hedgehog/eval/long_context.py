"""Fidelity where linear attention is meant to pay off: long inputs. All under no-grad.

* :func:`context_fidelity` scores a converted model against its softmax teacher on windows of several context
  lengths (512 ... the model's maximum), and beside it the **no-training baseline**: the teacher itself with
  exact softmax restricted to the last ``window`` keys plus the first ``sinks`` tokens (StreamingLLM's
  attention sinks). A converted model whose linear part is worth having beats that baseline at every length.
* :func:`passkey_scores` hides a 5-digit key at several depths of filler text and checks whether greedy
  decoding gives it back, for the teacher and the student (the baseline is not run: every key lies beyond its
  window, so it could only guess the digits). Greedy decoding of the key is
  computed teacher-forced: every key token must be the argmax given the prompt and the key's earlier tokens,
  which is exactly when greedy generation produces it (one forward per trial instead of a decode loop).

Both take a ``student`` and a ``teacher`` callable ``(input_ids, attention_mask=None, keep=0) -> logits`` so they
serve a LoRA-wrapped model in teacher mode as well as a separate base model; ``keep`` asks for the logits of the last
``keep`` positions only (0: all), which the passkey check needs (a forward may return all of them anyway).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from hedgehog.eval.fidelity import NextTokenTally, model_device, tally_windows, teacher_mode
from hedgehog.layers.attention import Mode

Forward = Callable[..., torch.Tensor]  # (input_ids (B, N), attention_mask=None, keep=0) -> logits (B, N or keep, V)

DEFAULT_LENGTHS = (512, 2048, 4096, 8192)
CONTEXT_TOKENS = 4096  # per length and text
PASSKEY_LENGTHS = (1024, 2048, 4096)
PASSKEY_TRIALS = 8
BASELINE_SINKS = 4


def context_lengths(model_max: Optional[int], lengths: Sequence[int] = DEFAULT_LENGTHS) -> List[int]:
    """The lengths to score: ``lengths`` up to the model's maximum context, and that maximum itself (up to the
    largest of ``lengths``) when it lies between them. ``model_max`` None: ``lengths`` as given."""
    if model_max is None:
        return sorted(set(lengths))
    top = min(model_max, max(lengths))
    return sorted({L for L in lengths if L <= top} | {top})


def window_mask(n: int, window: int, sinks: int, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(1, 1, n, n): query i sees key j when causal and ``i - j < window`` or ``j < sinks``. Bool (True = sees)
    by default, the form SDPA and FlexAttention read; with a floating ``dtype`` the additive form (0 or the
    dtype's minimum) that transformers' eager attention adds to its scores."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    seen = ((j <= i) & ((i - j < window) | (j < sinks)))[None, None]
    if dtype is None or dtype == torch.bool:
        return seen
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)


@torch.no_grad()
def context_fidelity(student: Forward, teacher: Forward, baseline: Forward, windows: torch.Tensor,
                     progress: bool = False, desc: str = "long context") -> Dict:
    """Student and no-training baseline (:func:`baseline_forward` of the teacher) against the teacher on ``windows``
    (num_windows, L), one window at a time (the forwards take ``(1, L)`` input ids and return logits).

    Returns ``{"length", "tokens", "teacher_ppl", "student": {...}, "baseline": {...}}`` where each side holds
    ``ppl``, ``ppl_ratio`` (to the teacher), ``top1_agreement`` and ``kl_per_token`` (KL(teacher || side), nats).
    The statistics are tallied a block of positions at a time (:func:`~hedgehog.eval.fidelity.tally_windows`).
    """
    tallies = {"student": NextTokenTally(), "baseline": NextTokenTally()}
    t_nll = 0.0
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        ids = w[None]
        t_logits = teacher(ids)
        sides = {name: fn(ids) for name, fn in (("student", student), ("baseline", baseline))}
        t_nll += tally_windows(ids, t_logits, sides, tallies)
        del t_logits, sides
    n = tallies["student"].n
    return {"length": windows.shape[1], "tokens": n, "teacher_ppl": math.exp(t_nll / max(1, n)),
            "student": tallies["student"].result(t_nll), "baseline": tallies["baseline"].result(t_nll)}


# ---- passkey retrieval -----------------------------------------------------------------------------------------
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tok, length: int, depth: float, key: str, min_distance: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_ids (n,), answer_ids (m,))`` with ``n + m <= length``: the key sentence at ``depth`` (0 = first,
    1 = last) of the filler, and at least ``min_distance`` tokens between the key sentence and the end of the
    prompt (so a window of that many recent keys cannot see it)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    intro, unit, question = enc(INTRO), enc(FILLER), enc(QUESTION)
    needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    answer = enc(f" {key}")
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    units = room // len(unit)
    after_min = -(-max(0, min_distance - len(question)) // len(unit))  # filler units needed after the key
    if units < 1 or after_min > units:
        raise ValueError(f"a passkey prompt of {length} tokens is too short for a key {min_distance} tokens "
                         f"before its end; pass a longer length")
    before = min(round(depth * units), units - after_min)
    ids = intro + unit * before + needle + unit * (units - before) + question
    return torch.tensor(ids), torch.tensor(answer)


def passkey_trials(tok, length: int, trials: int, seed: int = 0, min_distance: int = 0) -> List[Dict]:
    """``trials`` prompts of ``length`` tokens, the keys (seeded) at evenly spread depths."""
    rng = random.Random(seed * 1000003 + length)
    out = []
    for t in range(trials):
        depth = (t + 0.5) / trials
        key = str(rng.randint(10000, 99999))
        prompt, answer = passkey_prompt(tok, length, depth, key, min_distance)
        out.append({"depth": depth, "key": key, "prompt": prompt, "answer": answer})
    return out


@torch.no_grad()
def passkey_hit(fn: Forward, prompt: torch.Tensor, answer: torch.Tensor) -> bool:
    """True when greedy decoding after ``prompt`` gives ``answer`` (checked teacher-forced, see the module doc)."""
    ids = torch.cat([prompt, answer])[None]
    a = answer.numel()
    logits = fn(ids, keep=a + 1)  # the positions that predict the answer's tokens, and the last
    pred = logits[0, -(a + 1):-1].argmax(-1).cpu()
    return bool((pred == answer).all())


@torch.no_grad()
def passkey_scores(models: Dict[str, Forward], tok, lengths: Sequence[int] = PASSKEY_LENGTHS, trials: int = 8,
                   min_distance: int = 64, seed: int = 0, progress: bool = False) -> Dict[int, Dict]:
    """Per length: hits out of ``trials`` for every entry of ``models`` (name -> forward of ``(1, n)`` ids), the
    keys at evenly spread depths and at least ``min_distance`` tokens before the question (beyond a window)."""
    res = {}
    for L in lengths:
        cases = passkey_trials(tok, L, trials, seed, min_distance=min_distance)
        row = {"trials": trials, "depths": [c["depth"] for c in cases]}
        bar = tqdm(total=len(models) * len(cases), desc=f"passkey @ {L}", disable=not progress, leave=False)
        for name, fn in models.items():
            hits = []
            for c in cases:
                hits.append(passkey_hit(fn, c["prompt"], c["answer"]))
                bar.update()
            row[name] = sum(hits)
            row[f"{name}_hits"] = hits
        bar.close()
        res[L] = row
    return res


# ---- the report: several texts, lengths, passkey -------------------------------------------------------------
def model_forwards(model, teacher=None) -> Tuple[Forward, Forward]:
    """``(student, teacher)`` forwards of a converted ``model`` (maybe LoRA-wrapped): the teacher is ``teacher``
    when given (a separate base, needed once LoRA is merged), else ``model`` itself in teacher mode."""
    dev, keep_kw = model_device(model), _keep_kw(model)

    def student(ids, attention_mask=None, keep=0):
        return model(input_ids=ids.to(dev), attention_mask=attention_mask, use_cache=False, **keep_kw(keep)).logits

    if teacher is not None:
        t_dev, t_keep_kw = model_device(teacher), _keep_kw(teacher)

        def teach(ids, attention_mask=None, keep=0):
            return teacher(input_ids=ids.to(t_dev), attention_mask=attention_mask, use_cache=False,
                           **t_keep_kw(keep)).logits
    else:
        def teach(ids, attention_mask=None, keep=0):
            with teacher_mode(model):
                return student(ids, attention_mask, keep)
    return student, teach


def _keep_kw(model) -> Callable[[int], Dict]:
    """``keep -> {"logits_to_keep": keep}`` where ``model``'s forward takes it (every recent causal LM; the LM head
    then runs on those positions only), else ``keep -> {}`` (all logits); ``keep`` 0 asks for all of them."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return lambda keep: {"logits_to_keep": keep} if takes and keep else {}


def window_mode_baseline(model, window: int, sinks: int = BASELINE_SINKS) -> Optional[Forward]:
    """The no-training baseline computed by a converted ``model`` itself (its baseline mode: adapter off, exact
    softmax over the last ``window`` keys and the first ``sinks`` in O(N * window)), or None where that is not
    the teacher: some attention layers left unconverted, or a teacher with its own sliding window or soft-cap."""
    from hedgehog.layers.attention import hedgehog_layers

    layers = hedgehog_layers(model)
    if len(layers) != getattr(model.config, "num_hidden_layers", -1) or any(
            lay.teacher.window is not None or lay.teacher.softcap is not None for lay in layers):
        return None
    student, _ = model_forwards(model)
    for lay in layers:  # what baseline mode computes; the modes in between leave it alone
        lay.baseline = (window, sinks)

    def fn(ids, attention_mask=None, keep=0):
        with teacher_mode(model, Mode.BASELINE):
            return student(ids, keep=keep)

    return fn


def baseline_forward(teacher: Forward, config, window: int, sinks: int = BASELINE_SINKS) -> Forward:
    """The no-training baseline from a teacher forward: the window + sinks mask in the form ``config``'s
    attention implementation reads (bool for SDPA and FlexAttention, additive for eager)."""
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if impl.startswith("flash"):
        raise ValueError(f"the window baseline needs a custom attention mask, which {impl} does not take; load the "
                         "teacher with attn_implementation='sdpa' (or 'eager')")
    masks = {}

    def fn(ids, attention_mask=None, keep=0):
        n = ids.shape[1]
        if n not in masks:
            masks[n] = window_mask(n, window, sinks, device=ids.device,
                                   dtype=torch.float32 if impl == "eager" else None)
        return teacher(ids, attention_mask=masks[n], keep=keep)

    return fn


def text_ids(texts: Sequence[str], tok, max_tokens: int) -> torch.Tensor:
    """The documents of a text as one id sequence (EOS between documents), at most ``max_tokens`` long."""
    from hedgehog.data.corpora import tokenize_windows

    return tokenize_windows(texts, tok, 1, max_tokens=max_tokens).view(-1)


@torch.no_grad()
def long_context_report(model, texts: Dict[str, Sequence[str]], tok, window: int, lengths: Sequence[int] = DEFAULT_LENGTHS,
                        tokens: int = CONTEXT_TOKENS, sinks: int = BASELINE_SINKS,
                        passkey_lengths: Sequence[int] = PASSKEY_LENGTHS, passkey_trials: int = PASSKEY_TRIALS,
                        teacher=None, progress: bool = False) -> Dict:
    """Fidelity at several context lengths on each of ``texts`` (name -> documents) and passkey retrieval, for a
    converted ``model`` (teacher: ``teacher`` or the model in teacher mode), its teacher and the no-training
    baseline (the teacher's softmax over the last ``window`` keys and the first ``sinks``).

    Per length, ``tokens`` tokens of each text (at least one window) are scored in windows of that length;
    lengths above the model's maximum context are left out, and so is a length a text is too short for.
    Returns a JSON-ready dict: ``lengths``, ``texts`` (name -> length -> :func:`context_fidelity`), ``mean``
    (length -> the mean over texts of each side's figures) and ``passkey`` (:func:`passkey_scores`).
    """
    student, teach = model_forwards(model, teacher)
    config = (teacher if teacher is not None else model).config
    baseline = (window_mode_baseline(model, window, sinks) if teacher is None else None) \
        or baseline_forward(teach, config, window, sinks)
    lengths = context_lengths(getattr(config, "max_position_embeddings", None), lengths)
    per_text: Dict[str, Dict[str, Dict]] = {}
    for name, docs in texts.items():
        ids = text_ids(docs, tok, max(tokens, max(lengths)))
        per_text[name] = {}
        for L in lengths:
            k = max(1, min(tokens, ids.numel()) // L)
            if k * L > ids.numel():
                continue
            per_text[name][str(L)] = context_fidelity(student, teach, baseline, ids[:k * L].view(k, L),
                                                      progress=progress, desc=f"{name} @ {L}")
    mean = {}
    for L in lengths:
        rows = [r[str(L)] for r in per_text.values() if str(L) in r]
        if rows:
            mean[str(L)] = {side: {key: sum(r[side][key] for r in rows) / len(rows) for key in rows[0][side]}
                            for side in ("student", "baseline")}
            mean[str(L)]["texts"] = len(rows)
    p_lengths = [L for L in passkey_lengths if L <= max(lengths)]
    # Not the baseline: every key lies beyond its window (and after its sinks), so it can only guess the digits.
    passkey = passkey_scores({"teacher": teach, "student": student}, tok, p_lengths, passkey_trials,
                             min_distance=window, progress=progress)
    return {"lengths": lengths, "tokens_per_length": tokens, "window": window, "sinks": sinks, "texts": per_text,
            "mean": mean, "passkey": {str(L): r for L, r in passkey.items()}, "student_memory": student_memory(model)}


def student_memory(model) -> str:
    """What a converted model's attention holds per KV head, in words (the exact keys it may read, and the state)."""
    from hedgehog.layers.attention import hedgehog_layers

    layers = hedgehog_layers(model)
    if not layers:
        return "softmax attention"
    c = layers[0].hh_config
    if c.attention != "hybrid":
        return "linear state only"
    parts = [f"the last {c.window} keys"] + ([f"{c.sinks} sinks"] if c.sinks else [])
    if c.sparse_cache:
        parts.append(f"a sparse cache of {c.sparse_cache} keys (+ up to {c.sparse_chunk - 1} recent, chunk "
                     f"{c.sparse_chunk}, score {c.sparse_score})")
    decay = "decayed " if c.state_decay is not None else ""
    return " + ".join(parts) + f" exact, the rest in a {decay}linear state"
