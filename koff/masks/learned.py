"""The learned shared mask: hard-concrete gates on every prunable unit, plus the sparsity constraint."""

from __future__ import annotations

import torch
from torch import nn

from koff.errors import UserInputError
from koff.masks.binary import BinaryMask, select_uniform_units, select_units
from koff.masks.hard_concrete import HardConcreteGates
from koff.masks.units import UnitCosts


class LearnedMask(nn.Module):
    """One set of gates shared by all domains; FFN and/or attention units can be switched off.

    ``offset`` is a global shift added to every ``log_alpha``. It stays 0 under the Lagrangian
    constraint; the projected constraint (``project_``) sets it each step so that the expected
    sparsity equals the target exactly, leaving the gates free to learn only *which* units matter.
    """

    def __init__(self, costs: UnitCosts, prune_ffn: bool = True, prune_attention: bool = True, init_log_alpha: float = 5.0):
        super().__init__()
        if not (prune_ffn or prune_attention):
            raise UserInputError("a learned mask needs at least one unit type (FFN neurons or attention groups)")
        self.costs = costs
        self.ffn = nn.ModuleList(HardConcreteGates(n, init_log_alpha) for n in costs.ffn_units) if prune_ffn else None
        self.attn = nn.ModuleList(HardConcreteGates(n, init_log_alpha) for n in costs.attn_units) if prune_attention else None
        self.register_buffer("offset", torch.zeros(()), persistent=False)

    def gates(self) -> tuple[list, list]:
        """One gate vector per layer and unit type: sampled in training, deterministic in eval."""
        none = [None] * self.costs.num_layers
        ffn = [g(self.offset) for g in self.ffn] if self.ffn is not None else none
        attn = [g(self.offset) for g in self.attn] if self.attn is not None else none
        return ffn, attn

    def expected_sparsity(self) -> torch.Tensor:
        """Expected removed parameters (from P(z > 0)) over block parameters; differentiable."""
        return self.expected_removed_params() / self.costs.block_params

    def expected_removed_params(self, offset: float | torch.Tensor | None = None) -> torch.Tensor:
        offset = self.offset if offset is None else offset
        removed = torch.zeros(())
        for gates, cost in ((self.ffn, self.costs.ffn_cost), (self.attn, self.costs.attn_cost)):
            if gates is None:
                continue
            for layer, g in enumerate(gates):
                removed = removed + cost[layer] * (1 - g.prob_nonzero(offset)).sum()
        return removed

    @torch.no_grad()
    def project_(self, target: float, iterations: int = 40) -> None:
        """Set ``offset`` (by bisection) so that the expected sparsity equals ``target``.

        The expected sparsity falls monotonically as the offset grows. Targets the gates cannot
        reach (above what closing every gate removes) end at the closest bound."""
        budget = target * self.costs.block_params
        low, high = -40.0, 40.0  # offsets that close / open every gate
        for _ in range(iterations):
            mid = (low + high) / 2
            if self.expected_removed_params(mid) > budget:
                low = mid
            else:
                high = mid
        self.offset.fill_(high)

    @torch.no_grad()
    def clamp_(self) -> None:
        for group in (self.ffn, self.attn):
            for g in group or []:
                g.clamp_()

    def binarize(self, target: float, min_keep: int = 1, uniform: bool = False) -> BinaryMask:
        """The final mask: keep units in order of ``log_alpha`` until the target sparsity is met
        (``uniform``: the same number of each unit type in every layer)."""

        def scores(group):
            return None if group is None else [g.log_alpha.detach() for g in group]

        select = select_uniform_units if uniform else select_units
        return select(scores(self.ffn), scores(self.attn), self.costs, target, min_keep)


class SparsityConstraint(nn.Module):
    """Lagrangian ``lambda1 (s - t) + lambda2 (s - t)^2``; the lambdas are trained by ascent."""

    def __init__(self):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


def target_schedule(step: int, total_steps: int, final: float, warmup_fraction: float) -> float:
    """Sparsity target at ``step``: linear from 0 to ``final`` over the warm-up, then constant."""
    warmup = max(1, round(total_steps * warmup_fraction))
    return final * min(1.0, step / warmup)
