"""Which units each layer keeps, and how that narrows each projection and each memory.

Per layer, the kept FFN neurons keep their rows of gate_proj/up_proj and columns of down_proj;
the kept KV groups keep their heads' rows of q/k/v_proj (and biases) and columns of o_proj. The
projections stay stock ``nn.Linear``s, only narrower, so a layer is still a stock HF layer.

``uniform=True`` gives every layer the same width (the widest layer's) so the config is a plain
one: a narrower layer is topped up with pruned units whose *consumer* columns (down_proj, o_proj)
are zeroed, so they add exactly nothing and the logits stay those of the masked model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koff.masks.binary import BinaryMask
from koff.memories.memory import DomainMemory
from koff.memories.parts import PARTS
from koff.models.adapter import Axis, Projection, Units
from koff.models.architecture import DecoderLayout


@dataclass
class LayerSelection:
    """Indices each layer keeps; ``ffn_live`` / ``groups_live`` flag the units that really work
    (False for uniform-padding units, whose outputs are zeroed)."""

    ffn: torch.Tensor
    ffn_live: torch.Tensor
    groups: torch.Tensor
    groups_live: torch.Tensor


def select_layers(mask: BinaryMask, uniform: bool) -> list[LayerSelection]:
    ffn_width = max(int(m.sum()) for m in mask.ffn)
    group_width = max(int(m.sum()) for m in mask.attn)
    return [
        LayerSelection(*_pick(mask.ffn[i], ffn_width if uniform else None), *_pick(mask.attn[i], group_width if uniform else None))
        for i in range(len(mask.ffn))
    ]


def _pick(keep: torch.Tensor, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    kept = keep.nonzero().flatten()
    if width is None or width == len(kept):
        return kept, torch.ones(len(kept), dtype=torch.bool)
    padding = (~keep).nonzero().flatten()[: width - len(kept)]
    chosen = torch.cat([kept, padding]).sort()
    live = keep[chosen.values]
    return chosen.values, live


def head_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices (into q_proj / columns of o_proj) of the query heads of ``groups``."""
    heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def group_rows(groups: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices (into k_proj / v_proj) of ``groups``."""
    return (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()


@dataclass(frozen=True)
class Narrowing:
    """How one projection shrinks: the output rows it keeps, the input columns it keeps, and which
    of those kept columns to zero (uniform padding: there for a stock config, adding nothing).

    The same rule narrows the projection's weight (rows, then columns), its bias (rows) and a LoRA
    pair on it: B (out x r) keeps the rows, A (r x in) the columns."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    dead_cols: torch.Tensor | None = None  # positions within the kept columns

    def of_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows)

    def of_cols(self, t: torch.Tensor) -> torch.Tensor:
        if self.cols is None:
            return t
        t = t.index_select(1, self.cols)
        if self.dead_cols is not None and len(self.dead_cols):
            t[:, self.dead_cols] = 0
        return t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` narrowed: rows, then (for a matrix) columns. ``Narrowing()`` leaves any tensor as it is."""
        return self.of_cols(self.of_rows(t))

    def bias(self) -> "Narrowing":
        """The narrowing of the projection's bias: its rows only."""
        return Narrowing(rows=self.rows)


def projection_narrowings(sel: LayerSelection, heads_per_group: int, head_dim: int,
                          projections: dict[str, Projection]) -> dict[str, Narrowing]:
    """Each projection's narrowing (by role) for one layer's selection."""
    kept = {Units.FFN: sel.ffn, Units.QUERY: head_rows(sel.groups, heads_per_group, head_dim),
            Units.KV: group_rows(sel.groups, head_dim)}
    # A consumer (an "in" projection) also learns which of its kept columns are padding (uniform export).
    dead = {Units.FFN: (~sel.ffn_live).nonzero().flatten(),
            Units.QUERY: head_rows((~sel.groups_live).nonzero().flatten(), heads_per_group, head_dim)}
    return {role: Narrowing(rows=kept[p.units]) if p.axis is Axis.OUT
            else Narrowing(cols=kept[p.units], dead_cols=dead[p.units])
            for role, p in projections.items()}


def layer_widths(selections: list[LayerSelection]) -> dict[str, list[int]]:
    return {"intermediate_size": [len(s.ffn) for s in selections], "num_key_value_heads": [len(s.groups) for s in selections]}


def slice_memory(memory: DomainMemory, selections: list[LayerSelection], layout: DecoderLayout) -> dict:
    """The memory's flat state restricted to the kept units of each layer, part by part."""
    narrowings = [projection_narrowings(sel, layout.heads_per_group, layout.head_dim, layout.projections)
                  for sel in selections]
    kept_groups = [sel.groups for sel in selections]
    return {name: tensor for part in PARTS for name, tensor in part.sliced(memory, narrowings, kept_groups).items()}
