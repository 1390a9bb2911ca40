"""``koff decompose``: learn the shared mask and every domain's memory."""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

from koff.cli.common import UsageError, add_config_option, add_setting_flags, log, markdown_table, require
from koff.config import DecomposeConfig
from koff.evaluation import DecompositionEval
from koff.formats import run as run_folder
from koff.locks import folder_lock
from koff.training.pipeline import decompose


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decompose",
        help="learn one shared structured mask and per-domain memories",
        description="Jointly learn a shared structured pruning mask (to a target sparsity) and one memory "
        "(LoRA + learned KV prefix) per domain. --resume continues a killed run from its last checkpoint.",
    )
    add_config_option(parser)
    add_setting_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.set_defaults(func=run)


# How to run, not what to compute: a resumed run may change these.
_RESUME_MAY_CHANGE = {"out", "device"}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # Under `accelerate launch` only the main process (RANK 0) writes the folder, so only it locks.
    main_process = os.environ.get("RANK", "0") == "0"
    with folder_lock(out, "koff decompose") if main_process else nullcontext():
        config = _resumed_config(args, out) if args.resume else _new_config(args, out)
        # with held-out text the table scores the validation blocks too; summary.json takes them from it
        decomposer, summary = decompose(config, resume=args.resume, evaluate_run=not config.heldout)
    if not decomposer.accelerator.is_main_process:  # under `accelerate launch`, one process reports
        return 0
    log.info("run folder: %s (sparsity %.4f)", out, summary["sparsity"])
    if config.heldout and config.eval:
        print(_heldout_table(config, out, summary))
    elif "eval" in summary:
        print(_eval_table(DecompositionEval.from_dict(summary["eval"])))
    return 0


def _heldout_table(config: DecomposeConfig, out: Path, summary: dict) -> str:
    """The run scored as `koff eval RUN --transfer ...` scores it, with the held-out text as transfer
    columns; its rows on the validation blocks go into summary.json as the run's evaluation."""
    from koff.experiments.ablation import ablation_table, main_run_evaluation, save_table, usable_heldout

    table = ablation_table([str(out)], batch_size=config.eval_batch_size, max_blocks=config.eval_max_blocks,
                           device=config.device, transfer=usable_heldout(config.heldout, config.domain),
                           transfer_max_blocks=config.eval_max_blocks)
    run_folder.write_summary(out, summary | {"eval": main_run_evaluation(table).to_dict()})
    log.info("held-out text scored: %s", out / "eval" / "table.md")
    return save_table(table, out / "eval")


def _new_config(args: argparse.Namespace, out: Path) -> DecomposeConfig:
    if (out / run_folder.CHECKPOINTS).exists() or (out / run_folder.MASK).exists():
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    values = {f.name: getattr(args, f.name) for f in fields(DecomposeConfig)}
    values = {k: v for k, v in values.items() if v is not None}
    require(values.get("domain"), "--domain")
    config = DecomposeConfig.from_dict(values)
    if config.heldout:
        from koff.experiments.ablation import usable_heldout

        usable_heldout(config.heldout, config.domain)  # refuses a bad one before the run trains
    return config


def _resumed_config(args: argparse.Namespace, out: Path) -> DecomposeConfig:
    """The run's own config.yaml, continued in ``out``: the folder named by --out is the one resumed
    and written (a copied run folder resumes in the copy), and any other flag given must agree with
    the stored run, since changing what is computed half-way would not be the same run."""
    values = run_folder.read_config_values(out)
    values["out"] = str(out)
    if "device" in args.explicit:
        values["device"] = args.device
    config = DecomposeConfig.from_dict(values)
    for name in sorted(args.explicit - _RESUME_MAY_CHANGE - {"resume", "config"}):
        given, kept = getattr(args, name), getattr(config, name, None)
        if name in values and given != kept:
            raise UsageError(f"--resume continues {out} as configured: --{name.replace('_', '-')} {given} differs from the "
                             f"run's {kept!r}; start a new run (another --out) to change it")
    return config


def _eval_table(results: DecompositionEval) -> str:
    dense = results.dense["domains"]
    rows = []
    for name, result in results.to_dict().items():
        cells = [f"{result['domains'][d]['perplexity']:.2f} ({result['domains'][d]['perplexity'] / dense[d]['perplexity']:.3f})"
                 for d in dense]
        rows.append([name, *cells, f"{result['geomean_perplexity']:.2f}"])
    return markdown_table(["configuration", *[f"{d} ppl (ratio)" for d in dense], "geomean"], rows)
