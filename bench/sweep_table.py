"""One table over many ``bench/decompose.py`` results: a sweep run as separate commands.

    python bench/sweep_table.py bench/results/gpu-sweep   # writes index.md and index.json there

Each row is one result file: the flags its command set, KOFF's perplexity ratio to dense per domain
and on average, the mask alone's average, and whether every perplexity goal was met.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from koff.cli.common import markdown_table
from koff.io import write_json, write_text

QUALITY_GOALS = ("koff_within_5pct_every_domain", "koff_within_3pct_on_average", "mask_only_at_least_25pct_worse_on_average")
BOOKKEEPING = {"--tag", "--out", "--results"}


def settings(command: str) -> str:
    """The flags of a benchmark command, minus where it wrote."""
    words = shlex.split(command)[2:]
    kept, skip = [], False
    for word in words:
        flag = word.split("=")[0]
        if skip:
            skip = False
        elif flag in BOOKKEEPING:
            skip = "=" not in word
        else:
            kept.append(word)
    return " ".join(kept)


def row(result: dict) -> dict:
    koff = result["ratio_to_dense"]["mask+memories"]
    return {
        "settings": settings(result["command"]),
        "tokens": result["config"]["steps"] * result["config"]["batch_size"] * result["config"]["block_len"],
        "koff": koff,
        "koff_mean": result["mean_ratio_to_dense"]["mask+memories"],
        "mask_only_mean": result["mean_ratio_to_dense"]["mask only"],
        "quality_goals_met": all(result["goals_met"][g] for g in QUALITY_GOALS),
        "command": result["command"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    files = sorted(args.folder.glob("decompose*.json"))
    if not files:
        sys.exit(f"no decompose*.json in {args.folder}")
    rows = sorted((row(json.loads(f.read_text())) for f in files), key=lambda r: (r["tokens"], r["settings"]))
    domains = list(rows[0]["koff"])
    header = ["settings", "training tokens", *domains, "KOFF mean", "mask alone mean", "perplexity goals"]
    body = [[f"`{r['settings']}`", f"{r['tokens']:,}", *(f"{r['koff'][d]:.3f}" for d in domains), f"{r['koff_mean']:.3f}",
             f"{r['mask_only_mean']:.2f}", "all met" if r["quality_goals_met"] else "not all"] for r in rows]
    text = [f"# {args.folder.name}: KOFF perplexity / dense, one row per result file", "",
            f"Command: `python bench/sweep_table.py {args.folder}`", "", markdown_table(header, body), ""]
    write_text(args.folder / "index.md", "\n".join(text))
    write_json(args.folder / "index.json", rows)
    print("\n".join(text))


if __name__ == "__main__":
    main()
