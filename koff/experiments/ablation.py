"""One table for the paper's evidence: configurations x domains, held-out perplexity and ratio to dense.

The main run (a KOFF decomposition) gives four rows without further training: the dense base, the
dense base with the run's memories (a reference: what the memories add without pruning), the mask
alone, and the mask with the memories. Every comparison run (``koff decompose`` with another
``--mask`` / ``--memory``: LoRA only or KV only on the same mask, a one-shot mask with LoRA trained
after it, ...) adds its own row, and the row of its mask alone unless the table has that mask alone
already (it trained on the main run's mask with ``--mask file:``, or two runs share one one-shot
mask). All rows score the same validation blocks, so their numbers are comparable by construction.

*Transfer* columns score each row on text of a domain from another source than the one it trained
on (``--transfer NAME=SOURCE``: the memory of NAME on that text): what a memory carries beyond its
training corpus. The *price of offloading* is KOFF over the dense base with the same memories, per
column: what the mask costs once the memories are there.
"""

from __future__ import annotations

import csv
import io
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from koff.data import DomainData, load_domains, load_heldout, parse_domain, parse_domains
from koff.data.sources import chosen_source, fell_back, source_exists
from koff.errors import UserInputError
from koff.evaluation import DecompositionEval
from koff.evaluation.perplexity import Scorer, evaluate
from koff.evaluation.score_cache import ScoreCache, model_identity
from koff.formats.exported_memory import training_data
from koff.formats.run import Run, load_run
from koff.io import markdown_table, write_json, write_text
from koff.masks.binary import BinaryMask
from koff.models import load_model, model_folder
from koff.runtime import load

log = logging.getLogger(__name__)


class TableError(UserInputError):
    """Runs that cannot share one table (other model, other domains, no recorded data)."""


DENSE_WITH_MEMORIES = "dense base + memories"  # the label that opens that row, before the memory kind
MEMORY_NAMES = {"lora+kv": "LoRA + KV", "lora": "LoRA only", "kv": "KV only", "none": "no memories"}


@dataclass
class Configuration:
    """One row: how to score, and what it costs."""

    name: str
    scorer: Scorer
    parameters: int  # backbone parameters in use (embeddings included)
    memory_parameters: int = 0  # per domain
    setting: Callable[[], ContextManager] = nullcontext  # entered while this row is scored
    cache: ScoreCache | None = None  # where its scores are kept between tables (the frozen dense base's)


def describe(run: Run) -> str:
    """A readable name for a run's configuration, e.g. 'one-shot wanda mask + LoRA only'."""
    cfg = run.config
    return f"{cfg.mask_spec.describe()} + {MEMORY_NAMES[cfg.memory]}"


def memory_parameters_per_domain(model) -> int:
    """Trainable parameters of one memory (the mean over the model's memories; 0 without any)."""
    return mean_memory_parameters([m.num_parameters() for m in model.memories.values()])


def mean_memory_parameters(counts: list[int]) -> int:
    """The mean of per-memory parameter counts (a run summary's ``memory_parameters``); 0 for none."""
    return round(sum(counts) / len(counts)) if counts else 0


def run_configurations(run: Run, label: str | None, shown: list[BinaryMask] | None) -> Iterator[Configuration]:
    """The rows one run contributes. ``shown``: the masks the table already scores alone (None for the
    main run, which opens the table); a comparison run's mask alone is scored only if it is new."""
    model = run.koff_model()
    dense_params = model.costs.total_params
    masked = dense_params - run.mask.removed_params(model.costs)
    memories = memory_parameters_per_domain(model)
    bare = lambda ids, domain: model(ids, None)  # noqa: E731
    if shown is None:
        yield Configuration("dense base", model.scorer(), dense_params, setting=model.dense,
                            cache=dense_cache(run.config.model, run.model, "koff model, dense"))
        if memories:
            yield Configuration(f"{DENSE_WITH_MEMORIES} ({MEMORY_NAMES[run.config.memory]})", model.scorer(),
                                dense_params, memories, setting=model.unmasked)
        yield Configuration("mask, no memories", bare, masked)
        if memories:
            yield Configuration(f"KOFF: {label or describe(run)}", model.scorer(), masked, memories)
        return
    if not any(_same_mask(run.mask, mask) for mask in shown):
        yield Configuration(f"{label or describe(run)}, mask without memories", bare, masked)
    if memories:
        yield Configuration(label or describe(run), model.scorer(), masked, memories)


def dense_cache(spec: str, model: torch.nn.Module, how: str) -> ScoreCache:
    """Where the scores of the dense base ``spec`` (loaded as ``model``, scored through ``how``) are
    kept between tables."""
    weight = next(model.parameters())
    return ScoreCache(model_identity(model_folder(spec)[0], weight.dtype, weight.device, how))


def _same_mask(a: BinaryMask, b: BinaryMask) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.ffn + a.attn, b.ffn + b.attn))


def evaluate_table(configurations: Iterator[Configuration], domains: list[DomainData],
                   transfer: list[tuple[str, DomainData]] = (), **kwargs) -> dict:
    """Score every configuration (one at a time, so a run's model can be freed before the next) on
    the validation blocks of ``domains`` and on each ``(column, held-out text)`` of ``transfer``."""
    rows, results = [], []
    for config in configurations:
        with torch.no_grad(), config.setting():
            results.append(evaluate(config.scorer, domains, cache=config.cache, **kwargs))
            # held-out text is already cut to its own block budget (evenly spaced): score all of it, one
            # column at a time (two columns of one domain share its name, which picks its memory)
            other = {column: evaluate(config.scorer, [data], cache=config.cache,
                                      **(kwargs | {"max_blocks": None}))["domains"][data.name]
                     for column, data in transfer}
        perplexity = {d: r["perplexity"] for d, r in results[-1]["domains"].items()}
        perplexity |= {column: other[column]["perplexity"] for column, _ in transfer}
        rows.append({"configuration": config.name, "perplexity": perplexity, "parameters": config.parameters,
                     "memory_parameters_per_domain": config.memory_parameters, "evaluation": results[-1]})
    names = [d.name for d in domains]
    columns = [column for column, _ in transfer]
    for row, result in zip(rows, results):
        ratios = {d: p / rows[0]["perplexity"][d] for d, p in row["perplexity"].items()}
        row["ratio_to_dense"] = ratios
        row["mean_ratio"] = sum(ratios[d] for d in names) / len(names)
        row["geomean_ratio"] = geomean_ratio(result, results[0])
        if columns:
            row["transfer_mean_ratio"] = sum(ratios[c] for c in columns) / len(columns)
            row["source_mean_ratio"] = {label: sum(ratios[c] for c in group) / len(group)
                                        for label, group in columns_by_source(columns).items()}
    table = {"domains": names, "transfer": columns, "rows": rows,
             "tokens": {d: r["tokens"] for d, r in results[0]["domains"].items()}}
    table["tokens"] |= {column: data.val[:, 1:].numel() for column, data in transfer}
    price = price_of_offloading(rows, names + columns)
    if price:
        table["price_of_offloading"] = price
    return table


def main_run_evaluation(table: dict) -> DecompositionEval:
    """The main run's three rows on its own validation blocks, as ``koff decompose`` records them in
    summary.json (the table scores them anyway; scoring them twice cost a run minutes)."""
    by_name = {row["configuration"]: row["evaluation"] for row in table["rows"]}
    koff = next((e for name, e in by_name.items() if name.startswith("KOFF: ")), None)
    return DecompositionEval(dense=by_name["dense base"], mask_only=by_name["mask, no memories"], with_memories=koff)


def columns_by_source(columns: list[str]) -> dict[str, list[str]]:
    """Held-out columns (``NAME@label``) grouped by their source's label, in order."""
    groups: dict[str, list[str]] = {}
    for column in columns:
        groups.setdefault(column.partition("@")[2], []).append(column)
    return groups


def dense_with_memories_row(rows: list[dict]) -> dict | None:
    """The table's row of the dense base with the run's memories (its label names the memory kind)."""
    return next((r for r in rows if r["configuration"].startswith(DENSE_WITH_MEMORIES)), None)


def price_of_offloading(rows: list[dict], columns: list[str]) -> dict | None:
    """KOFF's perplexity over the dense base's with the same memories, per column (None without both rows)."""
    koff = next((r for r in rows if r["configuration"].startswith("KOFF")), None)
    reference = dense_with_memories_row(rows)
    if koff is None or reference is None:
        return None
    return {c: koff["perplexity"][c] / reference["perplexity"][c] for c in columns}


def geomean_ratio(result: dict, dense: dict) -> float:
    """Geometric mean over domains of perplexity / dense perplexity, from two ``evaluate`` results."""
    return result["geomean_perplexity"] / dense["geomean_perplexity"]


def markdown(table: dict) -> str:
    names = table["domains"] + table.get("transfer", [])
    other = bool(table.get("transfer"))
    sources = list(columns_by_source(table.get("transfer", [])))
    by_source = len(sources) > 1
    header = ["configuration", *names, "mean ratio", *(["mean ratio, other source"] if other else []),
              *([f"mean ratio, {s}" for s in sources] if by_source else []), "geomean ratio",
              "parameters", "memory params / domain"]
    rows = []
    for row in table["rows"]:
        cells = [f"{row['perplexity'][d]:.2f} ({row['ratio_to_dense'][d]:.3f})" for d in names]
        memory = f"{row['memory_parameters_per_domain']:,}" if row["memory_parameters_per_domain"] else "-"
        rows.append([row["configuration"], *cells, row["mean_ratio"], *([row["transfer_mean_ratio"]] if other else []),
                     *([row["source_mean_ratio"][s] for s in sources] if by_source else []),
                     row["geomean_ratio"], f"{row['parameters']:,}", memory])
    text = markdown_table(header, rows)
    price = table.get("price_of_offloading")
    if price:
        text += "\n\nPrice of offloading (KOFF / dense base with the same memories): " + ", ".join(
            f"{c} {v:.3f}" for c, v in price.items())
        groups = {"training text": table["domains"], **columns_by_source(table.get("transfer", []))}
        text += "\n\nMean price of offloading: " + ", ".join(
            f"{label} {sum(price[c] for c in group) / len(group):.3f}" for label, group in groups.items())
    return text


def save_table(table: dict, folder: Path) -> str:
    """Write ``table`` as table.json, table.md and table.csv in ``folder``; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(table)
    write_json(folder / "table.json", table)
    write_text(folder / "table.md", text + "\n")
    write_text(folder / "table.csv", to_csv(table))
    return text


def usable_heldout(specs: list[str], domains: list[str]) -> list[str]:
    """The held-out texts to score. One that names no domain of the run, or whose files are missing,
    is refused before a run trains for an hour and then fails to score it; except where the domain's
    own source fell back (``A|B``: the real corpora were not fetched), whose held-out text is left
    out with a warning."""
    sources = {spec.partition("=")[0].strip(): spec.partition("=")[2] for spec in domains}
    usable = []
    for text in specs:
        spec = parse_domain(text)
        if spec.name not in sources:
            raise TableError(f"--heldout {text}: {spec.name!r} is not one of the run's domains ({', '.join(sources)})")
        if source_exists(spec.source):
            usable.append(text)
        elif fell_back(sources[spec.name]):
            log.warning("--heldout %s: %s does not exist and %s trains on %s instead; not scored", text, spec.source,
                        spec.name, chosen_source(sources[spec.name]))
        else:
            raise TableError(f"--heldout {text}: {spec.source} does not exist")
    return usable


def to_csv(table: dict) -> str:
    names = table["domains"] + table.get("transfer", [])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["configuration", *[f"{d}_perplexity" for d in names], *[f"{d}_ratio" for d in names],
                     "mean_ratio", "geomean_ratio", "parameters", "memory_parameters_per_domain"])
    for row in table["rows"]:
        writer.writerow([row["configuration"], *[f"{row['perplexity'][d]:.4f}" for d in names],
                         *[f"{row['ratio_to_dense'][d]:.4f}" for d in names], f"{row['mean_ratio']:.4f}",
                         f"{row['geomean_ratio']:.4f}", row["parameters"], row["memory_parameters_per_domain"]])
    return out.getvalue()


def transfer_domains(specs: list[str], known: list[str], tokenizer, block_len: int, max_blocks: int | None
                     ) -> list[tuple[str, DomainData]]:
    """``NAME=SOURCE`` -> (column ``NAME@<source>``, the held-out text, named NAME so that NAME's memory scores it)."""
    columns = []
    for text in specs:
        spec = parse_domain(text)
        if spec.name not in known:
            raise TableError(f"--transfer {text}: {spec.name!r} is not a domain of the run ({', '.join(known)})")
        columns.append((f"{spec.name}@{source_label(spec.source)}", load_heldout(spec, tokenizer, block_len, max_blocks)))
    return columns


def source_label(source: str) -> str:
    """A short name for a source: its folder's parent for a path (``corpora/debian-reference/deu`` ->
    ``debian-reference``), else the source itself."""
    if source.startswith(("bundled:", "hf:")):
        return source
    path = Path(source)
    return (path.parent.name or path.name) if path.is_dir() else path.stem


def run_label(spec: str) -> tuple[str | None, Path]:
    """``LABEL=PATH`` or ``PATH``."""
    label, sep, path = spec.partition("=")
    return (label, Path(path)) if sep and not Path(spec).exists() else (None, Path(spec))


def export_configurations(runtime) -> Iterator[Configuration]:
    """Rows of an exported folder: the physically pruned backbone with and without its memories."""
    model = runtime.model
    params = sum(p.numel() for p in model.base.parameters())
    yield Configuration("exported backbone, no memories", lambda ids, domain: model(ids, None), params)
    if model.memories:
        yield Configuration("exported backbone + memories", model.scorer(), params, memory_parameters_per_domain(model))


def ablation_table(specs: list[str], batch_size: int = 4, max_blocks: int | None = None, device: str = "cpu",
                   transfer: list[str] = (), transfer_max_blocks: int | None = None) -> dict:
    """The table for a main run (``specs[0]``) and comparison runs (``[LABEL=]RUN_DIR`` each), with
    a column per ``transfer`` source (``NAME=SOURCE``)."""
    label, path = run_label(specs[0])
    main = load_run(path, device=device)
    cfg = main.config
    domains = load_domains(parse_domains(cfg.domain), main.tokenizer, block_len=cfg.block_len,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)

    def configurations() -> Iterator[Configuration]:
        yield from run_configurations(main, label, None)
        shown = [main.mask]
        for spec in specs[1:]:
            other_label, other_path = run_label(spec)
            other = load_run(other_path, device=device)
            if other.config.model != cfg.model or sorted(other.config.domain) != sorted(cfg.domain):
                raise TableError(f"{other_path} was trained on another model or other domains than {path}; "
                                 "rows of one table must score the same data")
            yield from run_configurations(other, other_label, shown)
            shown.append(other.mask)

    other = transfer_domains(list(transfer), [d.name for d in domains], main.tokenizer, cfg.block_len,
                             transfer_max_blocks)
    table = evaluate_table(configurations(), domains, other, batch_size=batch_size, max_blocks=max_blocks, device=device)
    table["runs"] = specs
    return table


def export_table(folder: str | Path, base_model: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                 batch_size: int = 4, max_blocks: int | None = None, device: str = "cpu") -> dict:
    """The table for an exported folder: the dense base it came from, the backbone alone and with its
    memories, on each memory's own data (source and block length from its manifest)."""
    runtime = load(folder, device=device)
    data = [training_data(Path(folder) / "memories" / name) for name in runtime.memories]
    sources = [d for d in data if d.get("source")]
    if not sources:
        raise TableError(f"{folder}: no memory records the data it was trained on; evaluate with --model/--domain instead")
    block_len = sources[0]["block_len"]
    specs = parse_domains([f"{d['name']}={d['source']}" for d in sources])
    domains = load_domains(specs, runtime.tokenizer, block_len=block_len, val_fraction=val_fraction, seed=seed)
    base = base_model or runtime.meta["base_model"]
    dense = load_model(base, device=device).model.eval()

    def configurations() -> Iterator[Configuration]:
        yield Configuration("dense base", lambda ids, domain: dense(input_ids=ids).logits,
                            sum(p.numel() for p in dense.parameters()), cache=dense_cache(base, dense, "transformers"))
        yield from export_configurations(runtime)

    table = evaluate_table(configurations(), domains, batch_size=batch_size, max_blocks=max_blocks, device=device)
    table["export"] = str(folder)
    return table
