"""The three numbers every decomposition is judged by: held-out perplexity of the dense base, of the
final mask with each domain's memory (KOFF), and of the mask alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koff.data.blocks import DomainData
from koff.evaluation.perplexity import evaluate
from koff.model import KoffModel

# How each configuration is named in a run's summary.json (its file format; kept as it was).
SUMMARY_KEYS = {"dense": "dense", "with_memories": "mask+memories", "mask_only": "mask only"}


@dataclass
class DecompositionEval:
    """Each field is ``evaluate``'s result: per-domain perplexities and their means."""

    dense: dict
    mask_only: dict
    with_memories: dict | None = None  # None when the run trained no memories

    def to_dict(self) -> dict:
        return {SUMMARY_KEYS[name]: getattr(self, name) for name in ("dense", "with_memories", "mask_only")
                if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, values: dict) -> "DecompositionEval":
        return cls(**{name: values.get(key) for name, key in SUMMARY_KEYS.items()})


def evaluate_decomposition(
    model: KoffModel, domains: list[DomainData], batch_size: int = 4, max_blocks: int | None = None,
    device: str | torch.device = "cpu",
) -> DecompositionEval:
    """Evaluate ``model`` (holding its final mask and memories) three ways on the validation blocks."""
    model.eval()
    kwargs = dict(batch_size=batch_size, max_blocks=max_blocks, device=device)
    with model.dense():
        dense = evaluate(model.scorer(), domains, **kwargs)
    with_memories = evaluate(model.scorer(), domains, **kwargs) if model.memories else None
    mask_only = evaluate(lambda ids, domain: model(ids, None), domains, **kwargs)
    return DecompositionEval(dense, mask_only, with_memories)
