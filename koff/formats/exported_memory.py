"""One domain's memory beside an exported backbone, on disk (written by export and add-domain,
read by the runtime).

* ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA half in PEFT's format, sliced
  to the kept units, so ``peft.PeftModel.from_pretrained`` loads it onto a uniform backbone;
* ``kv_prefix.safetensors``: the KV half, ``layers.{i}.keys`` / ``layers.{i}.values`` of shape
  (kv_heads, slots, head_dim);
* ``manifest.json``: domain, sizes, training data summary and the backbone's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from koff.errors import UserInputError
from koff.io import read_json, write_json
from koff.memories.memory import DomainMemory
from koff.memories.parts import LORA, MAX_VALUE, PARTS, MemoryFit
from koff.tensor_files import load_tensors

FORMAT = "koff-memory-export-v1"
MANIFEST = "manifest.json"


def write_memory(folder: Path, name: str, state: dict, memory: DomainMemory, module_names: dict, manifest: dict) -> None:
    """Write a memory's (sliced) flat state, each part in its own file, and its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        part.export(folder, state, memory, module_names)
    has_lora = any(LORA.owns(k) for k in state)
    write_json(folder / MANIFEST, {"format": FORMAT, "name": name, "lora_rank": memory.rank if has_lora else 0,
                                   "lora_alpha": memory.alpha, "kv_slots": memory.slots, **manifest})


def read_exported_state(folder: Path, fit: MemoryFit, manifest: dict) -> dict:
    """Inverse of ``write_memory``: flat state (lora_A.<layer>_<proj>, prefix.keys.<i>, ...), after
    each part checked its file's tensor names, shapes and dtypes against ``fit`` from the header
    (before any tensor is read) and the manifest's settings, and then every value: a memory that
    loads can join any batch of this backbone."""
    files = {part: folder / part.file for part in PARTS if (folder / part.file).is_file()}
    names = {path: part.check_file(path, fit, manifest) for part, path in files.items()}
    state = {}
    for path in files.values():
        state |= {names[path][name]: tensor for name, tensor in load_tensors(path).items()}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all() or tensor.abs().max() > MAX_VALUE:
            raise UserInputError(f"{folder}: {key} holds NaN or infinite values, or values beyond {MAX_VALUE:g}; the "
                                 "memory would corrupt every batch it joins")
    return state


def training_data(folder: Path) -> dict:
    """The summary of the text a memory was trained on (name, source, block_len, ...) that its
    manifest records; {} where it records none."""
    return read_json(folder / MANIFEST).get("data") or {}


def memory_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
