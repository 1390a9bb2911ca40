"""The final, binary shared mask: which FFN neurons and KV groups each layer keeps."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from koff.errors import UserInputError
from koff.tensor_files import load_tensors, save_tensors
from koff.masks.units import UnitCosts


@dataclass
class BinaryMask:
    """Per-layer keep flags (bool tensors): ``ffn[i]`` over neurons, ``attn[i]`` over KV groups."""

    ffn: list[torch.Tensor]
    attn: list[torch.Tensor]

    @classmethod
    def dense(cls, costs: UnitCosts) -> "BinaryMask":
        return cls(
            [torch.ones(n, dtype=torch.bool) for n in costs.ffn_units],
            [torch.ones(n, dtype=torch.bool) for n in costs.attn_units],
        )

    def removed_params(self, costs: UnitCosts) -> int:
        removed = 0
        for i in range(costs.num_layers):
            removed += int((~self.ffn[i]).sum()) * costs.ffn_cost[i] + int((~self.attn[i]).sum()) * costs.attn_cost[i]
        return removed

    def sparsity(self, costs: UnitCosts) -> float:
        return self.removed_params(costs) / costs.block_params

    def stats(self, costs: UnitCosts) -> dict:
        removed = self.removed_params(costs)
        return {
            "sparsity": removed / costs.block_params,
            "whole_model_sparsity": removed / costs.total_params,
            "removed_params": removed,
            "block_params": costs.block_params,
            "total_params": costs.total_params,
            "ffn_kept": [int(m.sum()) for m in self.ffn],
            "attn_groups_kept": [int(m.sum()) for m in self.attn],
        }

    def gates(self, dtype: torch.dtype = torch.float32) -> tuple[list, list]:
        """Constant 0/1 gates; ``None`` for layers that keep everything (no multiply needed)."""

        def as_gate(keep: torch.Tensor):
            return None if bool(keep.all()) else keep.to(dtype)

        return [as_gate(m) for m in self.ffn], [as_gate(m) for m in self.attn]

    def save(self, path: str | Path, costs: UnitCosts | None = None) -> None:
        tensors = {f"ffn.{i}": m.to(torch.uint8) for i, m in enumerate(self.ffn)}
        tensors.update({f"attn.{i}": m.to(torch.uint8) for i, m in enumerate(self.attn)})
        metadata = {"format": "koff-mask-v1", "num_layers": str(len(self.ffn))}
        if costs is not None:
            metadata["stats"] = json.dumps(self.stats(costs))
        save_tensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "BinaryMask":
        try:
            tensors = load_tensors(path)
            n = len([k for k in tensors if k.startswith("ffn.")])
            mask = cls([tensors[f"ffn.{i}"].bool() for i in range(n)], [tensors[f"attn.{i}"].bool() for i in range(n)])
        except Exception as err:  # not safetensors, truncated, or other tensors than a mask's
            raise UserInputError(f"{path} is not a readable koff mask ({type(err).__name__}: {err})") from err
        if n == 0:
            raise UserInputError(f"{path} is not a koff mask (it holds no ffn.* tensors)")
        return mask


def ffn_chunks(scores: torch.Tensor, align: int) -> list[tuple[float, torch.Tensor]]:
    """One layer's FFN neurons in the groups that are removed together so that the layer keeps a
    multiple of ``align`` neurons: the ``width % align`` lowest-scoring first, then ``align`` at a
    time in ascending score. Each group comes with its highest score (so a layer's groups come
    in order); a group holding a neuron scored +inf (held open) is left out: it is never removed."""
    order = scores.argsort()
    first = len(order) % align
    groups = ([order[:first]] if first else []) + list(order[first:].split(align))
    return [(float(scores[g].max()), g) for g in groups if not math.isinf(float(scores[g].max()))]


def select_units(
    ffn_scores: list[torch.Tensor],
    attn_scores: list[torch.Tensor] | None,
    costs: UnitCosts,
    target: float,
    min_keep: int = 1,
    ffn_align: int = 1,
) -> BinaryMask:
    """Remove the lowest-scoring units until ``target`` sparsity is met to within one unit.

    Units are taken in ascending score over all layers and both unit types; a unit is removed when
    that brings the removed count no further than half its own cost past the target, so the result
    lands within half a unit of the target whenever small units remain. FFN neurons go in groups of
    ``ffn_align`` (``ffn_chunks``), so each layer keeps a multiple of ``ffn_align`` neurons (or all
    of them): matrix shapes the hardware runs fast. Each layer keeps at least ``min_keep`` units of
    each type so that no layer becomes empty. A unit scored +inf is never removed.
    ``attn_scores=None`` (or a ``None`` entry for ``ffn_scores``) leaves that unit type untouched.
    """
    mask = BinaryMask.dense(costs)
    budget = target * costs.block_params
    entries = []  # (score, kind, layer, indices)
    for layer, layer_scores in enumerate(ffn_scores or []):
        entries += [(score, "ffn", layer, group) for score, group in ffn_chunks(layer_scores, ffn_align)]
    for layer, layer_scores in enumerate(attn_scores or []):
        entries += [(float(s), "attn", layer, torch.tensor([j])) for j, s in enumerate(layer_scores.tolist()) if s != math.inf]
    entries.sort(key=lambda e: e[0])
    kept = {("ffn", i): n for i, n in enumerate(costs.ffn_units)} | {("attn", i): n for i, n in enumerate(costs.attn_units)}
    removed = 0.0
    for _, kind, layer, units in entries:
        cost = len(units) * (costs.ffn_cost[layer] if kind == "ffn" else costs.attn_cost[layer])
        if removed + cost / 2 > budget or kept[(kind, layer)] - len(units) < min_keep:
            continue
        getattr(mask, kind)[layer][units] = False
        kept[(kind, layer)] -= len(units)
        removed += cost
    return mask


def select_uniform_units(
    ffn_scores: list[torch.Tensor] | None,
    attn_scores: list[torch.Tensor] | None,
    costs: UnitCosts,
    target: float,
    min_keep: int = 1,
    ffn_align: int = 1,
) -> BinaryMask:
    """Like ``select_units``, but every layer removes the same number of FFN neurons and the same
    number of KV groups, so an export is a stock config with one width (``--layer-shape uniform``).

    The split of the budget between the two unit types is the one ``select_units`` finds over all
    layers; each layer then removes its own lowest-scoring units, keeping a multiple of
    ``ffn_align`` neurons. The result meets ``target`` to within half a unit (of ``ffn_align``
    neurons) per layer."""
    free = select_units(ffn_scores, attn_scores, costs, target, min_keep, ffn_align)
    layers = len(costs.ffn_units)
    budget = target * costs.block_params
    attn_room = min(costs.attn_units) - min_keep if attn_scores is not None else 0
    groups = min(attn_room, round(sum(int((~m).sum()) for m in free.attn) / layers))
    left = budget - groups * sum(costs.attn_cost)
    width = min(costs.ffn_units)
    ffn_room = width - max(min_keep, ffn_align if width >= ffn_align else 1) if ffn_scores is not None else 0
    neurons = max(0, round(left / sum(costs.ffn_cost)))
    if neurons and ffn_align > 1:  # keep a multiple of ffn_align
        neurons = width - ffn_align * round((width - neurons) / ffn_align)
    neurons = min(ffn_room, max(0, neurons))
    mask = BinaryMask.dense(costs)
    for kind, scores, count in (("ffn", ffn_scores, neurons), ("attn", attn_scores, groups)):
        for layer, layer_scores in enumerate(scores or []):
            if count:
                getattr(mask, kind)[layer][layer_scores.argsort()[:count]] = False
    return mask
