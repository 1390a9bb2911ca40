"""bench/common.py: what every benchmark records about the run that made its numbers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import git_commit  # noqa: E402


def test_the_commit_the_caller_names_wins_over_the_checkouts_own(monkeypatch):
    # A lent GPU machine's copy of the tree carried a stale .git: its HEAD was the session's first commit.
    monkeypatch.setenv("KOFF_GIT_COMMIT", "b1568edf7695")
    assert git_commit() == "b1568edf7695"


def test_without_a_named_commit_the_checkouts_head_is_recorded(monkeypatch, tmp_path):
    monkeypatch.delenv("KOFF_GIT_COMMIT", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    assert git_commit().split("+")[0].isalnum()
    monkeypatch.chdir(tmp_path)  # no git history at all
    assert git_commit() == "unknown"


def test_the_machine_line_names_a_missing_gpu_instead_of_failing(monkeypatch):
    # A report written from runs a GPU machine trained (bench/keep_outliers.py) runs where there is none.
    from common import machine

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert machine("cuda").endswith(", no CUDA device here") and "CUDA" not in machine("cpu")
