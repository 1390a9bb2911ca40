"""The paper's evidence on the embedded SmolLM2-135M (issue 5): ablation table, sparsity sweep, LAPE.

Runs, through the same `koff decompose` loop, at every sparsity of the sweep: KOFF (learned mask +
LoRA + KV), the one-shot Wanda mask with the same LoRA + KV memories (the row that isolates the
learned mask) and prune-then-LoRA (one-shot Wanda mask, then LoRA at a rank whose parameters per
domain are at least KOFF's); at 12% also LoRA only and KV only trained on KOFF's own mask. Then:

* `koff eval` of the 12% KOFF run with the comparison runs: one table (Markdown, JSON, CSV);
* the sweep: geometric-mean perplexity ratio to dense per configuration and sparsity (+ PNG);
* `koff analyze` of the 12% run: language-specific neurons (LAPE) vs the mask (+ per-layer PNG).

    python bench/evidence.py                         # everything; 17 runs, hours on the 2-core CPU
    python bench/evidence.py --device cuda --jobs 15 # the same on one GPU, 15 trainings at once (~5.5 min, H200)
    python bench/evidence.py --steps 3 --eval-max-blocks 2 --sparsities 0.12 --out bench/out/evidence-smoke \
        --results bench/out/evidence-smoke/results   # smoke test

Killed runs resume where they stopped when the command is run again. Writes evidence.json and
evidence.md (with the command that produced them) and the PNGs to --results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import add_run_options, command_line, git_commit, machine, named_config, with_settings
from koff.cli import main as koff_main
from parallel_runs import train_all
from sweep import run_sweep, sweep_markdown
from koff.io import write_json, write_text
from koff.training import DecomposeConfig

# Real text of each domain from another source than training's (scripts/real_corpora.py writes it).
TRANSFER = {"eng": "debian-reference/eng", "deu": "debian-reference/deu", "fra": "debian-reference/fra",
            "spa": "debian-reference/spa", "ita": "debian-reference/ita", "por": "debian-reference/por",
            "python": "python-stdlib/python"}
EVIDENCE_RUN = named_config("evidence-gpu")
DOMAINS = EVIDENCE_RUN["domain"]


def goals(table: dict, sweep: dict, analysis: dict) -> dict:
    rows = {r["configuration"]: r for r in table["rows"]}
    koff = next(r for name, r in rows.items() if name.startswith("KOFF"))
    ratios = sweep["geomean_ratio_to_dense"]
    removal = analysis["removal"]
    enrichment = removal.get("specific_activity_adjusted_enrichment")
    general = removal.get("general_activity_adjusted_enrichment")

    def mean_ppl(row: dict) -> float:
        return sum(row["perplexity"].values()) / len(row["perplexity"])

    other = table.get("transfer", [])
    result = {
        "koff_within_5pct_every_domain": all(r <= 1.05 for r in koff["ratio_to_dense"].values()),
        "koff_within_3pct_on_average": koff["mean_ratio"] <= 1.03,
        "mask_alone_at_least_25pct_worse": rows["mask, no memories"]["mean_ratio"] >= 1.25,
        "learned_mask_beats_oneshot_mask_with_the_same_memories":
            mean_ppl(koff) < mean_ppl(rows["one-shot mask + LoRA + KV"]),
        "lora_plus_kv_beats_lora_only": mean_ppl(koff) < mean_ppl(rows["LoRA only, same mask"]),
        "lora_plus_kv_beats_kv_only": mean_ppl(koff) < mean_ppl(rows["KV only, same mask"]),
        "language_specific_removed_more_than_all": enrichment is not None and enrichment > 1,
        "language_general_removed_less_than_all": general is not None and general < 1,
    }
    if other:  # issue 13's goals, on text from another source than training's
        ratios_other = [koff["ratio_to_dense"][c] for c in other]
        result["koff_within_5pct_on_average_other_source"] = koff["transfer_mean_ratio"] <= 1.05
        result["koff_within_10pct_worst_other_source"] = max(ratios_other) <= 1.10
        result["mask_alone_at_least_25pct_worse_other_source"] = rows["mask, no memories"]["transfer_mean_ratio"] >= 1.25
        result["learned_mask_beats_oneshot_mask_with_the_same_memories_other_source"] = \
            koff["transfer_mean_ratio"] < rows["one-shot mask + LoRA + KV"]["transfer_mean_ratio"]
    for s in (0.12, 0.20):
        if s in ratios["KOFF"]:
            result[f"koff_beats_prune_then_lora_at_{round(100 * s)}pct"] = ratios["KOFF"][s] < ratios["prune, then LoRA"][s]
    return result


def add_evidence_options(parser: argparse.ArgumentParser) -> None:
    """The options of every run the evidence is made of (bench/keep_outliers.py shares them)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=EVIDENCE_RUN["steps"])
    parser.add_argument("--batch-size", type=int, default=EVIDENCE_RUN["batch_size"])
    parser.add_argument("--eval-max-blocks", type=int, default=40)
    parser.add_argument("--lape-max-blocks", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process (on one "
                        "GPU a run of the 135M model leaves it mostly idle: 15 at once keep an H200 busy)")
    add_run_options(parser)


def evidence_config(args: argparse.Namespace) -> DecomposeConfig:
    """The settings every evidence run shares; the sweep sets the sparsity, mask and memories of each."""
    base = DecomposeConfig(model=args.model, domain=DOMAINS, steps=args.steps, batch_size=args.batch_size,
                           eval_max_blocks=args.eval_max_blocks, checkpoint_every=20, init_shape="mask",
                           final_fraction=0.4, target_warmup=0.25,
                           lr_mask=args.lr_mask, distill_every=args.distill_every, device=args.device)
    return with_settings(base, args.set)


def transfer_flags(root: Path, max_blocks: int) -> list[str]:
    """``--transfer NAME=SOURCE`` for every domain whose other source exists under ``root``."""
    flags = []
    for name, folder in TRANSFER.items():
        if (root / folder).is_dir():
            flags += ["--transfer", f"{name}={root / folder}"]
        else:
            print(f"no other source for {name} ({root / folder} missing: python scripts/real_corpora.py --out {root})")
    return flags + ["--transfer-max-blocks", str(max_blocks)] if flags else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evidence_options(parser)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.06, 0.12, 0.20, 0.30])
    parser.add_argument("--transfer-root", default="corpora",
                        help="folder written by scripts/real_corpora.py: each memory is also scored on real text of its "
                        "domain from there (missing folders are skipped)")
    parser.add_argument("--transfer-max-blocks", type=int, default=80, help="evenly spaced blocks per transfer source "
                        "(80 x 256 = 20k tokens)")
    parser.add_argument("--out", default="bench/out/evidence")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    if 0.12 not in args.sparsities:
        parser.error("--sparsities must include 0.12 (the ablation table and the analysis use that run)")
    command = command_line()
    commit = git_commit()  # the code this run uses: taken before it starts
    out, results = Path(args.out), Path(args.results)
    start = time.perf_counter()

    base = evidence_config(args)
    sweep = run_sweep(base, args.sparsities, out / "sweep", jobs=args.jobs)
    koff_run = sweep["runs"][0.12]["koff"]
    same_mask = [DecomposeConfig(**{**base.to_dict(), "mask": f"file:{koff_run}", "memory": memory,
                                    "out": str(out / f"same-mask-{memory}"), "eval": False}) for memory in ("lora", "kv")]
    train_all(same_mask, args.jobs)

    table_dir, analysis_dir = out / "table", out / "analysis"
    code = koff_main(["eval", koff_run, f"LoRA only, same mask={out / 'same-mask-lora'}",
                      f"KV only, same mask={out / 'same-mask-kv'}",
                      f"one-shot mask + LoRA + KV={sweep['runs'][0.12]['oneshot_lora_kv']}",
                      f"prune, then LoRA (equal budget)={sweep['runs'][0.12]['prune_then_lora']}",
                      "--max-blocks", str(args.eval_max_blocks), "--device", args.device, "--out", str(table_dir),
                      *transfer_flags(Path(args.transfer_root), args.transfer_max_blocks)])
    code = code or koff_main(["analyze", koff_run, "--max-blocks", str(args.lape_max_blocks), "--device", args.device,
                              "--out", str(analysis_dir)])
    if code:
        sys.exit(code)
    table = json.loads((table_dir / "table.json").read_text())
    analysis = json.loads((analysis_dir / "analysis.json").read_text())

    met = goals(table, sweep, analysis)
    result = {
        "command": command,
        "commit": commit,
        "machine": machine(args.device),
        "config": base.to_dict(),
        "table": table,
        "sweep": sweep,
        "lape": analysis["removal"],
        "goals_met": met,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "evidence.json", result)
    shutil.copy(out / "sweep" / "sweep.png", results / "evidence-sweep.png")
    shutil.copy(analysis_dir / "removal_by_layer.png", results / "evidence-lape.png")
    text = "\n".join([
        f"# koff evidence ({args.model}, {len(DOMAINS)} domains)", "", f"Command: `{command}`  ", f"Commit: {commit}", "",
        f"Machine: {result['machine']}; {args.steps} steps per run, batch {args.batch_size} x {base.block_len} tokens; "
        f"{result['wall_seconds']:.0f} s in all.", "",
        "## Ablation table at 12% sparsity (perplexity, ratio to dense)", "",
        (table_dir / "table.md").read_text().strip(), "",
        "## Sparsity sweep (geometric-mean perplexity ratio to dense)", "", sweep_markdown(sweep), "",
        "![sweep](evidence-sweep.png)", "",
        "## Language-specific neurons (LAPE) removed by the 12% mask", "",
        (analysis_dir / "analysis.md").read_text().strip() if (analysis_dir / "analysis.md").is_file() else "",
        "", "![LAPE](evidence-lape.png)", "",
        "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()), "",
    ])
    write_text(results / "evidence.md", text)
    print(text)


if __name__ == "__main__":
    main()
