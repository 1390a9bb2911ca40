"""Which memory each sample of the current forward pass uses."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from koff.memories.memory import DomainMemory


class MemoryRouter:
    """Shared by every LoRA wrapper of a model; set once per forward pass.

    A batch that uses one memory (or none) takes ``single``. A mixed batch has ``per_sample``
    (one entry per sample, ``None`` = no memory) and ``distinct`` (each memory present, once).
    """

    def __init__(self):
        self.single: DomainMemory | None = None
        self.per_sample: list[DomainMemory | None] = []
        self.distinct: list[DomainMemory] = []
        self.mixed = False

    @contextmanager
    def route(self, per_sample: Sequence[DomainMemory | None]) -> Iterator[None]:
        distinct = {id(m): m for m in per_sample if m is not None}
        self.mixed = len(distinct) > 1 or (len(distinct) == 1 and None in per_sample)
        if not self.mixed:
            self.single = next(iter(distinct.values()), None)
        else:
            self.per_sample, self.distinct = list(per_sample), list(distinct.values())
        try:
            yield
        finally:
            self.single, self.per_sample, self.distinct, self.mixed = None, [], [], False
