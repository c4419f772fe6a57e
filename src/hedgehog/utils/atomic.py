"""Atomic writes: a file or a directory is either the old version or the new one, whole, never half written.

- :func:`atomic_file` (and :func:`write_json`) writes a file through a temp file in the same folder, fsyncs it and renames it over the
  target (stage checkpoints, reports, model cards).
- :func:`atomic_dir` yields a temp folder beside the target and publishes it on success (saved models, cached
  assets, the LM checkpoint). A previous version is first renamed to ``NAME.old``, so a crash between the two
  renames leaves ``NAME.old`` whole (readers that resume look there too); on failure the temp folder is removed.

Nothing here imports the rest of hedgehog.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def atomic_file(path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, then move the result over ``path`` in one rename (after fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically (reports, tables)."""
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def old_version(final) -> Path:
    """Where :func:`atomic_dir` keeps the previous version of ``final`` while it publishes the new one."""
    final = Path(final)
    return final.with_name(final.name + ".old")


@contextlib.contextmanager
def atomic_dir(final) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: ...write into tmp...``: ``out`` becomes ``tmp`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = old_version(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
