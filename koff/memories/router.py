"""Which memory each sample of the current forward pass uses."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from koff.memories.memory import DomainMemory


class MemoryRouter:
    """Shared by every LoRA wrapper of a model; set once per forward pass.

    A batch that uses one memory (or none) takes ``single``. A mixed batch takes ``per_sample``
    (for one batched matmul over stacked factors) or, when some samples lack a factor or ranks
    differ, ``groups``: (memory, sample indices) for each distinct memory present.
    """

    def __init__(self):
        self.single: DomainMemory | None = None
        self.per_sample: list[DomainMemory | None] = []
        self.groups: list[tuple[DomainMemory, torch.Tensor]] = []
        self.mixed = False

    @contextmanager
    def route(self, per_sample: Sequence[DomainMemory | None], device: torch.device) -> Iterator[None]:
        distinct = {id(m): m for m in per_sample if m is not None}
        self.mixed = len(distinct) > 1 or (len(distinct) == 1 and None in per_sample)
        if not self.mixed:
            self.single = next(iter(distinct.values()), None)
        else:
            self.per_sample = list(per_sample)
            self.groups = [
                (mem, torch.tensor([i for i, m in enumerate(per_sample) if m is mem], device=device))
                for mem in distinct.values()
            ]
        try:
            yield
        finally:
            self.single, self.per_sample, self.groups, self.mixed = None, [], [], False
