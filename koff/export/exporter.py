"""``export_run``: a run folder in, a physically smaller backbone and one file set per memory out."""

from __future__ import annotations

from pathlib import Path

from transformers.utils.hub import convert_file_size_to_int

from koff.errors import KoffError
from koff.export.prune import layer_widths, prune_model, select_layers, slice_memory
from koff.formats.backbone import DEFAULT_SHARD_SIZE, save_backbone
from koff.formats.export_folder import SUMMARY, is_export
from koff.formats.exported_memory import memory_size_bytes, peft_module_names, write_memory
from koff.formats.run import load_run
from koff.io import staged_folder, write_json
from koff.masks.units import UnitCosts
from koff.models.architecture import decoder_layout


class ExportError(KoffError, RuntimeError):
    pass


def export_run(run_dir: str | Path, out_dir: str | Path, uniform: bool = False, force: bool = False,
               max_shard_size: str = DEFAULT_SHARD_SIZE) -> dict:
    """Write ``out_dir``. Everything is checked before anything is written, and the export is
    written to a temporary folder renamed into place, so a refused or failed export leaves an
    existing ``out_dir`` as it was; ``force`` replaces only an earlier koff export."""
    out = Path(out_dir)
    check_shard_size(max_shard_size)
    check_target(Path(run_dir), out, force)
    run = load_run(run_dir, keep_stored_dtype=True)  # the backbone keeps the base's dtype
    for i, (ffn, attn) in enumerate(zip(run.mask.ffn, run.mask.attn)):
        if not ffn.any() or not attn.any():
            kind = "FFN neuron" if not ffn.any() else "attention group"
            raise ExportError(f"the mask is not exportable: layer {i} keeps no {kind} (a stock layer needs at least one)")
    with staged_folder(out) as staged:
        return _write_export(run, Path(run_dir), staged, uniform, max_shard_size)


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


def _write_export(run, run_dir: Path, out: Path, uniform: bool, max_shard_size: str) -> dict:
    model, layout = run.model, decoder_layout(run.model)
    dense_costs = UnitCosts.of(model, layout)
    selections = select_layers(run.mask, uniform)
    module_names = peft_module_names(model)
    prune_model(model, layout, selections)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "source_run": str(run_dir.resolve()),
        "base_model": run.config.model,
        "mask": run.mask.stats(dense_costs),
        "dense_parameters": dense_costs.total_params,
        "parameters": params,
        "lora_targets": list(run.config.lora_targets),
    }
    meta = save_backbone(model, run.tokenizer, out / "backbone", layer_widths(selections), uniform, info, max_shard_size)
    memories = {}
    for name, memory in run.memories.items():
        state = slice_memory(memory, selections, layout.heads_per_group, layout.head_dim)
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
