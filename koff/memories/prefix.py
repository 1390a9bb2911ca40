"""The learned KV memory, fed to attention as a prefix cache through transformers' cache API."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from koff.memories.memory import DomainMemory
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
    slots = max((m.slots for m in per_sample if m is not None and m.has_prefix), default=0)
    if slots == 0:
        return None, None
    batch = len(per_sample)
    valid = torch.zeros(batch, slots, dtype=torch.long, device=device)
    template = next(m for m in per_sample if m is not None and m.has_prefix)
    cache = DynamicCache(config=config)
    for layer in range(len(template.prefix_keys)):
        keys, values = [], []
        for i, memory in enumerate(per_sample):
            if memory is not None and memory.has_prefix:
                k, v = memory.prefix_keys[layer], memory.prefix_values[layer]
                valid[i, slots - memory.slots :] = 1
            else:
                k = v = torch.zeros_like(template.prefix_keys[layer][:, :0])
            pad = slots - k.shape[1]  # left-pad so every prefix ends right before the first token
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        cache.update(torch.stack(keys).to(device, dtype), torch.stack(values).to(device, dtype), layer)
    return cache, valid


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
