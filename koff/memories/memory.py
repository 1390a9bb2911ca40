"""One domain's memory: LoRA adapters on chosen projections plus a learned key-value prefix."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from koff.errors import UserInputError

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
    def use_lora(self) -> bool:
        return "lora" in self.kind

    @property
    def use_kv(self) -> bool:
        return "kv" in self.kind

    def to_dict(self) -> dict:
        return asdict(self)


def rows_in_stack(per_sample: Sequence["DomainMemory | None"], present: Sequence["DomainMemory"],
                  device: torch.device | str) -> torch.Tensor:
    """(batch,) long: each sample's place in ``present`` plus one, 0 for a sample whose memory is not
    in it: the row it takes of a stack of ``present``'s tensors with zeros first (LoRA factors, KV
    prefixes), so a mixed batch gathers each sample's own with one ``index_select``."""
    place = {id(m): i + 1 for i, m in enumerate(present)}
    return torch.tensor([place.get(id(m), 0) for m in per_sample], device=device)


def lora_key(layer: int, projection: str) -> str:
    """Parameter-dict key of one adapted projection (dots are not allowed in module keys)."""
    return f"{layer}_{projection}"


def parse_lora_key(key: str) -> tuple[int, str]:
    layer, projection = key.split("_", 1)
    return int(layer), projection


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
        for key, (fan_in, fan_out) in lora_shapes.items():
            a = torch.empty(rank, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT: A random, B zero
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(fan_out, rank))
        self.prefix_keys = nn.ParameterList()
        self.prefix_values = nn.ParameterList()
        for kv_heads, head_dim in prefix_shapes or []:
            self.prefix_keys.append(nn.Parameter(torch.zeros(kv_heads, slots, head_dim)))
            self.prefix_values.append(nn.Parameter(torch.zeros(kv_heads, slots, head_dim)))

    @classmethod
    def from_flat_state(cls, name: str, state: dict[str, torch.Tensor], alpha: float) -> "DomainMemory":
        """Rebuild a memory from ``flat_state()`` tensors; shapes (and so per-layer widths) come from them."""
        lora_shapes = {k[len("lora_A."):]: (v.shape[1], state["lora_B." + k[len("lora_A."):]].shape[0])
                       for k, v in state.items() if k.startswith("lora_A.")}
        ranks = {v.shape[0] for k, v in state.items() if k.startswith("lora_A.")}
        if len(ranks) > 1:
            raise UserInputError(f"memory {name!r}: LoRA factors of different ranks {sorted(ranks)}")
        n_layers = len([k for k in state if k.startswith("prefix.keys.")])
        keys = [state[f"prefix.keys.{i}"] for i in range(n_layers)]
        if len({k.shape[1] for k in keys}) > 1:
            raise UserInputError(f"memory {name!r}: KV prefix layers hold different slot counts")
        memory = cls(name, lora_shapes, ranks.pop() if ranks else 0, alpha,
                     [(k.shape[0], k.shape[2]) for k in keys], keys[0].shape[1] if keys else 0)
        memory.load_flat_state(state)
        return memory

    @property
    def slots(self) -> int:
        return self.prefix_keys[0].shape[1] if len(self.prefix_keys) else 0

    @property
    def has_prefix(self) -> bool:
        return len(self.prefix_keys) > 0

    def lora_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_A.values()) + list(self.lora_B.values())

    def prefix_parameters(self) -> list[nn.Parameter]:
        return list(self.prefix_keys) + list(self.prefix_values)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for param, k in zip(self.prefix_keys, keys):
            param.copy_(k)
        for param, v in zip(self.prefix_values, values):
            param.copy_(v)

    def flat_state(self) -> dict[str, torch.Tensor]:
        """Tensors under stable, file-friendly names."""
        state = {f"lora_A.{k}": p.detach() for k, p in self.lora_A.items()}
        state |= {f"lora_B.{k}": p.detach() for k, p in self.lora_B.items()}
        state |= {f"prefix.keys.{i}": p.detach() for i, p in enumerate(self.prefix_keys)}
        state |= {f"prefix.values.{i}": p.detach() for i, p in enumerate(self.prefix_values)}
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
