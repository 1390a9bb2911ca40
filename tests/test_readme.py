"""The README's quick tour runs as written: every command of its block, in order, from a fresh folder,
with only the model, the corpora and the budget made tiny (and `koff serve`, which would not return,
left out)."""

import re
import shlex
from pathlib import Path

from koff.cli import main
from tiny import save_tiny, write_corpus

README = Path(__file__).parent.parent / "README.md"


def quick_tour() -> list[list[str]]:
    """The `koff` commands of the README's quick tour, each as its argument list."""
    text = README.read_text()
    block = re.search(r"## Quick tour\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "koff":
            commands.append(words[1:])
    return commands


def tiny_budget(argv: list[str], model: str, corpus: dict) -> list[str]:
    """``argv`` with the embedded model, the bundled corpora and the step count made tiny."""
    swaps = {"smollm2-135m": model, "eng=bundled:eng": f"eng={corpus['eng']}", "deu=bundled:deu": f"deu={corpus['deu']}"}
    argv = [swaps.get(word, word) for word in argv]
    if argv[0] == "decompose":
        argv[argv.index("--steps") + 1] = "2"
        argv += ["--block-len", "32", "--kv-slots", "4"]
    return argv


def test_the_quick_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = quick_tour()
    assert [c[0] for c in commands] == ["decompose", "export", "info", "generate", "eval", "analyze", "serve"]
    model, corpus = save_tiny(tmp_path / "model"), write_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands[:-1]:
        assert main(tiny_budget(argv, model, corpus)) == 0, (argv, capsys.readouterr().err)
    assert (tmp_path / "exports" / "demo" / "memories" / "deu").is_dir()
