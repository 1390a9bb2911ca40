"""Where koff keeps its caches (converted models, tokenised corpora)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KOFF_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the koff cache.

    The root is ``$KOFF_CACHE_DIR`` when set, else ``~/.cache/koff``.
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "koff")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
