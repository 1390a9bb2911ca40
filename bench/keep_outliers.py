"""Does holding the FFN neurons of highest Wanda importance open (``--keep-outliers K``) steady the
learned mask alone, and what does it cost KOFF? (issue 13 point 7, at the evidence benchmark's settings)

The evidence sweep's mask alone jumps with sparsity (1.3x dense at 6%, 7.1x at 12%, 2.9x at 20% on
one H200) and its 12% mask removes a neuron whose importance is over 1,000x the median. This trains
KOFF exactly as bench/evidence.py does (SmolLM2-135M, 7 bundled domains, 160 steps of 7 x 256 tokens,
the Wanda start) with K such neurons held open: at 12% for each seed, at the other sparsities for the
first seed; then ``koff analyze`` of each run (LAPE, and which outliers the mask keeps). Beside each
row: the evidence benchmark's own KOFF run at that sparsity (seed 0, nothing held open), read from
``--evidence-out`` where it has been run.

    python bench/keep_outliers.py --device cuda --jobs 6          # 6 runs at once, about 3 min on one H200
    python bench/keep_outliers.py --steps 2 --eval-max-blocks 2 --lape-max-blocks 2 --sparsities 0.12 --seeds 0 \\
        --out bench/out/keep-smoke --results bench/out/keep-smoke/results   # smoke test

Finished runs and analyses are kept, killed runs resume. Writes keep-outliers.json and .md (with the
command, machine and commit) to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import command_line, git_commit, machine
from evidence import add_evidence_options, evidence_config
from koff.cli import main as koff_main
from koff.evaluation import DecompositionEval
from koff.experiments.ablation import geomean_ratio
from parallel_runs import train_all
from sweep import sweep_configs
from koff.io import markdown_table, read_json, write_json, write_text
from koff.training import DecomposeConfig

LAPE_KEYS = ("specific_enrichment", "specific_layer_adjusted_enrichment", "specific_activity_adjusted_enrichment")


def runs(base: DecomposeConfig, keep: int, sparsities: list[float], seeds: list[int], out: Path) -> dict[str, DecomposeConfig]:
    """The KOFF runs of the evidence sweep with ``keep`` outliers held open: every seed at 12%, the first elsewhere."""
    koff = replace(base, mask="learned", memory="lora+kv", eval=True, keep_outliers=keep)
    chosen = {}
    for sparsity in sparsities:
        for seed in (seeds if sparsity == 0.12 else seeds[:1]):
            name = f"keep{keep}-s{round(sparsity * 100):02d}-seed{seed}"
            chosen[name] = replace(koff, sparsity=sparsity, seed=seed, out=str(out / name))
    return chosen


def describe(run: Path, analysis: Path | None) -> dict:
    """One row: KOFF and the mask alone against dense on the bundled split, LAPE and outliers kept."""
    ev = DecompositionEval.from_dict(read_json(run / "summary.json")["eval"])
    row = {"run": str(run),
           "koff_geomean_ratio": geomean_ratio(ev.with_memories, ev.dense),
           "koff_worst_ratio": max(ev.with_memories["domains"][d]["perplexity"] / found["perplexity"]
                                   for d, found in ev.dense["domains"].items()),
           "mask_alone_geomean_ratio": geomean_ratio(ev.mask_only, ev.dense)}
    if analysis is not None and (analysis / "analysis.json").is_file():
        found = read_json(analysis / "analysis.json")
        row |= {key: found["removal"].get(key) for key in LAPE_KEYS}
        row["outliers_kept"] = f"{sum(o['kept'] for o in found['outliers'])} of {len(found['outliers'])}"
    return row


def markdown(rows: dict[str, dict]) -> str:
    header = ["run", "sparsity", "seed", "held open", "KOFF (geomean)", "KOFF (worst)", "mask alone (geomean)",
              "LAPE enrichment", "within layers", "activity-adjusted", "top-8 outliers kept"]

    columns = ("koff_geomean_ratio", "koff_worst_ratio", "mask_alone_geomean_ratio", *LAPE_KEYS, "outliers_kept")
    body = [[name, f"{r['sparsity']:.0%}", r["seed"], r["keep_outliers"],
             *("-" if r.get(k) is None else r[k] for k in columns)] for name, r in rows.items()]
    return markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evidence_options(parser)
    parser.add_argument("--keep", type=int, default=8, help="FFN neurons of highest Wanda importance held open")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.06, 0.12, 0.20, 0.30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evidence-out", default="bench/out/evidence", help="bench/evidence.py's --out")
    parser.add_argument("--out", default="bench/out/keep-outliers")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    command, commit = command_line(), git_commit()
    start = time.perf_counter()

    base = evidence_config(args)
    configs = runs(base, args.keep, args.sparsities, args.seeds, Path(args.out))
    train_all(list(configs.values()), args.jobs)
    for config in configs.values():
        if not (Path(config.out) / "analysis" / "analysis.json").is_file():
            code = koff_main(["analyze", config.out, "--max-blocks", str(args.lape_max_blocks), "--device", args.device])
            if code:
                sys.exit(code)

    rows = {}
    for name, config in configs.items():
        rows[name] = {"sparsity": config.sparsity, "seed": config.seed, "keep_outliers": args.keep,
                      **describe(Path(config.out), Path(config.out) / "analysis")}
    evidence = Path(args.evidence_out)  # the evidence sweep's own KOFF runs, where bench/evidence.py has run
    for sparsity, sweep_runs in sweep_configs(replace(base, eval=True), args.sparsities, evidence / "sweep").items():
        run = Path(sweep_runs["koff"].out)
        if (run / "summary.json").is_file():
            analysis = evidence / "analysis" if sparsity == 0.12 else None
            rows[f"evidence {run.name}"] = {"sparsity": sparsity, "seed": 0, "keep_outliers": 0, **describe(run, analysis)}
    result = {"command": command, "commit": commit, "machine": machine(args.device),
              "config": base.to_dict(), "keep_outliers": args.keep, "rows": rows,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "keep-outliers.json", result)
    text = "\n".join([
        f"# Outlier neurons held open ({args.model}, the evidence benchmark's settings)", "",
        f"Command: `{command}`  ", f"Commit: {commit}", "",
        f"Machine: {result['machine']}; {args.steps} steps per run, batch {args.batch_size} x 256 tokens; "
        f"{result['wall_seconds']:.0f} s in all.", "",
        "Perplexity / dense on the bundled validation split (geometric mean and worst over the 7 domains), "
        "the mask alone, and LAPE of each run's mask (enrichment: the rate at which language-specific "
        "neurons are removed over the rate for all neurons).", "",
        markdown(rows), ""])
    write_text(results / "keep-outliers.md", text)
    print(text)
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
