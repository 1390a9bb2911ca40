"""The run folder that ``koff decompose`` writes, and reading it back: config, a fresh base model,
the final mask, the memories.

    config.yaml        the run's DecomposeConfig
    log.jsonl          one record per step (loss, expected sparsity, target, tokens/s)
    checkpoints/       safetensors + JSON (``koff.training.checkpoint``)
    mask.safetensors   the final binary mask; mask.json its statistics
    memories/<name>/   each domain's memory (``koff.formats.run_memory``)
    summary.json       steps, timings, sparsity, and "eval" once the run is evaluated
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from koff.config import DecomposeConfig
from koff.errors import KoffError
from koff.formats.run_memory import load_memory_state, save_memory
from koff.io import read_yaml, write_json
from koff.masks.binary import BinaryMask
from koff.memories.memory import DomainMemory
from koff.models import load_model


CONFIG = "config.yaml"
LOG = "log.jsonl"
CHECKPOINTS = "checkpoints"
MASK = "mask.safetensors"
MASK_STATS = "mask.json"
MEMORIES = "memories"
SUMMARY = "summary.json"


class RunFolderError(KoffError, FileNotFoundError):
    """Not a (finished) koff run folder."""


@dataclass
class RunOutputs:
    """A finished run's outputs, without its base model."""

    folder: Path
    config: DecomposeConfig
    mask: BinaryMask
    memories: dict[str, DomainMemory] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)


@dataclass
class Run:
    folder: Path
    config: DecomposeConfig
    model: object
    tokenizer: object
    mask: BinaryMask
    memories: dict[str, DomainMemory] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)

    def koff_model(self):
        """The run's masked model with its memories (wraps ``self.model`` in place)."""
        from koff.model import KoffModel

        model = KoffModel(self.model, self.config.memory_config(), self.mask)
        for memory in self.memories.values():
            model.add_memory(memory)
        return model.eval()


def write_outputs(folder: Path, mask: BinaryMask, costs, memories: dict[str, DomainMemory], extras: dict[str, dict],
                  summary: dict) -> dict:
    """Write a finished run's mask, its statistics, each memory (with ``extras[name]`` in its
    manifest) and ``summary.json`` (with the mask's sparsity added); the summary back."""
    mask.save(folder / MASK, costs)
    stats = mask.stats(costs)
    write_json(folder / MASK_STATS, stats)
    for name, memory in memories.items():
        save_memory(memory, folder / MEMORIES / name, extras[name])
    summary = summary | {"sparsity": stats["sparsity"], "whole_model_sparsity": stats["whole_model_sparsity"],
                         "memory_parameters": {n: m.num_parameters() for n, m in memories.items()}}
    write_summary(folder, summary)
    return summary


def write_summary(folder: Path, summary: dict) -> None:
    """``summary.json`` (rewritten whole: e.g. with ``eval`` once the run is evaluated)."""
    write_json(folder / SUMMARY, summary)


def read_config_values(folder: Path) -> dict:
    """The run's config.yaml as a plain mapping (to merge with flags before building the config)."""
    path = folder / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{path} not found (is {folder} a `koff decompose` run folder?)")
    values = read_yaml(path)
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} is not a koff run config")
    return values


def read_config(folder: Path) -> DecomposeConfig:
    """The run's DecomposeConfig; a config.yaml from another koff version or hand-edited wrongly is refused in words."""
    try:
        return DecomposeConfig.from_dict(read_config_values(folder))
    except TypeError as err:
        raise RunFolderError(f"{folder / CONFIG}: {err}") from err


def read_run(folder: str | Path) -> RunOutputs:
    """What a finished run wrote (config, mask, memories), without loading its base model."""
    folder = Path(folder)
    if not (folder / MASK).is_file():
        raise RunFolderError(f"{folder} is not a finished koff run: {MASK} is missing")
    outputs = RunOutputs(folder, read_config(folder), BinaryMask.load(folder / MASK))
    memories = folder / MEMORIES
    for path in sorted(memories.iterdir()) if memories.is_dir() else []:
        manifest, tensors = load_memory_state(path)
        outputs.memories[path.name] = DomainMemory.from_flat_state(path.name, tensors, manifest["lora_alpha"])
        outputs.manifests[path.name] = manifest
    return outputs


def load_run(folder: str | Path, device: str = "cpu") -> Run:
    """The run's base model (in the run's dtype) with its mask, memories and tokenizer."""
    outputs = read_run(folder)
    config = outputs.config
    loaded = load_model(config.model, dtype=config.dtype, device=device)
    return Run(outputs.folder, config, loaded.model, loaded.tokenizer, outputs.mask, outputs.memories, outputs.manifests)
