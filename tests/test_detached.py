"""scripts/detached.sh: a command started in its own process session outlives the shell that started
it, and `wait` brings back what it wrote, whether or not it has ended."""

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "detached.sh"
pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")


def detached(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_command_outlives_its_starter_and_its_results_come_back(tmp_path):
    run = tmp_path / "out" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-1.pt").write_text("big")
    (run / "summary.json").write_text("{}")
    started = detached("start", "job", "--", "bash", "-c", "sleep 1; echo trained; echo done > result.txt",
                       cwd=tmp_path)
    assert started.returncode == 0, started.stderr  # the starter has returned; the command goes on

    early = detached("wait", "job", "0", "back", cwd=tmp_path)
    assert "still running" in early.stdout

    done = detached("wait", "job", "30", "back", "result.txt", "out/run", cwd=tmp_path)
    assert "ended, exit 0" in done.stdout and "trained" in done.stdout
    assert (tmp_path / "back" / "result.txt").read_text() == "done\n"
    assert (tmp_path / "back" / "log").read_text() == "trained\n"
    with tarfile.open(tmp_path / "back" / "run.tgz") as tar:
        assert sorted(tar.getnames()) == ["run", "run/summary.json"]  # no checkpoints


def test_a_second_start_while_the_first_runs_is_refused(tmp_path):
    assert detached("start", "job", "--", "sleep", "3", cwd=tmp_path).returncode == 0
    again = detached("start", "job", "--", "true", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip() == "detached.sh: job holds a command that has not ended"
    assert detached("wait", "job", "30", "back", cwd=tmp_path).stdout.startswith("status: ended, exit 0")


def test_bad_calls_are_refused_with_one_line(tmp_path):
    assert detached("wait", "nothing", "5", "back", cwd=tmp_path).stderr.strip() == "detached.sh: nothing was started in nothing"
    assert detached("wait", "job", "soon", "back", cwd=tmp_path).stderr.strip() == \
        "detached.sh: SECONDS must be a whole number, not 'soon'"
    assert detached("start", "job", "true", cwd=tmp_path).stderr.strip() == "detached.sh: start needs -- and a command"
