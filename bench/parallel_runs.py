"""Independent decompositions side by side, each in its own process.

On one GPU a run of a small model leaves the device idle most of the time (its steps are bound by
kernel launches and Python), so several runs at once finish in about the time of one. Each run is
its own ``python bench/parallel_runs.py CONFIG`` process: it trains or resumes the run
folder the config names, so a command cut off part-way resumes every run where it stopped.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from koff.config import DecomposeConfig
from koff.errors import KoffError
from koff.formats import run as run_folder
from koff.io import read_json, write_yaml
from koff.training import train_or_resume

PROCESS_LOG = "process.log"


def finished(config: DecomposeConfig) -> bool:
    """Whether the run folder holds a finished run of exactly this config. A setting added to koff
    after the run was made counts at its default, so a new setting does not send old runs to train again."""
    out = Path(config.out)
    if not (out / run_folder.SUMMARY).is_file() or not (out / run_folder.CONFIG).is_file():
        return False
    try:
        same = run_folder.read_config(out).to_dict() == config.to_dict()
    except KoffError:  # a config another koff wrote, or damaged: not this run
        return False
    return same and read_json(out / run_folder.SUMMARY).get("steps") == config.steps


def train_concurrently(configs: list[DecomposeConfig], jobs: int) -> None:
    """Train (or resume) every unfinished run, ``jobs`` processes at a time; raise if one fails.

    Each process writes its output to ``PROCESS_LOG`` in its run folder, and evaluates its run
    there when the config asks for it (the evaluation lands in the run's summary.json).
    """
    todo = [c for c in configs if not finished(c)]
    if not todo:
        return
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        codes = list(pool.map(_train_in_process, todo))
    failed = [c.out for c, code in zip(todo, codes) if code]
    if failed:
        raise KoffError(f"{len(failed)} of {len(todo)} runs failed; see {PROCESS_LOG} in: {', '.join(failed)}")


def train_all(configs: list[DecomposeConfig], jobs: int = 1) -> None:
    """Train (or resume) every unfinished run: with ``jobs`` > 1 that many processes at a time,
    else one after another in this process. Finished runs are left as they are, not reloaded."""
    if jobs > 1:
        train_concurrently(configs, jobs)
    for config in configs:
        if not finished(config):
            train_or_resume(config)


def _train_in_process(config: DecomposeConfig) -> int:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / run_folder.CONFIG, config.to_dict())
    with (out / PROCESS_LOG).open("a") as log:
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out / run_folder.CONFIG)],
                              stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _main(config_path: str) -> None:
    train_or_resume(DecomposeConfig.from_dict(run_folder.read_config_values(Path(config_path).parent)))


if __name__ == "__main__":
    _main(sys.argv[1])
