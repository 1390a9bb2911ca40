"""The folder ``koff export`` writes: ``backbone/``, ``memories/<name>/`` and ``export.json`` (its
summary, whose presence marks the folder as a finished koff export)."""

from __future__ import annotations

from pathlib import Path

SUMMARY = "export.json"


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / SUMMARY).is_file()
