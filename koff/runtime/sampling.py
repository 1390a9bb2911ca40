"""Choosing the next token of every row of a batch on the device, in one pass for the whole batch.

Sampling draws its randomness from a counter-based hash of (the request's seed, the token's index
in the completion, the vocabulary entry) instead of a ``torch.Generator``: it needs no state per
request, runs as the same handful of tensor operations for any mix of rows, gives a seeded
request the same tokens whatever else shares its batch, and gives the same stream of noise on a
CPU and a GPU. A draw is the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g = -log(-log u)``
samples from ``softmax(logits / T)``; nucleus (top-p) sampling first sets the logits outside the
nucleus to minus infinity.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from koff.errors import UserInputError

# Temperatures below this sample the most likely token anyway; dividing logits by them overflows
# to infinity (a request with temperature 1e-45 once failed its whole batch), so they are greedy.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # any 64-bit seed, signed or not
_U32 = 0xFFFFFFFF
_ROW_TENSORS = ("temperature", "top_p", "seed_lo", "seed_hi", "step")


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserInputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UserInputError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed}")

    def seed_words(self) -> tuple[int, int]:
        """The seed as two 32-bit words; a request without a seed draws one."""
        seed = self.seed if self.seed is not None else secrets.randbits(64)
        seed &= (1 << 64) - 1
        return seed & _U32, seed >> 32


def _hash(x: torch.Tensor) -> torch.Tensor:
    """PCG's output permutation of 32-bit words (Jarzynski and Olano, "Hash functions for GPU
    rendering", 2020), on int64 tensors holding values below 2**32: no product overflows 63 bits."""
    state = (x * 747796405 + 2891336453) & _U32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _U32
    return (word >> 22) ^ word


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) floats in (0, 1), a pure function of each row's seed words and step."""
    row = _hash(step ^ _hash(seed_lo ^ _hash(seed_hi)))
    entries = torch.arange(vocab, device=row.device)
    bits = _hash(entries[None, :] ^ row[:, None]) >> 8  # 24 bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


class RowSampling:
    """The sampling settings of a batch's rows as device tensors, made when rows join or leave
    (never per step); the host keeps only what decides which operations a step runs."""

    def __init__(self, params: list[Sampling], device: torch.device):
        self._decide_operations(params)
        words = [p.seed_words() for p in params]
        settings = torch.tensor([[0.0 if p.greedy else p.temperature, p.top_p] for p in params], dtype=torch.float32)
        seeds = torch.tensor(words, dtype=torch.int64).reshape(-1, 2)
        self.temperature, self.top_p = settings.to(device).unbind(1)
        self.seed_lo, self.seed_hi = seeds.to(device).unbind(1)
        self.step = torch.zeros(len(params), dtype=torch.int64, device=device)

    @classmethod
    def joined(cls, parts: list["RowSampling"]) -> "RowSampling":
        """The rows of ``parts``, in order (a batch's slots growing)."""
        return cls._of(parts, lambda name: torch.cat([getattr(p, name) for p in parts]))

    def head(self, rows: int, params: list[Sampling]) -> "RowSampling":
        """The first ``rows`` rows, sharing this one's tensors (their step counters advance here
        too); ``params`` are the settings of the live rows among them, which decide the operations."""
        new = self._of([self], lambda name: getattr(self, name)[:rows])
        new._decide_operations(params)
        return new

    def _decide_operations(self, params: list[Sampling]) -> None:
        """Whether a step draws at all, and whether it cuts a nucleus: host flags, never read per step."""
        self.any_sampled = any(not p.greedy for p in params)
        self.any_nucleus = any(p.top_p < 1 and not p.greedy for p in params)

    def put(self, index: torch.Tensor, rows: "RowSampling") -> None:
        """Write ``rows`` over the rows at ``index`` (a device tensor): requests taking free slots."""
        for name in _ROW_TENSORS:
            getattr(self, name).index_copy_(0, index, getattr(rows, name))

    @classmethod
    def _of(cls, parts: list["RowSampling"], take) -> "RowSampling":
        new = cls.__new__(cls)
        new.any_sampled = any(p.any_sampled for p in parts)
        new.any_nucleus = any(p.any_nucleus for p in parts)
        for name in _ROW_TENSORS:
            setattr(new, name, take(name))
        return new

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (a device tensor); advances each row's step counter."""
        best = logits.argmax(-1)
        if self.any_sampled:
            sampled = self._draw(logits.float())
            best = torch.where(self.temperature > 0, sampled, best)
        self.step += 1
        return best

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = logits / torch.where(self.temperature > 0, self.temperature, 1.0)[:, None]
        if self.any_nucleus:
            scaled = self._nucleus(scaled)
        noise = uniform_noise(self.seed_lo, self.seed_hi, self.step, logits.shape[-1])
        return (scaled - torch.log(-torch.log(noise))).argmax(-1)

    def _nucleus(self, scaled: torch.Tensor) -> torch.Tensor:
        """Minus infinity outside each row's nucleus: the most likely tokens whose probabilities,
        those before them summed, stay within ``top_p`` (the most likely token always stays)."""
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # rows at top_p = 1 keep everything (a cumulative sum can pass 1 by rounding)
        outside_sorted = (sorted_probs.cumsum(-1) - sorted_probs > self.top_p[:, None]) & (self.top_p < 1)[:, None]
        outside = torch.empty_like(outside_sorted).scatter_(-1, order, outside_sorted)
        return scaled.masked_fill(outside, -math.inf)
