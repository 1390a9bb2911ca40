"""A memory on disk, in a run folder: ``memory.safetensors`` plus a ``memory.json`` manifest.

(The export step converts these into PEFT's adapter format for the pruned backbone.)
"""

from __future__ import annotations

from pathlib import Path

from koff.errors import UserInputError
from koff.io import read_json, write_json
from koff.memories.memory import DomainMemory
from koff.memories.parts import parse_lora_key
from koff.tensor_files import load_tensors, save_tensors

FORMAT = "koff-memory-v1"


def save_memory(memory: DomainMemory, folder: Path, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(memory.flat_state(), folder / "memory.safetensors")
    write_json(folder / "memory.json", {"format": FORMAT, **describe(memory), **(extra or {})})
    return folder


def describe(memory: DomainMemory) -> dict:
    return {
        "name": memory.name,
        "lora_rank": memory.rank,
        "lora_alpha": memory.alpha,
        "lora_targets": sorted({parse_lora_key(k)[1] for k in memory.lora_A}),
        "kv_slots": memory.slots,
        "parameters": memory.num_parameters(),
        "lora_parameters": sum(p.numel() for p in memory.lora_parameters()),
        "kv_parameters": sum(p.numel() for p in memory.prefix_parameters()),
    }


def load_memory_state(folder: Path) -> tuple[dict, dict]:
    """(manifest, tensors) of a saved memory."""
    manifest = read_json(folder / "memory.json")
    if manifest.get("format") != FORMAT:
        raise UserInputError(f"{folder} is not a koff memory (format {manifest.get('format')!r})")
    return manifest, load_tensors(folder / "memory.safetensors")
