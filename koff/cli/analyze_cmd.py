"""``koff analyze``: does a run's shared mask remove language-specific neurons preferentially?

Finds language-specific and language-general FFN neurons of the dense base model by LAPE
(``koff.analysis.lape``) on the run's own language domains, then measures the rate at which the
run's final mask removes each kind. It also lists the few neurons of highest one-shot importance and
whether the mask keeps them (``koff.analysis.outliers``): losing one can break the bare backbone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from koff.analysis import (activation_probabilities, classify, language_rates, lape_scores, outlier_neurons,
                           removal_rates, spread_blocks)
from koff.analysis.lape import SPLITS, check_fractions
from koff.cli.common import UsageError, add_config_option, log, markdown_table, require, save_resolved_config
from koff.data import DomainSpec, load_domains, parse_domains
from koff.formats import run as run_folder
from koff.io import write_json, write_text
from koff.tensor_files import save_tensors
from koff.masks import BinaryMask, UnitCosts, unit_importance
from koff.models import decoder_layout, load_model

CODE_PREFIX = "bundled:code/"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="language-specific neurons (LAPE) and how often the run's mask removes them",
        description="Find language-specific and language-general FFN neurons of the dense base model by LAPE "
        "(Tang et al. 2024) on the run's language domains, and compare the rates at which the run's mask "
        "removes them; also which of the neurons of highest Wanda importance (massive activations) the mask "
        "removes. Writes analysis.json, lape.safetensors and removal_by_layer.png.",
    )
    add_config_option(parser)
    parser.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="a `koff decompose` run folder")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    parser.add_argument("--max-blocks", type=int, default=64, help="blocks per language, evenly spaced (default: 64)")
    parser.add_argument("--split", default="train", choices=SPLITS, help="which blocks LAPE reads (default: train)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward pass (default: 4)")
    parser.add_argument("--specific-fraction", type=float, default=0.05,
                        help="lowest-entropy fraction of active neurons called language-specific (default: 0.05)")
    parser.add_argument("--general-fraction", type=float, default=0.05,
                        help="highest-entropy fraction of active neurons called language-general (default: 0.05)")
    parser.add_argument("--min-probability", type=float, default=0.01,
                        help="a neuron counts only if it fires on at least this fraction of some language's tokens "
                        "(default: 0.01)")
    parser.add_argument("--exclude", action="append", default=None, metavar="NAME",
                        help="repeatable; a domain of the run that is not a language (bundled:code/* are always excluded)")
    parser.add_argument("--outliers", type=int, default=8, metavar="K",
                        help="report the K FFN neurons of highest Wanda importance and whether the mask keeps them "
                        "(a bare backbone that lost one can collapse; default: 8, 0: skip)")
    parser.add_argument("--device", default=None, help="torch device (default: the run's)")
    parser.set_defaults(func=run)


def split_languages(specs: list[DomainSpec], exclude: list[str]) -> tuple[list[DomainSpec], list[dict]]:
    """The run's domains that are languages, and the others with the reason they are left out."""
    unknown = sorted(set(exclude) - {s.name for s in specs})
    if unknown:
        raise UsageError(f"--exclude: the run has no domain {', '.join(unknown)}")
    languages, skipped = [], []
    for spec in specs:
        if spec.source.startswith(CODE_PREFIX):
            skipped.append({"name": spec.name, "source": spec.source, "reason": "code is not a language"})
        elif spec.name in exclude:
            skipped.append({"name": spec.name, "source": spec.source, "reason": "--exclude"})
        else:
            languages.append(spec)
    if len(languages) < 2:
        raise UsageError(f"LAPE compares languages: the run has {len(languages)} language domain(s), at least 2 are needed")
    return languages, skipped


def _check_args(args: argparse.Namespace) -> None:
    if args.max_blocks is not None and args.max_blocks < 1:
        raise UsageError(f"--max-blocks must be at least 1, got {args.max_blocks}")
    if args.outliers < 0:
        raise UsageError(f"--outliers must be at least 0, got {args.outliers}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0.0 <= args.min_probability <= 1.0:
        raise UsageError(f"--min-probability must be in [0, 1], got {args.min_probability}")
    try:
        check_fractions(args.specific_fraction, args.general_fraction)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _check_mask(mask: BinaryMask, layout, mask_path: Path, model: str) -> None:
    widths = [parts.projection("gate_proj").out_features for parts in layout.layers]
    if [len(m) for m in mask.ffn] != widths:
        raise UsageError(
            f"{mask_path} has {len(mask.ffn)} layers of {sorted({len(m) for m in mask.ffn})} FFN neurons; "
            f"{model} has {len(widths)} layers of {sorted(set(widths))}"
        )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    run_dir = Path(require(args.run_dir, "RUN"))
    config = run_folder.read_config(run_dir)
    mask_path = run_dir / run_folder.MASK
    if not mask_path.is_file():
        raise UsageError(f"{mask_path} not found (has the run finished?)")
    languages, skipped = split_languages(parse_domains(config.domain), args.exclude or [])
    for s in skipped:
        print(f"skipped domain {s['name']} ({s['source']}): {s['reason']}")

    start = time.perf_counter()
    loaded = load_model(config.model, dtype=config.dtype, device=args.device or config.device)
    layout = decoder_layout(loaded.model)
    mask = BinaryMask.load(mask_path)
    _check_mask(mask, layout, mask_path, config.model)
    domains = load_domains(
        languages, loaded.tokenizer, block_len=config.block_len, val_fraction=config.val_fraction, seed=config.seed
    )
    probs = activation_probabilities(loaded.model, layout, domains, args.max_blocks, args.batch_size, args.split)
    entropy = lape_scores(probs)
    classes = classify(entropy, probs, args.specific_fraction, args.general_fraction, args.min_probability)
    names = [d.name for d in domains]
    result = {
        "run": str(run_dir),
        "model": config.model,
        "model_source": loaded.source,
        "mask_sparsity": mask.sparsity(UnitCosts.of(loaded.model, layout)),
        "languages": names,
        "skipped": skipped,
        "split": args.split,
        "tokens_per_language": {d.name: int(spread_blocks(getattr(d, args.split), args.max_blocks).numel()) for d in domains},
        "settings": {
            "specific_fraction": args.specific_fraction,
            "general_fraction": args.general_fraction,
            "min_probability": args.min_probability,
            "max_blocks": args.max_blocks,
        },
        "classes": classes.summary(),
        "removal": removal_rates(mask, classes.specific, classes.general, probs),
        "specific_by_language": language_rates(mask, probs, classes.specific, names),
        "outliers": _outliers(loaded.model, layout, mask, domains, config.calib_blocks, args),
        "seconds": round(time.perf_counter() - start, 2),
    }
    out = Path(args.out) if args.out else run_dir / "analysis"
    _write(out, args, result, probs, entropy, classes)
    print(summary_table(result))
    log.info("wrote %s", out / "analysis.json")
    return 0


def _outliers(model, layout, mask: BinaryMask, domains, calib_blocks: int, args: argparse.Namespace) -> list[dict]:
    """The top ``--outliers`` neurons by Wanda importance on ``calib_blocks`` blocks (the run's
    calibration budget, balanced over the languages, evenly spaced in each)."""
    if args.outliers == 0:
        return []
    per_language = max(1, calib_blocks // len(domains))
    blocks = torch.cat([spread_blocks(getattr(d, args.split), per_language) for d in domains])
    importance, _ = unit_importance(model, layout, list(blocks.split(args.batch_size)), "wanda")
    return outlier_neurons(importance, mask, args.outliers)


def _write(out: Path, args: argparse.Namespace, result: dict, probs, entropy, classes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(args, out)
    write_json(out / "analysis.json", result)
    write_text(out / "analysis.md", summary_table(result) + "\n")
    tensors = {"probs": probs, "entropy": entropy}
    tensors |= {name: getattr(classes, name).to(torch.uint8) for name in ("specific", "general", "active")}
    save_tensors(tensors, out / "lape.safetensors", {"languages": ",".join(result["languages"])})
    try:
        from koff.analysis.plot import plot_removal_by_layer

        model = Path(result["model"]).name
        title = f"{model}, mask sparsity {result['mask_sparsity']:.3f}: FFN neurons removed per layer"
        plot_removal_by_layer(result["removal"], out / "removal_by_layer.png", title)
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'koff[plots]'): no plot written")


def summary_table(result: dict) -> str:
    r = result["removal"]

    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    rows = [
        [label, r[f"n_{name}"], fmt(r[name]), fmt(r[f"{name}_enrichment"]),
         fmt(r[f"{name}_layer_adjusted_enrichment"]), fmt(r.get(f"{name}_activity_adjusted_enrichment"))]
        for name, label in (("specific", "language-specific"), ("general", "language-general"))
    ]
    rows.append(["all", r["n_all"], fmt(r["all"]), "", "", ""])
    table = markdown_table(["FFN neurons", "count", "removed", "enrichment", "layer-adjusted", "activity-adjusted"], rows)
    langs = [[name, v["n_specific"], fmt(v["removal_rate"])] for name, v in result["specific_by_language"].items()]
    text = table + "\n\n" + markdown_table(["language", "specific neurons", "removed"], langs)
    if result.get("outliers"):
        rows = [[o["layer"], o["neuron"], f"{o['times_median']:.0f}x", "kept" if o["kept"] else "**removed**"]
                for o in result["outliers"]]
        text += "\n\n" + markdown_table(["layer", "neuron", "Wanda importance / median", "mask"], rows)
    return text
