"""Read a decomposition run folder back: config, a fresh base model, the final mask, the memories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from koff.errors import KoffError
from koff.io import read_yaml
from koff.masks.binary import BinaryMask
from koff.memories.files import load_memory_state
from koff.memories.memory import DomainMemory
from koff.models import load_model
from koff.training.config import DecomposeConfig


class RunFolderError(KoffError, FileNotFoundError):
    """Not a (finished) koff run folder."""


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


def load_run(folder: str | Path, device: str = "cpu") -> Run:
    folder = Path(folder)
    for name in ("config.yaml", "mask.safetensors"):
        if not (folder / name).is_file():
            raise RunFolderError(f"{folder} is not a finished koff run: {name} is missing")
    config = DecomposeConfig.from_dict(read_yaml(folder / "config.yaml"))
    loaded = load_model(config.model, dtype=config.dtype, device=device)
    run = Run(folder, config, loaded.model, loaded.tokenizer, BinaryMask.load(folder / "mask.safetensors"))
    memories = folder / "memories"
    for path in sorted(memories.iterdir()) if memories.is_dir() else []:
        manifest, tensors = load_memory_state(path)
        run.memories[path.name] = DomainMemory.from_flat_state(path.name, tensors, manifest["lora_alpha"])
        run.manifests[path.name] = manifest
    return run
