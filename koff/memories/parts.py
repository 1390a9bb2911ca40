"""The kinds of part a memory is made of: LoRA factors and a KV prefix.

A part owns everything about its kind: the parameters it adds to a memory and their shapes, the
names of its tensors in a memory's flat state (a run's memory file, a checkpoint), how it narrows
with a pruned backbone at export, its file in an exported memory folder, and the checks a file of
it must pass before it may join a backbone's batches (names, shapes and dtypes from the file's
header, before any tensor is read). A ``DomainMemory`` holds the parameters; the parts say what
they are. A new kind of memory part is one class here and its entry in ``PARTS``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from koff.errors import UserInputError
from koff.models.architecture import decoder_layout
from koff.tensor_files import FLOAT_DTYPES, TensorInfo, read_header, save_tensors

if TYPE_CHECKING:
    from koff.memories.memory import DomainMemory

# Bounds a memory must keep to be served: far above anything trained (rank 8, scale 2, values < 10),
# far below what overflows a float16 or bfloat16 forward pass.
MAX_RANK = 1024
MAX_SCALE = 1e3
MAX_SLOTS = 4096
MAX_VALUE = 1e4


def lora_key(layer: int, projection: str) -> str:
    """Parameter-dict key of one adapted projection (dots are not allowed in module keys)."""
    return f"{layer}_{projection}"


def parse_lora_key(key: str) -> tuple[int, str]:
    layer, projection = key.split("_", 1)
    return int(layer), projection


@dataclass(frozen=True)
class MemoryFit:
    """What a memory must fit to join a backbone's batches: its adaptable projections by PEFT module
    name, their (in, out) features, each layer's KV heads, the head size, and the context length."""

    modules: dict[str, tuple[int, str]]
    features: dict[tuple[int, str], tuple[int, int]]
    kv_heads: list[int]
    head_dim: int
    context: int

    @classmethod
    def of(cls, model) -> "MemoryFit":
        layout = decoder_layout(model)
        names = peft_module_names(model)
        features = {key: (layout.layers[key[0]].projection(key[1]).in_features,
                          layout.layers[key[0]].projection(key[1]).out_features) for key in names}
        kv_heads = [p.projection("k_proj").out_features // layout.head_dim for p in layout.layers]
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        return cls({name: key for key, name in names.items()}, features, kv_heads, layout.head_dim, context)


def peft_module_names(model) -> dict[tuple[int, str], str]:
    """(layer, projection) -> the module's dotted name in the backbone (e.g. model.layers.3.mlp.up_proj)."""
    layout = decoder_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {(p.index, role): names[id(p.projection(role))] for p in layout.layers for role in layout.adapter.roles}


class Narrowing(Protocol):
    """One projection's kept rows and columns (``koff.export.prune.Narrowing``)."""

    def of_rows(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def of_cols(self, tensor: torch.Tensor) -> torch.Tensor: ...


class MemoryPart(ABC):
    """One kind of memory part (a stateless description; the memory holds the tensors)."""

    kind: str  # its name in a memory kind: "lora", "kv"
    file: str  # its file in an exported memory folder
    flat_prefixes: tuple[str, ...]  # the first component of its tensors' names in a flat state

    def owns(self, flat_name: str) -> bool:
        """Whether a tensor of a memory's flat state is this part's."""
        return flat_name.split(".", 1)[0] in self.flat_prefixes

    @abstractmethod
    def parameters(self, memory: "DomainMemory") -> list[nn.Parameter]: ...

    @abstractmethod
    def flat_state(self, memory: "DomainMemory") -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def sliced(self, memory: "DomainMemory", narrowings: list[dict[str, Narrowing]],
               kept_groups: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Its flat state restricted to a pruned backbone's kept units (per layer: each projection's
        narrowing by role, and the indices of the KV groups kept)."""

    @abstractmethod
    def export(self, folder: Path, state: dict[str, torch.Tensor], memory: "DomainMemory",
               module_names: dict[tuple[int, str], str]) -> None:
        """Write its tensors of ``state`` (already sliced) into an exported memory folder."""

    @abstractmethod
    def check_file(self, path: Path, fit: MemoryFit, manifest: dict) -> dict[str, str]:
        """File name -> flat name of every tensor in its exported file, after checking the file's
        header against the backbone (``fit``) and the memory's manifest; refuses what does not fit."""


class LoRAPart(MemoryPart):
    """LoRA factors ``A`` (rank x in) and ``B`` (out x rank) per adapted projection, in PEFT's
    format once exported (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    kind = "lora"
    file = "adapter_model.safetensors"
    flat_prefixes = ("lora_A", "lora_B")

    def add_to(self, memory: "DomainMemory", shapes: dict[str, tuple[int, int]], rank: int) -> None:
        for key, (fan_in, fan_out) in shapes.items():
            a = torch.empty(rank, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT: A random, B zero
            memory.lora_A[key] = nn.Parameter(a)
            memory.lora_B[key] = nn.Parameter(torch.zeros(fan_out, rank))

    @staticmethod
    def shapes_of(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, tuple[int, int]], int]:
        """({key: (in, out)}, rank) of the LoRA factors in a flat state."""
        shapes = {k[len("lora_A."):]: (v.shape[1], state["lora_B." + k[len("lora_A."):]].shape[0])
                  for k, v in state.items() if k.startswith("lora_A.")}
        ranks = {v.shape[0] for k, v in state.items() if k.startswith("lora_A.")}
        if len(ranks) > 1:
            raise UserInputError(f"memory {name!r}: LoRA factors of different ranks {sorted(ranks)}")
        return shapes, ranks.pop() if ranks else 0

    def parameters(self, memory: "DomainMemory") -> list[nn.Parameter]:
        return list(memory.lora_A.values()) + list(memory.lora_B.values())

    def flat_state(self, memory: "DomainMemory") -> dict[str, torch.Tensor]:
        return ({f"lora_A.{k}": p.detach() for k, p in memory.lora_A.items()}
                | {f"lora_B.{k}": p.detach() for k, p in memory.lora_B.items()})

    def sliced(self, memory, narrowings, kept_groups) -> dict[str, torch.Tensor]:
        state = {}
        for key, a in memory.lora_A.items():
            layer, role = parse_lora_key(key)
            narrowing = narrowings[layer][role]
            state[f"lora_A.{key}"] = narrowing.of_cols(a.detach()).contiguous()
            state[f"lora_B.{key}"] = narrowing.of_rows(memory.lora_B[key].detach()).contiguous()
        return state

    def export(self, folder, state, memory, module_names) -> None:
        lora = {k: v for k, v in state.items() if self.owns(k)}
        if not lora:
            return
        from peft import LoraConfig

        targets = sorted({parse_lora_key(k.split(".", 1)[1])[1] for k in lora})
        LoraConfig(r=memory.rank, lora_alpha=memory.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM").save_pretrained(str(folder))
        tensors = {}
        for flat, tensor in lora.items():
            factor, key = flat.split(".", 1)
            tensors[f"base_model.model.{module_names[parse_lora_key(key)]}.{factor}.weight"] = tensor
        save_tensors(tensors, folder / self.file)

    def check_file(self, path, fit, manifest) -> dict[str, str]:
        header, names = read_header(path), {}
        rank, alpha = manifest.get("lora_rank"), manifest.get("lora_alpha")
        if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise UserInputError(f"{path.parent}: manifest's lora_rank {rank!r} is not a rank from 1 to {MAX_RANK}")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < abs(alpha / rank) <= MAX_SCALE:
            raise UserInputError(f"{path.parent}: lora_alpha {alpha!r} gives a LoRA scale outside (0, {MAX_SCALE:g}]")
        for name, info in header.items():
            module, _, factor = name.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
            if not name.startswith("base_model.model.") or factor not in ("lora_A", "lora_B") or module not in fit.modules:
                raise UserInputError(f"{path}: {name} is not a LoRA factor of a projection of this backbone")
            fan_in, fan_out = fit.features[fit.modules[module]]
            expect_tensor(path, name, info, (rank, fan_in) if factor == "lora_A" else (fan_out, rank))
            names[name] = f"{factor}.{lora_key(*fit.modules[module])}"
        if len(names) != 2 * len({n.split(".", 1)[1] for n in names.values()}):
            raise UserInputError(f"{path}: every LoRA projection needs both its lora_A and lora_B factors")
        return names


class KVPrefixPart(MemoryPart):
    """Learned keys and values per layer, (kv_heads, slots, head_dim) each, that every sample of the
    memory attends before its own tokens; ``kv_prefix.safetensors`` once exported."""

    kind = "kv"
    file = "kv_prefix.safetensors"
    flat_prefixes = ("prefix",)

    def add_to(self, memory: "DomainMemory", shapes: list[tuple[int, int]], slots: int) -> None:
        for kv_heads, head_dim in shapes:
            memory.prefix_keys.append(nn.Parameter(torch.zeros(kv_heads, slots, head_dim)))
            memory.prefix_values.append(nn.Parameter(torch.zeros(kv_heads, slots, head_dim)))

    @staticmethod
    def shapes_of(state: dict[str, torch.Tensor], name: str) -> tuple[list[tuple[int, int]], int]:
        """([(kv_heads, head_dim)] per layer, slots) of the KV prefix in a flat state."""
        keys = [state[f"prefix.keys.{i}"] for i in range(sum(k.startswith("prefix.keys.") for k in state))]
        if len({k.shape[1] for k in keys}) > 1:
            raise UserInputError(f"memory {name!r}: KV prefix layers hold different slot counts")
        return [(k.shape[0], k.shape[2]) for k in keys], keys[0].shape[1] if keys else 0

    def parameters(self, memory: "DomainMemory") -> list[nn.Parameter]:
        return list(memory.prefix_keys) + list(memory.prefix_values)

    def flat_state(self, memory: "DomainMemory") -> dict[str, torch.Tensor]:
        return ({f"prefix.keys.{i}": p.detach() for i, p in enumerate(memory.prefix_keys)}
                | {f"prefix.values.{i}": p.detach() for i, p in enumerate(memory.prefix_values)})

    def sliced(self, memory, narrowings, kept_groups) -> dict[str, torch.Tensor]:
        state = {}
        for i, (k, v) in enumerate(zip(memory.prefix_keys, memory.prefix_values)):
            state[f"prefix.keys.{i}"] = k.detach()[kept_groups[i]].contiguous()
            state[f"prefix.values.{i}"] = v.detach()[kept_groups[i]].contiguous()
        return state

    def export(self, folder, state, memory, module_names) -> None:
        kv = {k: v for k, v in state.items() if self.owns(k)}
        if kv:
            save_tensors({f"layers.{k.split('.')[2]}.{k.split('.')[1]}": v for k, v in kv.items()}, folder / self.file)

    def check_file(self, path, fit, manifest) -> dict[str, str]:
        header, names = read_header(path), {}
        slots = manifest.get("kv_slots")
        most = min(max(1, fit.context // 2) if fit.context else MAX_SLOTS, MAX_SLOTS)
        if not isinstance(slots, int) or not 1 <= slots <= most:
            raise UserInputError(f"{path.parent}: manifest's kv_slots {slots!r} is not from 1 to {most} "
                                 "(at most half the backbone's context)")
        expected = {f"layers.{i}.{kind}": (heads, slots, fit.head_dim)
                    for i, heads in enumerate(fit.kv_heads) for kind in ("keys", "values")}
        if set(header) != set(expected):
            extra, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
            raise UserInputError(f"{path}: the KV prefix does not have this backbone's {len(fit.kv_heads)} layers "
                                 f"(unexpected {extra[:2]}, missing {missing[:2]})")
        for name, info in header.items():
            expect_tensor(path, name, info, expected[name])
            _, layer, kind = name.split(".")
            names[name] = f"prefix.{kind}.{layer}"
        return names


def expect_tensor(path: Path, name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape or info.dtype not in FLOAT_DTYPES:
        raise UserInputError(f"{path}: {name} is {info.dtype} {list(info.shape)}; this backbone needs a float tensor "
                             f"of shape {list(shape)}")


LORA, KV_PREFIX = LoRAPart(), KVPrefixPart()
PARTS: tuple[MemoryPart, ...] = (LORA, KV_PREFIX)
