"""The named configs in configs/ are what `koff decompose --config` runs: each resolves to a valid
decomposition, and the README's first command names the one the benchmarks measure."""

from pathlib import Path

import pytest

from koff.cli import build_parser
from koff.cli.common import resolve_args
from koff.cli.decompose_cmd import _new_config

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_named_config_is_a_valid_decomposition(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its out/ is relative: no run of this checkout is looked at
    args = resolve_args(build_parser(), ["decompose", "--config", str(path)])
    config = _new_config(args, Path(args.out))
    assert config.domain and config.sparsity > 0 and config.steps > 0


def test_a_flag_beside_a_named_config_overrides_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = resolve_args(build_parser(), ["decompose", "--config", str(ROOT / "configs/smollm2.yaml"), "--steps", "7"])
    config = _new_config(args, Path(args.out))
    assert config.steps == 7 and config.batch_size == 5 and len(config.domain) == 5


def test_the_readme_runs_the_named_config():
    assert "koff decompose --config configs/smollm2-real.yaml" in (ROOT / "README.md").read_text().split("## ")[0]
