"""lm-evaluation-harness for converted models: the ``hedgehog`` model type and a teacher-vs-student table.

- ``HedgehogLM`` (registered as ``hedgehog`` on first use): lm-eval's Hugging Face backend
  (batched loglikelihood, rolling loglikelihood, generation) on a directory saved by ``hedgehog convert``.
  ``teacher=True`` scores the model it was converted from instead (its recorded base: softmax attention, no
  adapter), so both sides of a comparison come from the same directory.
- ``lm_eval --model hedgehog --model_args pretrained=runs/x/model --tasks hellaswag``: lm-eval's own command. lm-eval
  (0.4.x) has no plugin discovery, so installing hedgehog adds a start-up hook (``hedgehog-lm-eval.pth``, see
  ``src/_hedgehog_lm_eval.py``) that registers the type lazily when lm-eval loads its model table.
  ``hedgehog lm-eval ARGS`` is the same command with the type registered directly (for installs without the hook).
- :func:`compare_tasks`: teacher and student on the same tasks, one row per task and metric.
- :func:`write_cloze_task`: an offline multiple-choice task from a held-out text (no hub needed).

``lm-eval`` is an optional extra: ``pip install 'hedgehog[eval]'``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional

from hedgehog.errors import UserError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError("scoring with lm-eval needs the `lm-eval` package, which is not installed. Install it with "
                        "`pip install 'hedgehog[eval]'` (or `pip install lm-eval`).") from e
    return register_model, HFLM


def _register():
    register_model, HFLM = _lm_eval()

    @register_model("hedgehog")
    class HedgehogLM(HFLM):
        """``--model hedgehog --model_args pretrained=DIR[,teacher=True][,base_model=PATH][,batch_size=N]``."""

        def __init__(self, pretrained: str, teacher: bool = False, base_model: Optional[str] = None, **kwargs):
            from hedgehog.models.loading import load
            from hedgehog.models.loading import load_base
            from hedgehog.models.formats import read_meta

            if teacher:
                model, tok, _ = load_base(base_model or read_meta(pretrained)["base_model"])
            else:
                model, tok = load(pretrained, base_model=base_model)
            kwargs.pop("device", None)  # the model is already placed; HFLM ignores it for an instance
            super().__init__(pretrained=model, tokenizer=tok, **kwargs)

    return HedgehogLM


_CLASS = None


def model_class():
    """The registered ``hedgehog`` lm-eval model class (registers it on first use)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _register()
    return _CLASS


def __getattr__(name):
    # ``hedgehog.eval.lmeval:HedgehogLM`` is the lazy target the start-up hook registers (src/_hedgehog_lm_eval.py):
    # the class is built, and lm-eval imported, only when lm-eval asks for it.
    if name == "HedgehogLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_cli(argv: List[str]) -> None:
    """lm-eval's command line (``lm_eval ARGS``) with the ``hedgehog`` model type registered."""
    import sys

    model_class()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def task_manager(tasks: List[str], include_path: Optional[str] = None):
    """An lm-eval TaskManager that knows ``tasks``: the local folder alone when it holds them all (indexing
    lm-eval's thousands of built-in task files takes minutes on a small CPU), else the built-ins too."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate(model_dir: str, tasks: List[str], teacher: bool, include_path: Optional[str] = None,
             limit: Optional[float] = None, batch_size: int = 4, num_fewshot: Optional[int] = None,
             manager=None) -> Dict:
    """``lm_eval.simple_evaluate`` of the converted model (or its teacher) on ``tasks``: its ``results`` dict."""
    cls = model_class()
    from lm_eval import simple_evaluate

    lm = cls(pretrained=model_dir, teacher=teacher, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager or task_manager(tasks, include_path),
                          limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return out["results"]


def _metrics(results: Dict) -> Dict[str, Dict[str, float]]:
    """task -> metric -> value (lm-eval's ``"acc,none"`` keys become ``acc``; stderr and bookkeeping such as
    ``sample_len``, whose keys carry no filter suffix, are left out)."""
    out: Dict[str, Dict[str, float]] = {}
    for task, res in results.items():
        for key, val in res.items():
            name, sep, _ = key.partition(",")
            if sep and isinstance(val, (int, float)) and not isinstance(val, bool) and not name.endswith("_stderr"):
                out.setdefault(task, {})[name] = float(val)
    return out


def compare_tasks(model_dir: str, tasks: List[str], include_path: Optional[str] = None,
                  limit: Optional[float] = None, batch_size: int = 4, num_fewshot: Optional[int] = None) -> Dict:
    """The converted model and its teacher on the same tasks: ``{"rows": [{task, metric, teacher, student,
    ratio}], "tasks", "limit"}`` (ratio = student / teacher)."""
    kw = dict(limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, manager=task_manager(tasks, include_path))
    teacher = _metrics(evaluate(model_dir, tasks, teacher=True, **kw))
    student = _metrics(evaluate(model_dir, tasks, teacher=False, **kw))
    rows = []
    for task in sorted(student):
        for metric, s in sorted(student[task].items()):
            t = teacher.get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "teacher": t, "student": s,
                         "ratio": s / t if t not in (None, 0) else None})
    return {"model": str(model_dir), "tasks": list(tasks), "limit": limit, "rows": rows}


def format_table(result: Dict) -> str:
    """Markdown: task | metric | teacher | student | student/teacher."""
    lines = ["| task | metric | teacher | student | student / teacher |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        teacher = f"{r['teacher']:.4f}" if r["teacher"] is not None else ""
        lines.append(f"| {r['task']} | {r['metric']} | {teacher} | {r['student']:.4f} | {ratio} |")
    return "\n".join(lines)


def write_cloze_task(documents, out_dir, name: str = "heldout_cloze", n: int = 200, context_words: int = 48,
                     answer_words: int = 6, choices: int = 4, seed: int = 0) -> Path:
    """A multiple-choice continuation task from held-out ``documents``: each item is a passage of
    ``context_words`` words and ``choices`` continuations of ``answer_words`` words, one the text's own, the
    others taken from elsewhere in it. Writes ``{name}.yaml`` and ``{name}.jsonl`` into ``out_dir``; pass
    ``out_dir`` as lm-eval's include path."""
    rng = random.Random(seed)
    words = [w for d in documents for w in d.split()]
    span = context_words + answer_words
    if len(words) < span * (choices + 1):
        raise UserError(f"the text for the cloze task has {len(words)} words, too few for {choices}-way items of "
                        f"{span} words; pass a longer text.")
    items = []
    for _ in range(n):
        i = rng.randrange(0, len(words) - span)
        right = " ".join(words[i + context_words: i + span])
        wrong = set()
        while len(wrong) < choices - 1:
            j = rng.randrange(0, len(words) - answer_words)
            cand = " ".join(words[j: j + answer_words])
            if cand != right:
                wrong.add(cand)
        opts = [right, *sorted(wrong)]
        rng.shuffle(opts)
        items.append({"context": " ".join(words[i: i + context_words]), "choices": opts, "label": opts.index(right)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (out / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "target_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return out
