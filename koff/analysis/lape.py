"""Language-specific FFN neurons by LAPE, and how a pruning mask treats them.

LAPE (language activation probability entropy; Tang et al. 2024, "Language-Specific Neurons: The
Key to Multilingual Capabilities in Large Language Models"):

1. For each language k and FFN neuron j, p[k, j] = the fraction of the language's tokens on which
   the neuron's activation ``act_fn(gate_proj(x))`` is > 0 (the value as it enters the
   elementwise product with ``up_proj(x)``).
2. Normalise over languages, q[k, j] = p[k, j] / sum_k p[k, j], and take the entropy
   H[j] = -sum_k q[k, j] log q[k, j]. Low entropy: the neuron fires for few languages
   (language-specific); high entropy: it fires alike for all (language-general).

Neurons that never fire get the maximal entropy log(n_languages) (no language preference), and
``classify`` counts a neuron as neither specific nor general unless it fires on at least
``min_probability`` of the tokens of some language; otherwise a neuron that fired on one token of
one language would have entropy 0 and pass as "specific". Tang et al. filter the same way, with a
threshold at the 95th percentile of all probabilities; an absolute floor is simpler to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from koff.data.blocks import DomainData
from koff.errors import UserInputError
from koff.masks.binary import BinaryMask
from koff.models.architecture import DecoderLayout

SPLITS = ("train", "val")


def spread_blocks(blocks: torch.Tensor, max_blocks: int | None) -> torch.Tensor:
    """At most ``max_blocks`` blocks, evenly spaced over the corpus (blocks keep corpus order, so
    taking the first ones would see only the first files of a multi-file corpus)."""
    if max_blocks is None or max_blocks >= len(blocks):
        return blocks.long()
    if max_blocks < 1:
        raise UserInputError(f"max_blocks must be at least 1, got {max_blocks}")
    return blocks[torch.linspace(0, len(blocks) - 1, max_blocks).round().long()].long()


def _fire_counter(counts: torch.Tensor, layer: int, act_fn):
    def hook(module, args, output):
        fired = act_fn(output.detach()) > 0
        counts[layer] += fired.reshape(-1, fired.shape[-1]).sum(0)

    return hook


@torch.no_grad()
def fire_counts(
    model: torch.nn.Module,
    layout: DecoderLayout,
    blocks: torch.Tensor,
    batch_size: int = 4,
    desc: str = "lape",
    progress: bool = True,
) -> torch.Tensor:
    """``(n_layers, n_ffn)``: on how many tokens of ``blocks`` each neuron's ``act_fn(gate_proj x)`` is > 0."""
    device = next(model.parameters()).device
    width = layout.layers[0].projection("gate_proj").out_features
    counts = torch.zeros(layout.num_layers, width, dtype=torch.long, device=device)
    handles = [
        parts.projection("gate_proj").register_forward_hook(_fire_counter(counts, parts.index, parts.mlp.act_fn))
        for parts in layout.layers
    ]
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
            # logits_to_keep=1: the LM head over every position is not needed here.
            model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return counts.cpu()


def activation_probabilities(
    model: torch.nn.Module,
    layout: DecoderLayout,
    domains: list[DomainData],
    max_blocks: int | None = None,
    batch_size: int = 4,
    split: str = "train",
    progress: bool = True,
) -> torch.Tensor:
    """``(n_domains, n_layers, n_ffn)``: fraction of each domain's tokens on which each neuron fires.

    Reads the ``split`` blocks of every domain (at most ``max_blocks``, evenly spaced; every
    position counts). Forward hooks on ``gate_proj`` pass its output through the layer's own
    ``mlp.act_fn``; the model runs unchanged (no mask, no memory).
    """
    if split not in SPLITS:
        raise UserInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    widths = {parts.projection("gate_proj").out_features for parts in layout.layers}
    if len(widths) != 1:
        raise UserInputError(f"LAPE needs one FFN width in every layer (the dense base model); got {sorted(widths)}")
    probs = []
    for data in domains:
        blocks = spread_blocks(getattr(data, split), max_blocks)
        counts = fire_counts(model, layout, blocks, batch_size, f"lape {data.name}", progress)
        probs.append(counts.double() / blocks.numel())
    return torch.stack(probs).float()


def lape_scores(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over languages of each neuron's normalised activation probabilities, ``(n_layers, n_ffn)``.

    Neurons that never fire (all probabilities 0) get the maximal entropy ``log(n_languages)``.
    """
    probs = probs.double()
    total = probs.sum(0)
    q = probs / total.clamp_min(1e-300)
    entropy = -torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(0)
    return torch.where(total > 0, entropy, torch.full_like(entropy, math.log(probs.shape[0]))).float()


@dataclass
class NeuronClasses:
    """Bool ``(n_layers, n_ffn)`` sets from ``classify``; ``active`` = fires often enough in some language."""

    specific: torch.Tensor
    general: torch.Tensor
    active: torch.Tensor
    specific_max_entropy: float  # the highest entropy among the specific neurons
    general_min_entropy: float  # the lowest entropy among the general neurons

    def summary(self) -> dict:
        return {
            "neurons": int(self.active.numel()),
            "active": int(self.active.sum()),
            "specific": int(self.specific.sum()),
            "general": int(self.general.sum()),
            "specific_max_entropy": self.specific_max_entropy,
            "general_min_entropy": self.general_min_entropy,
        }


def check_fractions(specific_fraction: float, general_fraction: float) -> None:
    for name, value in (("specific fraction", specific_fraction), ("general fraction", general_fraction)):
        if not 0.0 <= value <= 1.0:
            raise UserInputError(f"the {name} must be in [0, 1], got {value}")
    if specific_fraction + general_fraction > 1.0:
        raise UserInputError("the specific and general fractions must not add up to more than 1 (the sets would overlap)")


def classify(
    entropy: torch.Tensor,
    probs: torch.Tensor,
    specific_fraction: float = 0.05,
    general_fraction: float = 0.05,
    min_probability: float = 0.01,
) -> NeuronClasses:
    """Lowest-entropy ``specific_fraction`` and highest-entropy ``general_fraction`` of the active neurons.

    A neuron is active when its activation probability reaches ``min_probability`` in at least one
    language; inactive (dead or near-dead) neurons are in neither set. Fractions are of the active
    neurons; ties in entropy are broken by position (layer, then neuron), so the sets are exactly
    ``round(fraction * n_active)`` large and deterministic.
    """
    check_fractions(specific_fraction, general_fraction)
    active = probs.amax(0) >= min_probability
    candidates = active.flatten().nonzero().squeeze(1)
    order = candidates[torch.sort(entropy.flatten()[candidates], stable=True).indices]
    n_specific = round(specific_fraction * len(order))
    n_general = round(general_fraction * len(order))
    specific = torch.zeros(entropy.numel(), dtype=torch.bool)
    general = torch.zeros(entropy.numel(), dtype=torch.bool)
    specific[order[:n_specific]] = True
    general[order[len(order) - n_general :]] = True
    flat = entropy.flatten()
    return NeuronClasses(
        specific=specific.view_as(entropy),
        general=general.view_as(entropy),
        active=active,
        specific_max_entropy=float(flat[order[n_specific - 1]]) if n_specific else float("nan"),
        general_min_entropy=float(flat[order[len(order) - n_general]]) if n_general else float("nan"),
    )


def _rate(removed: torch.Tensor, selected: torch.Tensor) -> float | None:
    n = int(selected.sum())
    return int((removed & selected).sum()) / n if n else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rates(removed: torch.Tensor, specific: torch.Tensor, general: torch.Tensor) -> dict:
    everything = torch.ones_like(removed)
    rates = {
        "specific": _rate(removed, specific),
        "general": _rate(removed, general),
        "all": _rate(removed, everything),
        "n_specific": int(specific.sum()),
        "n_general": int(general.sum()),
        "n_all": int(everything.sum()),
    }
    rates["specific_enrichment"] = _ratio(rates["specific"], rates["all"])
    rates["general_enrichment"] = _ratio(rates["general"], rates["all"])
    return rates


def adjusted_enrichment(removed: torch.Tensor, selected: torch.Tensor, strata: torch.Tensor) -> float | None:
    """Removed ``selected`` neurons / the number expected if, within each stratum, they were
    removed at the stratum's overall rate (a stratified, Mantel-Haenszel-style baseline)."""
    removed, selected, strata = removed.flatten(), selected.flatten(), strata.flatten()
    expected = 0.0
    for s in strata.unique():
        here = strata == s
        expected += int((selected & here).sum()) * float(removed[here].float().mean())
    return int((removed & selected).sum()) / expected if expected else None


def activity_strata(probs: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """``(n_layers, n_ffn)`` bin index (0..n_bins-1) of each neuron's mean activation probability
    over languages, by quantile."""
    activity = probs.float().mean(0)
    edges = activity.flatten().quantile(torch.linspace(0, 1, n_bins + 1)[1:-1])
    return torch.bucketize(activity, edges)


def removal_rates(
    mask: BinaryMask, specific: torch.Tensor, general: torch.Tensor, probs: torch.Tensor | None = None
) -> dict:
    """How often ``mask`` removes (keep flag False) specific, general and all FFN neurons.

    Returns the overall rates, ``*_enrichment`` = class rate / overall rate (> 1: removed more
    often than a neuron drawn at random), the same per layer (``per_layer``; a rate is ``None``
    where the class is empty, an enrichment ``None`` where the layer loses nothing), and
    ``*_layer_adjusted_enrichment`` (see ``adjusted_enrichment``), which separates "the mask
    prefers this class" from "the class sits in layers the mask prunes hard". Given ``probs``,
    also ``*_activity_adjusted_enrichment``, stratified by deciles of mean activation probability:
    language-specific neurons fire less often on average, and importance-based pruning removes
    rarely-firing neurons first whatever their language profile.
    """
    if len(mask.ffn) != specific.shape[0] or any(len(m) != specific.shape[1] for m in mask.ffn):
        raise UserInputError(
            f"mask has {len(mask.ffn)} layers of {[len(m) for m in mask.ffn]} FFN neurons; "
            f"the neuron sets are {tuple(specific.shape)}"
        )
    removed = ~torch.stack([m.bool() for m in mask.ffn])
    result = _rates(removed, specific, general)
    layers = torch.arange(len(removed)).unsqueeze(1).expand_as(removed)
    for name, selected in (("specific", specific), ("general", general)):
        result[f"{name}_layer_adjusted_enrichment"] = adjusted_enrichment(removed, selected, layers)
        if probs is not None:
            result[f"{name}_activity_adjusted_enrichment"] = adjusted_enrichment(removed, selected, activity_strata(probs))
    result["per_layer"] = [{"layer": i, **_rates(removed[i], specific[i], general[i])} for i in range(len(removed))]
    return result


def language_rates(mask: BinaryMask, probs: torch.Tensor, specific: torch.Tensor, names: list[str]) -> dict:
    """Removal rate of the specific neurons of each language (the language where the neuron fires
    most often; Tang et al. allow several, one keeps the counts disjoint)."""
    removed = ~torch.stack([m.bool() for m in mask.ffn])
    owner = probs.argmax(0)
    return {
        name: {"n_specific": int((specific & (owner == k)).sum()), "removal_rate": _rate(removed, specific & (owner == k))}
        for k, name in enumerate(names)
    }
