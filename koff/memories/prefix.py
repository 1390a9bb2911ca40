"""The learned KV memory, fed to attention as a prefix cache through transformers' cache API."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from koff.memories.memory import DomainMemory, rows_in_stack
from koff.models.cache_api import returned_cache


def prefix_shapes(model, layout) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per layer, read from the (possibly pruned) k_proj widths."""
    return [(parts.projection("k_proj").out_features // layout.head_dim, layout.head_dim) for parts in layout.layers]


def build_prefix_cache(
    per_sample: Sequence[DomainMemory | None], config, dtype: torch.dtype, device: torch.device
) -> tuple[DynamicCache | None, torch.Tensor | None]:
    """A cache holding each sample's prefix, left-padded to the longest one, and its (batch, slots) mask.

    Samples with no prefix (or a shorter one) get masked-out zero slots; ``mask.sum(1)`` is each
    sample's own prefix length, the position of its first real token. Returns (None, None) when no
    sample has a prefix.
    """
    distinct = list({id(m): m for m in per_sample if m is not None and m.has_prefix}.values())
    if not distinct:
        return None, None
    slots = max(m.slots for m in distinct)
    # Each sample takes one row of a per-layer table: zeros first (no prefix), then each memory's
    # prefix left-padded so that it ends right before the first token. One gather per layer.
    index = rows_in_stack(per_sample, distinct, device)
    valid = torch.tensor([[0] * slots] + [[0] * (slots - m.slots) + [1] * m.slots for m in distinct], device=device)
    cache = DynamicCache(config=config)
    for layer in range(len(distinct[0].prefix_keys)):
        tables = []
        for prefixes in ([m.prefix_keys[layer] for m in distinct], [m.prefix_values[layer] for m in distinct]):
            padded = [torch.nn.functional.pad(t, (0, 0, slots - t.shape[1], 0)) for t in prefixes]
            table = torch.stack([torch.zeros_like(padded[0])] + padded).to(device, dtype)
            tables.append(table.index_select(0, index))
        cache.update(*tables, layer)
    return cache, valid.index_select(0, index)


def prefix_inputs(
    per_sample: Sequence[DomainMemory | None], config, dtype: torch.dtype, attention_mask: torch.Tensor
) -> tuple[DynamicCache | None, torch.Tensor, torch.Tensor]:
    """What a forward pass over (possibly left-padded) tokens needs to see each sample's prefix.

    Returns the prefix cache (None when no sample has a prefix), the attention mask over prefix
    slots + tokens, and each token's position: right after its own prefix, padding not counted.
    """
    cache, prefix_mask = build_prefix_cache(per_sample, config, dtype, attention_mask.device)
    if prefix_mask is None:
        prefix_mask = attention_mask[:, :0]
    positions = prefix_mask.sum(1, keepdim=True) + (attention_mask.cumsum(1) - 1).clamp(min=0)
    return cache, torch.cat([prefix_mask, attention_mask], dim=1), positions


@torch.no_grad()
def prefix_from_text(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's own keys and values over ``input_ids`` (1D): the initial value of a KV memory."""
    cache = returned_cache(model(input_ids=input_ids[None], use_cache=True))
    return [layer.keys[0].float().clone() for layer in cache.layers], [layer.values[0].float().clone() for layer in cache.layers]
