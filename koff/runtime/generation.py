"""Batched generation where every sample may use its own memory.

The prompts are left-padded; each sample's KV prefix sits in the cache before its prompt and its
positions start right after its own prefix, so a sample's tokens are the same whether it runs
alone or in a mixed batch (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from koff.memories.prefix import build_prefix_cache
from koff.model import KoffModel


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def sample_next(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    """One token from one row of logits: greedy, or temperature + nucleus (top-p) sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class BatchGeneration:
    """Generate for several prompts at once; iterate to get, per step, (sample index, token id) pairs.

    ``stop(i)`` ends sample ``i`` early (a stop string was found, a client went away)."""

    def __init__(
        self,
        model: KoffModel,
        prompts: Sequence[Sequence[int]],
        memories: Sequence[str | None],
        params: Sequence[Sampling],
        pad_id: int,
        eos_ids: set[int],
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        for p in params:
            p.validate()
        self.model, self.prompts, self.params = model, [list(p) for p in prompts], list(params)
        self.per_sample = model.resolve(list(memories), len(prompts))
        self.pad_id, self.eos_ids = pad_id, eos_ids
        self.done = [False] * len(prompts)
        self.generators = [
            torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in self.params
        ]

    def stop(self, index: int) -> None:
        self.done[index] = True

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        model, device = self.model, self.model.device
        batch, longest = len(self.prompts), max(len(p) for p in self.prompts)
        ids = torch.full((batch, longest), self.pad_id, dtype=torch.long, device=device)
        prompt_mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
        for i, p in enumerate(self.prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=device)
            prompt_mask[i, longest - len(p):] = 1
        counts = [0] * batch
        with model.activate(self.per_sample) as active:
            dtype = next(model.base.parameters()).dtype
            cache, prefix_mask = build_prefix_cache(active, model.base.config, dtype, device)
            if cache is None:
                cache, prefix_mask = DynamicCache(config=model.base.config), prompt_mask[:, :0]
            mask = torch.cat([prefix_mask, prompt_mask], dim=1)
            positions = prefix_mask.sum(1, keepdim=True) + (prompt_mask.cumsum(1) - 1).clamp(min=0)
            out = model.base(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True)
            next_position = positions[:, -1:] + 1
            while True:
                logits = out.logits[:, -1]
                step, tokens = [], []
                for i in range(batch):
                    token = self.pad_id
                    if not self.done[i]:
                        token = sample_next(logits[i], self.params[i], self.generators[i])
                        step.append((i, token))
                        counts[i] += 1
                        if token in self.eos_ids or counts[i] >= self.params[i].max_new_tokens:
                            self.done[i] = True
                    tokens.append(token)
                if step:
                    yield step
                if all(self.done):
                    return
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
                out = model.base(
                    input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                    past_key_values=out.past_key_values, position_ids=next_position, use_cache=True,
                )
                next_position = next_position + 1


class TextStream:
    """Turns one sample's tokens into text deltas.

    Holds back an incomplete multi-byte character, and any tail that may be the start of a stop
    string, so a stop string split over tokens is never half-sent; ``flush()`` releases what was
    held back once the sample ends without hitting a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        at = min((i for i in (full.find(s) for s in self.stop_strings) if i != -1), default=-1)
        if at != -1:
            full, self.stopped = full[:at], True
        else:
            full = full[: len(full) - self._partial_stop(full)]
        return self._advance(full)

    def flush(self) -> str:
        """At the end of the sample: the text held back as a possible stop-string start."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best

    def _advance(self, full: str) -> str:
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
