"""LoRA through a small module swap: each adapted ``nn.Linear`` is replaced by a wrapper that
adds the routed memory's low-rank update; the base weight stays frozen and shared."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from koff.memories.memory import lora_key
from koff.memories.router import MemoryRouter
from koff.models.architecture import DecoderLayout


# Sets of memories whose factors each wrapper keeps at inference: the running batch's and the one of
# the prompts being prefilled, each as one memory or a mix, so that they do not evict each other
# step after step.
CACHED_SETS = 4


class RoutedLoRALinear(nn.Module):
    """``base(x) + scaling * B A x`` with A, B taken from each sample's memory (if it adapts this key)."""

    def __init__(self, base: nn.Linear, key: str, router: MemoryRouter):
        super().__init__()
        self.base = base
        self.key = key
        self._router = [router]  # a list keeps the router out of the module tree
        self._cache: OrderedDict = OrderedDict()  # concatenated factors of recent memory sets (inference only)

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
        y = self.base(x)
        router = self._router[0]
        if not router.mixed:
            memory = router.single
            if memory is None or self.key not in memory.lora_A:
                return y
            a, scaled_b = self._single(memory, x.dtype)  # kept between decoding steps, made anew in training
            return y + F.linear(F.linear(x, a), scaled_b)
        if torch.is_grad_enabled() and self._batchable(router.per_sample):
            return y + self._batched_delta(router.per_sample, x)  # training: per-sample factors, no repeat
        return y + self._segmented_delta(router, x)  # inference: factors kept across decode steps

    def _batchable(self, per_sample) -> bool:
        ranks = {m.rank if m is not None and self.key in m.lora_A else -1 for m in per_sample}
        return len(ranks) == 1 and -1 not in ranks

    def _batched_delta(self, per_sample, x: torch.Tensor) -> torch.Tensor:
        """Every sample's own update in two batched matmuls: (B,T,in) @ (B,in,r) @ (B,r,out)."""
        a = torch.stack([m.lora_A[self.key] for m in per_sample]).to(x.dtype)
        b = torch.stack([m.lora_B[self.key] for m in per_sample]).to(x.dtype)
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        scales = {m.scaling for m in per_sample}
        if len(scales) == 1:  # the usual case: a plain multiply, no per-sample tensor copied to the device
            return delta * scales.pop()
        scale = torch.tensor([m.scaling for m in per_sample], dtype=x.dtype, device=x.device)
        return delta * scale.view(-1, *[1] * (x.dim() - 1))

    def _segmented_delta(self, router, x: torch.Tensor) -> torch.Tensor:
        """A batch where some samples have no update here (the bare backbone, a memory without this
        projection) or ranks differ: project on the concatenated A of the distinct memories present,
        keep each sample's own columns (scaled), and map back with the concatenated B. Two plain
        matmuls for the whole batch, whatever the mix; samples without an update get exactly zero."""
        present = [m for m in router.distinct if self.key in m.lora_A]
        if not present:
            return torch.zeros_like(x[..., :1]).expand(*x.shape[:-1], self.out_features)
        a, b = self._concatenated(present, x.dtype)
        select = router.selection(present, x.dtype, x.device)
        low = F.linear(x, a) * select.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return F.linear(low, b)

    def _concatenated(self, present, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of ranks, in) and (out, sum of ranks) factors of the memories present."""
        def build():
            return (torch.cat([m.lora_A[self.key] for m in present]).to(dtype),
                    torch.cat([m.lora_B[self.key] for m in present], dim=1).to(dtype))

        return self._cached("mixed", present, dtype, build)

    def _single(self, memory, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One memory's A and its B times its scaling, in ``dtype``."""
        def build():
            return memory.lora_A[self.key].to(dtype), (memory.lora_B[self.key] * memory.scaling).to(dtype)

        return self._cached("single", [memory], dtype, build)

    def _cached(self, kind: str, present, dtype: torch.dtype, build) -> tuple[torch.Tensor, torch.Tensor]:
        """``build()``'s factors, kept between calls when no gradient is recorded and neither the set
        of memories, their factors (``_version`` counts in-place updates) nor their device changed:
        every step of a decoding batch whose samples come and go over the same memories reuses them."""
        if torch.is_grad_enabled():
            return build()  # training: the factors change every step, and gradients flow through the cast
        signature = (kind, dtype, present[0].lora_A[self.key].device,
                     tuple((id(m), m.scaling, m.lora_A[self.key]._version, m.lora_B[self.key]._version) for m in present))
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


def install_lora(layout: DecoderLayout, targets: list[str], router: MemoryRouter) -> dict[str, tuple[int, int]]:
    """Swap every target projection for a routed wrapper; return {key: (in, out)} for building memories."""
    shapes = {}
    for parts in layout.layers:
        for name in targets:
            owner = parts.owner(name)
            module = getattr(owner, name)
            key = lora_key(parts.index, name)
            if not isinstance(module, RoutedLoRALinear):
                setattr(owner, name, RoutedLoRALinear(module, key, router))
            shapes[key] = (module.in_features, module.out_features)
    return shapes
