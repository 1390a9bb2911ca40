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

from safetensors.torch import load_file, save_file

from koff.errors import UserInputError
from koff.io import atomic_path, write_json
from koff.memories.memory import DomainMemory, lora_key, parse_lora_key
from koff.models.architecture import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, decoder_layout

FORMAT = "koff-memory-export-v1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KV_WEIGHTS = "kv_prefix.safetensors"
MANIFEST = "manifest.json"


def peft_module_names(model) -> dict[tuple[int, str], str]:
    """(layer, projection) -> the module's dotted name in the backbone (e.g. model.layers.3.mlp.up_proj)."""
    layout = decoder_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {(p.index, proj): names[id(p.projection(proj))] for p in layout.layers for proj in (*ATTENTION_PROJECTIONS, *MLP_PROJECTIONS)}


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
        with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
    if kv:
        tensors = {f"layers.{k.split('.')[2]}.{k.split('.')[1]}": v for k, v in kv.items()}
        with atomic_path(folder / KV_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
    write_json(folder / MANIFEST, {"format": FORMAT, "name": name, "lora_rank": memory.rank if lora else 0,
                                   "lora_alpha": memory.alpha, "kv_slots": memory.slots, **manifest})


def read_exported_state(folder: Path, module_keys: dict[str, tuple[int, str]]) -> dict:
    """Inverse of ``write_memory``: flat state (lora_A.<layer>_<proj>, prefix.keys.<i>, ...)."""
    state = {}
    if (folder / ADAPTER_WEIGHTS).is_file():
        for name, tensor in load_file(str(folder / ADAPTER_WEIGHTS)).items():
            module, factor, _ = name[len("base_model.model."):].rsplit(".", 2)
            if module not in module_keys:
                raise UserInputError(f"{folder / ADAPTER_WEIGHTS}: {module} is not a projection of this backbone")
            state[f"{factor}.{lora_key(*module_keys[module])}"] = tensor
    if (folder / KV_WEIGHTS).is_file():
        for name, tensor in load_file(str(folder / KV_WEIGHTS)).items():
            _, layer, kind = name.split(".")
            state[f"prefix.{kind}.{layer}"] = tensor
    return state


def memory_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
