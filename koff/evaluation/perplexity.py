"""Held-out perplexity per domain.

Every configuration koff evaluates (dense base, masked backbone, backbone + memory, exported
model) is reduced to a *scorer*: a function ``(input_ids, domain) -> logits``. The same code
then measures all of them, so their numbers are comparable by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from koff.data.blocks import DomainData
from koff.scoring import token_nll_sum

if TYPE_CHECKING:
    from koff.evaluation.score_cache import ScoreCache

Scorer = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass
class DomainPerplexity:
    domain: str
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens


def hf_scorer(model: torch.nn.Module) -> Scorer:
    """Scorer for a plain Hugging Face causal LM (ignores the domain)."""
    return lambda input_ids, domain: model(input_ids=input_ids).logits


def scored_blocks(data: DomainData, max_blocks: int | None) -> torch.Tensor:
    """The blocks ``domain_perplexity`` scores: the first ``max_blocks`` validation blocks (all for None)."""
    return data.val if max_blocks is None else data.val[:max_blocks]


@torch.no_grad()
def domain_perplexity(
    scorer: Scorer,
    data: DomainData,
    batch_size: int = 4,
    max_blocks: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> DomainPerplexity:
    """Token-weighted perplexity of ``scorer`` on the validation blocks of ``data``."""
    blocks = scored_blocks(data, max_blocks)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=f"eval {data.name}", disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device, torch.long)
        total += token_nll_sum(scorer(batch, data.name), batch).item()
        count += batch[:, 1:].numel()
    nll = total / count
    return DomainPerplexity(data.name, math.exp(nll), nll, count)


def evaluate(
    scorer: Scorer,
    domains: list[DomainData],
    batch_size: int = 4,
    max_blocks: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    cache: ScoreCache | None = None,
) -> dict:
    """Perplexity on every domain plus the arithmetic and geometric means over domains (kept in and
    read from ``cache`` where given: the frozen dense base's)."""
    measure = cache.perplexity if cache is not None else domain_perplexity
    results = [measure(scorer, d, batch_size, max_blocks, progress, device) for d in domains]
    ppls = [r.perplexity for r in results]
    return {
        "domains": {r.domain: asdict(r) for r in results},
        "mean_perplexity": sum(ppls) / len(ppls),
        "geomean_perplexity": math.exp(sum(math.log(p) for p in ppls) / len(ppls)),
    }

