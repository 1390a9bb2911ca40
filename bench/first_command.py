"""The README's first command, measured: decompose configs/smollm2-real.yaml, export it, and record
its time and its table (validation blocks, another source, another genre, price of offloading).

    python bench/first_command.py                       # runs it (about 80 minutes on 2 cores)
    python bench/first_command.py --collect --seconds 3900 60   # a run the command made: record it
    python bench/first_command.py --flag=--lr-lora=6e-3 --run runs/real-lr6 --name first-command-lr6   # a variant
    python bench/first_command.py --seeds 0 1 2 --jobs 3 --flag=--sparsity=0.25 --run runs/real-s25 --name first-command-s25
        # three seeds side by side (runs/real-s25-seed0 ...), trained and scored, not exported; a
        # run already scored is reused and one that was cut off resumes
    python bench/first_command.py --combine first-command-lr3 first-command-lr3-s1 first-command-lr3-s2 --name first-command-lr3-seeds
        # seeds recorded one by one (each by its --seed flag): the same over-seeds table

Writes bench/results/NAME.json and .md (NAME: --name, first-command) with the command, the machine and the
commit; with --seeds, NAME-seedS.* per seed and NAME.* over the seeds (goals met only if met by every seed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import command_line, git_commit, machine, named_config
from koff.config import DecomposeConfig
from koff.experiments.ablation import columns_by_source, markdown
from koff.formats import run as run_folder
from koff.io import markdown_table, read_json, write_json, write_text

CONFIG = "smollm2-real"
# Goals for new text, by sparsity: KOFF / dense (mean over the domains, worst domain) and the price of
# offloading; at every sparsity the bare backbone stays far from dense (the memories carry the domains).
GOALS = {0.12: {"mean": 1.05, "worst": 1.10, "price": 1.10}, 0.25: {"mean": 1.10}}
BARE_BACKBONE_AT_LEAST = 1.25
KOFF = [sys.executable, "-m", "koff"]


def decompose_argv(run: Path, flags: list[str]) -> list[str]:
    """`koff decompose --config` of the first command, with ``flags``, into ``run``."""
    return [*KOFF, "decompose", "--config", f"configs/{CONFIG}.yaml", *flags, "--out", str(run)]


def run_command(run: Path, export: Path, flags: list[str]) -> list[float]:
    """Seconds of `koff decompose --config` (with ``flags``) and of `koff export`, run as the README runs them."""
    seconds = []
    for argv in (decompose_argv(run, flags), [*KOFF, "export", str(run), str(export)]):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        seconds.append(round(time.perf_counter() - start, 1))
    return seconds


def decompose_seed(run: Path, flags: list[str]) -> float | None:
    """Seconds of one seed's `koff decompose` (its output in RUN.log); None where the run was already
    scored. A run folder left by a cut-off command is resumed."""
    if (run / "eval" / "table.json").is_file():
        return None
    argv = decompose_argv(run, flags)
    if (run / run_folder.CHECKPOINTS).exists() or (run / run_folder.MASK).exists():
        argv.append("--resume")
    start = time.perf_counter()
    with run.with_name(run.name + ".log").open("a") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        sys.exit(f"{' '.join(argv)} failed (exit {code}); see {run.name}.log beside the run")
    return round(time.perf_counter() - start, 1)


def over_seeds(results: dict[int, dict]) -> dict:
    """Per row and text: the mean over the seeds of each seed's mean, and the worst of their worsts."""
    first = next(iter(results.values()))["summary"]
    return {row: {g: {"mean": sum(r["summary"][row][g]["mean"] for r in results.values()) / len(results),
                      "worst": max(r["summary"][row][g]["worst"] for r in results.values())}
                  for g in groups}
            for row, groups in first.items()}


def merged(table: dict, other: dict) -> dict:
    """``table`` with ``other``'s held-out columns in place of its own of the same name (columns scored
    again in another call: every row, ratio and price taken from ``other``)."""
    rows = {r["configuration"]: r for r in other["rows"]}
    for row in table["rows"]:
        for key in ("perplexity", "ratio_to_dense"):
            row[key] |= {c: rows[row["configuration"]][key][c] for c in other["transfer"]}
    table["transfer"] = [c for c in table["transfer"] if c not in other["transfer"]] + other["transfer"]
    for row in table["rows"]:  # the means, over the columns as they now are
        ratios = row["ratio_to_dense"]
        row["transfer_mean_ratio"] = sum(ratios[c] for c in table["transfer"]) / len(table["transfer"])
        row["source_mean_ratio"] = {s: sum(ratios[c] for c in cols) / len(cols)
                                    for s, cols in columns_by_source(table["transfer"]).items()}
    table["price_of_offloading"] |= {c: other["price_of_offloading"][c] for c in other["transfer"]}
    table["tokens"] |= {c: other["tokens"][c] for c in other["transfer"]}
    return table


def summary(table: dict) -> dict:
    """Per row and per text (training text, then each held-out source): mean and worst ratio to dense,
    and the price of offloading's mean and worst."""
    groups = {"training text": table["domains"], **columns_by_source(table["transfer"])}
    rows = {}
    for row in table["rows"]:
        rows[row["configuration"]] = {g: {"mean": sum(row["ratio_to_dense"][c] for c in cols) / len(cols),
                                          "worst": max(row["ratio_to_dense"][c] for c in cols),
                                          "worst_column": max(cols, key=lambda c: row["ratio_to_dense"][c])}
                                      for g, cols in groups.items()}
    price = table["price_of_offloading"]
    rows["price of offloading"] = {g: {"mean": sum(price[c] for c in cols) / len(cols), "worst": max(price[c] for c in cols),
                                       "worst_column": max(cols, key=lambda c: price[c])} for g, cols in groups.items()}
    return rows


def setting(result: dict, name: str) -> str:
    """A setting of the run: its ``--name=`` flag's value, else the config's, else koff's default."""
    flags = [f.split("=", 1)[1] for f in result["flags"] if f.startswith(f"--{name.replace('_', '-')}=")]
    return flags[-1] if flags else str(result["config"].get(name, getattr(DecomposeConfig, name)))


def sparsity(result: dict) -> float:
    return float(setting(result, "sparsity"))


def goals(result: dict) -> list[list]:
    """[goal, measured, met] rows for the run's sparsity, on every text it never saw."""
    s = result["summary"]
    new = [g for g in next(iter(s.values())) if g != "training text"]
    koff = next(v for k, v in s.items() if k.startswith("KOFF"))
    bare = next(v for k, v in s.items() if k.startswith("mask, no memories"))
    limits = GOALS.get(round(sparsity(result), 2), {})
    rows = [[f"KOFF / dense, mean on {g} <= {limits['mean']}", f"{koff[g]['mean']:.3f}", koff[g]["mean"] <= limits["mean"]]
            for g in new if "mean" in limits]
    rows += [[f"KOFF / dense, worst domain on {g} <= {limits['worst']}", f"{koff[g]['worst']:.3f}",
              koff[g]["worst"] <= limits["worst"]] for g in new if "worst" in limits]
    rows += [[f"price of offloading, mean on {g} <= {limits['price']}", f"{s['price of offloading'][g]['mean']:.3f}",
              s["price of offloading"][g]["mean"] <= limits["price"]] for g in new if "price" in limits]
    return rows + [[f"bare backbone / dense, mean on {g} >= {BARE_BACKBONE_AT_LEAST}", f"{bare[g]['mean']:.3f}",
                    bare[g]["mean"] >= BARE_BACKBONE_AT_LEAST] for g in new]


def report(result: dict) -> str:
    s, groups = result["summary"], list(next(iter(result["summary"].values())))
    rows = [[name, *[f"{v[g]['mean']:.3f} ({v[g]['worst']:.3f}, {v[g]['worst_column']})" for g in groups]]
            for name, v in s.items()]
    minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["seconds"].items() if v) or "times not recorded"
    flags = "".join(f" {f}" for f in result["flags"])
    what = (f"The README's first command with `{flags.strip()}`" if flags else "The README's first command")
    exported = ", then `koff export`" if result.get("exported", True) else " (not exported)"
    return "\n".join([
        f"# {result['name']}", "", f"`{result['command']}`", "", f"{result['machine']}, commit {result['commit']}", "",
        f"{what}: `koff decompose --config configs/{CONFIG}.yaml{flags}`{exported} "
        f"({minutes}; setup apart). One seed.", "",
        f"Perplexity / dense: mean over the domains (worst domain, its column), on {setting(result, 'eval_max_blocks')} "
        "blocks per domain and text:", "",
        markdown_table(["configuration", *groups], rows), "",
        f"Goals at {sparsity(result):.0%} sparsity (one seed; they ask for three):", "",
        markdown_table(["goal", "measured", "met"], [[g, m, "yes" if ok else "no"] for g, m, ok in goals(result)]), "",
        "The run's whole table (`RUN/eval/table.md`):", "", markdown(result["table"]), ""])


def seeds_report(result: dict) -> str:
    """Each seed's KOFF and price of offloading per text, their mean over seeds, and the goals per seed."""
    seeds, groups = result["seeds"], list(result["over_seeds"]["price of offloading"])
    rows = []
    for prefix, label in (("KOFF", "KOFF / dense"), ("dense base +", "dense + memories / dense"),
                          ("mask, no memories", "bare backbone / dense"),
                          ("price of offloading", "price of offloading")):
        row = next(k for k in result["over_seeds"] if k.startswith(prefix))
        rows += [[f"{label}, seed {seed}", *[f"{r['summary'][row][g]['mean']:.3f} ({r['summary'][row][g]['worst']:.3f})"
                                             for g in groups]] for seed, r in seeds.items()]
        rows.append([f"{label}, mean over seeds (worst)", *[f"{result['over_seeds'][row][g]['mean']:.3f} "
                                                             f"({result['over_seeds'][row][g]['worst']:.3f})" for g in groups]])
    per_seed = [goals(r) for r in seeds.values()]  # the same goals, in the same order, for every seed
    goal_rows = [[seed_rows[0][0], *[m for _, m, _ in seed_rows], "yes" if all(ok for _, _, ok in seed_rows) else "no"]
                 for seed_rows in zip(*per_seed)]
    flags = " ".join(result["flags"])
    own = ", ".join(f"{n}.md" for n in result.get("combined_from", [])) or f"{result['name']}-seedS.md"
    return "\n".join([
        f"# {result['name']}", "", f"`{result['command']}`", "", f"{result['machine']}, commit {result['commit']}", "",
        f"The README's first command (`koff decompose --config configs/{CONFIG}.yaml {flags}`) over seeds "
        f"{', '.join(map(str, seeds))}; each seed's own table is in {own}. Mean over the domains "
        f"(worst domain), {setting(next(iter(seeds.values())), 'eval_max_blocks')} blocks per domain and text:", "",
        markdown_table(["", *groups], rows), "",
        f"Goals at {sparsity(next(iter(seeds.values()))):.0%} sparsity, met only if met by every seed:", "",
        markdown_table(["goal", *[f"seed {s}" for s in seeds], "met"], goal_rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", action="store_true", help="record the run the command already made")
    parser.add_argument("--seconds", type=float, nargs=2, metavar=("DECOMPOSE", "EXPORT"),
                        help="with --collect: how long the two commands took")
    parser.add_argument("--rescored", action="append", default=[], metavar="TABLE_JSON",
                        help="another `koff eval RUN --transfer` table whose held-out columns replace the run's own")
    parser.add_argument("--flag", action="append", default=[], metavar="FLAG",
                        help="a setting changed against the config, passed to `koff decompose` as it is "
                        "(repeatable; e.g. --flag=--lr-lora=3e-3): a variant of the first command")
    parser.add_argument("--run", help="the run folder (default: the config's; a variant needs its own; with --seeds, "
                        "the seeds' folders are RUN-seedS)")
    parser.add_argument("--seeds", type=int, nargs="+", help="train and score these seeds (not exported)")
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: how many seeds train at once")
    parser.add_argument("--combine", nargs="+", metavar="NAME",
                        help="results files (NAME.json) of the same variant at different --seed flags: record them over seeds")
    parser.add_argument("--name", default="first-command", help="results file name")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    if (args.flag or args.seeds) and not args.run:
        sys.exit("a variant (--flag or --seeds) needs its own run folder: --run runs/NAME")
    if args.seeds:
        return run_seeds(args)
    if args.combine:
        return combine(args.combine, args.name, Path(args.results))
    run = Path(args.run or named_config(CONFIG)["out"])
    export = run.with_name(run.name + "-export")
    seconds = args.seconds if args.collect else run_command(run, export, args.flag)
    table = read_json(run / "eval" / "table.json")
    for path in args.rescored:
        table = merged(table, read_json(Path(path)))
    record(args.name, run, args.flag, seconds or (None, None), table, Path(args.results), rescored=args.rescored)


def record(name: str, run: Path, flags: list[str], seconds, table: dict, out: Path, **extra) -> dict:
    """Write NAME.json and NAME.md for one run's table; the result back."""
    result = {"name": name, "command": command_line(), "machine": machine(), "commit": git_commit(),
              "config": named_config(CONFIG), "flags": flags, "run": str(run),
              "seconds": dict(zip(("decompose", "export"), seconds)), "summary": summary(table), **extra, "table": table}
    write_json(out / f"{name}.json", result)
    text = report(result)
    write_text(out / f"{name}.md", text)
    print(text)
    return result


def run_seeds(args: argparse.Namespace) -> None:
    """--seeds: train and score every seed (``--jobs`` at once), record each, then all of them together."""
    runs = {seed: Path(f"{args.run}-seed{seed}") for seed in args.seeds}
    flags = {seed: [*args.flag, f"--seed={seed}"] for seed in args.seeds}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        seconds = dict(zip(runs, pool.map(lambda s: decompose_seed(runs[s], flags[s]), runs)))
    out = Path(args.results)
    results = {seed: record(f"{args.name}-seed{seed}", run, flags[seed], (seconds[seed], None),
                            read_json(run / "eval" / "table.json"), out, exported=False) for seed, run in runs.items()}
    record_over_seeds(args.name, args.flag, results, out, jobs=args.jobs)


def combine(names: list[str], name: str, out: Path) -> None:
    """--combine: the over-seeds table of seeds recorded one by one (NAME.json each, told apart by --seed)."""
    results = [read_json(out / f"{n}.json") for n in names]
    seeds = [int(setting(r, "seed")) for r in results]
    others = {tuple(sorted(f for f in r["flags"] if not f.startswith("--seed="))) for r in results}
    if len(set(seeds)) != len(seeds) or len(others) != 1:
        sys.exit(f"--combine needs one run per seed with the same other flags; got seeds {seeds}, flags {sorted(others)}")
    record_over_seeds(name, list(others.pop()), dict(zip(seeds, results)), out, combined_from=names)


def record_over_seeds(name: str, flags: list[str], results: dict[int, dict], out: Path, **extra) -> None:
    """Write NAME.json and NAME.md: every seed's result, their mean and worst, and the goals per seed."""
    combined = {"name": name, "command": command_line(), "machine": machine(), "commit": git_commit(),
                "flags": flags, **extra, "over_seeds": over_seeds(results), "seeds": results}
    write_json(out / f"{name}.json", combined)
    text = seeds_report(combined)
    write_text(out / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
