"""Every loaded memory's LoRA side by side, for a compiled decoding step.

A compiled step (``torch.compile``; CUDA graphs on a GPU) must take the same Python branches and
tensors of the same shapes at every call, or it is traced again. ``RoutedLoRALinear``'s usual
dispatch (one memory, a merged weight, a few memories side by side, factors gathered per row) is
chosen on the host from the batch's composition, which changes whenever a request joins or leaves.

Here every wrapper instead holds the factors of *all* the memories loaded, side by side, made once
while that set stays the same; each row keeps its own memory's block through one (rows, summed
rank) mask of ones and zeros, shared by every projection and written in place when the batch's
composition changes. The step's code and shapes stay the same whatever the mix; the price is every
loaded memory's rank computed for every row (4 memories of rank 8 add 32 to a product 576 wide).
The factors are taken when the set is made: memories that train in place are not served this way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from koff.errors import UserInputError
from koff.memories.batch import rank_block_mask
from koff.memories.lora import CONCATENATED_MEMORIES, RoutedLoRALinear
from koff.memories.memory import DomainMemory


class ResidentMemories:
    """The memories side by side in every LoRA wrapper of ``base``, and the rows' block mask ``keep``."""

    def __init__(self, base: torch.nn.Module, memories: Sequence[DomainMemory], device: torch.device,
                 dtype: torch.dtype):
        if len(memories) > CONCATENATED_MEMORIES:
            raise UserInputError(f"a compiled step serves at most {CONCATENATED_MEMORIES} memories loaded at once, "
                                 f"not {len(memories)}: unload some, or run without --compile")
        self.memories = tuple(memories)
        self.ranks = tuple(m.rank for m in self.memories)
        self.device, self.dtype = device, dtype
        for module in base.modules():
            if isinstance(module, RoutedLoRALinear):
                module.hold(self.memories, dtype)
        self.keep: torch.Tensor | None = None  # (rows, sum of ranks)
        self._routed: tuple = ()

    def holds(self, memories: Sequence[DomainMemory]) -> bool:
        """Whether this is the set ``memories`` (the same objects, in the same order)."""
        return len(memories) == len(self.memories) and all(a is b for a, b in zip(memories, self.memories))

    def route(self, per_row: Sequence[DomainMemory | None]) -> None:
        """Give each row its memory's block (None: no update); ``keep`` keeps its storage while the
        number of rows stays the same, so a compiled step reads the new routing without a new trace."""
        routed = tuple(map(id, per_row))
        if routed == self._routed and self.keep is not None:
            return
        blocks = rank_block_mask(per_row, self.memories, self.ranks)
        if self.keep is None or self.keep.shape != blocks.shape:
            self.keep = blocks.to(self.device, self.dtype)
            torch._dynamo.mark_static_address(self.keep)  # an address CUDA graphs may keep
        else:
            self.keep.copy_(blocks)
        self._routed = routed
