"""The learned shared mask: hard-concrete gates on every prunable unit, plus the sparsity constraint."""

from __future__ import annotations

import math

import torch
from torch import nn

from koff.errors import UserInputError
from koff.masks.binary import BinaryMask, select_uniform_units, select_units
from koff.masks import hard_concrete
from koff.masks.hard_concrete import HardConcreteGates
from koff.masks.units import UnitCosts


class LearnedMask(nn.Module):
    """One set of gates shared by all domains; FFN and/or attention units can be switched off.

    ``offset`` is a global shift added to every ``log_alpha``. It stays 0 under the Lagrangian
    constraint; the projected constraint (``project_``) sets it each step so that the expected
    sparsity equals the target exactly, leaving the gates free to learn only *which* units matter.

    ``pin_open_`` holds chosen FFN neurons' gates at 1: they are never sampled, cost nothing in the
    expected sparsity and are always kept by ``binarize`` (``--keep-outliers``: the few neurons with
    massive activations, without which the bare backbone collapses).

    The gates are kept per layer (``ffn[i].log_alpha``, as checkpoints name them) but computed all
    at once: one concatenation, one sample, one split into per-layer views. A step then costs a
    handful of kernels, not a few per layer, and ``project_`` never waits on the device.
    """

    def __init__(self, costs: UnitCosts, prune_ffn: bool = True, prune_attention: bool = True, init_log_alpha: float = 5.0):
        super().__init__()
        if not (prune_ffn or prune_attention):
            raise UserInputError("a learned mask needs at least one unit type (FFN neurons or attention groups)")
        self.costs = costs
        self.ffn = nn.ModuleList(HardConcreteGates(n, init_log_alpha) for n in costs.ffn_units) if prune_ffn else None
        self.attn = nn.ModuleList(HardConcreteGates(n, init_log_alpha) for n in costs.attn_units) if prune_attention else None
        self.register_buffer("offset", torch.zeros(()), persistent=False)
        per_unit = []
        for gates, units, cost in ((self.ffn, costs.ffn_units, costs.ffn_cost), (self.attn, costs.attn_units, costs.attn_cost)):
            if gates is not None:
                per_unit += [torch.full((n,), float(c)) for n, c in zip(units, cost)]
        self.register_buffer("unit_cost", torch.cat(per_unit), persistent=False)  # parameters each unit costs
        # gates held open (over log_alpha()'s order); set from the config at every start, so not saved
        self.register_buffer("pinned", torch.zeros_like(self.unit_cost, dtype=torch.bool), persistent=False)
        self.any_pinned = False  # a Python flag, so an unpinned mask pays no kernel and no sync for it

    def _all(self) -> list[HardConcreteGates]:
        return [*(self.ffn or []), *(self.attn or [])]

    def log_alpha(self) -> torch.Tensor:
        """Every gate's ``log_alpha`` in one vector (FFN layers, then attention layers)."""
        return torch.cat([g.log_alpha for g in self._all()])

    def gates(self) -> tuple[list, list]:
        """One gate vector per layer and unit type: sampled in training, deterministic in eval."""
        shifted = self.log_alpha() + self.offset
        values = hard_concrete.sample(shifted) if self.training else hard_concrete.deterministic(shifted)
        if self.any_pinned:
            values = values.masked_fill(self.pinned, 1.0)
        ffn, attn = self._per_layer(values)
        none = [None] * self.costs.num_layers
        return ffn if ffn is not None else none, attn if attn is not None else none

    def _per_layer(self, vector: torch.Tensor) -> tuple[list | None, list | None]:
        """A vector in ``log_alpha()``'s order as per-layer views (``None`` for a type not pruned)."""
        pieces = iter(vector.split([g.log_alpha.numel() for g in self._all()]))
        ffn = [next(pieces) for _ in self.ffn] if self.ffn is not None else None
        attn = [next(pieces) for _ in self.attn] if self.attn is not None else None
        return ffn, attn

    def expected_sparsity(self) -> torch.Tensor:
        """Expected removed parameters (from P(z > 0)) over block parameters; differentiable."""
        return self.expected_removed_params() / self.costs.block_params

    def expected_removed_params(self, offset: float | torch.Tensor | None = None) -> torch.Tensor:
        offset = self.offset if offset is None else offset
        return self._removed(self.log_alpha() + offset).sum()

    def _removed(self, shifted: torch.Tensor) -> torch.Tensor:
        """Expected parameters each unit removes, for shifted ``log_alpha`` (any leading batch dims)."""
        removed = self.unit_cost * (1 - hard_concrete.prob_nonzero(shifted))
        return removed.masked_fill(self.pinned, 0.0) if self.any_pinned else removed

    @torch.no_grad()
    def pin_open_(self, ffn_units: list[tuple[int, int]]) -> None:
        """Hold the gates of these FFN neurons, as (layer, neuron) pairs, open for good."""
        if self.ffn is None:
            raise UserInputError("only FFN neurons can be held open, and this mask does not prune them")
        layers, _ = self._per_layer(self.pinned)  # views: writing them writes ``pinned``
        for layer, neuron in ffn_units:
            if not (0 <= layer < len(layers) and 0 <= neuron < layers[layer].numel()):
                raise UserInputError(f"no FFN neuron {neuron} in layer {layer} to hold open")
            layers[layer][neuron] = True
        self.any_pinned = bool(self.pinned.any())

    @torch.no_grad()
    def project_(self, target: float, rounds: int = 6, points: int = 32) -> None:
        """Set ``offset`` so that the expected sparsity equals ``target``.

        The expected sparsity falls monotonically as the offset grows. Each round evaluates it at
        ``points`` + 1 offsets at once and keeps the bracket that holds the target, all on the
        device (no host synchronisation): six rounds of 32 narrow [-40, 40] to below 1e-7.
        Targets the gates cannot reach (above what closing every gate removes) end at the bound."""
        log_alpha = self.log_alpha()
        budget = target * self.costs.block_params
        low, high = log_alpha.new_tensor(-40.0), log_alpha.new_tensor(40.0)  # offsets that close / open every gate
        fractions = torch.linspace(0.0, 1.0, points + 1, device=log_alpha.device)
        for _ in range(rounds):
            grid = low + (high - low) * fractions
            removed = self._removed(log_alpha[None] + grid[:, None]).sum(1)
            upper = (removed > budget).sum().clamp(1, points)  # first grid point that removes at most the budget
            low, high = grid.index_select(0, torch.stack([upper - 1, upper])).unbind()  # (no tensor-scalar index: a sync)
        self.offset.copy_(high)

    @torch.no_grad()
    def clamp_(self) -> None:
        values = [g.log_alpha for g in self._all()]
        torch._foreach_clamp_min_(values, hard_concrete.LOG_ALPHA_MIN)  # two kernels for every layer's gates
        torch._foreach_clamp_max_(values, hard_concrete.LOG_ALPHA_MAX)

    def binarize(self, target: float, min_keep: int = 1, uniform: bool = False, ffn_align: int = 1) -> BinaryMask:
        """The final mask: keep units in order of ``log_alpha`` until the target sparsity is met
        (``uniform``: the same number of each unit type in every layer; ``ffn_align``: FFN widths in
        multiples of it); held-open gates are always kept."""
        ffn, attn = self._per_layer(self.log_alpha().detach().masked_fill(self.pinned, math.inf))
        select = select_uniform_units if uniform else select_units
        return select(ffn, attn, self.costs, target, min_keep, ffn_align)


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
