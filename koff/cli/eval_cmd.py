"""``koff eval``: held-out perplexity per domain, of a model, or of a run / export as one ablation table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from koff.cli.common import (
    UsageError,
    add_config_option,
    add_data_options,
    add_model_options,
    log,
    markdown_table,
    require,
    save_resolved_config,
)
from koff.data import load_domains, parse_domains
from koff.evaluation import evaluate, hf_scorer
from koff.experiments.ablation import ablation_table, export_table, run_label, save_table
from koff.formats.export_folder import is_export
from koff.io import write_json, write_text
from koff.models import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="held-out perplexity per domain",
        description="Print and save held-out perplexity (token-weighted) per domain. With --model/--domain: one "
        "model. With RUN_DIR (a `koff decompose` folder) and optional comparison runs ([LABEL=]RUN_DIR, trained "
        "with other --mask/--memory settings on the same domains): one table of dense base, dense + memories, mask "
        "alone, KOFF and every comparison row, with ratios to dense and parameter counts. With an export folder: "
        "the dense base, the exported backbone alone and with its memories.",
    )
    add_config_option(parser)
    parser.add_argument("runs", nargs="*", metavar="RUN_OR_EXPORT_DIR",
                        help="a run or export folder, then comparison runs as [LABEL=]RUN_DIR")
    add_model_options(parser)
    add_data_options(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass (default: 4)")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many validation blocks per domain")
    parser.add_argument("--transfer", action="append", default=[], metavar="NAME=SOURCE",
                        help="with a run folder: a column scoring NAME's memory on text of NAME from another source "
                        "(repeatable; e.g. deu=corpora/debian-reference/deu)")
    parser.add_argument("--transfer-max-blocks", type=int, default=None,
                        help="evenly spaced blocks per --transfer source (default: all of it)")
    parser.add_argument("--routing", action="store_true",
                        help="with an export: how well `model: auto` picks memories (accuracy at 16, 64 and 256 prompt "
                        "tokens, confusion matrix) and the perplexity of routed, right, wrong and no memories; "
                        "--transfer adds other sources; routing.md/.json in EXPORT/eval")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/eval, or RUN_OR_EXPORT_DIR/eval for a table)")
    tasks = parser.add_argument_group("downstream tasks (lm-evaluation-harness; pip install 'koff[lmeval]')")
    tasks.add_argument("--tasks", default=None, metavar="TASK[,TASK...]",
                       help="with an export folder: run these harness tasks on the dense base, the bare backbone and "
                       "the backbone with a memory, instead of perplexity")
    tasks.add_argument("--memory", action="append", default=[], metavar="NAME|TASK=NAME",
                       help="the memory a task runs with (repeatable; TASK=NAME for one task, e.g. xnli_de=deu)")
    tasks.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's own)")
    tasks.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    tasks.add_argument("--include-path", default=None, metavar="DIR", help="a folder of task YAMLs (local datasets)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tasks:
        return run_tasks(args)
    if args.routing:
        return run_routing(args)
    if args.runs:
        return run_table(args)
    specs = parse_domains(require(args.domain, "--domain"))
    loaded = load_model(require(args.model, "--model"), dtype=args.dtype, device=args.device)
    log.info("loaded %s (%s) in %.1f s", args.model, loaded.source, loaded.seconds)
    out = Path(args.out or "runs/eval")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(args, out)

    domains = load_domains(specs, loaded.tokenizer, block_len=args.block_len, val_fraction=args.val_fraction, seed=args.seed)
    start = time.perf_counter()
    result = evaluate(hf_scorer(loaded.model), domains, args.batch_size, args.max_blocks, device=args.device)
    result.update(
        model=args.model,
        model_source=loaded.source,
        model_load_seconds=round(loaded.seconds, 2),
        eval_seconds=round(time.perf_counter() - start, 2),
        data={d.name: d.summary() for d in domains},
    )
    rows = [[name, r["perplexity"], r["tokens"]] for name, r in result["domains"].items()]
    rows.append(["mean", result["mean_perplexity"], sum(r["tokens"] for r in result["domains"].values())])
    table = markdown_table(["domain", "perplexity", "tokens"], rows)
    print(table)
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", table + "\n")
    log.info("wrote %s", out / "eval.json")
    return 0


def run_routing(args: argparse.Namespace) -> int:
    from koff.experiments.routing import routing_markdown, routing_table

    export = Path(require(args.runs, "EXPORT")[0])
    if len(args.runs) != 1 or not is_export(export):
        raise UsageError("--routing takes one `koff export` folder")
    table = routing_table(export, args.val_fraction, args.seed, args.max_blocks or 16, args.transfer,
                          args.transfer_max_blocks or 16, device=args.device)
    out = Path(args.out or export / "eval")
    out.mkdir(parents=True, exist_ok=True)
    text = routing_markdown(table)
    print(text)
    write_json(out / "routing.json", table)
    write_text(out / "routing.md", text + "\n")
    log.info("wrote %s (routing.md, routing.json)", out)
    return 0


def run_table(args: argparse.Namespace) -> int:
    first = run_label(args.runs[0])[1]
    if not first.is_dir():
        raise UsageError(f"{first} is not a folder")
    start = time.perf_counter()
    kwargs = dict(batch_size=args.batch_size, max_blocks=args.max_blocks, device=args.device)
    if is_export(first):
        if len(args.runs) > 1:
            raise UsageError("comparison runs go with a run folder, not with an export folder")
        if args.transfer:
            raise UsageError("--transfer goes with a run folder, not with an export folder")
        table = export_table(first, args.model, args.val_fraction, args.seed, **kwargs)
    else:
        table = ablation_table(args.runs, **kwargs, transfer=args.transfer, transfer_max_blocks=args.transfer_max_blocks)
    table["eval_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out or first / "eval")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(args, out)
    print(save_table(table, out))
    log.info("wrote %s (table.md, table.json, table.csv)", out)
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    from koff.experiments.lmeval import downstream_table, parse_memories, write_table
    from koff.runtime import load

    if len(args.runs) != 1 or not is_export(args.runs[0]):
        raise UsageError("--tasks runs on one export folder: koff eval EXPORT --tasks TASK[,TASK...]")
    if args.limit is not None and args.limit < 1 or args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError("--limit must be at least 1 and --num-fewshot at least 0")
    tasks = [t for t in args.tasks.split(",") if t]
    memories = parse_memories(args.memory, tasks)
    runtime = load(args.runs[0], device=args.device)
    base = args.model or runtime.meta.get("base_model")
    runs = downstream_table(runtime, tasks, memories, base, args.num_fewshot, args.limit, args.include_path, args.batch_size)
    out = Path(args.out or Path(args.runs[0]) / "eval")
    print(write_table(runs, out))
    log.info("wrote %s (tasks.md, tasks.json, tasks.csv)", out)
    return 0
