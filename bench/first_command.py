"""The README's first command, measured: decompose configs/smollm2-real.yaml, export it, and record
its time and its table (validation blocks, another source, another genre, price of offloading).

    python bench/first_command.py                       # runs it (about 80 minutes on 2 cores)
    python bench/first_command.py --collect --seconds 3900 60   # a run the command made: record it
    python bench/first_command.py --flag=--lr-lora=3e-3 --run runs/real-lr3 --name first-command-lr3   # a variant

Writes bench/results/NAME.json and .md (NAME: --name, first-command) with the command, the machine and the commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import command_line, git_commit, machine, named_config
from koff.experiments.ablation import columns_by_source, markdown
from koff.io import markdown_table, read_json, write_json, write_text

CONFIG = "smollm2-real"
# Goals for new text, by sparsity: KOFF / dense (mean over the domains, worst domain) and the price of
# offloading; at every sparsity the bare backbone stays far from dense (the memories carry the domains).
GOALS = {0.12: {"mean": 1.05, "worst": 1.10, "price": 1.10}, 0.25: {"mean": 1.10}}
BARE_BACKBONE_AT_LEAST = 1.25


def run_command(run: Path, export: Path, flags: list[str]) -> list[float]:
    """Seconds of `koff decompose --config` (with ``flags``) and of `koff export`, run as the README runs them."""
    koff = [sys.executable, "-m", "koff"]
    seconds = []
    decompose = [*koff, "decompose", "--config", f"configs/{CONFIG}.yaml", *flags, "--out", str(run)]
    for argv in (decompose, [*koff, "export", str(run), str(export)]):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        seconds.append(round(time.perf_counter() - start, 1))
    return seconds


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


def sparsity(result: dict) -> float:
    """The run's target sparsity: a ``--sparsity`` flag's, else the config's."""
    flags = [f.split("=", 1)[1] for f in result["flags"] if f.startswith("--sparsity=")]
    return float(flags[-1]) if flags else float(result["config"]["sparsity"])


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
    return "\n".join([
        f"# {result['name']}", "", f"`{result['command']}`", "", f"{result['machine']}, commit {result['commit']}", "",
        f"{what}: `koff decompose --config configs/{CONFIG}.yaml{flags}`, then `koff export` "
        f"({minutes}; setup apart). One seed.", "",
        "Perplexity / dense: mean over the domains (worst domain, its column), on 40 blocks per domain and text:", "",
        markdown_table(["configuration", *groups], rows), "",
        f"Goals at {sparsity(result):.0%} sparsity (one seed; they ask for three):", "",
        markdown_table(["goal", "measured", "met"], [[g, m, "yes" if ok else "no"] for g, m, ok in goals(result)]), "",
        "The run's whole table (`RUN/eval/table.md`):", "", markdown(result["table"]), ""])


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
    parser.add_argument("--run", help="the run folder (default: the config's; a variant needs its own)")
    parser.add_argument("--name", default="first-command", help="results file name")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    if args.flag and not args.run:
        sys.exit("a variant (--flag) needs its own run folder: --run runs/NAME")
    run = Path(args.run or named_config(CONFIG)["out"])
    export = run.with_name(run.name + "-export")
    seconds = args.seconds if args.collect else run_command(run, export, args.flag)
    table = read_json(run / "eval" / "table.json")
    for path in args.rescored:
        table = merged(table, read_json(Path(path)))
    result = {"name": args.name, "command": command_line(), "machine": machine(), "commit": git_commit(),
              "config": named_config(CONFIG), "flags": args.flag, "run": str(run),
              "seconds": dict(zip(("decompose", "export"), seconds or (None, None))), "summary": summary(table),
              "rescored": args.rescored, "table": table}
    out = Path(args.results)
    write_json(out / f"{args.name}.json", result)
    text = report(result)
    write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
