"""One domain's memory beside an exported backbone, on disk (written by export and add-domain,
read by the runtime).

* ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA half in PEFT's format, sliced
  to the kept units, so ``peft.PeftModel.from_pretrained`` loads it onto a uniform backbone;
* ``kv_prefix.safetensors``: the KV half, ``layers.{i}.keys`` / ``layers.{i}.values`` of shape
  (kv_heads, slots, head_dim);
* ``manifest.json``: domain, sizes, training data summary and the backbone's fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from koff.errors import UserInputError
from koff.io import read_json, write_json
from koff.memories.memory import DomainMemory, lora_key, parse_lora_key
from koff.models.architecture import decoder_layout
from koff.tensor_files import FLOAT_DTYPES, TensorInfo, load_tensors, read_header, save_tensors

FORMAT = "koff-memory-export-v1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KV_WEIGHTS = "kv_prefix.safetensors"
MANIFEST = "manifest.json"

# Bounds a memory must keep to be served: far above anything trained (rank 8, scale 2, values < 10),
# far below what overflows a float16 or bfloat16 forward pass.
MAX_RANK = 1024
MAX_SCALE = 1e3
MAX_SLOTS = 4096
MAX_VALUE = 1e4


def peft_module_names(model) -> dict[tuple[int, str], str]:
    """(layer, projection) -> the module's dotted name in the backbone (e.g. model.layers.3.mlp.up_proj)."""
    layout = decoder_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {(p.index, proj): names[id(p.projection(proj))] for p in layout.layers for proj in layout.adapter.roles}


def write_memory(folder: Path, name: str, state: dict, memory: DomainMemory, module_names: dict, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lora = {k: v for k, v in state.items() if k.startswith("lora_")}
    kv = {k: v for k, v in state.items() if k.startswith("prefix.")}
    if lora:
        from peft import LoraConfig

        targets = sorted({parse_lora_key(k.split(".", 1)[1])[1] for k in lora})
        LoraConfig(r=memory.rank, lora_alpha=memory.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM").save_pretrained(str(folder))
        tensors = {}
        for flat, tensor in lora.items():
            factor, key = flat.split(".", 1)
            module = module_names[parse_lora_key(key)]
            tensors[f"base_model.model.{module}.{factor}.weight"] = tensor
        save_tensors(tensors, folder / ADAPTER_WEIGHTS)
    if kv:
        tensors = {f"layers.{k.split('.')[2]}.{k.split('.')[1]}": v for k, v in kv.items()}
        save_tensors(tensors, folder / KV_WEIGHTS)
    write_json(folder / MANIFEST, {"format": FORMAT, "name": name, "lora_rank": memory.rank if lora else 0,
                                   "lora_alpha": memory.alpha, "kv_slots": memory.slots, **manifest})


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


def read_exported_state(folder: Path, fit: MemoryFit, manifest: dict) -> dict:
    """Inverse of ``write_memory``: flat state (lora_A.<layer>_<proj>, prefix.keys.<i>, ...), after
    checking every tensor's name, shape and dtype in the files' headers against ``fit`` (before any
    tensor is read), the manifest's scale, and then every value: a memory that loads can join any
    batch of this backbone."""
    adapter, kv = folder / ADAPTER_WEIGHTS, folder / KV_WEIGHTS
    names = {}
    if adapter.is_file():
        names |= _check_lora_header(adapter, fit, manifest)
    if kv.is_file():
        names |= _check_kv_header(kv, fit, manifest)
    state = {}
    for path in (adapter, kv):
        if path.is_file():
            state |= {names[name]: tensor for name, tensor in load_tensors(path).items()}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all() or tensor.abs().max() > MAX_VALUE:
            raise UserInputError(f"{folder}: {key} holds NaN or infinite values, or values beyond {MAX_VALUE:g}; the "
                                 "memory would corrupt every batch it joins")
    return state


def _check_lora_header(path: Path, fit: MemoryFit, manifest: dict) -> dict[str, str]:
    """file name -> flat name of every LoRA factor, after checking shapes, dtypes, rank and scale."""
    header, names = read_header(path), {}
    rank = manifest.get("lora_rank")
    alpha = manifest.get("lora_alpha")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise UserInputError(f"{path.parent}: manifest's lora_rank {rank!r} is not a rank from 1 to {MAX_RANK}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < abs(alpha / rank) <= MAX_SCALE:
        raise UserInputError(f"{path.parent}: lora_alpha {alpha!r} gives a LoRA scale outside (0, {MAX_SCALE:g}]")
    for name, info in header.items():
        module, _, factor = name.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
        if not name.startswith("base_model.model.") or factor not in ("lora_A", "lora_B") or module not in fit.modules:
            raise UserInputError(f"{path}: {name} is not a LoRA factor of a projection of this backbone")
        fan_in, fan_out = fit.features[fit.modules[module]]
        expected = (rank, fan_in) if factor == "lora_A" else (fan_out, rank)
        _expect(path, name, info, expected)
        names[name] = f"{factor}.{lora_key(*fit.modules[module])}"
    pairs = {n.split(".", 1)[1] for n in names.values()}
    if len(names) != 2 * len(pairs):
        raise UserInputError(f"{path}: every LoRA projection needs both its lora_A and lora_B factors")
    return names


def _check_kv_header(path: Path, fit: MemoryFit, manifest: dict) -> dict[str, str]:
    """file name -> flat name of every KV prefix tensor: exactly one keys and one values per layer."""
    header, names = read_header(path), {}
    slots = manifest.get("kv_slots")
    most = max(1, fit.context // 2) if fit.context else MAX_SLOTS
    if not isinstance(slots, int) or not 1 <= slots <= min(most, MAX_SLOTS):
        raise UserInputError(f"{path.parent}: manifest's kv_slots {slots!r} is not from 1 to {min(most, MAX_SLOTS)} "
                             "(at most half the backbone's context)")
    expected = {f"layers.{i}.{kind}": (heads, slots, fit.head_dim)
                for i, heads in enumerate(fit.kv_heads) for kind in ("keys", "values")}
    if set(header) != set(expected):
        extra, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
        raise UserInputError(f"{path}: the KV prefix does not have this backbone's {len(fit.kv_heads)} layers "
                             f"(unexpected {extra[:2]}, missing {missing[:2]})")
    for name, info in header.items():
        _expect(path, name, info, expected[name])
        _, layer, kind = name.split(".")
        names[name] = f"prefix.{kind}.{layer}"
    return names


def _expect(path: Path, name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape or info.dtype not in FLOAT_DTYPES:
        raise UserInputError(f"{path}: {name} is {info.dtype} {list(info.shape)}; this backbone needs a float tensor "
                             f"of shape {list(shape)}")


def training_data(folder: Path) -> dict:
    """The summary of the text a memory was trained on (name, source, block_len, ...) that its
    manifest records; {} where it records none."""
    return read_json(folder / MANIFEST).get("data") or {}


def memory_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
