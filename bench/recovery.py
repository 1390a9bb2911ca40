"""What makes the recovery carry over to new text, does the learned mask still pay there, and what moves
language-specific neurons, and does KOFF beat prune-then-LoRA there? (issue 13, points 3, 4, 5 and 7)

Controlled KOFF runs at 12% on the embedded SmolLM2-135M (eng/deu/fra/spa + Python), seed 0 unless
a variant says otherwise, one change each against the baseline of ``bench/transfer.py`` (seed 0,
same budget, the run is reused):

* ``bundled``     the baseline: trained on the bundled corpus, today's defaults;
* ``real``        trained on real text instead (Debian's ``debian-reference`` manuals, Python's
                  standard library): a larger, human-written corpus;
* ``distill-x4``  the distillation weight 4 instead of 1: the memories follow the dense teacher more
                  and the training corpus less;
* ``init-none``   the gates start from no importance (all kept, no one-shot ranking): does the
                  one-shot start explain why language-specific neurons are removed less often?
* ``real-full``   ``real`` at the budget of the README's first command (160 steps of 5 x 256
                  tokens, twice the tokens): is the rest of the gap to dense a matter of training longer?
* ``real-full-seed1``, ``real-full-seed2`` the same with seeds 1 and 2 (the seed also draws the
                  run's validation split).
* ``bundled-full`` the baseline at that budget: do more gate steps alone move language-specific
                  neurons (and the held-out gap), without real text?
* ``bundled-full-seed1``, ``bundled-full-seed2`` the same with seeds 1 and 2.
* ``oneshot-real-full`` (and ``-seed1``, ``-seed2``) the row that isolates the mask, on real text:
                  ``real-full`` with the one-shot Wanda mask instead of the learned one and the very
                  same LoRA + KV memories, loop, budget and distillation. Does *learning* the mask
                  still pay where the memories generalise?
* ``init-none-real-full`` (and ``-seed1``, ``-seed2``) ``real-full`` with gates that start from no
                  importance: does the start that moved language-specific neurons on the bundled
                  corpus move them on real text too, and at what cost in quality?
* ``keep-outliers-real-full`` (and ``-seed1``, ``-seed2``) ``init-none-real-full`` with the gates of
                  the 8 FFN neurons of highest Wanda importance held open (``--keep-outliers 8``):
                  two of its three masks removed one massive-activation neuron and their bare
                  backbones collapsed. Does holding those few open keep the backbone standing
                  alone, and does the start from no importance still move language-specific neurons?
* ``prune-lora-real-full`` (and ``-seed1``, ``-seed2``) prune, then LoRA, on real text: the one-shot
                  mask with LoRA alone at the equal-budget rank (``bench/sweep.py``), the
                  same loop, budget and distillation. Does KOFF still beat plain pruning plus LoRA
                  where the adapters train on text that generalises?

Every run is scored with ``koff eval`` on its own validation split and on text that *no* run trained
on: Debian's ``maint-guide`` in each language and third-party Python (``python-site``), with the
price of offloading (KOFF over the dense base with the same memories); and ``koff analyze`` (LAPE)
of its mask, on its own training text.

    python scripts/real_corpora.py --out corpora
    python bench/recovery.py [--variants bundled,real,distill-x4,init-none] [--steps 80]

Runs resume if killed; tables and analyses are reused when the same request made them. A variant
whose run is not on this machine keeps its row from an earlier NAME.json when that row was scored
the same way (the same numbers of blocks, and the same held-out text where the row records its
fingerprint), so a new variant is added without retraining the others; ``--fresh`` trains and
scores every variant asked for, and ``--keep`` keeps a variant's earlier row although its run is here
(a retrained run must not replace the committed row). Each row records the commit that scored it. Writes
bench/results/NAME.json and NAME.md (``--name``). Scoring present runs on more text keeps the
committed tables: ``--transfer-max-blocks 80 --name recovery-80`` writes its tables beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from common import command_line, git_commit, machine
from koff.experiments.ablation import dense_with_memories_row
from parallel_runs import finished, train_all
from sweep import equal_budget_runs
from koff.io import markdown_table, write_json, write_text
from koff.training import DecomposeConfig
from transfer import DOMAINS as BUNDLED
from transfer import OTHER_SOURCES as REAL  # transfer.py's other source is the real training text here
from transfer import add_budget_options, koff_once, made_at, named_rows, spread, spread_cell, table_name

HELD_OUT = {"eng": "maint-guide/eng", "deu": "maint-guide/deu", "fra": "maint-guide/fra", "spa": "maint-guide/spa",
            "python": "python-site/python"}
# the seeds a configuration is trained with, and the tag each adds to its variant's name
SEEDS = ((0, ""), (1, "-seed1"), (2, "-seed2"))
# name: (what changes, training domains, settings); "real" domains are read under --corpora
VARIANTS = {
    "bundled": ("baseline: the bundled corpus, today's defaults", "bundled", {}),
    "real": ("trained on real text (debian-reference, Python stdlib)", "real", {}),
    "distill-x4": ("distillation weight 4 (default 1)", "bundled", {"distill_weight": 4.0}),
    "init-none": ("gates start from no importance (--init-from none)", "bundled", {"init_from": "none"}),
    "real-full": ("real text, the README's budget (160 steps of 5 x 256)", "real", {"steps": 160, "batch_size": 5}),
    "real-full-seed1": ("real-full with seed 1", "real", {"steps": 160, "batch_size": 5, "seed": 1}),
    "real-full-seed2": ("real-full with seed 2", "real", {"steps": 160, "batch_size": 5, "seed": 2}),
    "bundled-full": ("bundled corpus, the README's budget (160 steps of 5 x 256)", "bundled",
                     {"steps": 160, "batch_size": 5}),
    "bundled-full-seed1": ("bundled-full with seed 1", "bundled", {"steps": 160, "batch_size": 5, "seed": 1}),
    "bundled-full-seed2": ("bundled-full with seed 2", "bundled", {"steps": 160, "batch_size": 5, "seed": 2}),
    **{f"oneshot-real-full{tag}": (f"real-full{tag or ''} with the one-shot Wanda mask (same memories)", "real",
                                   {"steps": 160, "batch_size": 5, "seed": seed, "mask": "oneshot:wanda"})
       for seed, tag in SEEDS},
    **{f"init-none-real-full{tag}": (f"real-full{tag or ''} with gates from no importance (--init-from none)", "real",
                                     {"steps": 160, "batch_size": 5, "seed": seed, "init_from": "none"})
       for seed, tag in SEEDS},
    **{f"keep-outliers-real-full{tag}": (f"init-none-real-full{tag or ''} with the 8 top-Wanda FFN neurons held open "
                                         "(--keep-outliers 8)", "real",
                                         {"steps": 160, "batch_size": 5, "seed": seed, "init_from": "none",
                                          "keep_outliers": 8})
       for seed, tag in SEEDS},
    # "equal_budget_run" picks that run of sweep.equal_budget_runs (mask, memory, rank)
    **{f"prune-lora-real-full{tag}": (f"real-full{tag or ''} as prune, then LoRA (one-shot mask, LoRA alone, "
                                      "equal budget)", "real",
                                      {"steps": 160, "batch_size": 5, "seed": seed, "equal_budget_run": "prune_then_lora"})
       for seed, tag in SEEDS},
}

# koff analyze's rates of language-specific neurons removed, relative to all neurons
LAPE_MEASURES = ("enrichment", "layer_adjusted_enrichment", "activity_adjusted_enrichment")
# one configuration trained with several seeds: its variants, summarised across seeds
SEEDED = {name: tuple(f"{name}{tag}" for _, tag in SEEDS)
          for name in ("real-full", "bundled-full", "oneshot-real-full", "prune-lora-real-full", "init-none-real-full",
                       "keep-outliers-real-full")}
# result key: (what is compared, the configuration, the configuration it must beat), seed by seed
COMPARED = {"learned_against_oneshot": ("The learned mask against the one-shot mask with the same memories, real text, "
                                        "the README's budget", "real-full", "oneshot-real-full"),
            "koff_against_prune_then_lora": ("KOFF against prune, then LoRA (equal budget), real text, the README's budget",
                                             "real-full", "prune-lora-real-full"),
            "init_none_against_wanda_start": ("Gates from no importance against the Wanda start (today's default), "
                                              "real text, the README's budget", "init-none-real-full", "real-full"),
            "keep_outliers_against_init_none": ("Gates from no importance with the outlier neurons held open against "
                                                "the same without, real text, the README's budget",
                                                "keep-outliers-real-full", "init-none-real-full"),
            "keep_outliers_against_wanda_start": ("Gates from no importance with the outlier neurons held open against "
                                                  "the Wanda start (today's default), real text, the README's budget",
                                                  "keep-outliers-real-full", "real-full")}
# the numbers on which the configuration must beat the other configuration for every seed
COMPARED_NUMBERS = {"koff_own_split": "own split", "koff_held_out": "held-out text"}
# the numbers summarised across seeds, and their column titles
SEEDED_COLUMNS = {"koff_held_out": "KOFF, held-out text", "koff_held_out_worst": "worst domain",
                  "mask_alone_held_out": "mask alone, held-out", "price_of_offloading_held_out": "price of offloading",
                  "lape_enrichment": "LAPE enrichment"}
GOALS = {"koff_held_out": ("KOFF within 5% of dense on average", lambda x: x <= 1.05),
         "koff_held_out_worst": ("KOFF within 10% in the worst domain", lambda x: x <= 1.10),
         "mask_alone_held_out": ("bare backbone at least 25% worse", lambda x: x >= 1.25)}


def run_folder(args: argparse.Namespace, name: str) -> Path:
    """The baseline is bench/transfer.py's seed-0 KOFF run (same config), so it is trained once."""
    return Path(args.transfer_out) / "koff" if name == "bundled" else Path(args.out) / name


def config(args: argparse.Namespace, name: str) -> DecomposeConfig:
    _, data, settings = VARIANTS[name]
    settings = dict(settings)
    equal_budget_run = settings.pop("equal_budget_run", None)
    domains = BUNDLED if data == "bundled" else [f"{name}={Path(args.corpora) / sub}" for name, sub in REAL.items()]
    fields = {"steps": args.steps, "batch_size": args.batch_size, "seed": 0, "mask": "learned",
              **settings}  # a variant may change them
    base = DecomposeConfig(model="smollm2-135m", domain=domains, sparsity=0.12, eval=False, checkpoint_every=20,
                           memory="lora+kv", device=args.device, out=str(run_folder(args, name)), **fields)
    return equal_budget_runs(base)[equal_budget_run] if equal_budget_run else base


def evaluate(args: argparse.Namespace, name: str, commit: str) -> tuple[dict, dict, str]:
    """(koff eval table on the own split + held-out text, koff analyze result, the commit that made the
    table: ``commit`` unless an earlier call made it) of one run."""
    run, table = run_folder(args, name), Path(args.out) / f"{name}-eval" / table_name(args)
    analysis = table.parent / "analysis"  # the mask's, whatever the blocks
    transfer = [f for d, sub in HELD_OUT.items() for f in ("--transfer", f"{d}={Path(args.corpora) / sub}")]
    koff_once(["eval", str(run), "--max-blocks", str(args.eval_max_blocks), "--transfer-max-blocks",
               str(args.transfer_max_blocks), *transfer, "--device", args.device, "--out", str(table)], table)
    koff_once(["analyze", str(run), "--device", args.device, "--out", str(analysis)], analysis)
    return (json.loads((table / "table.json").read_text()),
            json.loads((analysis / "analysis.json").read_text()), made_at(table, commit))


def held_out_fingerprint(corpora: Path) -> dict[str, str]:
    """Per held-out domain, a sha256 over its files' names and bytes: ``python-site`` is the installed
    packages' source, so it changes with them, and rows scored on other text must not be compared."""
    prints = {}
    for domain, sub in HELD_OUT.items():
        digest = hashlib.sha256()
        for path in sorted((corpora / sub).iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        prints[domain] = digest.hexdigest()[:16]
    return prints


def scoring(args: argparse.Namespace, fingerprint: dict[str, str]) -> dict:
    """How a row was scored: rows scored another way are not reused."""
    return {"eval_max_blocks": args.eval_max_blocks, "transfer_max_blocks": args.transfer_max_blocks,
            "held_out_fingerprint": fingerprint}


def reusable_rows(path: Path, how: dict) -> dict[str, dict]:
    """The rows of an earlier results file scored as ``how`` says, by variant. A row from before rows
    recorded the held-out text's fingerprint is taken as scored on today's text."""
    if not path.is_file():
        return {}
    fingerprint = how["held_out_fingerprint"]
    return {r["variant"]: r for r in json.loads(path.read_text())["rows"]
            if all(r.get(k) == how[k] for k in ("eval_max_blocks", "transfer_max_blocks"))
            and r.get("held_out_fingerprint", fingerprint) == fingerprint}


def summary_row(name: str, run: DecomposeConfig, table: dict, analysis: dict, commit: str, how: dict) -> dict:
    rows = named_rows(table)
    koff, bare, dense_mem = rows["KOFF"], rows["mask, no memories"], dense_with_memories_row(table["rows"])
    columns = table["transfer"]
    return {"variant": name, "change": VARIANTS[name][0], "steps": run.steps, "batch_size": run.batch_size,
            "commit": commit, **how,
            "koff_own_split": koff["mean_ratio"], "koff_held_out": koff["transfer_mean_ratio"],
            "koff_held_out_worst": max(koff["ratio_to_dense"][c] for c in columns),
            "dense_memories_held_out": dense_mem["transfer_mean_ratio"],
            "mask_alone_held_out": bare["transfer_mean_ratio"],
            "price_of_offloading_held_out": sum(table["price_of_offloading"][c] for c in columns) / len(columns),
            "koff_held_out_by_domain": {c: koff["ratio_to_dense"][c] for c in columns},
            **{f"lape_{k}": analysis["removal"][f"specific_{k}"] for k in LAPE_MEASURES}}


def markdown(rows: list[dict]) -> str:
    def f(x):
        return "–" if x is None else f"{x:.3f}"

    return markdown_table(
        ["variant", "change", "budget", "scored at", "KOFF, own split", "KOFF, held-out text", "worst domain", "dense + memories, held-out",
         "mask alone, held-out", "price of offloading", "LAPE enrichment", "layer-adjusted", "activity-adjusted"],
        [[r["variant"], r["change"], f"{r['steps']} x {r['batch_size']}", r["commit"], f(r["koff_own_split"]), f(r["koff_held_out"]), f(r["koff_held_out_worst"]),
          f(r["dense_memories_held_out"]), f(r["mask_alone_held_out"]), f(r["price_of_offloading_held_out"]),
          *[f(r[f"lape_{k}"]) for k in LAPE_MEASURES]] for r in rows])


def across_seeds(rows: list[dict]) -> dict:
    """For each configuration of SEEDED with two seeds or more among ``rows``: mean / min / max of the
    held-out numbers over those seeds, and whether issue 13's goals hold for each of them."""
    by_name, summary = {r["variant"]: r for r in rows}, {}
    for name, all_seeds in SEEDED.items():
        variants = [v for v in all_seeds if v in by_name]
        if len(variants) < 2:
            continue
        seeded = [by_name[v] for v in variants]
        summary[name] = {"variants": variants, **{k: spread([r[k] for r in seeded]) for k in SEEDED_COLUMNS},
                         "goals_met_for_every_seed": {label: all(ok(r[k]) for r in seeded)
                                                      for k, (label, ok) in GOALS.items()}}
    return summary


def koff_against_others(rows: list[dict]) -> dict:
    """For each comparison of COMPARED with a seed whose two runs are among ``rows``: per such seed, the
    KOFF numbers (mask + memories) of both configurations, and whether the first one's are better on
    each for every such seed."""
    by_name, result = {r["variant"]: r for r in rows}, {}
    for key, (label, koff, other) in COMPARED.items():
        pairs = [(a, b) for a, b in zip(SEEDED[koff], SEEDED[other]) if a in by_name and b in by_name]
        if not pairs:
            continue
        result[key] = {"label": label, "pairs": pairs,
                       **{k: {"koff": [by_name[a][k] for a, _ in pairs], "other": [by_name[b][k] for _, b in pairs],
                              "koff_better_for_every_seed": all(by_name[a][k] < by_name[b][k] for a, b in pairs)}
                          for k in COMPARED_NUMBERS}}
    return result


def koff_against_others_markdown(result: dict) -> list[str]:
    text = []
    for key, r in result.items():
        _, koff, other = COMPARED[key]
        text += [f"## {r['label']}", "",
                 markdown_table([f"seed pair ({koff} / {other})", *COMPARED_NUMBERS.values()],
                                [[f"{a} / {b}", *(f"{r[k]['koff'][i]:.3f} / {r[k]['other'][i]:.3f}"
                                                  for k in COMPARED_NUMBERS)]
                                 for i, (a, b) in enumerate(r["pairs"])]), "",
                 f"{koff} better than {other} for every seed scored ({len(r['pairs'])} of {len(SEEDED[koff])}): "
                 + "; ".join(
                     f"{t}: {'yes' if r[k]['koff_better_for_every_seed'] else 'NO'}"
                     for k, t in COMPARED_NUMBERS.items()), ""]
    return text


def across_seeds_markdown(summary: dict) -> list[str]:
    text = []
    for name, s in summary.items():
        text += [f"## {name} across seeds ({', '.join(s['variants'])}): mean [min, max]", "",
                 markdown_table(list(SEEDED_COLUMNS.values()), [[spread_cell(s[k]) for k in SEEDED_COLUMNS]]), "",
                 f"Goals, met only if met for every seed scored ({len(s['variants'])} of {len(SEEDED[name])}): " + "; ".join(
                     f"{label}: {'met' if ok else 'NOT met'}" for label, ok in s["goals_met_for_every_seed"].items()), ""]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    add_budget_options(parser)
    parser.add_argument("--transfer-out", default="bench/out/transfer", help="bench/transfer.py's --out (the baseline)")
    parser.add_argument("--out", default="bench/out/recovery")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--name", default="recovery")
    parser.add_argument("--fresh", action="store_true", help="train and score every variant, reusing no earlier row")
    parser.add_argument("--keep", default="", help="comma-separated variants whose row from the earlier results "
                        "file is kept even though their run is on this machine (e.g. a retrained run)")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    needed = [Path(args.corpora) / p for p in [*HELD_OUT.values(), *REAL.values()]]
    missing = [str(p) for p in needed if not p.is_dir()]
    if missing:
        sys.exit(f"missing real text {missing}: run python scripts/real_corpora.py --out {args.corpora}")
    command, start = command_line(), time.perf_counter()
    commit = git_commit()  # the tree the runs train with
    how = scoring(args, held_out_fingerprint(Path(args.corpora)))
    runs = {n: config(args, n) for n in names}
    earlier = {} if args.fresh else reusable_rows(Path(args.results) / f"{args.name}.json", how)
    keep = [v for v in args.keep.split(",") if v]
    unkept = [v for v in keep if v not in names or v not in earlier]
    if unkept:
        sys.exit(f"--keep {unkept}: no row scored this way in {args.results}/{args.name}.json among --variants")
    kept = {n: earlier[n] for n in names if n in earlier and (n in keep or not finished(runs[n]))}
    todo = [n for n in names if n not in kept]
    train_all([runs[n] for n in todo], args.jobs)
    scored = {n: summary_row(n, runs[n], *evaluate(args, n, commit), how) for n in todo}
    rows = [kept.get(n) or scored[n] for n in names]
    seeds, compared = across_seeds(rows), koff_against_others(rows)
    result = {"command": command, "commit": commit, "machine": machine(args.device), "steps": args.steps,
              "batch_size": args.batch_size, **how, "held_out": HELD_OUT,
              "reused_rows": sorted(kept), "rows": rows, "across_seeds": seeds,
              **compared,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json(Path(args.results) / f"{args.name}.json", result)
    text = "\n".join([
        "# What carries the recovery to new text (issue 13, points 3, 4, 5 and 7)", "",
        f"Command: `{command}`  ", f"Commit: {result['commit']}  ",
        f"Machine: {result['machine']}; seed 0 unless the change says otherwise, 12%, {args.steps} steps of {args.batch_size} x 256 tokens per run "
        "unless the budget column says otherwise; "
        f"{result['wall_seconds']:.0f} s (runs and tables reused from an earlier call count nothing; "
        f"rows kept from the earlier results file: {', '.join(result['reused_rows']) or 'none'}, each scored at the "
        "commit its row names)", "",
        "Mean perplexity / dense over eng/deu/fra/spa/python. Held-out text is text no run trained on: Debian's "
        "maint-guide per language, third-party Python (python-site); "
        f"{args.transfer_max_blocks} evenly spaced blocks of 256 tokens per domain. The own split is each run's "
        "validation split of its training corpus (bundled or real). LAPE: language-specific FFN neurons removed, "
        "relative to all neurons (1 = as often).", "",
        markdown(rows), "", *across_seeds_markdown(seeds), *koff_against_others_markdown(compared)])
    write_text(Path(args.results) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
