"""The benchmark scripts (bench/): what every benchmark records about the run that made its numbers,
and the runs two benchmarks share."""

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


def test_the_keep_outliers_runs_are_the_evidence_sweeps_koff_runs_with_neurons_held_open(tmp_path):
    """bench/keep_outliers.py compares its runs with the evidence sweep's: they may differ in nothing
    but the held-open neurons, the seed and the folder."""
    import argparse
    from dataclasses import replace

    from evidence import add_evidence_options, evidence_config
    from keep_outliers import runs
    from sweep import sweep_configs

    parser = argparse.ArgumentParser()
    add_evidence_options(parser)
    base = evidence_config(parser.parse_args(["--device", "cuda"]))
    ours = runs(base, 8, [0.06, 0.12], [0, 1], tmp_path / "keep")
    assert sorted(ours) == ["keep8-s06-seed0", "keep8-s12-seed0", "keep8-s12-seed1"]
    sweep = sweep_configs(replace(base, eval=True), [0.06, 0.12], tmp_path / "evidence")
    for name, sparsity, seed in (("keep8-s06-seed0", 0.06, 0), ("keep8-s12-seed1", 0.12, 1)):
        theirs = sweep[sparsity]["koff"]
        assert ours[name] == replace(theirs, keep_outliers=8, seed=seed, out=str(tmp_path / "keep" / name))
