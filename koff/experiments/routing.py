"""``koff eval EXPORT --routing``: how well ``model: "auto"`` picks memories, and what a wrong pick costs.

On held-out blocks of each memory's domain (its validation split, and other sources given with
``--transfer NAME=SOURCE``, one set per source), the router sees each block's first 16, 64 and 256
tokens. Reported: the accuracy per domain and the confusion matrix at each prompt length; every
block's perplexity under every memory and under the bare backbone (the cost matrix of a wrong
pick); and the perplexity with the memory the router picked from the first 64 tokens against the
domain's memory (the oracle by label).

A label is the folder a block came from, and real text is not that tidy (a French manual quotes
English). So each block's best memory (the one under which the whole block is most likely) is
reported too: how often the router agrees with it, and the routed perplexity against the best
memory's, an oracle no router can beat.
"""

from __future__ import annotations

import math
from statistics import geometric_mean
from pathlib import Path

import torch

from koff.data import DomainData, load_domains, load_heldout, parse_domain, parse_domains
from koff.errors import UserInputError
from koff.experiments.ablation import source_label
from koff.formats.exported_memory import training_data
from koff.io import markdown_table
from koff.runtime import load
from koff.scoring import token_nll_sum

PROMPT_TOKENS = (16, 64, 256)
ROUTED_AT = 64
BACKBONE = "(backbone)"


def routing_table(folder: str | Path, val_fraction: float = 0.1, seed: int = 0, max_blocks: int | None = 16,
                  transfer: list[str] = (), transfer_max_blocks: int | None = 16, device: str = "cpu") -> dict:
    runtime = load(folder, device=device)
    if runtime.router is None:
        raise UserInputError(f"{folder}: {runtime.router_problem}")
    return routing_report(runtime, routing_sets(runtime, val_fraction, seed, transfer, transfer_max_blocks), max_blocks)


def routing_report(runtime, sets: dict[str, list[DomainData]], max_blocks: int | None = 16) -> dict:
    """How the export's router does on each of ``sets`` (``routing_sets``; ``max_blocks`` validation
    blocks per domain): accuracy, confusion and the perplexity a wrong pick costs."""
    return {"export": str(runtime.folder), "memories": [d.name for d in sets["validation"]], "kind": runtime.router.kind,
            "threshold": runtime.router.threshold, "prompt_tokens": list(PROMPT_TOKENS), "routed_at": ROUTED_AT,
            "sets": {kind: _evaluate(runtime, domains, max_blocks if kind == "validation" else None)
                     for kind, domains in sets.items()}}


def routing_sets(runtime, val_fraction: float = 0.1, seed: int = 0, transfer: list[str] = (),
                 transfer_max_blocks: int | None = 16) -> dict[str, list[DomainData]]:
    """The text routing is measured on: ``validation``, the validation blocks of every memory the router
    routes to (split by ``val_fraction`` and ``seed``), then the held-out ``transfer`` text
    (``NAME=SOURCE``), one set per source, ``transfer_max_blocks`` evenly spaced blocks per domain."""
    data = {name: _manifest_data(runtime, name) for name in runtime.router.names if name in runtime.memories}
    block_len = next(iter(data.values()))["block_len"]
    specs = parse_domains([f"{name}={d['source']}" for name, d in data.items()])
    sets = {"validation": load_domains(specs, runtime.tokenizer, block_len=block_len, val_fraction=val_fraction, seed=seed)}
    for text in transfer:
        spec = parse_domain(text)
        if spec.name not in data:
            raise UserInputError(f"--transfer names {spec.name}, which the router does not route to")
        label = source_label(spec.source)
        domains = sets.setdefault(label, [])
        if any(d.name == spec.name for d in domains):
            raise UserInputError(f"--transfer gives {spec.name} twice from {label}")
        domains.append(load_heldout(spec, runtime.tokenizer, block_len, transfer_max_blocks))
    return sets


def _manifest_data(runtime, name: str) -> dict:
    data = training_data(runtime.folder / "memories" / name)
    if not data.get("source"):
        raise UserInputError(f"memory {name!r} records no training data to evaluate routing on")
    return data


@torch.no_grad()
def _evaluate(runtime, domains: list[DomainData], max_blocks: int | None) -> dict:
    targets = [*[n for n in runtime.router.names if n in runtime.memories], BACKBONE]
    accuracy, confusion, nll, tokens = {}, {}, {}, {}
    routed_picks = {}
    for domain in domains:
        blocks = domain.val if max_blocks is None else domain.val[:max_blocks]
        for length in PROMPT_TOKENS:
            texts = [runtime.tokenizer.decode(b[:length]) for b in blocks]
            picks = [name or BACKBONE for name, _ in runtime.route(texts)]
            accuracy.setdefault(str(length), {})[domain.name] = sum(p == domain.name for p in picks) / len(picks)
            row = confusion.setdefault(str(length), {}).setdefault(domain.name, dict.fromkeys(targets, 0))
            for p in picks:
                row[p] += 1
            if length == ROUTED_AT:
                routed_picks[domain.name] = picks
        ids = blocks.to(runtime.model.device, torch.long)
        nll[domain.name] = {t: [token_nll_sum(runtime.model(ids[i:i + 1], None if t == BACKBONE else t), ids[i:i + 1]).item()
                                for i in range(len(ids))] for t in targets}
        tokens[domain.name] = (ids.shape[1] - 1) * len(ids)
    for table in accuracy.values():
        table["mean"] = sum(table.values()) / len(table)
    cost = {d: {t: math.exp(sum(v) / tokens[d]) for t, v in per.items()} for d, per in nll.items()}
    routed = {d: _perplexity(nll[d], routed_picks[d], tokens[d]) for d in nll}
    ratio = {d: routed[d] / cost[d][d] for d in nll}
    best = {d: _best_memories(nll[d], targets[:-1]) for d in nll}
    agreement = {d: sum(p == b for p, b in zip(routed_picks[d], best[d])) / len(best[d]) for d in nll}
    to_best = {d: routed[d] / _perplexity(nll[d], best[d], tokens[d]) for d in nll}
    return {"accuracy": accuracy, "confusion": confusion, "perplexity": cost, "routed_perplexity": routed,
            "routed_to_oracle": ratio, "mean_routed_to_oracle": geometric_mean(ratio.values()),
            "best_memory": best, "agreement_with_best": agreement | {"mean": sum(agreement.values()) / len(agreement)},
            "routed_to_best": to_best, "mean_routed_to_best": geometric_mean(to_best.values())}


def _perplexity(nll: dict[str, list[float]], picks: list[str], tokens: int) -> float:
    """Perplexity of a domain's blocks, block i scored under ``picks[i]``."""
    return math.exp(sum(nll[p][i] for i, p in enumerate(picks)) / tokens)


def _best_memories(nll: dict[str, list[float]], memories: list[str]) -> list[str]:
    """Each block's memory of lowest loss."""
    return [min(memories, key=lambda m: nll[m][i]) for i in range(len(nll[memories[0]]))]


def routing_markdown(table: dict) -> str:
    parts = [f"The {table['kind']} router of {table['export']} over {', '.join(table['memories'])}."]
    at = str(table["routed_at"])
    for kind, result in table["sets"].items():
        domains = list(result["routed_perplexity"])
        parts += [f"\n### {kind}: accuracy by prompt length (tokens)\n",
                  markdown_table(["tokens", *domains, "mean"],
                                 [[n, *[result["accuracy"][n][d] for d in domains], result["accuracy"][n]["mean"]]
                                  for n in result["accuracy"]]),
                  f"\n### {kind}: where the router sent each domain's prompts ({at} tokens)\n",
                  markdown_table(["domain \\ memory", *next(iter(result["confusion"][at].values()))],
                                 [[d, *row.values()] for d, row in result["confusion"][at].items()]),
                  f"\n### {kind}: perplexity under each memory, routed ({at} tokens) and oracle\n",
                  markdown_table(["domain", *next(iter(result["perplexity"].values())), "routed", "routed / oracle",
                                  "agrees with the best memory", "routed / best memory"],
                                 [[d, *row.values(), result["routed_perplexity"][d], result["routed_to_oracle"][d],
                                   result["agreement_with_best"][d], result["routed_to_best"][d]]
                                  for d, row in result["perplexity"].items()]),
                  f"\nRouted / oracle perplexity, geometric mean: {result['mean_routed_to_oracle']:.4f}; "
                  f"routed / each block's best memory: {result['mean_routed_to_best']:.4f}; the router agrees with "
                  f"each block's best memory for {result['agreement_with_best']['mean']:.1%} of the blocks."]
    return "\n".join(parts)
