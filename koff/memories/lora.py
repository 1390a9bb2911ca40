"""LoRA through a small module swap: each adapted ``nn.Linear`` is replaced by a wrapper that
adds the routed memory's low-rank update; the base weight stays frozen and shared.

At inference a batch that uses one memory alone can instead run on a *merged* copy of each adapted
weight (``W + scaling * B A``, made once and kept for the most recent such memory): one matmul per
projection instead of three operations more, at the price of one more copy of the adapted weights
in memory. ``BatchMemories.merge_single`` switches it on; training and mixed batches never merge.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from koff.memories.parts import lora_key
from koff.memories.batch import BatchMemories
from koff.models.architecture import DecoderLayout


# Sets of memories whose factors each wrapper keeps at inference: the running batch's and the one of
# the prompts being prefilled, each as one memory or a mix, so that they do not evict each other
# step after step.
CACHED_SETS = 4


class RoutedLoRALinear(nn.Module):
    """``base(x) + scaling * B A x`` with A, B taken from each sample's memory (if it adapts this key)."""

    def __init__(self, base: nn.Linear, key: str, batch: BatchMemories):
        super().__init__()
        self.base = base
        self.key = key
        self._batch = [batch]  # a list keeps it out of the module tree
        self._cache: OrderedDict = OrderedDict()  # concatenated factors of recent memory sets (inference only)
        self._merged: tuple = ()  # (signature, memory, weight): the last memory merged alone (inference only)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._batch[0]
        if not batch.mixed and batch.merge_single and batch.single is not None and not torch.is_grad_enabled() \
                and self.key in batch.single.lora_A:
            return F.linear(x, self._merged_weight(batch.single), self.base.bias)
        y = self.base(x)
        if not batch.mixed:
            memory = batch.single
            if memory is None or self.key not in memory.lora_A:
                return y
            a, scaled_b = self._single(memory, x.dtype)  # kept between decoding steps, made anew in training
            return y + F.linear(F.linear(x, a), scaled_b)  # three operations (reshaping for addmm costs more)
        present = [m for m in batch.distinct if self.key in m.lora_A]
        if not present:
            return y
        return self._add_gathered(y, present, batch.index(present, x.device), x)

    def _add_gathered(self, y: torch.Tensor, present, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch (several memories, some samples with none, ranks that differ): the factors
        of the memories present are stacked once (zeros first, for samples with no update here)
        and each sample gathers its own, so the whole batch takes two batched matmuls,
        (B,T,in) @ (B,in,r) @ (B,r,out), the second one adding to ``y``, whatever the mix ("BGMV",
        as S-LoRA and Punica serve many adapters at once). Samples without an update get exactly zero."""
        a_t, b_t = self._stacked(present, x.dtype)
        rows = x.shape[0]
        low = torch.bmm(x.reshape(rows, -1, x.shape[-1]), a_t.index_select(0, index))
        return torch.baddbmm(y.reshape(rows, -1, self.out_features), low, b_t.index_select(0, index)).view_as(y)

    def _stacked(self, present, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + memories, in, rank) and (1 + memories, rank, out) factors (A and B transposed, B
        times its scaling), with zero factors first and smaller ranks padded with zeros to the largest."""
        def build():
            rank = max(m.lora_A[self.key].shape[0] for m in present)
            a = [F.pad(m.lora_A[self.key], (0, 0, 0, rank - m.lora_A[self.key].shape[0])) for m in present]
            b = [F.pad(m.lora_B[self.key] * m.scaling, (0, rank - m.lora_B[self.key].shape[1])) for m in present]
            return (torch.stack([torch.zeros_like(a[0])] + a).transpose(1, 2).contiguous().to(dtype),
                    torch.stack([torch.zeros_like(b[0])] + b).transpose(1, 2).contiguous().to(dtype))

        return self._cached("stacked", present, dtype, build)

    def _single(self, memory, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One memory's A and its B times its scaling, in ``dtype``."""
        def build():
            return memory.lora_A[self.key].to(dtype), (memory.lora_B[self.key] * memory.scaling).to(dtype)

        return self._cached("single", [memory], dtype, build)

    def forget(self, memory) -> None:
        """Drop every factor set and merged weight kept for ``memory`` (it is being unloaded)."""
        self._cache = OrderedDict((k, v) for k, v in self._cache.items() if all(m is not memory for m in v[0]))
        if self._merged and self._merged[1] is memory:
            self._merged = ()

    def _merged_weight(self, memory) -> torch.Tensor:
        """``W + scaling * B A`` in the base weight's dtype (the update computed in float32), made
        when the memory (or its factors) changed and kept for that one memory only."""
        signature = self._signature("merged", [memory], self.base.weight.dtype)
        if self._merged and self._merged[0] == signature:
            return self._merged[2]
        self._merged = ()  # the old copy goes before the new one is made
        weight = self.base.weight
        update = (memory.lora_B[self.key].float() * memory.scaling) @ memory.lora_A[self.key].float()
        merged = (weight.float() + update.to(weight.device)).to(weight.dtype)
        self._merged = (signature, memory, merged)  # holds the memory: its id cannot be reused meanwhile
        return merged

    def _signature(self, kind: str, present, dtype: torch.dtype) -> tuple:
        """What a kept tensor was made from: the memories, their scalings and factor versions
        (``_version`` counts in-place updates), the dtype and the device."""
        return (kind, dtype, present[0].lora_A[self.key].device,
                tuple((id(m), m.scaling, m.lora_A[self.key]._version, m.lora_B[self.key]._version) for m in present))

    def _cached(self, kind: str, present, dtype: torch.dtype, build) -> tuple[torch.Tensor, torch.Tensor]:
        """``build()``'s factors, kept between calls when no gradient is recorded and neither the set
        of memories, their factors (``_version`` counts in-place updates) nor their device changed:
        every step of a decoding batch whose samples come and go over the same memories reuses them."""
        if torch.is_grad_enabled():
            return build()  # training: the factors change every step, and gradients flow through the cast
        signature = self._signature(kind, present, dtype)
        if signature in self._cache:
            self._cache.move_to_end(signature)
            return self._cache[signature][1:]
        a, b = build()
        # The entry holds the memories too: while it lives, their ids cannot be reused by a memory
        # loaded later (whose fresh tensors would also be at _version 0).
        self._cache[signature] = (list(present), a, b)
        if len(self._cache) > CACHED_SETS:
            self._cache.popitem(last=False)
        return a, b


def install_lora(layout: DecoderLayout, targets: list[str], batch: BatchMemories) -> dict[str, tuple[int, int]]:
    """Swap every target projection for a routed wrapper; return {key: (in, out)} for building memories."""
    shapes = {}
    for parts in layout.layers:
        for name in targets:
            module = parts.projection(name)
            key = lora_key(parts.index, name)
            if not isinstance(module, RoutedLoRALinear):
                parts.replace(name, RoutedLoRALinear(module, key, batch))
            shapes[key] = (module.in_features, module.out_features)
    return shapes
