"""Sampling over domains (balanced, each domain once or weighted, or by corpus size), with a state
small enough to checkpoint and resume exactly."""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field

import torch

from koff.config import SamplingSpec
from koff.data.blocks import DomainData


@dataclass
class SamplerState:
    samples: int = 0  # samples drawn so far (all domains)
    epoch: list[int] = field(default_factory=list)  # per domain
    position: list[int] = field(default_factory=list)  # per domain, within the epoch's permutation


def weighted_cycle(weights: list[int]) -> list[int]:
    """Domain indices in a cycle of ``sum(weights)`` samples, domain ``d`` ``weights[d]`` times and spread
    out (smooth weighted round robin); equal weights give 0, 1, ..., D-1."""
    credit, cycle = [0] * len(weights), []
    for _ in range(sum(weights)):
        credit = [c + w for c, w in zip(credit, weights)]
        pick = credit.index(max(credit))
        credit[pick] -= sum(weights)
        cycle.append(pick)
    return cycle


class DomainSampler:
    """Balanced (the default): sample ``n`` comes from the ``n``-th place of a fixed cycle over the
    domains, each once unless weighted, so every batch of D samples holds one of each domain. By size:
    sample ``n``'s domain is drawn with probability ~ (train blocks) ** ``size_alpha`` from a generator
    seeded by ``n`` alone. Either way resuming needs only the count. Within a domain, blocks are visited
    in a seeded permutation per epoch. With ``world_size`` processes, each takes every ``world_size``-th sample."""

    def __init__(self, domains: list[DomainData], seed: int, rank: int = 0, world_size: int = 1,
                 sampling: SamplingSpec = SamplingSpec()):
        self.domains = domains
        self.seed = seed
        self.size_alpha = sampling.size_alpha
        sizes = [float(d.train.shape[0]) for d in domains]
        weights = ([sampling.weight(d.name) for d in domains] if self.size_alpha is None
                   else [n**self.size_alpha for n in sizes])
        self.shares = [w / sum(weights) for w in weights]  # the expected fraction of samples of each domain
        self._cumulative = list(itertools.accumulate(self.shares))
        self._cycle = weighted_cycle([int(w) for w in weights]) if self.size_alpha is None else []
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

    def _domain(self, sample: int) -> int:
        if self.size_alpha is None:
            return self._cycle[sample % len(self._cycle)]
        u = random.Random(self.seed * 1_000_003 + sample).random()
        return min(bisect.bisect_right(self._cumulative, u), len(self.domains) - 1)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        blocks, names = [], []
        for _ in range(batch_size * self.world_size):
            d = self._domain(self.state.samples)
            block = self._take(d)
            if self.state.samples % self.world_size == self.rank:
                blocks.append(block)
                names.append(self.domains[d].name)
            self.state.samples += 1
        return torch.stack(blocks).long(), names

    def state_dict(self) -> dict:
        return {"samples": self.state.samples, "epoch": list(self.state.epoch), "position": list(self.state.position)}

    def load_state_dict(self, state: dict) -> None:
        self.state = SamplerState(state["samples"], list(state["epoch"]), list(state["position"]))
