"""A run killed at any moment of a checkpoint write, or left with a damaged checkpoint, resumes to
the same end state as a run that was never interrupted."""

import json
import shutil

import pytest

from koff.cli import main
from koff.errors import KoffError
import koff.training.checkpoint as checkpoint
from koff.tensor_files import save_tensors
from test_training import assert_same_end_state, make


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup (it is no Exception)."""


def kill_on_second(monkeypatch, module, name, partial_write=None, counts=lambda *args: True):
    """Make ``module.name`` die on its second counted call: the step-10 checkpoint of a 12-step run
    that checkpoints every 5 steps. ``counts`` picks the calls that count."""
    real, calls = getattr(module, name), {"n": 0}

    def dying(*args, **kwargs):
        if counts(*args):
            calls["n"] += 1
            if calls["n"] == 2:
                if partial_write:
                    partial_write(*args)
                raise Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def truncated_safetensors(tensors, path):
    save_tensors(tensors, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


PHASES = {
    # while the tensors are written into the temporary folder (a half-written file is left there)
    "tensors": lambda mp: kill_on_second(mp, checkpoint, "save_tensors", truncated_safetensors),
    # the temporary folder is complete but not yet renamed (os.replace is global: count folder renames only)
    "rename": lambda mp: kill_on_second(mp, checkpoint.os, "replace", counts=lambda src, dst: ".step-" in str(src)),
    # the folder is in place, latest.json still names the previous one
    "pointer": lambda mp: kill_on_second(mp, checkpoint, "write_json", counts=lambda path, obj: path.name == "latest.json"),
    # after the checkpoint, before older ones are removed
    "prune": lambda mp: kill_on_second(mp, checkpoint, "checkpoint_folders"),
}


@pytest.fixture
def whole(tmp_path, tokenizer, domains):
    run = make(tmp_path / "whole", tokenizer, domains, sparsity=0.2)
    run.train()
    return run


@pytest.mark.parametrize("phase", PHASES)
def test_kill_during_a_checkpoint_write_then_resume(tmp_path, tokenizer, domains, whole, monkeypatch, phase):
    killed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    with monkeypatch.context() as patch:
        PHASES[phase](patch)
        with pytest.raises(Killed):
            killed.train()
    resumed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    resumed.train(resume=True)
    assert_same_end_state(whole, resumed)
    folder = tmp_path / "b" / "run" / "checkpoints"
    assert not list(folder.glob(".step-*"))  # the stray temporary folder is cleaned up
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("kill_after", [4, 5, 10])  # before a checkpoint, right after one, right after the freeze
def test_kill_between_checkpoints_then_resume(tmp_path, tokenizer, domains, whole, kill_after):
    killed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    assert killed.train(stop_after=kill_after) == {"stopped_at": kill_after}
    resumed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    resumed.train(resume=True)
    assert_same_end_state(whole, resumed)


def damage_truncate(folder):
    path = folder / "step-000010" / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def damage_empty_pointer(folder):
    (folder / "latest.json").write_text("")


def damage_state(folder):
    (folder / "step-000010" / "state.json").write_text("{not json")


@pytest.mark.parametrize("damage", [damage_truncate, damage_empty_pointer, damage_state])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, tokenizer, domains, whole, damage, caplog):
    killed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    killed.train(stop_after=11)  # checkpoints at 5 and 10
    damage(tmp_path / "b" / "run" / "checkpoints")
    resumed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    resumed.train(resume=True)
    assert_same_end_state(whole, resumed)
    if damage is not damage_empty_pointer:
        assert "trying an older one" in caplog.text and "step-000005" in caplog.text


def test_no_readable_checkpoint_is_one_clear_error(tmp_path, tokenizer, domains):
    killed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2)
    killed.train(stop_after=11)
    for path in (tmp_path / "b" / "run" / "checkpoints").glob("step-*/tensors.safetensors"):
        path.write_bytes(b"garbage")
    with pytest.raises(KoffError, match="none of the 2 checkpoints"):
        make(tmp_path / "b", tokenizer, domains, sparsity=0.2).train(resume=True)


def test_cli_resume_of_a_copied_run_writes_the_copy_only(tmp_path, corpus, capsys):
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model", "llama")
    original = tmp_path / "run"
    argv = ["decompose", "--model", model_dir, "--domain", f"eng={corpus['eng']}", "--block-len", "32", "--steps", "4",
            "--batch-size", "2", "--kv-slots", "4", "--sparsity", "0.2", "--no-eval", "--checkpoint-every", "2",
            "--out", str(original)]
    assert main(argv) == 0
    (original / "summary.json").unlink()  # pretend it was killed after its last checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = {p: p.stat().st_mtime_ns for p in original.rglob("*")}
    assert main(["decompose", "--resume", "--out", str(copy)]) == 0
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*")} == before  # the original is untouched
    assert (copy / "summary.json").is_file() and not (original / "summary.json").exists()
    assert str(copy) in (copy / "config.yaml").read_text()

    capsys.readouterr()
    assert main(["decompose", "--resume", "--out", str(copy), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "--steps 8 differs from the run's 4" in err and "Traceback" not in err
