"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from koff.config import DecomposeConfig, parse_setting


def machine(device: str = "cpu") -> str:
    """One line naming where a benchmark ran: processor, threads, torch, and the GPU if any."""
    text = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if not device.startswith("cuda"):
        return text
    return text + (f", {torch.cuda.get_device_name(device)}" if torch.cuda.is_available() else ", no CUDA device here")


def command_line() -> str:
    """The command that ran this benchmark, as a shell would take it (written beside its results)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def git_commit() -> str:
    """The commit the benchmark ran at, with ``+dirty`` when the working tree had changes.
    ``$KOFF_GIT_COMMIT``, where set, wins: a copy of the tree on a lent GPU machine may carry no git
    history, or a stale one (one such copy's .git still named the commit its session started from)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    if os.environ.get("KOFF_GIT_COMMIT"):
        return os.environ["KOFF_GIT_COMMIT"]
    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """Where results go and the shapes speed is measured at (export and uniform benchmarks)."""
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward / generation batch")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence of the forward measurement")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (the median counts)")


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def named_config(name: str) -> dict:
    """``configs/NAME.yaml``: the settings `koff decompose --config` runs, which a benchmark reuses."""
    from koff.io import read_yaml

    return read_yaml(CONFIGS / f"{name}.yaml")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The training settings the benchmarks let a run override, with the library's defaults."""
    parser.add_argument("--distill-every", type=int, default=DecomposeConfig.distill_every,
                        help="distil on every k-th step only (weighted x k)")
    parser.add_argument("--lr-mask", type=float, default=DecomposeConfig.lr_mask, help="learning rate of the gates")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other decompose setting, e.g. --set lr_lora=3e-3 (repeatable)")


def with_settings(config: DecomposeConfig, settings: list[str]) -> DecomposeConfig:
    """``config`` with ``--set NAME=VALUE`` settings applied, each read as the command-line flag reads it."""
    values = config.to_dict()
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep or name not in values:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME a decompose setting")
        values[name] = parse_setting(name, text)
    return DecomposeConfig.from_dict(values)


def top_level_aten_ops(prof) -> int:
    """PyTorch operations a profiled block dispatched: aten events not inside another aten event
    (each one a kernel launch or more on a GPU)."""
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the files under ``folder`` whose names match ``pattern``."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())
