"""Does the recovery hold on real text, and does the *learned* mask beat a one-shot one? (issue 13)

The CPU-sized part of issue 13: at 12% on the embedded SmolLM2-135M (eng/deu/fra/spa + Python,
the README's domains), two runs through the same loop, budget and distillation:

* KOFF (learned mask + LoRA + KV);
* the row that isolates the mask: the one-shot Wanda mask with the very same LoRA + KV memories.

Then one `koff eval` table: every row on the bundled validation split and, per domain, on real
text from another source (Debian's manuals, Python's standard library; `scripts/real_corpora.py`),
with the price of offloading (KOFF over the dense base with the same memories).

    python scripts/real_corpora.py --out corpora
    python bench/transfer.py [--steps 80] [--out bench/out/transfer]

Runs resume if killed. Writes bench/results/transfer.json and transfer.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from common import git_commit, machine
from koff.cli import main as koff_main
from koff.experiments.sweep import train_or_resume
from koff.io import write_json, write_text
from koff.training import DecomposeConfig

DOMAINS = ["eng=bundled:eng", "deu=bundled:deu", "fra=bundled:fra", "spa=bundled:spa", "python=bundled:code/python"]
OTHER_SOURCES = {"eng": "debian-reference/eng", "deu": "debian-reference/deu", "fra": "debian-reference/fra",
                 "spa": "debian-reference/spa", "python": "python-stdlib/python"}
RUNS = {"koff": ("learned", "KOFF"), "oneshot-lora-kv": ("oneshot:wanda", "one-shot mask + LoRA + KV")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--eval-max-blocks", type=int, default=20)
    parser.add_argument("--transfer-max-blocks", type=int, default=40)
    parser.add_argument("--corpora", default="corpora", help="folder written by scripts/real_corpora.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/out/transfer")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    commit = git_commit()
    corpora, out = Path(args.corpora), Path(args.out)
    missing = [str(corpora / f) for f in OTHER_SOURCES.values() if not (corpora / f).is_dir()]
    if missing:
        sys.exit(f"missing other-source text {missing}: run python scripts/real_corpora.py --out {corpora}")
    start = time.perf_counter()
    for name, (mask, _) in RUNS.items():
        train_or_resume(DecomposeConfig(model="smollm2-135m", domain=DOMAINS, sparsity=0.12, steps=args.steps,
                                        batch_size=args.batch_size, eval=False, checkpoint_every=20, mask=mask,
                                        memory="lora+kv", device=args.device, out=str(out / name)))
    transfer = [flag for name, folder in OTHER_SOURCES.items() for flag in ("--transfer", f"{name}={corpora / folder}")]
    code = koff_main(["eval", str(out / "koff"), f"{RUNS['oneshot-lora-kv'][1]}={out / 'oneshot-lora-kv'}",
                      "--max-blocks", str(args.eval_max_blocks), "--transfer-max-blocks", str(args.transfer_max_blocks),
                      *transfer, "--device", args.device, "--out", str(out / "table")])
    if code:
        sys.exit(code)
    table = json.loads((out / "table" / "table.json").read_text())
    rows = {r["configuration"]: r for r in table["rows"]}
    koff = next(r for n, r in rows.items() if n.startswith("KOFF"))
    oneshot, bare = rows[RUNS["oneshot-lora-kv"][1]], rows["mask, no memories"]
    other = table["transfer"]
    goals = {
        "koff_within_5pct_on_average_other_source": koff["transfer_mean_ratio"] <= 1.05,
        "koff_within_10pct_worst_other_source": max(koff["ratio_to_dense"][c] for c in other) <= 1.10,
        "mask_alone_at_least_25pct_worse_other_source": bare["transfer_mean_ratio"] >= 1.25,
        "learned_mask_beats_oneshot_with_the_same_memories_in_distribution": koff["mean_ratio"] < oneshot["mean_ratio"],
        "learned_mask_beats_oneshot_with_the_same_memories_other_source":
            koff["transfer_mean_ratio"] < oneshot["transfer_mean_ratio"],
    }
    result = {"command": command, "commit": commit, "machine": machine(args.device), "steps": args.steps,
              "table": table, "goals_met": goals, "wall_seconds": round(time.perf_counter() - start, 1)}
    results = Path(args.results)
    write_json(results / "transfer.json", result)
    text = "\n".join([
        "# Recovery on real text, and the learned mask against a one-shot mask (issue 13, CPU part)", "",
        f"Command: `{command}`  ", f"Commit: {commit}  ", f"Machine: {result['machine']}; {args.steps} steps per run, "
        f"batch {args.batch_size} x 256; {result['wall_seconds']:.0f} s (training resumed or reused counts only its "
        "remaining steps)", "",
        (out / "table" / "table.md").read_text().strip(), "",
        "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()), "",
    ])
    write_text(results / "transfer.md", text)
    print(text)


if __name__ == "__main__":
    main()
