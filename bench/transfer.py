"""Does the recovery hold on real text, and does the *learned* mask beat a one-shot one, for every seed? (issue 13)

The CPU-sized part of issue 13: at 12% on the embedded SmolLM2-135M (eng/deu/fra/spa + Python,
the README's domains), per seed three runs through the same loop, budget and distillation:

* KOFF (learned mask + LoRA + KV);
* the row that isolates the mask: the one-shot Wanda mask with the very same LoRA + KV memories;
* prune, then LoRA: the same one-shot mask with LoRA alone, at the smallest rank whose parameters
  per domain reach KOFF's memories (equal budget, never in KOFF's favour).

Then, per seed, one `koff eval` table: every row on the bundled validation split and, per domain,
on real text from another source (Debian's manuals, Python's standard library;
`scripts/real_corpora.py`), with the price of offloading (KOFF over the dense base with the same
memories); and `koff analyze` (language-specific neurons, LAPE) of the learned and the one-shot mask of the first seed
(prune-then-LoRA has the one-shot mask too). Across seeds: mean, min and max of each row, and every goal is met only if it holds for
every seed. The seed also draws the validation split, so the bundled columns move with it; the
other-source text is the same for every seed.

    python scripts/real_corpora.py --out corpora
    python bench/transfer.py [--seeds 0,1,2] [--steps 80] [--out bench/out/transfer]
    python bench/transfer.py --device cuda --steps 160 --batch-size 7 --jobs 6 --out bench/out/transfer-gpu --name transfer-gpu

Runs resume if killed, and a seed's table is reused when it was made by the same request. Seed 0
lives in OUT itself, seed s in OUT/seed{s}. Writes bench/results/NAME.json and NAME.md (--name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import command_line, git_commit, machine
from koff.cli import main as koff_main
from parallel_runs import train_all
from sweep import equal_budget_runs
from koff.io import markdown_table, write_json, write_text
from koff.training import DecomposeConfig

DOMAINS = ["eng=bundled:eng", "deu=bundled:deu", "fra=bundled:fra", "spa=bundled:spa", "python=bundled:code/python"]
OTHER_SOURCES = {"eng": "debian-reference/eng", "deu": "debian-reference/deu", "fra": "debian-reference/fra",
                 "spa": "debian-reference/spa", "python": "python-stdlib/python"}
# run folder: (its run in sweep.equal_budget_runs, row label in the table)
RUNS = {"koff": ("koff", "KOFF"),
        "oneshot-lora-kv": ("oneshot_lora_kv", "one-shot mask + LoRA + KV"),
        "prune-then-lora": ("prune_then_lora", "prune, then LoRA (equal budget)")}
ANALYSED = ("koff", "oneshot-lora-kv")  # the distinct masks
MADE_AT = "made_at.txt"  # in a koff_once folder: the commit whose code made it
EVAL_MAX_BLOCKS, TRANSFER_MAX_BLOCKS = 20, 40  # the committed tables' blocks of 256 tokens per domain


def seed_folder(out: Path, seed: int) -> Path:
    """Seed 0 keeps the top folder, so runs made before seeds were added stay in use."""
    return out if seed == 0 else out / f"seed{seed}"


def configs(args: argparse.Namespace, seed: int) -> list[DecomposeConfig]:
    runs = equal_budget_runs(DecomposeConfig(model="smollm2-135m", domain=DOMAINS, sparsity=0.12, steps=args.steps,
                                             batch_size=args.batch_size, eval=False, checkpoint_every=20,
                                             device=args.device, seed=seed))
    return [replace(runs[run], out=str(seed_folder(Path(args.out), seed) / name)) for name, (run, _) in RUNS.items()]


def koff_once(request: list[str], out: Path) -> None:
    """Run the `koff` command ``request`` (which writes ``out``) unless the same request made ``out``
    already; ``out/request.json`` records it, ``out/made_at.txt`` the commit whose code ran it."""
    made_by = out / "request.json"
    if made_by.is_file() and json.loads(made_by.read_text()) == request:
        return
    commit = git_commit()  # before it runs: a commit made while it runs did not make it
    if koff_main(request):
        sys.exit(f"koff {' '.join(request)} failed")
    write_json(made_by, request)
    write_text(out / MADE_AT, commit)


def made_at(out: Path, default: str) -> str:
    """The commit whose code made the ``koff_once`` folder ``out``; ``default`` for a folder made
    before folders recorded it."""
    path = out / MADE_AT
    return path.read_text().strip() if path.is_file() else default


def table_name(args: argparse.Namespace) -> str:
    """The folder name of a ``koff eval`` table: one scored with other numbers of blocks than the
    committed tables' goes beside theirs, not over it."""
    blocks = (args.eval_max_blocks, args.transfer_max_blocks)
    return "table" if blocks == (EVAL_MAX_BLOCKS, TRANSFER_MAX_BLOCKS) else "table-{}-{}".format(*blocks)


def table_folder(args: argparse.Namespace, seed: int) -> Path:
    """Where the seed's ablation table lies (``koff eval --out``)."""
    return seed_folder(Path(args.out), seed) / table_name(args)


def table_for(args: argparse.Namespace, seed: int) -> dict:
    """The seed's ablation table with transfer columns, reused when the same request made it."""
    folder, table = seed_folder(Path(args.out), seed), table_folder(args, seed)
    corpora = Path(args.corpora)
    transfer = [flag for name, sub in OTHER_SOURCES.items() for flag in ("--transfer", f"{name}={corpora / sub}")]
    others = [f"{label}={folder / name}" for name, (_, label) in RUNS.items() if name != "koff"]
    request = ["eval", str(folder / "koff"), *others,
               "--max-blocks", str(args.eval_max_blocks), "--transfer-max-blocks", str(args.transfer_max_blocks),
               *transfer, "--device", args.device, "--out", str(table)]
    koff_once(request, table)
    return json.loads((table / "table.json").read_text())


def analysis_for(args: argparse.Namespace, seed: int) -> dict[str, str]:
    """`koff analyze` (LAPE) of the distinct masks of one seed, as markdown by run name; reused when the
    same request made it."""
    folder, tables = seed_folder(Path(args.out), seed), {}
    for name in ANALYSED:
        out = folder / f"analysis-{name}"
        koff_once(["analyze", str(folder / name), "--device", args.device, "--out", str(out)], out)
        tables[name] = (out / "analysis.md").read_text().strip()
    return tables


def named_rows(table: dict) -> dict[str, dict]:
    """The rows by a name that is the same for every seed (KOFF's label carries its sparsity)."""
    return {("KOFF" if r["configuration"].startswith("KOFF") else r["configuration"]): r for r in table["rows"]}


def goals(table: dict) -> dict[str, bool]:
    rows = named_rows(table)
    koff, oneshot, bare = rows["KOFF"], rows[RUNS["oneshot-lora-kv"][1]], rows["mask, no memories"]
    pruned = rows[RUNS["prune-then-lora"][1]]
    return {
        "koff_within_5pct_on_average_other_source": koff["transfer_mean_ratio"] <= 1.05,
        "koff_within_10pct_worst_other_source": max(koff["ratio_to_dense"][c] for c in table["transfer"]) <= 1.10,
        "mask_alone_at_least_25pct_worse_other_source": bare["transfer_mean_ratio"] >= 1.25,
        "learned_mask_beats_oneshot_with_the_same_memories_in_distribution": koff["mean_ratio"] < oneshot["mean_ratio"],
        "learned_mask_beats_oneshot_with_the_same_memories_other_source":
            koff["transfer_mean_ratio"] < oneshot["transfer_mean_ratio"],
        "koff_beats_prune_then_lora_in_distribution": koff["mean_ratio"] < pruned["mean_ratio"],
        "koff_beats_prune_then_lora_other_source": koff["transfer_mean_ratio"] < pruned["transfer_mean_ratio"],
    }


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def spread_cell(s: dict) -> str:
    """A ``spread`` as a table cell: mean [min, max]."""
    return f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def across_seeds(tables: dict[int, dict]) -> dict:
    """Per row of every seed's table: mean ratio on the bundled split and on other-source text, as
    mean / min / max over seeds; the price of offloading on other-source text likewise. (A table made
    before `koff eval` scored each mask alone once has one more row: it is left out.)"""
    named = [named_rows(t) for t in tables.values()]
    rows = {name: {key: spread([n[name][key] for n in named]) for key in ("mean_ratio", "transfer_mean_ratio")}
            for name in named[0] if all(name in n for n in named)}
    price = spread([sum(t["price_of_offloading"][c] for c in t["transfer"]) / len(t["transfer"])
                    for t in tables.values()])
    return {"rows": rows, "price_of_offloading_other_source_mean": price}


def summary_markdown(summary: dict) -> str:
    rows = [[name, spread_cell(r["mean_ratio"]), spread_cell(r["transfer_mean_ratio"])]
            for name, r in summary["rows"].items()]
    return markdown_table(["configuration", "mean ratio, bundled split", "mean ratio, other source"], rows)


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """Each run's budget, how much text scores it, and where it runs (shared with bench/recovery.py)."""
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--eval-max-blocks", type=int, default=EVAL_MAX_BLOCKS)
    parser.add_argument("--transfer-max-blocks", type=int, default=TRANSFER_MAX_BLOCKS)
    parser.add_argument("--corpora", default="corpora", help="folder written by scripts/real_corpora.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process (a GPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    add_budget_options(parser)
    parser.add_argument("--name", default="transfer", help="file names of the results (NAME.json, NAME.md)")
    parser.add_argument("--train-only", action="store_true", help="train (or resume) the runs and stop")
    parser.add_argument("--out", default="bench/out/transfer")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    corpora = Path(args.corpora)
    missing = [str(corpora / f) for f in OTHER_SOURCES.values() if not (corpora / f).is_dir()]
    if missing:
        sys.exit(f"missing other-source text {missing}: run python scripts/real_corpora.py --out {corpora}")
    start = time.perf_counter()
    train_all([c for seed in seeds for c in configs(args, seed)], args.jobs)
    if args.train_only:
        return
    tables = {seed: table_for(args, seed) for seed in seeds}
    table_commits = {seed: made_at(table_folder(args, seed), commit) for seed in seeds}
    analysis = analysis_for(args, seeds[0])
    per_seed = {seed: goals(t) for seed, t in tables.items()}
    met = {goal: all(g[goal] for g in per_seed.values()) for goal in per_seed[seeds[0]]}
    summary = across_seeds(tables)
    result = {"command": command, "commit": commit, "machine": machine(args.device), "steps": args.steps,
              "seeds": seeds, "tables": tables, "table_commits": table_commits, "across_seeds": summary,
              "goals_per_seed": per_seed, "goals_met_for_every_seed": met,
              "analysis_seed": seeds[0], "analysis": analysis, "wall_seconds": round(time.perf_counter() - start, 1)}
    results = Path(args.results)
    write_json(results / f"{args.name}.json", result)
    price = summary["price_of_offloading_other_source_mean"]
    text = [
        "# Recovery on real text, and the learned mask against a one-shot mask (issue 13)", "",
        f"Command: `{command}`  ", f"Commit: {commit}  ", f"Machine: {result['machine']}; {args.steps} steps per run, "
        f"batch {args.batch_size} x 256, seeds {seeds}; {result['wall_seconds']:.0f} s (runs and tables reused from "
        "an earlier call count nothing)", "",
        "## Across seeds: mean [min, max] of perplexity / dense", "", summary_markdown(summary), "",
        f"Price of offloading on other-source text (KOFF / dense base with the same memories, mean over domains): "
        f"{price['mean']:.3f} [{price['min']:.3f}, {price['max']:.3f}]", "",
        "Goals (met only if met for every seed): " + ", ".join(
            f"{k}: {'met' if v else 'NOT met'} ({sum(g[k] for g in per_seed.values())}/{len(seeds)} seeds)"
            for k, v in met.items()), "",
    ]
    for name in ANALYSED:
        text += [f"## Language-specific neurons: {RUNS[name][1]} mask (koff analyze, seed {seeds[0]})", "", analysis[name], ""]
    for seed in seeds:
        text += [f"## Seed {seed} (table made at {table_commits[seed]})", "",
                 (table_folder(args, seed) / "table.md").read_text().strip(), ""]
    write_text(results / f"{args.name}.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
