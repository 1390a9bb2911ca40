"""A running batch's decoding forward compiled with ``torch.compile`` (CUDA graphs on a GPU).

Eager decoding dispatches every operation from Python: about 1,700 per token for a 30-layer model,
2,300 with a memory's LoRA. On a CPU that costs a few percent; on a GPU at batch 1 the launches, not
the weights, set the speed. Compiled, one step is one call into generated code (one graph replay
on a GPU).

A compiled step must see the same code path and tensor shapes at every call, or it is traced
again. ``DecodeBatch`` makes that so when it compiles: every slot runs (a free one is masked),
attention reads every column of the cache (``SlotCache(whole=True)``), and LoRA takes every loaded
memory side by side (``ResidentMemories``) with a routing mask written in place. Shapes change only
when the batch grows (its slots double) or its cache does; the first such change is traced once
more with those sizes symbolic, and later ones reuse it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from koff.memories.memory import DomainMemory
from koff.memories.resident import ResidentMemories
from koff.model import KoffModel
from koff.models.cache_api import cache_inputs


class CompiledStep:
    """The compiled forward of one decoding step over ``model``'s base, shared by its batches."""

    def __init__(self, model: KoffModel):
        self.model = model
        # CUDA graphs replay a step's kernels in one launch; the cache and routing mask they write
        # keep their addresses (marked static), so the graphs stay valid from step to step.
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        self._forward = torch.compile(self._logits, mode=mode)
        self._cache_argument = next(iter(cache_inputs(model.base, None)))  # asked once, not while tracing
        self._resident: ResidentMemories | None = None

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        base = self.model.base
        out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **{self._cache_argument: cache})
        return out.logits[:, -1]

    def route(self, per_row: Sequence[DomainMemory | None]) -> None:
        """The rows' memories (None: none) for the next steps; called when the batch's composition
        changes. The loaded memories are taken side by side again when they have changed."""
        loaded = list(self.model.memories.values())
        if self._resident is None or not self._resident.holds(loaded):
            self._resident = ResidentMemories(self.model.base, loaded, self.model.device, self.model.dtype)
        self._resident.route(per_row)

    @contextmanager
    def _resident_lora(self) -> Iterator[None]:
        batch = self.model.batch_memories
        batch.resident = self._resident
        try:
            yield
        finally:
            batch.resident = None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The last position's logits of every row."""
        with self._resident_lora():
            return self._forward(ids, mask, positions, cache)


def compiled_step(model: KoffModel) -> CompiledStep:
    """``model``'s compiled step, made on first use and kept with the model (compiling takes a while)."""
    step = getattr(model, "_compiled_step", None)
    if step is None:
        step = CompiledStep(model)
        model._compiled_step = step
    return step
