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
from koff.runtime.compiled_step import compiled_step
from koff.runtime.sampling import RowSampling, Sampling
from koff.runtime.slot_cache import SlotCache


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


class DecodeBatch:
    """A running generation batch that prompts join and leave between steps (continuous batching).

    ``add`` queues a prompt with its memory and sampling; each ``step`` feeds every running sample
    its last token (one forward for all, each with its own LoRA and KV prefix), then prefills the
    prompts that joined since (one forward for those) and admits them into free slots of the
    preallocated cache (``SlotCache``). Positions are per sample and each sample attends only to
    its own columns, so a sample's tokens do not depend on who else is in the batch (up to float
    rounding). A finished sample frees its slot at the next step; nothing else moves.

    A step that no sample joins or leaves reads the device once: the new tokens with their
    finiteness flags (``host_values``). The tokens to feed next, the positions, the sampling settings
    and the rows' memory routing stay on the device from one step to the next, and the step
    allocates no cache memory. Free slots below the highest one in use run along (their output is
    ignored) until a new request takes them.

    ``compile=True`` runs each step's forward compiled (``CompiledStep``): every slot runs, attention
    reads the whole cache, the slots grow by doubling, and LoRA takes every loaded memory side by
    side, so that steps keep the same shapes and code path whatever joins or leaves.
    """

    def __init__(self, model: KoffModel, pad_id: int, eos_ids: set[int], compile: bool = False):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids
        self.slots: list[_Row | None] = []  # slot -> the sample in it
        self.pending: list[tuple[_Row, list[int]]] = []
        self.cache = SlotCache(whole=compile)
        self._compiled = compiled_step(model) if compile else None
        # per slot, on the device: the token to feed next, its position, whether the slot is live
        self.last = self.position = self.live = None
        self.sampling: RowSampling | None = None
        self._width = 0  # slots a step runs: the highest one in use, plus one
        self._memories: list[DomainMemory | None] = []  # per slot of the width: the LoRA routing
        self._head: RowSampling | None = None  # the sampling of the width's slots
        self._keys = itertools.count()
        self._by_key: dict[int, _Row] = {}
        self._failed: dict[int, str] = {}  # key -> why that sample stopped without a token

    @property
    def rows(self) -> list[_Row]:
        """The samples running, in slot order."""
        return [r for r in self.slots if r is not None]

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
        tokens = self._decode() if self._width else []
        for row, _ in self.pending:
            if row.done:  # stopped before its prefill
                del self._by_key[row.key]
        self.pending = [(r, p) for r, p in self.pending if not r.done]
        if self.pending:
            tokens += self._prefill()
        return tokens

    def _decode(self) -> list[tuple[int, int]]:
        model, cache, width = self.model, self.cache, self._width
        cache.open_column(self.live[:width])
        mask = decode_attention_mask(cache.mask(width), model.base.config, model.dtype)
        with model.activate(self._memories):
            if self._compiled is not None:
                logits = self._compiled(self.last[:width], mask, self.position[:width], cache)
            else:
                logits = model.base(input_ids=self.last[:width], attention_mask=mask, position_ids=self.position[:width],
                                    use_cache=True, logits_to_keep=1, **cache_inputs(model.base, cache)).logits[:, -1]
        cache.advance()
        self.position[:width] += 1
        chosen = self._head.choose(logits)
        self.last[:width, 0] = chosen
        return self._read(self.slots[:width], logits, self.last[:width])

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
        self._admit(rows, returned_cache(out), mask, positions[:, -1:] + 1, last, sampling)
        return tokens

    def _read(self, rows: Sequence[_Row | None], logits: torch.Tensor, chosen: torch.Tensor) -> list[tuple[int, int]]:
        """The chosen token of each unfinished row (None: a free slot), read in one copy with each
        row's finiteness; a row whose logits are not finite ends on its own (see ``take_failures``),
        the others go on."""
        finite = torch.isfinite(logits).all(-1, keepdim=True)
        tokens, flags = zip(*host_values(torch.cat([chosen, finite.long()], dim=1)))
        chosen_tokens = []
        for row, token, is_finite in zip(rows, tokens, flags):
            if row is None or row.done:
                continue
            if not is_finite:
                row.done = True
                self._failed[row.key] = "the model's output for this sample is not finite (NaN or infinity)"
                continue
            row.count += 1
            row.done = token in self.eos_ids or row.count >= row.params.max_new_tokens
            chosen_tokens.append((row.key, token))
        return chosen_tokens

    def _admit(self, rows: list[_Row], prefilled: DynamicCache, mask: torch.Tensor, next_position: torch.Tensor,
               last: torch.Tensor, sampling: RowSampling) -> None:
        """Put newly prefilled samples into free slots (the lowest first), growing the slots when
        none is free, and write their caches there."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        taken = (free + list(range(len(self.slots), len(self.slots) + len(rows))))[: len(rows)]  # ascending
        slots = max(len(self.slots), taken[-1] + 1)
        if self._compiled is not None:  # fewer sizes, fewer traces
            slots = 1 << (slots - 1).bit_length()
        running = self.live[: self._width] if self._width else None
        room = max(r.params.max_new_tokens - r.count for r in self.rows + rows)
        index = torch.tensor(taken, device=mask.device)
        self.cache.admit(index, prefilled, mask, running, room, slots)
        if slots > len(self.slots):
            self._grow_slots(slots)
        self.position.index_copy_(0, index, next_position)
        self.last.index_copy_(0, index, last)
        self.live.index_fill_(0, index, True)
        self.sampling.put(index, sampling)
        for slot, row in zip(taken, rows):
            self.slots[slot] = row
        self._resize()

    def _grow_slots(self, slots: int) -> None:
        """Per-slot state for ``slots`` slots (new ones free: greedy, not live)."""
        device, more = self.model.device, slots - len(self.slots)
        filler = RowSampling([Sampling()] * more, device)
        zeros = torch.zeros(more, 1, dtype=torch.long, device=device)
        if self.last is None:
            self.last, self.position, self.sampling = zeros, zeros.clone(), filler
            self.live = torch.zeros(more, dtype=torch.bool, device=device)
        else:
            self.last, self.position = torch.cat([self.last, zeros]), torch.cat([self.position, zeros])
            self.live = torch.cat([self.live, self.live.new_zeros(more)])
            self.sampling = RowSampling.joined([self.sampling, filler])
        self.slots += [None] * more

    def _drop_finished(self) -> None:
        """Free the slots of finished samples."""
        left = [i for i, r in enumerate(self.slots) if r is not None and r.done]
        if not left:
            return
        for i in left:
            del self._by_key[self.slots[i].key]
            self.slots[i] = None
        self.live.index_fill_(0, torch.tensor(left, device=self.live.device), False)
        self._resize()

    def _resize(self) -> None:
        """After rows joined or left: the slots a step runs, their memories and sampling. A free slot
        takes the memory of a live one, so a batch of one memory stays one (its output is ignored)."""
        in_use = [i for i, r in enumerate(self.slots) if r is not None]
        self._width = (len(self.slots) if self._compiled is not None else in_use[-1] + 1) if in_use else 0
        if not in_use:  # the next admission starts the columns anew; the buffers are kept for it
            self._memories, self._head = [], None
            return
        stand_in = self.slots[in_use[0]].memory
        self._memories = [r.memory if r is not None else stand_in for r in self.slots[: self._width]]
        self._head = self.sampling.head(self._width, [self.slots[i].params for i in in_use])
        if self._compiled is not None:  # a free slot updates nothing
            self._compiled.route([r.memory if r is not None else None for r in self.slots])


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
        compile: bool = False,
    ):
        if not prompts:
            raise UserInputError("no prompts to generate for")
        self.batch = DecodeBatch(model, pad_id, eos_ids, compile=compile)
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
