"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import platform

import torch

from koff.training import DecomposeConfig


def machine(device: str = "cpu") -> str:
    """One line naming where a benchmark ran: processor, threads, torch, and the GPU if any."""
    text = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return text + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else "")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The training settings the benchmarks let a run override, with the library's defaults."""
    parser.add_argument("--distill-every", type=int, default=DecomposeConfig.distill_every,
                        help="distil on every k-th step only (weighted x k)")
    parser.add_argument("--lr-mask", type=float, default=DecomposeConfig.lr_mask, help="learning rate of the gates")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
