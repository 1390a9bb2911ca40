"""Hard-concrete (L0) gates, as in Louizos et al. 2018 and Sheared-LLaMA.

Each prunable unit has one ``log_alpha``. Training draws a stretched, clipped concrete sample
``z`` in [0, 1] (exactly 0 or 1 with positive probability); evaluation uses a deterministic gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA = 2.0 / 3.0
LIMIT_LEFT = -0.1
LIMIT_RIGHT = 1.1
LOG_ALPHA_MIN = math.log(0.01)
LOG_ALPHA_MAX = math.log(100.0)
EPS = 1e-6


def sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """A training sample of each gate (``log_alpha`` already shifted by any offset)."""
    u = torch.rand_like(log_alpha).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """The evaluation gate."""
    return (torch.sigmoid(log_alpha) * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) for each gate; differentiable in ``log_alpha``."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT))


class HardConcreteGates(nn.Module):
    """``n`` independent hard-concrete gates."""

    def __init__(self, n: int, init_log_alpha: float = 5.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))

    def sample(self, offset: float | torch.Tensor = 0.0) -> torch.Tensor:
        return sample(self.log_alpha + offset)

    def deterministic(self, offset: float | torch.Tensor = 0.0) -> torch.Tensor:
        return deterministic(self.log_alpha + offset)

    def prob_nonzero(self, offset: float | torch.Tensor = 0.0) -> torch.Tensor:
        return prob_nonzero(self.log_alpha + offset)

    def forward(self, offset: float | torch.Tensor = 0.0) -> torch.Tensor:
        return self.sample(offset) if self.training else self.deterministic(offset)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
