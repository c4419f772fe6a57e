"""Record data through the `datasets` library: JSON/JSONL/CSV/Parquet/Arrow files, saved datasets, and hub
dataset ids (``owner/name``, where a hub is reachable).

Each record becomes one document, rendered by its format:

- ``plain``: the ``--text-field`` column (default ``text``);
- ``instruction`` (Alpaca: ``instruction``, optional ``input``, ``output``): a user turn and an assistant turn;
- ``chat`` (``messages``: a list of ``{"role", "content"}``): the conversation.

Instruction and chat records go through the tokenizer's chat template when it has one; otherwise through the
plain fallback ``"<role>: <content>"`` lines (Alpaca's ``### Instruction / ### Input / ### Response`` for
instruction data). ``auto`` picks the format from the columns.

Held-out rule, by record position: record ``i`` goes to validation when ``i % 20 == 18`` and to test when
``i % 20 == 19`` (5% each), the rest trains; the same file always splits the same way. Files are memory-mapped
Arrow tables: a record is read and rendered only when the job tokenises it, and tokenisation stops at the
budget, so a large corpus is never read whole.
"""
from __future__ import annotations

import logging
import re
from collections import abc
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from hedgehog.errors import UserError

RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FORMATS = ("auto", "plain", "instruction", "chat")
HELD_OUT_RULE = "record i: validation if i % 20 == 18, test if i % 20 == 19, else train"


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is no local path: a dataset on the Hugging Face hub (where one is reachable)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).expanduser().exists()


def is_record_source(source: str) -> bool:
    """A file ``datasets`` reads (by suffix), a directory written by ``Dataset.save_to_disk``, or a hub id."""
    p = Path(source).expanduser()
    if p.is_file():
        return p.suffix.lower() in RECORD_SUFFIXES
    if is_hub_id(source):
        return True
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())


def load_records(source: str):
    """The records of ``source`` as a ``datasets.Dataset`` (the ``train`` split of a saved DatasetDict)."""
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"--data {source!r} is a record file, and reading it needs the `datasets` package. Install it "
                        "with `pip install 'hedgehog[data]'` (or `pip install datasets`), or pass plain text.") from e
    p = Path(source).expanduser()
    datasets.disable_progress_bars()
    quiet = logging.getLogger("datasets")  # its own log line would repeat the error we raise, with a traceback
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if is_hub_id(source):
            return datasets.load_dataset(source, split="train")
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return ds
        return datasets.load_dataset(RECORD_SUFFIXES[p.suffix.lower()], data_files=str(p), split="train")
    except Exception as e:  # a malformed file: say which and what was wrong
        what = ("a hub dataset (is a hub reachable from here?)" if is_hub_id(source)
                else RECORD_SUFFIXES.get(p.suffix.lower(), "a saved dataset") + " records")
        raise UserError(f"cannot read {source!r} as {what} ({type(e).__name__}: {str(e)[:300]}). Check the name or "
                        "file, or pass local text.") from e
    finally:
        quiet.setLevel(level)


def detect_format(columns: Sequence[str], text_field: Optional[str], fmt: str, source: str) -> str:
    cols = set(columns)
    if fmt not in FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if fmt == "auto":
        if text_field:
            fmt = "plain"
        elif "messages" in cols:
            fmt = "chat"
        elif {"instruction", "output"} <= cols:
            fmt = "instruction"
        elif "text" in cols:
            fmt = "plain"
        else:
            raise UserError(f"{source!r} has the fields {sorted(cols)}, and none holds text this job knows: pass "
                            "--text-field NAME for plain text, or use 'instruction'/'input'/'output' (Alpaca) or "
                            "'messages' (chat) records.")
    need = {"plain": {text_field or "text"}, "instruction": {"instruction", "output"}, "chat": {"messages"}}[fmt]
    missing = need - cols
    if missing:
        raise UserError(f"{source!r} has the fields {sorted(cols)}, but {fmt} records need {sorted(missing)}. Pass "
                        "--text-field with one of the fields it has, or another --data-format.")
    return fmt


def _chat(tokenizer, messages: List[Dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def renderer(fmt: str, tokenizer, text_field: Optional[str]) -> Callable[[Dict], str]:
    """``record -> document text`` for a detected format."""
    if fmt == "plain":
        field = text_field or "text"
        return lambda r: str(r[field] or "")
    if fmt == "chat":
        return lambda r: _chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in r["messages"]])

    def instruction(r):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        if getattr(tokenizer, "chat_template", None):
            return _chat(tokenizer, [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": r["output"]}])
        inp = f"### Input:\n{r['input']}\n\n" if r.get("input") else ""
        return f"### Instruction:\n{r['instruction']}\n\n{inp}### Response:\n{r['output']}"

    return instruction


class RenderedSplit(abc.Sequence):
    """A lazy list of documents: record ``indices[i]`` of ``ds``, rendered when read."""

    def __init__(self, ds, indices: List[int], render: Callable[[Dict], str]):
        self.ds, self.indices, self.render = ds, indices, render

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.render(self.ds[self.indices[i]])


def split_indices(n: int) -> Dict[str, List[int]]:
    """The held-out rule (:data:`HELD_OUT_RULE`); tiny files lend their last records to the empty splits."""
    out = {"train": [], "validation": [], "test": []}
    for i in range(n):
        out["validation" if i % 20 == 18 else "test" if i % 20 == 19 else "train"].append(i)
    for s in ("validation", "test"):
        if not out[s] and len(out["train"]) > 1:
            out[s].append(out["train"].pop())
    return out
