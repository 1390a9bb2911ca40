"""``export_run``: a run folder in, a physically smaller backbone and one file set per memory out."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.utils.hub import convert_file_size_to_int

from koff.errors import KoffError
from koff.export.prune import layer_widths, select_layers, slice_memory
from koff.export.router_build import write_router
from koff.export.weights import base_weight_files, stored_dtype, write_backbone_weights
from koff.formats.backbone import DEFAULT_SHARD_SIZE, finish_backbone, narrowed_config
from koff.formats.export_folder import SUMMARY, is_export
from koff.formats.exported_memory import memory_size_bytes, write_memory
from koff.memories.parts import peft_module_names
from koff.formats.run import RunOutputs, read_run
from koff.io import staged_folder, write_json
from koff.locks import folder_lock
from koff.masks.units import UnitCosts
from koff.models import load_tokenizer, model_folder, resolve_dtype
from koff.models.architecture import decoder_layout
from koff.routing import ROUTER_FILE


class ExportError(KoffError, RuntimeError):
    pass


def export_run(run_dir: str | Path, out_dir: str | Path, uniform: bool = False, force: bool = False,
               max_shard_size: str = DEFAULT_SHARD_SIZE, router: bool = True) -> dict:
    """Write ``out_dir``, with a router over the memories unless ``router`` is False (it counts the
    tokens of 32 blocks of each memory's training text). Everything is checked before anything is written, and the export is
    written to a temporary folder renamed into place, so a refused or failed export leaves an
    existing ``out_dir`` as it was; ``force`` replaces only an earlier koff export.

    The base is never loaded whole: its weights stream from its safetensors files a tensor at a
    time into the backbone's shards (``koff.export.weights``), so an 8B model exports with a few
    GB of host memory. The backbone keeps the dtype the base is stored in (a run with an explicit
    ``--dtype`` exports in that dtype)."""
    out = Path(out_dir)
    check_shard_size(max_shard_size)
    with folder_lock(run_dir, "koff export"), folder_lock(out, "koff export"):
        check_target(Path(run_dir), out, force)
        return _export(read_run(run_dir), out, uniform, max_shard_size, router)


def _export(run: RunOutputs, out: Path, uniform: bool, max_shard_size: str, router: bool) -> dict:
    for i, (ffn, attn) in enumerate(zip(run.mask.ffn, run.mask.attn)):
        if not ffn.any() or not attn.any():
            kind = "FFN neuron" if not ffn.any() else "attention group"
            raise ExportError(f"the mask is not exportable: layer {i} keeps no {kind} (a stock layer needs at least one)")
    with staged_folder(out) as staged:
        summary = _write_export(run, staged, uniform, max_shard_size)
        if router and write_router(run, staged) is not None:
            summary["router"] = ROUTER_FILE
            write_json(staged / SUMMARY, summary)
        return summary


def check_shard_size(size: str) -> None:
    try:
        convert_file_size_to_int(size)
    except (ValueError, TypeError) as err:
        raise ExportError(f"--max-shard-size must be a size such as 5GB or 500MB, got {size!r}") from err


def check_target(run_dir: Path, out: Path, force: bool) -> None:
    """Refuse a target that would overwrite something the user did not ask to replace."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run.is_relative_to(target):
        raise ExportError(f"{out} is (or holds) the run folder {run_dir}; export to another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty; pass --force to replace it")
        if not is_export(out):
            raise ExportError(f"{out} is not a koff export (no {SUMMARY}); --force replaces only an earlier export")


def _write_export(run: RunOutputs, out: Path, uniform: bool, max_shard_size: str) -> dict:
    base, _ = model_folder(run.config.model)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):  # names, shapes and layout only: no memory
        model = AutoModelForCausalLM.from_config(config)
    layout = decoder_layout(model)
    dense_costs = UnitCosts.of(model, layout)
    selections = select_layers(run.mask, uniform)
    files = base_weight_files(base)
    config.dtype = export_dtype(run, config, files)
    params = write_backbone_weights(files, model, layout, selections, config.dtype, out / "backbone", max_shard_size)
    widths = layer_widths(selections)
    info = {
        "source_run": str(run.folder.resolve()),
        "base_model": run.config.model,
        "mask": run.mask.stats(dense_costs),
        "dense_parameters": dense_costs.total_params,
        "parameters": params,
        "lora_targets": list(run.config.lora_targets),
    }
    config = narrowed_config(config, layout.head_dim, layout.heads_per_group, widths, uniform)
    meta = finish_backbone(out / "backbone", config, load_tokenizer(base), generation_config(base, config), widths,
                           uniform, info)
    module_names = peft_module_names(model)
    memories = {}
    for name, memory in run.memories.items():
        state = slice_memory(memory, selections, layout)
        manifest = {
            "backbone_fingerprint": meta["fingerprint"],
            "memory_kind": run.manifests[name].get("memory_kind"),
            "parameters": sum(t.numel() for t in state.values()),
            "data": run.manifests[name].get("data"),
        }
        write_memory(out / "memories" / name, name, state, memory, module_names, manifest)
        memories[name] = {"parameters": manifest["parameters"], "bytes": memory_size_bytes(out / "memories" / name)}
    summary = {"uniform": uniform, "fingerprint": meta["fingerprint"], "parameters": params,
               "dense_parameters": dense_costs.total_params, "memories": memories}
    write_json(out / SUMMARY, summary)
    return summary


def export_dtype(run: RunOutputs, config, files: dict[str, Path]) -> torch.dtype:
    """The dtype the base is stored in, unless the run named one (``--dtype`` other than auto)."""
    if run.config.dtype == "auto":
        return stored_dtype(config, files)
    return resolve_dtype(run.config.dtype, "cpu")


def generation_config(base: Path, config) -> GenerationConfig:
    """The base's generation config, or the one ``from_pretrained`` would derive from its config."""
    try:
        return GenerationConfig.from_pretrained(base)
    except OSError:
        return GenerationConfig.from_model_config(config)
