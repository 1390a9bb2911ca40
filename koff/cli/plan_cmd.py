"""``koff plan``: will a decomposition (and serving its export) fit the GPU? Reads no weights."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from koff.cli.common import add_config_option, add_setting_flags, markdown_table
from koff.config import DecomposeConfig
from koff.data import parse_domains
from koff.models import resolve_dtype
from koff.plan import GiB, Plan, plan_decomposition, read_model_config, shape_names

DEFAULT_DOMAINS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="peak GPU memory of a decomposition and of serving, from the model's config alone",
        description="Predict the peak GPU memory of `koff decompose` with these settings (weights, memories and "
        "optimiser states, activations with and without gradient checkpointing, logits) and of serving the export, "
        "and say whether each fits. --model also takes a config.json or shape:<name> (shipped shapes: "
        f"{', '.join(shape_names())}); no weights are read. Without --device, a GPU is assumed.",
    )
    add_config_option(parser)
    add_setting_flags(parser)
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel processes (each holds the whole model)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="memory of one GPU in GiB (e.g. 80); a run fits when its peak is at most 90%% of it (the rest: "
                        "CUDA context, fragmentation); without it nothing is said about fitting")
    parser.add_argument("--domains", type=int, default=None,
                        help=f"number of domains (default: the --domain flags given, else {DEFAULT_DOMAINS})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(DecomposeConfig) if getattr(args, f.name) is not None}
    cfg = DecomposeConfig.from_dict(values)
    device = cfg.device if "device" in args.explicit else "cuda"
    domains = args.domains or (len(parse_domains(cfg.domain)) if cfg.domain else DEFAULT_DOMAINS)
    plan = plan_decomposition(read_model_config(cfg.model), cfg, domains, args.gpus, args.gpu_memory, device)
    print(json.dumps(_as_dict(plan), indent=2) if args.json else _table(plan, cfg, domains, device))
    return 0


def _as_dict(plan: Plan) -> dict:
    return {
        "training": plan.training, "training_peak": plan.training_peak, "checkpointing": plan.checkpointing,
        "training_without_checkpointing": plan.training_without_checkpointing,
        "training_with_checkpointing": plan.training_with_checkpointing,
        "serving": plan.serving, "serving_peak": plan.serving_peak, "gpu_bytes": plan.gpu_bytes,
        "training_fits": plan.fits(plan.training_peak), "serving_fits": plan.fits(plan.serving_peak),
    }


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _fits(plan: Plan, peak: int) -> str:
    fits = plan.fits(peak)
    return "" if fits is None else ("fits" if fits else "does NOT fit")


def _table(plan: Plan, cfg: DecomposeConfig, domains: int, device: str) -> str:
    rows = [[f"training: {name.replace('_', ' ')}", _gib(v), ""] for name, v in plan.training.items()]
    rows += [
        ["training peak, no checkpointing", _gib(plan.training_without_checkpointing),
         _fits(plan, plan.training_without_checkpointing)],
        ["training peak, checkpointing", _gib(plan.training_with_checkpointing),
         _fits(plan, plan.training_with_checkpointing)],
    ]
    rows += [[f"serving: {name.replace('_', ' ')}", _gib(v), ""] for name, v in plan.serving.items()]
    rows.append(["serving peak", _gib(plan.serving_peak), _fits(plan, plan.serving_peak)])
    head = (f"{cfg.model}: micro-batch {cfg.batch_size} x {cfg.block_len} tokens, {domains} domains, "
            f"{cfg.memory} memories, {str(resolve_dtype(cfg.dtype, device)).removeprefix('torch.')} on {device}; "
            f"gradient checkpointing "
            f"{'on' if plan.checkpointing else 'off'} ({cfg.gradient_checkpointing})")
    return head + "\n" + markdown_table(["per GPU", "GiB", ""], rows)
