"""The fixed cost of a KOFF step, apart from its matmuls (issue 12, point 4).

A tiny-width model with many layers (30 layers of width 64, 5 domains, a micro-batch of 5 x 32
tokens) makes a step all overhead: what it measures is how many PyTorch operations a step
dispatches (each one a kernel launch on a GPU) and how long a step takes on one CPU thread. On a
GPU the 135M model's step is bound by the same launches.

    python bench/step_overhead.py [--steps 20] [--name step-overhead]

Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import command_line, git_commit, machine, top_level_aten_ops  # noqa: E402
from tiny import tiny_model  # noqa: E402

from koff.data.blocks import DomainData  # noqa: E402
from koff.io import markdown_table, write_json, write_text  # noqa: E402
from koff.training import DecomposeConfig, Decomposer  # noqa: E402


def decomposer(layers: int) -> Decomposer:
    g = torch.Generator().manual_seed(0)
    domains = [DomainData(f"d{i}", "random", torch.randint(0, 300, (32, 32), generator=g),
                          torch.randint(0, 300, (4, 32), generator=g)) for i in range(5)]
    config = DecomposeConfig(model="tiny", out=tempfile.mkdtemp(prefix="koff-overhead-"), block_len=32, batch_size=5,
                             kv_slots=4, steps=1000, eval=False, checkpoint_every=10**9)
    return Decomposer(config, base=tiny_model("llama", layers=layers), tokenizer=None, domains=domains)


def dispatched_ops(dec: Decomposer, steps: int = 2) -> float:
    """Top-level aten operations per step (a distilling and a plain step, averaged)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            dec.train_step()
    return top_level_aten_ops(prof) / steps


def step_seconds(dec: Decomposer, steps: int) -> float:
    import time

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        dec.train_step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="step-overhead")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dec = decomposer(args.layers)
    for _ in range(3):
        dec.train_step()
    result = {"command": command, "machine": machine("cpu"), "commit": commit, "layers": args.layers,
              "ops_per_step": dispatched_ops(dec), "median_seconds_per_step": step_seconds(dec, args.steps)}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", result)
    table = markdown_table(["layers", "dispatched ops per step", "median ms per step"],
                           [[args.layers, f"{result['ops_per_step']:.0f}", f"{1000 * result['median_seconds_per_step']:.0f}"]])
    text = f"# {args.name}\n\n`{command}`\n\n{result['machine']}, commit {commit}\n\n{table}\n"
    write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
