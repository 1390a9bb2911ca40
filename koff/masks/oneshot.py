"""Training-free structured pruning: score units by activations on calibration text, cut the lowest.

Importance measures (for the baselines the paper compares against):

* ``wanda``: Wanda-sp style, ``||X_j||_2 * ||W_out[:, j]||_2`` — the unit's input-activation norm
  times the norm of the weights that read it (down_proj column j; o_proj columns of group g).
* ``activation``: mean absolute activation of the unit (FLAP-like activation magnitude).

Scores are standardised per unit type (z-scores of their logs, over all layers) so that neurons and
attention groups can be ranked together, as FLAP does, then cut to the target by ``select_units``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from koff.errors import UserInputError
from koff.masks.binary import BinaryMask, select_uniform_units, select_units
from koff.masks.units import UnitCosts
from koff.models.architecture import DecoderLayout

IMPORTANCES = ("wanda", "activation")


@torch.no_grad()
def unit_importance(model, layout: DecoderLayout, batches: list[torch.Tensor], importance: str = "wanda"):
    """Per-layer importance of every FFN neuron and every KV group, from forward passes over ``batches``."""
    if importance not in IMPORTANCES:
        raise UserInputError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
    n_layers = layout.num_layers
    sq = {("ffn", i): 0.0 for i in range(n_layers)} | {("attn", i): 0.0 for i in range(n_layers)}
    ab = dict(sq)
    count = [0]

    def recorder(kind: str, layer: int, groups: int | None):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if groups is not None:
                x = x.view(x.shape[0], groups, -1)
                sq[(kind, layer)] += x.pow(2).sum(dim=(0, 2))
                ab[(kind, layer)] += x.norm(dim=2).sum(0)
            else:
                sq[(kind, layer)] += x.pow(2).sum(0)
                ab[(kind, layer)] += x.abs().sum(0)

        return hook

    handles = []
    for parts in layout.layers:
        groups = parts.projection("k_proj").out_features // layout.head_dim
        handles.append(parts.projection("down_proj").register_forward_pre_hook(recorder("ffn", parts.index, None)))
        handles.append(parts.projection("o_proj").register_forward_pre_hook(recorder("attn", parts.index, groups)))
    try:
        for batch in tqdm(batches, desc="calibrate", leave=False):
            model(input_ids=batch.to(next(model.parameters()).device))
            count[0] += batch.numel()
    finally:
        for handle in handles:
            handle.remove()

    ffn, attn = [], []
    for parts in layout.layers:
        i = parts.index
        if importance == "activation":
            ffn.append(ab[("ffn", i)] / count[0])
            attn.append(ab[("attn", i)] / count[0])
            continue
        down = parts.projection("down_proj").weight.float()
        o = parts.projection("o_proj").weight.float()
        attn_groups = o.shape[1] // (layout.head_dim * layout.heads_per_group)
        ffn.append(sq[("ffn", i)].sqrt() * down.norm(dim=0))
        o_norm = o.view(o.shape[0], attn_groups, -1).pow(2).sum(dim=(0, 2)).sqrt()
        attn.append(sq[("attn", i)].sqrt() * o_norm)
    return ffn, attn


def top_ffn_neurons(importance: list[torch.Tensor], k: int) -> list[tuple[int, int]]:
    """The ``k`` FFN neurons of highest raw importance over all layers (``importance[i]``: layer i's
    scores, as ``unit_importance`` gives them), highest first, as (layer, neuron) pairs."""
    sizes = [s.numel() for s in importance]
    order = torch.argsort(torch.cat([s.float().flatten().cpu() for s in importance]), descending=True)[:k]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    layers = torch.searchsorted(starts, order, right=True) - 1
    return [(int(layer), int(index - starts[layer])) for layer, index in zip(layers, order)]


def standardise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """z-scores of log importance over all layers, so different unit types can be ranked together."""
    logs = [s.clamp_min(1e-12).log() for s in scores]
    flat = torch.cat(logs)
    mean, std = flat.mean(), flat.std().clamp_min(1e-6)
    return [(s - mean) / std for s in logs]


def oneshot_mask(
    model,
    layout: DecoderLayout,
    costs: UnitCosts,
    batches: list[torch.Tensor],
    target: float,
    importance: str = "wanda",
    prune_ffn: bool = True,
    prune_attention: bool = True,
    uniform: bool = False,
    ffn_align: int = 1,
) -> BinaryMask:
    """A training-free structured mask at ``target`` sparsity (``uniform``: the same widths in every
    layer; ``ffn_align``: FFN widths in multiples of it)."""
    ffn, attn = unit_importance(model, layout, batches, importance)
    return mask_from_importance(ffn, attn, costs, target, prune_ffn, prune_attention, uniform, ffn_align)


def mask_from_importance(ffn: list[torch.Tensor], attn: list[torch.Tensor], costs: UnitCosts, target: float,
                         prune_ffn: bool = True, prune_attention: bool = True, uniform: bool = False,
                         ffn_align: int = 1) -> BinaryMask:
    """``oneshot_mask`` from importance already computed (``unit_importance``'s two lists)."""
    select = select_uniform_units if uniform else select_units
    return select(standardise(ffn) if prune_ffn else None, standardise(attn) if prune_attention else None, costs, target,
                  ffn_align=ffn_align)
