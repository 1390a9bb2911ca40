import json

import pytest
import yaml

from koff.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert name in capsys.readouterr().out


def test_eval_writes_results_and_config_and_reruns(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", model_dir, "--domain", f"eng={corpus['eng']}", "--domain", f"code={corpus['code']}",
            "--block-len", "16", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| eng |" in printed and "| mean |" in printed
    result = json.loads((out / "eval.json").read_text())
    assert set(result["domains"]) == {"eng", "code"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["block_len"] == 16 and config["model"] == model_dir

    rerun = tmp_path / "rerun"
    assert main(["eval", "--config", str(out / "config.yaml"), "--out", str(rerun)]) == 0
    again = json.loads((rerun / "eval.json").read_text())
    assert again["domains"] == result["domains"]


def test_user_errors_exit_2_without_traceback(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", model_dir, "--domain", f"x={tmp_path / 'none.txt'}", "--out", str(tmp_path)]) == 2
    assert "domain 'x'" in capsys.readouterr().err
    assert main(["eval", "--domain", "x=y.txt", "--out", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_config_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nno_such_option: 1\n")
    with pytest.raises(SystemExit) as done:
        main(["eval", "--config", str(bad)])
    assert done.value.code == 2


def test_every_decompose_setting_has_its_help_beside_it_and_flags_read_text_like_bench_set(capsys):
    from dataclasses import fields

    from koff.config import DecomposeConfig, parse_setting
    from koff.errors import UserInputError

    with pytest.raises(SystemExit):
        main(["decompose", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in fields(DecomposeConfig):
        assert f.metadata["help"] and " ".join(f.metadata["help"].split())[:40] in shown, f.name
    assert parse_setting("lora_targets", "q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_setting("eval_max_blocks", "none") is None and parse_setting("prune_ffn", "no") is False
    with pytest.raises(UserInputError, match="is not a float"):
        parse_setting("sparsity", "lots")


def test_every_option_has_help_and_an_export_is_always_called_export():
    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {a.dest}" for name, sub in commands.items() for a in sub._actions if a.dest != "help" and not a.help]
    assert not missing, missing
    for name in ("export", "info", "generate", "serve", "add-domain"):
        positionals = {a.dest: a.metavar for a in commands[name]._actions if not a.option_strings}
        assert positionals["export_dir"] == "EXPORT", name


def test_a_run_with_heldout_text_is_scored_on_it_beside_its_own_validation_blocks(tmp_path, corpus, capsys, monkeypatch):
    """`--heldout NAME=SOURCE` columns: dense, dense + memories, mask alone and KOFF on text never trained on;
    a domain whose real text is missing falls back (A|B) and its held-out text is left out. The
    validation blocks are scored once, by the table, and summary.json takes them from it."""
    from tiny import save_tiny
    import koff.training.pipeline

    monkeypatch.setattr(koff.training.pipeline, "evaluate", lambda decomposer: pytest.fail("scored twice"))

    model = save_tiny(tmp_path / "model")
    argv = ["decompose", "--model", model, "--domain", f"eng={corpus['eng']}",
            "--domain", f"code={tmp_path / 'not-fetched'}|{corpus['code']}", "--heldout", f"eng={corpus['deu']}",
            "--heldout", f"code={tmp_path / 'not-fetched-either'}", "--block-len", "32", "--steps", "2",
            "--batch-size", "2", "--kv-slots", "4", "--eval-max-blocks", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    table = json.loads((tmp_path / "run" / "eval" / "table.json").read_text())
    assert table["domains"] == ["eng", "code"] and table["transfer"] == [f"eng@{corpus['deu'].stem}"]
    assert set(table["price_of_offloading"]) == {"eng", "code", f"eng@{corpus['deu'].stem}"}
    assert "Mean price of offloading: training text" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    koff_row = next(r for r in table["rows"] if r["configuration"].startswith("KOFF"))
    assert summary["eval"]["mask+memories"]["domains"]["eng"]["perplexity"] == koff_row["perplexity"]["eng"]
    assert set(summary["eval"]) == {"dense", "mask+memories", "mask only"}
