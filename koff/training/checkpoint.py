"""Checkpoints as safetensors + JSON (no pickles), written atomically.

Each checkpoint is a folder ``checkpoints/step-NNNNNN`` holding ``tensors.safetensors`` (trainable
parameters, optimiser moments, RNG state) and ``state.json`` (step, sampler position, optimiser
hyper-parameters). ``checkpoints/latest.json`` names the newest complete one, for readers. A folder
gets its final name only once fully written (it is written as ``.step-NNNNNN.*`` and renamed), so
a run killed at any moment leaves complete checkpoints and at most one stray temporary folder.
Resuming takes the newest checkpoint that loads; one that does not (a disk fault, a hand-edited
file) is skipped with a warning, and the one before it is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from koff.errors import KoffError
from koff.io import read_json, remove_leftovers, write_json
from koff.tensor_files import load_tensors, save_tensors

log = logging.getLogger(__name__)

LATEST = "latest.json"


def flatten_optimizer(prefix: str, state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            name = f"{prefix}.{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().clone().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    items = [(k, v) for k, v in tensors.items() if k.startswith(prefix + ".")]
    items += [(k, v) for k, v in meta["scalars"].items()]
    for name, value in items:
        index, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder, ".step-*")  # left by a run killed while writing
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    save_tensors(tensors, tmp / "tensors.safetensors")
    write_json(tmp / "state.json", {"step": step, **state})
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(folder / LATEST, {"checkpoint": name, "step": step})
    for old in checkpoint_folders(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folders(folder: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    return sorted((p for p in folder.glob("step-*") if p.is_dir()), reverse=True)


def load_latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of the newest checkpoint that loads; None where there is none at all."""
    candidates = checkpoint_folders(folder)
    for path in candidates:
        try:
            state = read_json(path / "state.json")
            tensors = load_tensors(path / "tensors.safetensors")
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("state.json names no step")
        except Exception as err:  # noqa: BLE001 - truncated or corrupt: try the one before
            log.warning("checkpoint %s cannot be read (%s: %s); trying an older one", path, type(err).__name__, err)
            continue
        if path != candidates[0]:
            log.warning("resuming from the older checkpoint %s", path.name)
        return tensors, state
    if candidates:
        raise KoffError(f"none of the {len(candidates)} checkpoints in {folder} can be read; move the folder away "
                        "to start the run again from step 0")
    return None


@dataclass
class TrainingState:
    """Everything a checkpoint holds of a run besides its step: the trainable tensors by name, the
    optimisers and schedule, the sampler's position, and the device whose CUDA RNG state is kept."""

    trainable: dict[str, torch.Tensor]
    optimizers: dict[str, torch.optim.Optimizer | None]  # prefix -> optimiser (None: not used by this run)
    scheduler: Any
    sampler: Any  # state_dict() / load_state_dict()
    device: torch.device

    def save(self, folder: Path, step: int) -> Path:
        tensors = {k: p.detach().clone() for k, p in self.trainable.items()}
        state = {"sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else None}
        for prefix, optimizer in self.optimizers.items():
            if optimizer is not None:
                optimizer_tensors, state[prefix] = flatten_optimizer(prefix, optimizer.state_dict())
                tensors |= optimizer_tensors
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return save_checkpoint(folder, step, tensors, state)

    def restore(self, folder: Path) -> int | None:
        """Load the newest checkpoint that loads into this state; its step, or None where there is none."""
        found = load_latest(folder)
        if found is None:
            return None
        tensors, state = found
        missing = sorted(set(self.trainable) - set(tensors))
        if missing:
            raise KoffError(f"the checkpoint in {folder} does not belong to this run's configuration "
                            f"(it lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(tensors[name])
        for prefix, optimizer in self.optimizers.items():
            if optimizer is not None:
                optimizer.load_state_dict(unflatten_optimizer(prefix, tensors, state[prefix]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        return state["step"]
