"""``add_domain``: train one more memory on an exported (frozen, already pruned) backbone.

The same training loop as ``koff decompose`` runs with ``mask="none"`` and only the new domain; the
memory keeps the settings of the export's other memories (kind, LoRA rank/alpha/targets, KV slots),
so every memory of a folder looks alike. Because the backbone is the exported one, the memory
needs no slicing: its flat state is written as-is (every unit kept) in the export format, with the
backbone's fingerprint, beside the others.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from koff.config import DecomposeConfig
from koff.data import load_recorded_domain
from koff.data.sources import DomainSpec, parse_domain
from koff.errors import UserInputError
from koff.formats.backbone import load_backbone
from koff.formats.exported_memory import MANIFEST, memory_size_bytes, training_data, write_memory
from koff.memories.parts import peft_module_names
from koff.io import read_json, remove_leftovers
from koff.locks import folder_lock
from koff.memories.memory import DEFAULT_LORA_TARGETS
from koff.routing import ROUTER_FILE, Router, RouterError, TokenRouter
from koff.training.trainer import Decomposer


class AddDomainError(UserInputError):
    """The new memory cannot be added (name taken, folder is not an export)."""


def memory_settings(export_dir: Path, meta: dict) -> dict:
    """Kind, LoRA rank/alpha/targets, KV slots and block length shared by the export's memories."""
    settings = {"memory": "lora+kv", "lora_rank": 8, "lora_alpha": 16.0, "kv_slots": 16, "block_len": 256,
                "lora_targets": list(meta.get("lora_targets") or DEFAULT_LORA_TARGETS)}
    manifests = sorted((export_dir / "memories").glob(f"*/{MANIFEST}"))
    if manifests:
        first = read_json(manifests[0])
        rank, slots = int(first.get("lora_rank") or 0), int(first.get("kv_slots") or 0)
        kind = first.get("memory_kind") or ("lora+kv" if rank and slots else "lora" if rank else "kv")
        settings |= {"memory": kind, "lora_alpha": float(first.get("lora_alpha", 16.0))}
        settings |= {"lora_rank": rank} if rank else {}
        settings |= {"kv_slots": slots} if slots else {}
        block_len = (first.get("data") or {}).get("block_len")
        settings |= {"block_len": int(block_len)} if block_len else {}
    return settings


def add_domain(
    export_dir: str | Path,
    domain: str,
    steps: int = 200,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> dict:
    """Train ``NAME=SOURCE`` on the exported backbone and write ``memories/NAME``; returns its summary.

    ``overrides`` are ``DecomposeConfig`` fields (``block_len``, ``batch_size``, ``lr_lora``,
    ``lr_kv``, ``kv_slots``, ``lora_rank``, ``seed``, ...) that replace the export's settings.
    """
    with folder_lock(export_dir, "koff add-domain"):
        return _add_domain(Path(export_dir), parse_domain(domain), steps, device, dtype, overrides)


def _add_domain(out: Path, spec: DomainSpec, steps: int, device: str, dtype: torch.dtype, overrides: dict) -> dict:
    remove_leftovers(out, ".add-domain-*")  # left by an add-domain that was killed
    target = out / "memories" / spec.name
    if target.exists():
        raise AddDomainError(f"{target} exists: a memory named {spec.name!r} is already in this export; choose another name")
    base, tokenizer, meta = load_backbone(out / "backbone", dtype, device)
    module_names = peft_module_names(base)  # before the LoRA swap wraps the projections
    settings = memory_settings(out, meta) | {k: v for k, v in overrides.items() if v is not None}
    if settings["memory"] == "none":
        raise AddDomainError("this export's memories hold nothing to train (memory kind 'none')")
    (out / "memories").mkdir(exist_ok=True)
    # Work beside memories/ (never inside it: a half-written folder there would be loaded as a memory),
    # on the same file system, so the finished memory moves into place with one rename.
    with tempfile.TemporaryDirectory(prefix=".add-domain-", dir=out) as tmp:
        config = DecomposeConfig(
            model=str(out / "backbone"), domain=[str(spec)], out=str(Path(tmp) / "run"), device=device,
            dtype=str(dtype).removeprefix("torch."), mask="none", sparsity=0.0, steps=steps, eval=False,
            checkpoint_every=max(1, steps),
            # No teacher: "dense" here would be the exported backbone itself, and a KL to it would
            # pull the new memory towards doing nothing.
            distill_weight=0.0, **settings,
        )
        trainer = Decomposer(config, base=base, tokenizer=tokenizer)
        summary = trainer.train()
        memory = trainer.model.memories[spec.name]
        state = memory.flat_state()
        data = trainer.data_record(spec.name)
        manifest = {
            "backbone_fingerprint": meta["fingerprint"],
            "memory_kind": config.memory,
            "parameters": sum(t.numel() for t in state.values()),
            "data": data,
            "training": {"on": "exported backbone (koff add-domain)", "steps": summary["steps"],
                         "seconds_per_step": summary.get("seconds_per_step"), "distill_weight": config.distill_weight},
        }
        staged = Path(tmp) / spec.name
        write_memory(staged, spec.name, state, memory, module_names, manifest)
        if target.exists():  # someone else took the name while we trained
            raise AddDomainError(f"{target} appeared while training; nothing was written")
        os.replace(staged, target)
        new_domain = next(d for d in trainer.domains if d.name == spec.name)
        routed = update_router(out, spec.name, new_domain.train, base, tokenizer, config)
    return {"name": spec.name, "folder": str(target), "parameters": manifest["parameters"],
            "bytes": memory_size_bytes(target), "steps": summary["steps"], "settings": settings, "router": routed}


def update_router(export: Path, name: str, train: torch.Tensor, model, tokenizer, config: DecomposeConfig) -> list[str]:
    """Add memory ``name``, learnt from its training blocks ``train``, to the export's router (made anew
    from every memory's training text where there is none or it cannot be read); the memories it
    routes to back. The model runs bare: the new memory's LoRA wrappers add nothing outside a routed pass."""
    path = export / ROUTER_FILE
    try:
        router = Router.load(path, model) if path.is_file() else None
    except RouterError:
        router = None
    if router is not None:
        router = router.add(name, model, router.training_blocks(train), tokenizer.pad_token_id)
    else:
        texts = {name: TokenRouter.training_blocks(train)}
        for manifest_path in sorted((export / "memories").glob(f"*/{MANIFEST}")):
            data, other = training_data(manifest_path.parent), manifest_path.parent.name
            if other != name and data.get("source"):
                # The split the memory's run made (exports from before it was recorded: the defaults).
                domain = load_recorded_domain(other, data, tokenizer, config.block_len,
                                              DecomposeConfig.val_fraction, DecomposeConfig.seed)
                texts[other] = TokenRouter.training_blocks(domain.train)
        if len(texts) < 2:
            return []
        router = TokenRouter.build(texts, model.get_input_embeddings().num_embeddings)
    router.save(path)
    return router.names
