"""Why a bare backbone collapses while KOFF does not: the few outlier neurons its mask removed.

For each finished run (``bench/recovery.py``'s run folders), finds the ``--top`` FFN neurons of
highest Wanda importance (on the run's own calibration blocks), puts back those the mask removed,
and scores on held-out text (recovery.py's: maint-guide, python-site; ``--blocks`` evenly spaced
blocks per domain), relative to the dense base:

* the mask alone, with the run's mask and with the neurons put back;
* the mask with each domain's whole memory, its KV prefix only, and its LoRA factors only, both ways.

The memories are the run's, trained without those neurons. Writes ``--name``.json and .md.

    python bench/outlier_neuron.py --runs init-none-real-full,init-none-real-full-seed1,init-none-real-full-seed2 \\
        --out /root/koff-bench/recovery
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from common import command_line, git_commit, machine
from koff.analysis import outlier_neurons
from koff.data import load_domains, load_heldout, parse_domain, parse_domains
from koff.evaluation.perplexity import evaluate
from koff.formats.run import load_run
from koff.io import markdown_table, write_json, write_text
from koff.masks import unit_importance
from koff.memories.parts import KV_PREFIX, LORA
from koff.training.mask_init import calibration_batches
from recovery import HELD_OUT

MASKS = ("run's mask", "outliers put back")  # the two masks each configuration is scored with
MEMORY_PARTS = {"memories": (LORA, KV_PREFIX), "KV only": (KV_PREFIX,), "LoRA only": (LORA,)}


def score_run(folder: Path, corpora: Path, blocks: int, top: int) -> dict:
    run = load_run(folder)
    model = run.koff_model()
    held = [load_heldout(parse_domain(f"{d}={corpora / sub}"), run.tokenizer, 256, blocks) for d, sub in HELD_OUT.items()]
    train = load_domains(parse_domains(run.config.domain), run.tokenizer, block_len=run.config.block_len,
                         val_fraction=run.config.val_fraction, seed=run.config.seed)

    def ratio(scorer) -> float:
        result = evaluate(scorer, held, batch_size=5, progress=False)["domains"]
        return sum(result[d]["perplexity"] / dense[d]["perplexity"] for d in dense) / len(dense)

    with model.dense():
        dense = evaluate(model.scorer(), held, batch_size=5, progress=False)["domains"]
        importance, _ = unit_importance(run.model, model.layout, calibration_batches(run.config, train), "wanda")
    outliers = outlier_neurons(importance, run.mask, top)
    put_back = copy.deepcopy(run.mask)
    for o in outliers:
        put_back.ffn[o["layer"]][o["neuron"]] = True
    masks = dict(zip(MASKS, (run.mask, put_back)))
    row = {"run": folder.name, "outliers": outliers, "mask_alone": {}, **{part: {} for part in MEMORY_PARTS}}
    for label, mask in masks.items():
        model.set_mask(mask)
        row["mask_alone"][label] = ratio(lambda ids, domain: model(ids, None))
    full = dict(run.memories)
    for part, keep in MEMORY_PARTS.items():
        for memory in full.values():
            model.remove_memory(memory.name)
            model.add_memory(memory.keeping(keep))
        for label, mask in masks.items():
            model.set_mask(mask)
            row[part][label] = ratio(model.scorer())
    print(folder.name, row, flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    head = ["run", "outliers removed (layer:neuron, importance / median)"]
    columns = [("mask_alone", "mask alone"), *((p, p) for p in MEMORY_PARTS)]
    head += [f"{label}: {m.removeprefix('outliers ')}" for _, label in columns for m in MASKS]
    body = []
    for r in rows:
        removed = ", ".join(f"{o['layer']}:{o['neuron']} ({o['times_median']:.0f}x)" for o in r["outliers"] if not o["kept"])
        body.append([r["run"], removed or "none",
                     *(f"{r[key][m]:.3f}" for key, _ in columns for m in MASKS)])
    return markdown_table(head, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated run folder names under --out")
    parser.add_argument("--out", default="bench/out/recovery", help="bench/recovery.py's --out")
    parser.add_argument("--corpora", default="corpora")
    parser.add_argument("--blocks", type=int, default=10, help="evenly spaced held-out blocks per domain")
    parser.add_argument("--top", type=int, default=3, help="how many neurons of highest importance to put back")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--name", default="outlier-neuron")
    args = parser.parse_args()
    folders = [Path(args.out) / name for name in args.runs.split(",") if name]
    missing = [str(f) for f in folders if not (f / "mask.safetensors").is_file()]
    if missing:
        sys.exit(f"not finished runs: {missing} (train them with bench/recovery.py)")
    command, start, commit = command_line(), time.perf_counter(), git_commit()
    rows = [score_run(f, Path(args.corpora), args.blocks, args.top) for f in folders]
    result = {"command": command, "commit": commit, "machine": machine("cpu"), "blocks": args.blocks, "top": args.top,
              "held_out": HELD_OUT, "rows": rows, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(Path(args.results) / f"{args.name}.json", result)
    text = "\n".join([
        "# The outlier neurons a mask removed, put back (issue 13 point 7)", "",
        f"Command: `{command}`  ", f"Commit: {commit}  ",
        f"Machine: {result['machine']}; {result['wall_seconds']:.0f} s", "",
        f"Mean perplexity / dense on held-out text ({args.blocks} evenly spaced blocks of 256 tokens per domain: "
        "maint-guide per language, python-site), with the run's mask and with the removed ones among the "
        f"{args.top} FFN neurons of highest Wanda importance put back. The memories are the run's own, trained "
        "without those neurons; KV only / LoRA only keep one half of each memory.", "",
        markdown(rows)])
    write_text(Path(args.results) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
