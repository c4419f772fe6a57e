"""Where hedgehog keeps what it fetches and builds: ``$HEDGEHOG_CACHE``, default ``~/.cache/hedgehog`` (models,
texts, the compiled CPU kernel). A leaf module, so the op layer can use it without importing anything above."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("HEDGEHOG_CACHE", Path.home() / ".cache" / "hedgehog")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
