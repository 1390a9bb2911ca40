"""What the benchmark scripts share."""

from __future__ import annotations

import platform

import torch


def machine(device: str = "cpu") -> str:
    """One line naming where a benchmark ran: processor, threads, torch, and the GPU if any."""
    text = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return text + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else "")
