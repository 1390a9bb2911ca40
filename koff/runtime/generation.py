"""Batched generation where every sample may use its own memory, and samples join and leave a
running batch between steps.

The prompts are left-padded; each sample's KV prefix sits in the cache before its prompt and its
positions start right after its own prefix, so a sample's tokens are the same whether it runs
alone or in a mixed batch (up to float rounding).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from koff.errors import KoffError, UserInputError
from koff.memories.memory import DomainMemory
from koff.memories.prefix import prefix_inputs
from koff.model import KoffModel
from koff.models.attention_mask import decode_attention_mask
from koff.models.cache_api import cache_inputs, returned_cache
from koff.runtime.sampling import RowSampling, Sampling


class GenerationError(KoffError):
    """A sample could not be continued (its model output was not finite)."""


@dataclass
class _Row:
    """One sample of a running batch."""

    key: int
    memory: DomainMemory | None
    params: Sampling
    count: int = 0  # tokens generated
    done: bool = False


def host_values(tensor: torch.Tensor) -> list:
    """The one read back to the host that a decoding step makes (on a GPU, a wait for the device)."""
    return tensor.tolist()


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros on the left of ``dim`` up to ``length`` (the padding is masked out by the caller)."""
    pad = [0, 0] * (t.dim() - 1 - dim) + [length - t.shape[dim], 0]
    return torch.nn.functional.pad(t, pad)


class DecodeBatch:
    """A running generation batch that prompts join and leave between steps (continuous batching).

    ``add`` queues a prompt with its memory and sampling; each ``step`` feeds every running sample
    its last token (one forward for all, each with its own LoRA and KV prefix), then prefills the
    prompts that joined since (one forward for those) and merges their caches into the running one.
    Caches are left-padded to one length with the padding masked out and positions are per sample,
    so a sample's tokens do not depend on who else is in the batch (up to float rounding).
    Finished samples leave the cache at the next step.

    A step that no sample joins or leaves reads the device once: the new tokens with their
    finiteness flags (``host_values``). The tokens to feed next, the sampling settings and the
    rows' memory routing stay on the device from one step to the next.
    """

    def __init__(self, model: KoffModel, pad_id: int, eos_ids: set[int]):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids
        self.rows: list[_Row] = []
        self.pending: list[tuple[_Row, list[int]]] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 = a real prefix slot or token
        self.next_position: torch.Tensor | None = None  # (rows, 1)
        self.last: torch.Tensor | None = None  # (rows, 1): the tokens to feed next, on the device
        self.sampling: RowSampling | None = None
        self._new_column: torch.Tensor | None = None  # (rows, 1) ones: the mask of the token fed next
        self._keys = itertools.count()
        self._by_key: dict[int, _Row] = {}
        self._failed: dict[int, str] = {}  # key -> why that sample stopped without a token

    def add(self, prompt: Sequence[int], memory: str | None, params: Sampling) -> int:
        """Queue a prompt (token ids); it is prefilled on the next step. Returns its key."""
        if len(prompt) == 0:
            raise UserInputError("every prompt needs at least one token")
        params.validate()
        resolved = self.model.resolve([memory], 1)[0]
        row = _Row(next(self._keys), resolved, params)
        self.pending.append((row, list(prompt)))
        self._by_key[row.key] = row
        return row.key

    def stop(self, key: int) -> None:
        self._by_key[key].done = True

    def is_done(self, key: int) -> bool:
        return self._by_key[key].done

    def take_failures(self) -> dict[int, str]:
        """Samples that failed alone since the last call (key -> reason); the others went on."""
        failed, self._failed = self._failed, {}
        return failed

    def __len__(self) -> int:
        """Samples still generating (running or waiting for their prefill)."""
        return sum(not r.done for r in self.rows) + sum(not r.done for r, _ in self.pending)

    @torch.no_grad()
    def step(self) -> list[tuple[int, int]]:
        """One token for every unfinished sample: (key, token id) pairs."""
        self._drop_finished()
        tokens = self._decode() if self.rows else []
        for row, _ in self.pending:
            if row.done:  # stopped before its prefill
                del self._by_key[row.key]
        self.pending = [(r, p) for r, p in self.pending if not r.done]
        if self.pending:
            tokens += self._prefill()
        return tokens

    def _decode(self) -> list[tuple[int, int]]:
        self.mask = torch.cat([self.mask, self._new_column], dim=1)
        model = self.model
        mask = decode_attention_mask(self.mask, model.base.config, model.dtype)
        with model.activate([r.memory for r in self.rows]):
            out = model.base(input_ids=self.last, attention_mask=mask, position_ids=self.next_position, use_cache=True,
                             logits_to_keep=1, **cache_inputs(model.base, self.cache))
        self.cache, self.next_position = returned_cache(out), self.next_position + 1
        self.last = self.sampling.choose(out.logits[:, -1])[:, None]
        return self._read(self.rows, out.logits[:, -1], self.last)

    def _prefill(self) -> list[tuple[int, int]]:
        model, device = self.model, self.model.device
        rows, prompts = [r for r, _ in self.pending], [p for _, p in self.pending]
        self.pending = []
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        prompt_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        with model.activate([r.memory for r in rows]) as active:
            cache, mask, positions = prefix_inputs(active, model.base.config, model.dtype, prompt_mask)
            cache = cache if cache is not None else DynamicCache(config=model.base.config)
            out = model.base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **cache_inputs(model.base, cache))
        sampling = RowSampling([r.params for r in rows], device)
        last = sampling.choose(out.logits[:, -1])[:, None]
        tokens = self._read(rows, out.logits[:, -1], last)
        self._merge(rows, returned_cache(out), mask, positions[:, -1:] + 1, last, sampling)
        return tokens

    def _read(self, rows: list[_Row], logits: torch.Tensor, chosen: torch.Tensor) -> list[tuple[int, int]]:
        """The chosen token of each unfinished row, read in one copy with each row's finiteness;
        a row whose logits are not finite ends on its own (see ``take_failures``), the others go on."""
        finite = torch.isfinite(logits).all(-1, keepdim=True)
        tokens, flags = zip(*host_values(torch.cat([chosen, finite.long()], dim=1)))
        chosen_tokens = []
        for row, token, is_finite in zip(rows, tokens, flags):
            if row.done:
                continue
            if not is_finite:
                row.done = True
                self._failed[row.key] = "the model's output for this sample is not finite (NaN or infinity)"
                continue
            row.count += 1
            row.done = token in self.eos_ids or row.count >= row.params.max_new_tokens
            chosen_tokens.append((row.key, token))
        return chosen_tokens

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, next_position: torch.Tensor,
               last: torch.Tensor, sampling: RowSampling) -> None:
        """Append newly prefilled samples to the running batch, left-padding the shorter cache."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_position = rows, cache, mask, next_position
            self.last, self.sampling = last, sampling
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            merged = DynamicCache(config=self.model.base.config)
            for i, (old, new) in enumerate(zip(self.cache.layers, cache.layers)):
                keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)])
                values = torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)])
                merged.update(keys, values, i)
            self.cache = merged
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.next_position = torch.cat([self.next_position, next_position])
            self.last = torch.cat([self.last, last])
            self.sampling = RowSampling.joined([self.sampling, sampling])
            self.rows = self.rows + rows
        self._new_column = self.mask.new_ones(len(self.rows), 1)

    def _drop_finished(self) -> None:
        """Remove finished samples, and cache columns that no remaining sample attends to."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        for r in self.rows:
            if r.done:
                del self._by_key[r.key]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_position, self.last, self.sampling = [], None, None, None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())  # columns before it are padding for every sample left
        pruned = DynamicCache(config=self.model.base.config)
        for i, layer in enumerate(self.cache.layers):
            pruned.update(layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:], i)
        self.rows = [self.rows[i] for i in keep]
        self.cache, self.mask, self.next_position = pruned, mask[:, first:], self.next_position.index_select(0, index)
        self.last, self.sampling = self.last.index_select(0, index), self.sampling.select(index)
        self._new_column = self.mask.new_ones(len(self.rows), 1)


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
        if not prompts:
            raise UserInputError("no prompts to generate for")
        self.batch = DecodeBatch(model, pad_id, eos_ids)
        self.keys = [self.batch.add(p, m, s) for p, m, s in zip(prompts, memories, params, strict=True)]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.done = [False] * len(prompts)

    def stop(self, index: int) -> None:
        self.batch.stop(self.keys[index])
        self.done[index] = True

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while len(self.batch):
            step = [(self.index[key], token) for key, token in self.batch.step()]
            failed = self.batch.take_failures()
            if failed:
                key, reason = next(iter(failed.items()))
                raise GenerationError(f"generation failed for prompt {self.index[key]}: {reason}")
            for i, _ in step:
                self.done[i] = self.batch.is_done(self.keys[i])
            if step:
                yield step


class TextStream:
    """Turns one sample's tokens into text deltas.

    Each token decodes a short window of the latest ids, not the whole text (the window starts
    where the previous delta's ids began, so a tokenizer that spells a token differently at the
    start of a text does so in both halves of the difference), so streaming n tokens costs O(n).
    Holds back an incomplete multi-byte character, and any tail that may be the start of a stop
    string, so a stop string split over tokens is never half-sent; ``flush()`` releases what was
    held back once the sample ends without hitting a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.decoded = ""  # the text of ids[:read_offset]
        self.prefix_offset = self.read_offset = 0
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        self.ids.append(token)
        new = self._decode_new()
        if new is None:  # a multi-byte character is not complete yet
            return ""
        full = self.decoded = self.decoded + new
        at = min((i for i in (full.find(s) for s in self.stop_strings) if i != -1), default=-1)
        if at != -1:
            full, self.stopped = full[:at], True
        else:
            full = full[: len(full) - self._partial_stop(full)]
        return self._advance(full)

    def _decode_new(self) -> str | None:
        """The text the ids since ``read_offset`` add, or None while it ends in a partial character."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        window = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if window.endswith("\ufffd"):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(before):]

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
