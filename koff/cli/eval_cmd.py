"""``koff eval``: held-out perplexity per domain."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from koff.cli.common import (
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
from koff.io import write_json, write_text
from koff.models import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="held-out perplexity per domain",
        description="Print and save held-out perplexity (token-weighted) of a model on each domain.",
    )
    add_config_option(parser)
    add_model_options(parser)
    add_data_options(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many validation blocks per domain")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.json, eval.md and config.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    specs = parse_domains(require(args.domain, "--domain"))
    loaded = load_model(require(args.model, "--model"), dtype=args.dtype, device=args.device)
    log.info("loaded %s (%s) in %.1f s", args.model, loaded.source, loaded.seconds)
    out = Path(args.out)
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
