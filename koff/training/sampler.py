"""Balanced sampling over domains, with a state small enough to checkpoint and resume exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from koff.data.blocks import DomainData


@dataclass
class SamplerState:
    samples: int = 0  # samples drawn so far (all domains)
    epoch: list[int] = field(default_factory=list)  # per domain
    position: list[int] = field(default_factory=list)  # per domain, within the epoch's permutation


class BalancedSampler:
    """Sample ``k`` of a batch comes from domain ``(samples + k) % D``: every batch of D samples
    holds one of each domain. Within a domain, blocks are visited in a seeded permutation per epoch.
    With ``world_size`` processes, each takes every ``world_size``-th sample."""

    def __init__(self, domains: list[DomainData], seed: int, rank: int = 0, world_size: int = 1):
        self.domains = domains
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.state = SamplerState(0, [0] * len(domains), [0] * len(domains))
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _permutation(self, d: int, epoch: int) -> torch.Tensor:
        key = (d, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + d * 10_007 + epoch)
            self._perms = {key: torch.randperm(self.domains[d].train.shape[0], generator=g)}
        return self._perms[key]

    def _take(self, d: int) -> torch.Tensor:
        st = self.state
        perm = self._permutation(d, st.epoch[d])
        block = self.domains[d].train[perm[st.position[d]]]
        st.position[d] += 1
        if st.position[d] == len(perm):
            st.epoch[d], st.position[d] = st.epoch[d] + 1, 0
        return block

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        blocks, names = [], []
        n_domains = len(self.domains)
        for _ in range(batch_size * self.world_size):
            d = self.state.samples % n_domains
            block = self._take(d)
            if self.state.samples % self.world_size == self.rank:
                blocks.append(block)
                names.append(self.domains[d].name)
            self.state.samples += 1
        return torch.stack(blocks), names

    def state_dict(self) -> dict:
        return {"samples": self.state.samples, "epoch": list(self.state.epoch), "position": list(self.state.position)}

    def load_state_dict(self, state: dict) -> None:
        self.state = SamplerState(state["samples"], list(state["epoch"]), list(state["position"]))
