"""Sparsity sweep: KOFF, its mask without memories, and prune-then-LoRA at several sparsities.

For each sparsity, three runs through the same decomposition loop: KOFF (learned mask + LoRA + KV);
the row that isolates the mask (the one-shot mask with the very same LoRA + KV memories, loop,
budget and distillation: KOFF's claim to a *learned* mask stands only where it beats this row);
and "prune, then LoRA" (a one-shot mask, then LoRA trained on it) with a LoRA rank chosen so that
its trainable parameters per domain are at least KOFF's (equal budget, never in KOFF's favour).
Each run's own evaluation gives the rows; the sweep keeps the geometric mean over domains of the
perplexity ratio to the dense base.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from koff.analysis.plot import plot_sparsity_sweep
from koff.config import DecomposeConfig
from koff.evaluation import DecompositionEval
from koff.experiments.ablation import geomean_ratio, mean_memory_parameters
from koff.formats import run as run_folder
from koff.io import markdown_table, read_json, write_json, write_text
from koff.plan import ModelSizes, memory_parameters, read_model_config
from koff.training import train_or_resume
from parallel_runs import finished, train_concurrently

SERIES = ("KOFF", "mask, no memories", "one-shot mask + LoRA + KV", "prune, then LoRA", "one-shot mask, no memories")


def equal_budget_rank(config: DecomposeConfig) -> int:
    """The smallest LoRA rank whose parameters per domain reach those of ``config``'s memories
    (from the model's shapes alone, so every run of a sweep can be set up before any trains)."""
    sizes = ModelSizes.of(read_model_config(config.model))
    targets = config.memory_config().lora_targets
    per_rank = sizes.layers * sum(i + o for name, (i, o) in sizes.lora_in_out.items() if name in targets)
    return math.ceil(memory_parameters(sizes, config) / per_rank)


def equal_budget_runs(base: DecomposeConfig) -> dict[str, DecomposeConfig]:
    """The three runs compared at ``base``'s sparsity, through the same loop and budget: ``koff``,
    ``oneshot_lora_kv`` (the one-shot Wanda mask with the same memories) and ``prune_then_lora``
    (that mask with LoRA alone at the equal-budget rank); each keeps ``base``'s ``out``."""
    rank = equal_budget_rank(replace(base, memory="lora+kv"))
    return {"koff": replace(base, mask="learned", memory="lora+kv"),
            "oneshot_lora_kv": replace(base, mask="oneshot:wanda", memory="lora+kv"),
            "prune_then_lora": replace(base, mask="oneshot:wanda", memory="lora", lora_rank=rank, lora_alpha=2.0 * rank)}


def sweep_configs(base: DecomposeConfig, sparsities: list[float], out: str | Path) -> dict[float, dict[str, DecomposeConfig]]:
    """Per sparsity, the three ``equal_budget_runs``, each in its own folder of ``out``."""
    runs, configs = equal_budget_runs(base), {}  # the equal-budget rank does not depend on the sparsity
    for sparsity in sparsities:
        tag = f"s{round(sparsity * 100):02d}"
        configs[sparsity] = {name: replace(config, sparsity=sparsity,
                                           out=str(Path(out) / f"{name.replace('_', '-')}-{tag}"))
                             for name, config in runs.items()}
    return configs


def run_sweep(base: DecomposeConfig, sparsities: list[float], out: str | Path, jobs: int = 1) -> dict:
    """Run the sweep (resuming finished or killed runs under ``out``; with ``jobs`` > 1 that many
    trainings at once, in their own processes); write sweep.json and sweep.png."""
    out = Path(out)
    configs = sweep_configs(replace(base, eval=True), sparsities, out)
    if jobs > 1:
        train_concurrently([c for runs in configs.values() for c in runs.values()], jobs)
    sweep: dict[str, dict[float, float]] = {name: {} for name in SERIES}
    runs, budget = {}, {}
    for sparsity, config in configs.items():
        (ev_koff, koff_memory), (ev_oneshot, _), (ev_pruned, pruned_memory) = (
            _result(config[name]) for name in ("koff", "oneshot_lora_kv", "prune_then_lora"))
        sweep["KOFF"][sparsity] = geomean_ratio(ev_koff.with_memories, ev_koff.dense)
        sweep["mask, no memories"][sparsity] = geomean_ratio(ev_koff.mask_only, ev_koff.dense)
        sweep["one-shot mask + LoRA + KV"][sparsity] = geomean_ratio(ev_oneshot.with_memories, ev_oneshot.dense)
        sweep["prune, then LoRA"][sparsity] = geomean_ratio(ev_pruned.with_memories, ev_pruned.dense)
        sweep["one-shot mask, no memories"][sparsity] = geomean_ratio(ev_pruned.mask_only, ev_pruned.dense)
        runs[sparsity] = {name: c.out for name, c in config.items()}
        budget[sparsity] = {
            "koff_memory_parameters_per_domain": koff_memory,
            "prune_then_lora_rank": config["prune_then_lora"].lora_rank,
            "prune_then_lora_parameters_per_domain": pruned_memory,
        }
    result = {"sparsities": sparsities, "geomean_ratio_to_dense": sweep, "runs": runs, "trainable_budget": budget}
    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", sweep_markdown(result) + "\n")
    plot_sparsity_sweep(sweep, out / "sweep.png", f"{base.model}: quality against sparsity")
    return result


def _result(config: DecomposeConfig) -> tuple[DecompositionEval, int]:
    """One run's final evaluation and its memories' trainable parameters per domain.

    A run the concurrent trainings finished has both in its summary.json: they are read from there,
    not evaluated a second time in this process (one run after another, while the GPU sits idle).
    Any other run is trained (or resumed) and evaluated here.
    """
    summary = read_json(Path(config.out) / run_folder.SUMMARY) if finished(config) else {}
    if "eval" not in summary:
        _, summary = train_or_resume(config)
    memory = mean_memory_parameters(list(summary["memory_parameters"].values()))
    return DecompositionEval.from_dict(summary["eval"]), memory


def sweep_markdown(result: dict) -> str:
    sparsities = result["sparsities"]
    rows = [[name, *(points[s] for s in sparsities)] for name, points in result["geomean_ratio_to_dense"].items()]
    return markdown_table(["configuration", *(f"{100 * s:.0f}%" for s in sparsities)], rows)
