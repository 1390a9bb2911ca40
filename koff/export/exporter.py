"""``export_run``: a run folder in, a physically smaller backbone and one file set per memory out."""

from __future__ import annotations

import shutil
from pathlib import Path

from koff.export.backbone import save_backbone
from koff.export.memories import memory_size_bytes, peft_module_names, slice_memory, write_memory
from koff.export.prune import layer_widths, prune_model, select_layers
from koff.export.run import load_run
from koff.io import write_json
from koff.masks.units import UnitCosts
from koff.models.architecture import decoder_layout


class ExportError(RuntimeError):
    pass


def export_run(run_dir: str | Path, out_dir: str | Path, uniform: bool = False, force: bool = False) -> dict:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    run = load_run(run_dir)
    for i, (ffn, attn) in enumerate(zip(run.mask.ffn, run.mask.attn)):
        if not ffn.any() or not attn.any():
            kind = "FFN neuron" if not ffn.any() else "attention group"
            raise ExportError(f"the mask is not exportable: layer {i} keeps no {kind} (a stock layer needs at least one)")
    model, layout = run.model, decoder_layout(run.model)
    dense_costs = UnitCosts.of(model, layout)
    selections = select_layers(run.mask, uniform)
    module_names = peft_module_names(model)
    prune_model(model, layout, selections)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "source_run": str(Path(run_dir).resolve()),
        "base_model": run.config.model,
        "mask": run.mask.stats(dense_costs),
        "dense_parameters": dense_costs.total_params,
        "parameters": params,
        "lora_targets": list(run.config.lora_targets),
    }
    meta = save_backbone(model, run.tokenizer, out / "backbone", layer_widths(selections), uniform, info)
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
    write_json(out / "export.json", summary)
    return summary
