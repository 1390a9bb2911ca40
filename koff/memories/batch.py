"""Which memory each sample of the current forward pass uses: set once per pass, read by every LoRA
wrapper of the model. (Per-row dispatch of memories already chosen; choosing a memory for a
request is another matter.)"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from koff.memories.memory import DomainMemory, rows_in_stack
from koff.models.recompute import Restorer, attribute_snapshot

# Row-to-memory indices kept between passes: a decoding batch routes the same rows step after
# step, so its index tensors are made once (a copy to the device each) and not at every step.
KEPT_INDICES = 16


def rank_block_mask(per_sample: Sequence[DomainMemory | None], present: Sequence[DomainMemory],
                    ranks: Sequence[int]) -> torch.Tensor:
    """(samples, sum of ranks) on the host: for each sample, ones over its own memory's block of
    ``present``'s LoRA factors side by side (``ranks`` wide each), zeros elsewhere and for a sample
    whose memory is not in ``present``."""
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    place = {id(m): i for i, m in enumerate(present)}
    blocks = torch.zeros(len(per_sample), sum(ranks))
    for row, memory in enumerate(per_sample):
        if id(memory) in place:
            i = place[id(memory)]
            blocks[row, starts[i]:starts[i] + ranks[i]] = 1
    return blocks


class BatchMemories:
    """Shared by every LoRA wrapper of a model; set once per forward pass.

    A batch that uses one memory (or none) takes ``single``. A mixed batch has ``per_sample``
    (one entry per sample, ``None`` = no memory) and ``distinct`` (each memory present, once, in
    name order so that the same set of memories always stacks the same way).
    """

    def __init__(self, merge_single: bool = False):
        # At inference, run a batch of one memory on weights with its LoRA merged in (see lora.py).
        self.merge_single = merge_single
        self.single: DomainMemory | None = None
        self.per_sample: list[DomainMemory | None] = []
        self.distinct: list[DomainMemory] = []
        self.mixed = False
        # A compiled decoding step's LoRA: every loaded memory side by side (see resident.py); when
        # set, every wrapper takes it whatever the pass's memories.
        self.resident = None
        self._rows: tuple = ()  # the memories' ids, row by row: names this pass's routing
        self._indices: OrderedDict = OrderedDict()

    @contextmanager
    def use(self, per_sample: Sequence[DomainMemory | None]) -> Iterator[None]:
        distinct = {id(m): m for m in per_sample if m is not None}
        self.mixed = len(distinct) > 1 or (len(distinct) == 1 and None in per_sample)
        if not self.mixed:
            self.single = next(iter(distinct.values()), None)
        else:
            self.per_sample = list(per_sample)
            self._rows = tuple(id(m) for m in per_sample)
            self.distinct = sorted(distinct.values(), key=lambda m: m.name)
        try:
            yield
        finally:
            self.single, self.per_sample, self.distinct, self.mixed, self._rows = None, [], [], False, ()

    def snapshot(self) -> Restorer:
        """The memories of the pass under way, for a checkpointed layer's recompute in backward."""
        return attribute_snapshot(self, ("single", "per_sample", "distinct", "mixed", "_rows"))

    def index(self, present: list[DomainMemory], device: torch.device) -> torch.Tensor:
        """``rows_in_stack`` for this pass's samples, made once per batch composition."""
        return self._kept(("index", tuple(id(m) for m in present), device),
                          lambda: rows_in_stack(self.per_sample, present, device))

    def rank_blocks(self, present: list[DomainMemory], ranks: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
        """(batch, sum of ranks): for each sample, ones over its own memory's block of ``present``'s
        factors side by side (``ranks`` wide each), zeros elsewhere; made once per batch composition."""
        return self._kept(("blocks", tuple(id(m) for m in present), ranks, device, dtype),
                          lambda: rank_block_mask(self.per_sample, present, ranks).to(device, dtype))

    def _kept(self, key: tuple, make) -> torch.Tensor:
        key = (self._rows, *key)
        if key in self._indices:
            self._indices.move_to_end(key)
            return self._indices[key][1]
        made = make()
        # The entry holds the memories: while it lives, their ids cannot name a memory loaded later.
        self._indices[key] = (list(self.per_sample), made)
        if len(self._indices) > KEPT_INDICES:
            self._indices.popitem(last=False)
        return made
