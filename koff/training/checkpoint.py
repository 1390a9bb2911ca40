"""Checkpoints as safetensors + JSON (no pickles), written atomically.

Each checkpoint is a folder ``checkpoints/step-NNNNNN`` holding ``tensors.safetensors`` (trainable
parameters, optimiser moments, RNG state) and ``state.json`` (step, sampler position, optimiser
hyper-parameters). ``checkpoints/latest.json`` names the newest complete one; it is replaced
atomically only after the folder is fully written, so a run killed at any moment resumes from the
last complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from koff.io import read_json, write_json

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
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    write_json(tmp / "state.json", {"step": step, **state})
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(folder / LATEST, {"checkpoint": name, "step": step})
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / read_json(pointer)["checkpoint"]
    return load_file(str(path / "tensors.safetensors")), read_json(path / "state.json")
