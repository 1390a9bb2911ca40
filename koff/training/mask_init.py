"""The mask a run starts from: learned gates ranked by one-shot importance, a one-shot mask, another
run's mask (``file:``), or none."""

from __future__ import annotations

from pathlib import Path

import torch

from koff.config import DecomposeConfig
from koff.data import DomainData
from koff.errors import MissingFileError, UserInputError
from koff.masks import BinaryMask, LearnedMask, UnitCosts, oneshot_mask, unit_importance
from koff.masks.oneshot import mask_from_importance, standardise, top_ffn_neurons
from koff.masks.spec import FileMaskSpec, LearnedMaskSpec, OneShotMaskSpec
from koff.model import KoffModel


def initial_mask(config: DecomposeConfig, model: KoffModel, domains: list[DomainData]) -> LearnedMask | BinaryMask | None:
    spec = config.mask_spec
    if isinstance(spec, FileMaskSpec):
        return mask_from_file(spec.file, model)
    if not spec.prunes or config.sparsity == 0:
        return None
    batches = calibration_batches(config, domains)
    if isinstance(spec, LearnedMaskSpec):
        mask = LearnedMask(model.costs, config.prune_ffn, config.prune_attention, config.init_log_alpha)
        ranking = None if config.init_from == "none" else unit_importance(model.base, model.layout, batches, config.init_from)
        if ranking is not None:
            rank_gates(mask, config, model.costs, ranking)
        if config.keep_outliers:  # Wanda's ranking: reuse the start's when it is Wanda's (one calibration pass)
            wanda = ranking if config.init_from == "wanda" else unit_importance(model.base, model.layout, batches, "wanda")
            hold_outliers_open(mask, config.keep_outliers, wanda[0])
        return mask
    assert isinstance(spec, OneShotMaskSpec), spec
    return oneshot_mask(model.base, model.layout, model.costs, batches, config.sparsity, spec.importance,
                        config.prune_ffn, config.prune_attention, config.uniform_layers, config.ffn_align)


def mask_from_file(path: str, model: KoffModel) -> BinaryMask:
    """A fixed mask (e.g. another run's): only memories train on it; its own sparsity holds."""
    if not Path(path).is_file():
        raise MissingFileError(f"--mask file:{path}: no such mask file")
    mask = BinaryMask.load(path)
    costs = model.costs
    if [len(m) for m in mask.ffn] != list(costs.ffn_units) or [len(m) for m in mask.attn] != list(costs.attn_units):
        raise UserInputError(f"--mask file:{path} was made for another model (its layers or unit counts differ)")
    return mask


def calibration_batches(config: DecomposeConfig, domains: list[DomainData]) -> list[torch.Tensor]:
    """The first training blocks of every domain, ``calib_blocks`` in all (balanced over domains)."""
    per_domain = max(1, config.calib_blocks // len(domains))
    return [d.train[:per_domain].long() for d in domains]


@torch.no_grad()
def rank_gates(mask: LearnedMask, config: DecomposeConfig, costs: UnitCosts,
               importance: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    """Start the gates from one-shot importance (``config.init_from``'s, as ``unit_importance`` gives
    it) instead of identical values.

    With identical gates, meeting a sparsity target makes *every* unit equally noisy (on SmolLM2
    the loss rose from 2.86 to 3.74 at 1.2% sparsity). ``ranked`` spreads log_alpha by standardised
    importance, so the least important units close first; ``mask`` starts at the one-shot mask
    itself (units it cuts at -init_log_alpha, the rest at +init_log_alpha), so only the units on
    their way out are noisy and learning moves units across the cut."""
    top = config.init_log_alpha
    if config.init_shape == "mask":
        cut = mask_from_importance(*importance, costs, config.sparsity, mask.ffn is not None, mask.attn is not None,
                                   config.uniform_layers, config.ffn_align)
        ffn = [top * (keep.float() * 2 - 1) for keep in cut.ffn]
        attn = [top * (keep.float() * 2 - 1) for keep in cut.attn]
    else:
        ffn, attn = (standardise(s) for s in importance)
        ffn = [top + config.init_spread * z for z in ffn]
        attn = [top + config.init_spread * z for z in attn]
    for gates, values in ((mask.ffn, ffn), (mask.attn, attn)):
        for g, value in zip(gates or [], values):
            g.log_alpha.copy_(value)
    mask.clamp_()


@torch.no_grad()
def hold_outliers_open(mask: LearnedMask, count: int, wanda: list[torch.Tensor]) -> None:
    """Pin open the gates of the ``count`` FFN neurons of highest Wanda importance (``wanda``: per layer).

    A handful of neurons with massive activations score hundreds to thousands of times the median.
    Learned gates may close one when a memory (the KV prefix) stands in for it: the backbone with its
    memories is unharmed, but alone it collapses (7.4x dense on SmolLM2 for want of one neuron)."""
    mask.pin_open_(top_ffn_neurons(wanda, count))
