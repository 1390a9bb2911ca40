"""Remove pruned units from the weights for real.

Per layer, the kept FFN neurons keep their rows of gate_proj/up_proj and columns of down_proj;
the kept KV groups keep their heads' rows of q/k/v_proj (and biases) and columns of o_proj. The
modules stay stock ``nn.Linear``s, only narrower, so the layer is still a stock HF layer.

``uniform=True`` gives every layer the same width (the widest layer's) so the config is a plain
one: a narrower layer is topped up with pruned units whose *consumer* columns (down_proj, o_proj)
are zeroed, so they add exactly nothing and the logits stay those of the masked model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from koff.masks.binary import BinaryMask
from koff.memories.memory import DomainMemory, parse_lora_key
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


def narrow_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller ``nn.Linear`` holding the selected output rows / input columns."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = None if linear.bias is None else linear.bias.detach()
    if bias is not None and rows is not None:
        bias = bias[rows]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(False)


@torch.no_grad()
def prune_model(model: nn.Module, layout: DecoderLayout, selections: list[LayerSelection]) -> None:
    """Replace each layer's projections by their narrowed versions, in place."""
    rep, hd = layout.heads_per_group, layout.head_dim
    for parts, sel in zip(layout.layers, selections):
        mlp, attn = parts.mlp, parts.attention
        mlp.gate_proj = narrow_linear(mlp.gate_proj, rows=sel.ffn)
        mlp.up_proj = narrow_linear(mlp.up_proj, rows=sel.ffn)
        mlp.down_proj = narrow_linear(mlp.down_proj, cols=sel.ffn)
        mlp.down_proj.weight[:, ~sel.ffn_live] = 0
        q_rows, kv_rows = head_rows(sel.groups, rep, hd), group_rows(sel.groups, hd)
        attn.q_proj = narrow_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = narrow_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = narrow_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = narrow_linear(attn.o_proj, cols=q_rows)
        dead_heads = head_rows(torch.arange(len(sel.groups))[~sel.groups_live], rep, hd)
        attn.o_proj.weight[:, dead_heads] = 0
        for name in ("intermediate_size",):
            if hasattr(mlp, name):
                setattr(mlp, name, len(sel.ffn))


def layer_widths(selections: list[LayerSelection]) -> dict[str, list[int]]:
    return {"intermediate_size": [len(s.ffn) for s in selections], "num_key_value_heads": [len(s.groups) for s in selections]}


def slice_memory(memory: DomainMemory, selections: list[LayerSelection], heads_per_group: int, head_dim: int) -> dict:
    """The memory's flat state restricted to the kept units of each layer."""
    state = {}
    for key, a in memory.lora_A.items():
        layer, proj = parse_lora_key(key)
        sel = selections[layer]
        a, b = a.detach(), memory.lora_B[key].detach()
        if proj in ("gate_proj", "up_proj"):
            b = b[sel.ffn]
        elif proj == "down_proj":
            a = a[:, sel.ffn] * sel.ffn_live.to(a.dtype)
        elif proj == "q_proj":
            b = b[head_rows(sel.groups, heads_per_group, head_dim)]
        elif proj in ("k_proj", "v_proj"):
            b = b[group_rows(sel.groups, head_dim)]
        elif proj == "o_proj":
            live = sel.groups_live.repeat_interleave(heads_per_group * head_dim).to(a.dtype)
            a = a[:, head_rows(sel.groups, heads_per_group, head_dim)] * live
        state[f"lora_A.{key}"], state[f"lora_B.{key}"] = a.contiguous(), b.contiguous()
    for i, (k, v) in enumerate(zip(memory.prefix_keys, memory.prefix_values)):
        groups = selections[i].groups
        state[f"prefix.keys.{i}"] = k.detach()[groups].contiguous()
        state[f"prefix.values.{i}"] = v.detach()[groups].contiguous()
    return state
