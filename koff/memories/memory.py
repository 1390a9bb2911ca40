"""One domain's memory: LoRA adapters on chosen projections plus a learned key-value prefix.

The memory holds the parameters; each kind of part (``koff.memories.parts``) says what its
parameters are, how they are named, sliced, exported and checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from koff.errors import UserInputError
from koff.memories.parts import KV_PREFIX, LORA, PARTS, MemoryPart

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEMORY_KINDS = ("lora+kv", "lora", "kv", "none")


@dataclass
class MemoryConfig:
    """What a memory holds. ``kind`` is one of ``lora+kv``, ``lora``, ``kv``, ``none``."""

    kind: str = "lora+kv"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    kv_slots: int = 16

    def __post_init__(self):
        if self.kind not in MEMORY_KINDS:
            raise UserInputError(f"unknown memory kind {self.kind!r}; choose one of {', '.join(MEMORY_KINDS)}")
        unknown = sorted(set(self.lora_targets) - set(DEFAULT_LORA_TARGETS))
        if unknown:
            raise UserInputError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(DEFAULT_LORA_TARGETS)}")
        if self.use_lora and self.lora_rank < 1:
            raise UserInputError("lora_rank must be at least 1")
        if self.use_kv and self.kv_slots < 1:
            raise UserInputError("kv_slots must be at least 1")

    @property
    def parts(self) -> tuple[MemoryPart, ...]:
        """The kinds of part ``kind`` names ("lora+kv": both; "none": no memory)."""
        named = set(self.kind.split("+"))
        return tuple(part for part in PARTS if part.kind in named)

    @property
    def use_lora(self) -> bool:
        return LORA in self.parts

    @property
    def use_kv(self) -> bool:
        return KV_PREFIX in self.parts

    def to_dict(self) -> dict:
        return asdict(self)


def rows_in_stack(per_sample: Sequence["DomainMemory | None"], present: Sequence["DomainMemory"],
                  device: torch.device | str) -> torch.Tensor:
    """(batch,) long: each sample's place in ``present`` plus one, 0 for a sample whose memory is not
    in it: the row it takes of a stack of ``present``'s tensors with zeros first (LoRA factors, KV
    prefixes), so a mixed batch gathers each sample's own with one ``index_select``."""
    place = {id(m): i + 1 for i, m in enumerate(present)}
    return torch.tensor([place.get(id(m), 0) for m in per_sample], device=device)


class DomainMemory(nn.Module):
    """LoRA factors ``A`` (rank x in) and ``B`` (out x rank) per adapted projection, and per-layer
    prefix keys/values of shape (kv_heads, slots, head_dim)."""

    def __init__(
        self,
        name: str,
        lora_shapes: dict[str, tuple[int, int]],
        rank: int,
        alpha: float,
        prefix_shapes: list[tuple[int, int]] | None,
        slots: int,
    ):
        super().__init__()
        self.name = name
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if rank else 0.0
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.prefix_keys = nn.ParameterList()
        self.prefix_values = nn.ParameterList()
        LORA.add_to(self, lora_shapes, rank)
        KV_PREFIX.add_to(self, prefix_shapes or [], slots)

    @classmethod
    def from_flat_state(cls, name: str, state: dict[str, torch.Tensor], alpha: float) -> "DomainMemory":
        """Rebuild a memory from ``flat_state()`` tensors; shapes (and so per-layer widths) come from them."""
        lora_shapes, rank = LORA.shapes_of(state, name)
        prefix_shapes, slots = KV_PREFIX.shapes_of(state, name)
        memory = cls(name, lora_shapes, rank, alpha, prefix_shapes, slots)
        memory.load_flat_state(state)
        return memory

    @property
    def slots(self) -> int:
        return self.prefix_keys[0].shape[1] if len(self.prefix_keys) else 0

    @property
    def has_prefix(self) -> bool:
        return len(self.prefix_keys) > 0

    def lora_parameters(self) -> list[nn.Parameter]:
        return LORA.parameters(self)

    def prefix_parameters(self) -> list[nn.Parameter]:
        return KV_PREFIX.parameters(self)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for param, k in zip(self.prefix_keys, keys):
            param.copy_(k)
        for param, v in zip(self.prefix_values, values):
            param.copy_(v)

    def keeping(self, parts: Sequence[MemoryPart], name: str | None = None) -> "DomainMemory":
        """A copy holding only ``parts`` (a LoRA-only memory, say, for an engine with no KV prefix)."""
        state = {k: v for k, v in self.flat_state().items() if any(part.owns(k) for part in parts)}
        return DomainMemory.from_flat_state(name or self.name, state, self.alpha)

    def flat_state(self) -> dict[str, torch.Tensor]:
        """Tensors under stable, file-friendly names."""
        state = {name: tensor for part in PARTS for name, tensor in part.flat_state(self).items()}
        return {k: v.contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.flat_state()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise UserInputError(f"memory {self.name!r}: tensors do not match (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, target in own.items():
            if state[key].shape != target.shape:
                raise UserInputError(f"memory {self.name!r}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key])
