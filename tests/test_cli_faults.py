"""The CLI under bad input: every refusal is one ``koff: error:`` line and exit status 2, never a
traceback; no command deletes or rewrites a folder it was not pointed at; flags beat config files."""

import hashlib
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from koff.cli import main
from koff.export import export_run
from koff.masks import BinaryMask
from koff.masks.units import UnitCosts
from koff.models.architecture import decoder_layout
from test_export import make_run
from tiny import tiny_model, write_corpus

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run, its export, a mask of another model, and junk files."""
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KOFF_CACHE_DIR", str(root / "koff-cache"))
        run = make_run(root, corpus, "llama")
        export_run(run, root / "export")
    other = tiny_model("llama", layers=3)  # a mask of another model: other layer count
    layout = decoder_layout(other)
    BinaryMask.dense(UnitCosts.of(other, layout)).save(root / "other-mask.safetensors", UnitCosts.of(other, layout))
    (root / "junk.txt").write_text("not a mask")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("precious")
    return {"root": root, "run": run, "other": root / "other-mask.safetensors", "export": root / "export", "corpus": corpus,
            "model": str(root / "model-llama")}


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def refused(argv, capsys, match):
    """Run ``koff argv``: exit status 2, no traceback, and ``match`` in the last line of stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as done:  # argparse's own refusals (wrong types, unknown choices)
        code = done.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert match in last, (argv, last)
    return last


def decompose(world, *extra):
    return ["decompose", "--model", world["model"], "--domain", f"eng={world['corpus']['eng']}", "--block-len", "32",
            "--steps", "2", "--batch-size", "2", "--kv-slots", "4", "--no-eval", "--out", world["root"] / "new-run", *extra]


def test_decompose_refuses_bad_input(world, capsys):
    r = world["root"]
    cases = [
        (decompose(world, "--steps", "abc"), "invalid int value"),
        (decompose(world, "--steps", "0"), "steps (--steps) must be at least 1"),
        (decompose(world, "--sparsity", "1.5"), "sparsity must be in [0, 1)"),
        (decompose(world, "--sparsity", "nan"), "sparsity must be in [0, 1)"),
        (decompose(world, "--lr-lora", "-1"), "--lr-lora must be a finite number"),
        (decompose(world, "--memory", "both"), "--memory must be one of"),
        (decompose(world, "--mask", f"file:{r / 'nowhere.safetensors'}"), "no such mask file"),
        (decompose(world, "--mask", f"file:{r / 'junk.txt'}"), "is not a readable koff mask"),
        (decompose(world, "--mask", f"file:{world['other']}"), "was made for another model"),
        (decompose(world, "--domain", "noequals"), "NAME=SOURCE"),
        (decompose(world, "--domain", f"x={r / 'none.txt'}"), "domain 'x'"),
        (decompose(world, "--heldout", f"eng={r / 'none.txt'}"), "none.txt does not exist"),
        (decompose(world, "--heldout", f"deu={world['corpus']['deu']}"), "'deu' is not one of the run's domains"),
        (decompose(world, "--model", r / "no-such-model"), "no-such-model"),
        (decompose(world, "--config", r / "none.yaml"), "config file not found"),
        (decompose(world, "--config", r / "list.yaml"), "is not a koff config"),
        (["decompose", "--resume", "--out", r / "notes"], "not found (is"),
        (["decompose", "--model", world["model"], "--domain", f"eng={world['corpus']['eng']}", "--out", world["run"]],
         "already holds a run"),
    ]
    for argv, match in cases:
        refused(argv, capsys, match)
    assert not (r / "new-run" / "checkpoints").exists()  # nothing was trained for a refused run


def test_export_refuses_and_never_deletes_what_it_was_not_asked_to(world, capsys, tmp_path):
    export, run = world["export"], world["run"]
    before, run_before = tree_digest(export), tree_digest(world["root"] / "run-llama-lora+kv")
    refused(["export", world["root"] / "no-such-run", export, "--force"], capsys, "not a finished koff run")
    refused(["export", run, run, "--force"], capsys, "is (or holds) the run folder")
    refused(["export", run, world["root"], "--force"], capsys, "is (or holds) the run folder")
    refused(["export", run, export], capsys, "pass --force")
    refused(["export", run, world["root"] / "notes", "--force"], capsys, "is not a koff export")
    refused(["export", run, world["root"] / "junk.txt"], capsys, "is not a folder")
    refused(["export", run, export, "--force", "--max-shard-size", "lots"], capsys, "--max-shard-size must be a size")
    assert tree_digest(export) == before and tree_digest(world["root"] / "run-llama-lora+kv") == run_before
    assert (world["root"] / "notes" / "keep.txt").read_text() == "precious"


def test_a_failed_forced_export_leaves_the_old_export_intact(world, tmp_path, monkeypatch):
    target = tmp_path / "export"
    shutil.copytree(world["export"], target)
    before = tree_digest(target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("koff.export.exporter.write_memory", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(world["run"], target, force=True)
    assert tree_digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left beside it
    monkeypatch.undo()
    export_run(world["run"], target, uniform=True, force=True)  # a forced export that succeeds replaces it
    assert tree_digest(target) != before and (target / "export.json").is_file()


def test_runtime_commands_refuse_bad_input_before_loading(world, capsys, tmp_path, monkeypatch):
    export = world["export"]
    loads = []
    monkeypatch.setattr("koff.runtime.load", lambda *a, **k: loads.append(a))
    for flag, value, match in [("--temperature", "-1", "temperature must be"), ("--temperature", "nan", "temperature must be"),
                               ("--max-new-tokens", "-3", "max_new_tokens must be"), ("--top-p", "0", "top_p must be"),
                               ("--seed", str(2**64), "seed must be")]:
        refused(["generate", export, "hi", flag, value], capsys, match)
    assert loads == []  # refused before the model was loaded
    monkeypatch.undo()

    broken = tmp_path / "broken-export"
    shutil.copytree(export, broken)
    weights = next((broken / "backbone").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [
        (["generate", tmp_path / "none", "hi"], "none"),
        (["generate", export, "hi", "--memory", "klingon"], "unknown memory 'klingon'"),
        (["generate", broken, "hi"], "broken-export"),
        (["info", tmp_path / "none"], "none"),
        (["info", world["run"]], "is not a koff backbone"),
        (["serve", tmp_path / "none", "--port", "1"], "none"),
        (["serve", export, "--max-batch", "0"], "must be positive"),
        (["add-domain", tmp_path / "none", f"x={world['corpus']['eng']}"], "none"),
        (["add-domain", export, f"eng={world['corpus']['eng']}", "--steps", "1"], "already in this export"),
        (["add-domain", export, f"x={world['corpus']['eng']}", "--steps", "0"], "--steps must be at least 1"),
        (["add-domain", export, f"x={tmp_path / 'none.txt'}", "--steps", "1"], "domain 'x'"),
        (["analyze", tmp_path / "none"], "none"),
        # a folder of the other kind: an export where a run is expected, and the other way round
        (["export", export, tmp_path / "out"], "not a finished koff run"),
        (["generate", world["run"], "hi"], "is not a koff backbone"),
        (["add-domain", world["run"], f"x={world['corpus']['eng']}", "--steps", "1"], "is not a koff backbone"),
        (["analyze", export], "run folder?"),
        (["eval", tmp_path / "none"], "none"),
        (["eval", "--model", world["model"], "--domain", "x=y.txt", "--out", tmp_path / "e"], "domain 'x'"),
    ]
    for argv, match in cases:
        refused(argv, capsys, match)


def test_a_memory_with_non_finite_weights_is_refused(world, capsys, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(world["export"], export)
    kv = export / "memories" / "code" / "kv_prefix.safetensors"
    tensors = load_file(str(kv))
    first = next(iter(tensors))
    tensors[first][0] = float("nan")
    save_file(tensors, str(kv))
    from koff.runtime import load

    runtime = load(export)  # the others still load; the bad one is reported
    assert runtime.memories == ["eng"] and "NaN or infinite" in runtime.broken["code"]
    refused(["generate", export, "hi", "--memory", "code"], capsys, "could not be loaded")


def test_an_explicit_flag_beats_the_config_file_even_at_its_default(world, tmp_path):
    first = tmp_path / "first"
    argv = ["eval", "--model", world["model"], "--domain", f"eng={world['corpus']['eng']}", "--block-len", "16"]
    assert main([*map(str, argv), "--out", str(first)]) == 0
    assert yaml.safe_load((first / "config.yaml").read_text())["block_len"] == 16
    second = tmp_path / "second"
    assert main(["eval", "--config", str(first / "config.yaml"), "--block-len", "256", "--out", str(second)]) == 0
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["block_len"] == 256 and config["model"] == world["model"]  # 256 is the default, given explicitly
