"""LoRA through a small module swap: each adapted ``nn.Linear`` is replaced by a wrapper that
adds the routed memory's low-rank update; the base weight stays frozen and shared.

At inference a batch that uses one memory alone can instead run on a *merged* copy of each adapted
weight (``W + scaling * B A``, made once and kept for the most recent such memory): one matmul per
projection instead of three operations more, at the price of one more copy of the adapted weights
in memory. ``BatchMemories.merge_single`` switches it on; training and mixed batches never merge.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

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
# A mixed batch of at most this many memories runs them side by side as one wide LoRA (two plain
# matmuls, the others' ranks computed for nothing); beyond, each sample gathers its own factors.
CONCATENATED_MEMORIES = 16


class RoutedLoRALinear(nn.Module):
    """``base(x) + scaling * B A x`` with A, B taken from each sample's memory (if it adapts this key)."""

    def __init__(self, base: nn.Linear, key: str, batch: BatchMemories):
        super().__init__()
        self.base = base
        self.key = key
        self._batch = [batch]  # a list keeps it out of the module tree
        self._cache: OrderedDict = OrderedDict()  # concatenated factors of recent memory sets (inference only)
        self._merged: _Made | None = None  # the last memory merged alone (inference only)
        # A compiled step's factors: every loaded memory's side by side (see resident.py); None
        # when none of them adapts this projection.
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None

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
        if batch.resident is not None:
            return self._add_held(self.base(x), x, batch.resident.keep)
        if not batch.mixed and batch.merge_single and batch.single is not None and not torch.is_grad_enabled():
            merged = self._merged_weight(batch.single)
            if merged is not None:
                return F.linear(x, merged, self.base.bias)
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
        if len(present) <= CONCATENATED_MEMORIES:
            return self._add_concatenated(y, present, x)
        return self._add_gathered(y, present, batch.index(present, x.device), x)

    def _add_concatenated(self, y: torch.Tensor, present, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch over a few memories: their factors side by side make one LoRA of their
        summed ranks, ``[A1; A2; ...]`` and ``[s1 B1, s2 B2, ...]``; each sample keeps the block of
        its own memory (a mask of ones and zeros; a sample with none keeps nothing, so its update is
        exactly zero). Two plain matmuls and a multiply for the whole batch, whatever the mix, and
        nothing gathered: the extra work is the other memories' ranks, small beside the projection."""
        a, b, ranks = self._concatenated(present, x.dtype)
        keep = self._batch[0].rank_blocks(present, ranks, x.device, x.dtype)
        low = F.linear(x, a) * keep.view(keep.shape[0], *([1] * (x.dim() - 2)), keep.shape[1])
        return y + F.linear(low, b)

    def _add_held(self, y: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The compiled step's update: the resident memories side by side, each row keeping its own
        block (``keep``: rows x summed rank); the same operations whatever the batch's mix."""
        if self._held is None:
            return y
        a, b = self._held
        return y + F.linear(F.linear(x, a) * keep.view(keep.shape[0], *([1] * (x.dim() - 2)), keep.shape[1]), b)

    def hold(self, memories, dtype: torch.dtype) -> None:
        """Keep ``memories``' factors side by side, a zero block for each that does not adapt this
        projection (so that the blocks line up with the rows' mask), B times its scaling."""
        if not any(self.key in m.lora_A for m in memories):
            self._held = None
            return
        weight = self.base.weight
        a = [m.lora_A[self.key] if self.key in m.lora_A else weight.new_zeros(m.rank, self.in_features)
             for m in memories]
        b = [m.lora_B[self.key] * m.scaling if self.key in m.lora_A else weight.new_zeros(self.out_features, m.rank)
             for m in memories]
        with torch.no_grad():
            self._held = (torch.cat(a).to(dtype), torch.cat(b, dim=1).to(dtype))
        for tensor in self._held:  # CUDA graphs read them where they are instead of copying them in
            torch._dynamo.mark_static_address(tensor)

    def _concatenated(self, present, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(summed rank, in) and (out, summed rank) factors of ``present`` (B times its scaling),
        and each memory's rank."""
        def build():
            a = torch.cat([m.lora_A[self.key] for m in present]).to(dtype)
            b = torch.cat([m.lora_B[self.key] * m.scaling for m in present], dim=1).to(dtype)
            return a, b, tuple(m.lora_A[self.key].shape[0] for m in present)

        return self._cached("concatenated", present, dtype, build)

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
        self._cache = OrderedDict((k, v) for k, v in self._cache.items() if all(m is not memory for m in v.memories))
        if self._merged is not None and self._merged.memories[0] is memory:
            self._merged = None
        self._held = None  # a compiled step makes its set again (ResidentMemories)

    def _merged_weight(self, memory) -> torch.Tensor | None:
        """``W + scaling * B A`` in the base weight's dtype (the update computed in float32), made
        when the memory (or its factors) changed and kept for that one memory only; None when the
        memory does not adapt this projection."""
        weight = self.base.weight
        kept = self._merged
        if kept is not None and kept.serves("merged", [memory], weight.dtype):
            return kept.tensors[0]
        if self.key not in memory.lora_A:
            return None
        self._merged = None  # the old copy goes before the new one is made
        update = (memory.lora_B[self.key].float() * memory.scaling) @ memory.lora_A[self.key].float()
        merged = (weight.float() + update.to(weight.device)).to(weight.dtype)
        self._merged = _Made.of("merged", [memory], self.key, weight.dtype, (merged,))
        return merged

    def _cached(self, kind: str, present, dtype: torch.dtype, build) -> tuple:
        """``build()``'s tensors, kept between calls when no gradient is recorded and neither the set
        of memories, their factors (``_version`` counts in-place updates) nor their device changed:
        every step of a decoding batch whose samples come and go over the same memories reuses them."""
        if torch.is_grad_enabled():
            return build()  # training: the factors change every step, and gradients flow through the cast
        key = (kind, dtype, *map(id, present))
        kept = self._cache.get(key)
        if kept is not None and kept.serves(kind, present, dtype):
            self._cache.move_to_end(key)
            return kept.tensors
        made = build()
        self._cache[key] = _Made.of(kind, present, self.key, dtype, made)
        if len(self._cache) > CACHED_SETS:
            self._cache.popitem(last=False)
        return made


@dataclass(frozen=True)
class _Made:
    """Tensors a wrapper made from some memories' factors, and what they were made from: checking
    that they still serve takes a few attribute reads (a decoding step checks 210 of them), no
    lookup in the memories' parameter dictionaries. Holding the memories keeps their ids from
    naming a memory loaded later."""

    kind: str
    dtype: torch.dtype
    memories: tuple
    factors: tuple  # per memory: its A and B as they were, their _version counters, its scaling
    tensors: tuple

    @classmethod
    def of(cls, kind: str, present, key: str, dtype: torch.dtype, tensors: tuple) -> "_Made":
        pairs = [(m, m.lora_A[key], m.lora_B[key]) for m in present]
        factors = tuple((a, b, a._version, b._version, m.scaling, a.device) for m, a, b in pairs)
        return cls(kind, dtype, tuple(present), factors, tensors)

    def serves(self, kind: str, present, dtype: torch.dtype) -> bool:
        return (kind == self.kind and dtype == self.dtype and len(present) == len(self.memories)
                and all(m is held for m, held in zip(present, self.memories))
                and all(a._version == va and b._version == vb and m.scaling == s and a.device == d
                        for m, (a, b, va, vb, s, d) in zip(present, self.factors)))


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
