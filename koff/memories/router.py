"""Which memory each sample of the current forward pass uses."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from koff.memories.memory import DomainMemory
from koff.models.recompute import Restorer, attribute_snapshot


class MemoryRouter:
    """Shared by every LoRA wrapper of a model; set once per forward pass.

    A batch that uses one memory (or none) takes ``single``. A mixed batch has ``per_sample``
    (one entry per sample, ``None`` = no memory) and ``distinct`` (each memory present, once, in
    name order so that the same set of memories always concatenates the same way).
    """

    def __init__(self):
        self.single: DomainMemory | None = None
        self.per_sample: list[DomainMemory | None] = []
        self.distinct: list[DomainMemory] = []
        self._selections: dict = {}
        self.mixed = False

    @contextmanager
    def route(self, per_sample: Sequence[DomainMemory | None]) -> Iterator[None]:
        distinct = {id(m): m for m in per_sample if m is not None}
        self.mixed = len(distinct) > 1 or (len(distinct) == 1 and None in per_sample)
        if not self.mixed:
            self.single = next(iter(distinct.values()), None)
        else:
            self.per_sample = list(per_sample)
            self.distinct = sorted(distinct.values(), key=lambda m: m.name)
        try:
            yield
        finally:
            self.single, self.per_sample, self.distinct, self.mixed = None, [], [], False
            self._selections = {}

    def snapshot(self) -> Restorer:
        """The routing of the pass under way, for a checkpointed layer's recompute in backward."""
        return attribute_snapshot(self, ("single", "per_sample", "distinct", "mixed", "_selections"))

    def selection(self, present: list[DomainMemory], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(batch, sum of ranks of ``present``): each sample's own columns of the concatenated
        factors, holding its memory's scaling; zero rows for samples whose memory is not present.
        Built once per forward pass for each distinct ``present`` list."""
        key = (tuple(id(m) for m in present), dtype, device)
        if key not in self._selections:
            select = torch.zeros(len(self.per_sample), sum(m.rank for m in present), dtype=dtype, device=device)
            start = 0
            for memory in present:
                rows = [i for i, m in enumerate(self.per_sample) if m is memory]
                select[rows, start : start + memory.rank] = memory.scaling
                start += memory.rank
            self._selections[key] = select
        return self._selections[key]
