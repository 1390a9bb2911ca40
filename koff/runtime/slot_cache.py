"""A preallocated KV cache for a running batch: one slot (batch row) per request, one shared column
per decoding step.

A ``DynamicCache`` grows by ``torch.cat`` in every layer at every step (a copy of the whole cache per
token), and a request that joins or leaves a batch built on it copies the whole cache again. Here
every layer's keys and values are allocated once, (slots, kv heads, capacity, head dim), and:

* a decoding step writes the new keys of every slot into the same column (``index_copy_`` at a
  column index kept on the device) and attention reads a view of the columns in use, rounded up to
  a multiple of 64, so a step allocates no cache memory and never copies it;
* a request is admitted into a free slot once: its prefilled keys (the memory's KV prefix, then
  its prompt) are written so that they end right before the shared column; nothing else moves;
* a request that leaves frees its slot; the slot is reused by the next request that joins.

Each row's tokens sit in consecutive columns ending at the shared column, exactly as in a left-padded
batch, so transformers' own masks (causal, sliding window) apply unchanged; ``attend`` (slots,
capacity) marks the columns a row may see. Only admission moves data when it must: a prompt longer
than the columns used so far shifts every row right, and a batch that runs out of columns first drops
columns no row needs any longer, then grows.
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

ALIGN = 64  # columns attended are a multiple of this (kernels prefer it, and shapes change less often)


def round_up(n: int, unit: int = ALIGN) -> int:
    return -(-n // unit) * unit


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values of every slot. ``update`` is a decoding step's write."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "SlotCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values
        self.device, self.is_initialized = keys.device, True
        self._views: tuple = ()  # (rows, visible, keys, key view, value view) of the last step

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotLayer is allocated when its first request is admitted")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        if key_states.shape[2] != 1:
            raise RuntimeError("a slot cache takes one new token per row; prompts are prefilled elsewhere and admitted")
        if owner.whole:
            keys, values = self.keys, self.values
        else:
            keys, values = self._visible(key_states.shape[0], owner.visible)
        keys.index_copy_(2, owner.column_index, key_states)  # the column written is always visible
        values.index_copy_(2, owner.column_index, value_states)
        return keys, values

    def _visible(self, rows: int, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the rows and columns a step uses, made again only when they change (every 64
        steps, or when rows join or leave): each slicing is one more operation dispatched per layer."""
        views = self._views
        if not views or views[0] != rows or views[1] != visible or views[2] is not self.keys:
            views = self._views = (rows, visible, self.keys, self.keys[:rows, :, :visible], self.values[:rows, :, :visible])
        return views[3], views[4]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.visible, 0

    def get_seq_length(self) -> int:
        return self.owner.column

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """Keys, values and the ``attend`` mask of a batch's slots; see the module's docstring.

    ``column`` is where the next decoding step writes (a host integer: shapes are decided on the
    host without reading the device); ``column_index`` holds the same on the device for the write.
    """

    def __init__(self, whole: bool = False):
        super().__init__(layers=[])
        # Attend to every column (those not in use masked): a step's shapes stay the same while the
        # cache does not grow, as a compiled step needs.
        self.whole = whole
        self.column = 0
        self.column_index: torch.Tensor | None = None
        self.attend: torch.Tensor | None = None  # (slots, capacity) bool

    @property
    def slots(self) -> int:
        return 0 if self.attend is None else self.attend.shape[0]

    @property
    def capacity(self) -> int:
        return 0 if self.attend is None else self.attend.shape[1]

    @property
    def visible(self) -> int:
        """Columns a decoding step attends to: those in use, the one it writes included."""
        return self.capacity if self.whole else min(self.capacity, round_up(self.column + 1))

    def mask(self, rows: int) -> torch.Tensor:
        """A decoding step's (rows, visible) mask: ``attend`` with the column it writes switched on
        for the live rows (set by ``open_column``)."""
        return self.attend[:rows, :self.visible]

    def open_column(self, live: torch.Tensor) -> None:
        """Let each live row (``live``: (rows,) bool, on the device) attend to the column the next
        step writes."""
        self.attend[: live.shape[0], self.column] = live

    def advance(self) -> None:
        """After a decoding step: the next one writes the next column."""
        self.column += 1
        self.column_index.add_(1)

    def admit(self, slots: torch.Tensor, prefilled: Cache, prefilled_mask: torch.Tensor, live: torch.Tensor | None,
              room: int, rows_needed: int) -> None:
        """Write a prefilled group of requests into ``slots`` so that their columns end right before
        ``column``; make the cache at least ``rows_needed`` slots tall, able to take ``room`` more columns.

        ``prefilled_mask`` (group, length) is the group's mask over its own prefix slots and prompt;
        ``live`` (rows,) bool marks the rows already running (None when none runs): the columns they
        still attend to are read on the host only when the cache runs out of columns."""
        length = prefilled_mask.shape[1]
        if not self.layers:
            self._allocate(prefilled, rows_needed, round_up(length + room))
        if live is None:  # the batch starts anew: its first columns are the group's
            self.column = length
            self.column_index.fill_(length)
        if max(self.column, length) + room > self.capacity and live is not None:
            self._drop_unused_columns((self.attend[: live.shape[0]] & live[:, None]).any(0))
        shift = max(0, length - self.column)
        self._reshape(max(rows_needed, self.slots), max(self.capacity, round_up(self.column + shift + room)))
        if shift:
            self._shift_right(shift)
        self._write(slots, prefilled, prefilled_mask)

    # ----- geometry ---------------------------------------------------------------------------
    def _allocate(self, prefilled: Cache, slots: int, capacity: int) -> None:
        device = prefilled.layers[0].keys.device
        self.attend = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.column_index = torch.zeros(1, dtype=torch.long, device=device)
        for layer in prefilled.layers:
            shape = (slots, layer.keys.shape[1], capacity, layer.keys.shape[3])
            keys = torch.zeros(shape, dtype=layer.keys.dtype, device=device)
            values = torch.zeros(shape[:3] + (layer.values.shape[3],), dtype=layer.values.dtype, device=device)
            self.layers.append(SlotLayer(self, keys, values))
        self._mark_static()

    def _reshape(self, slots: int, capacity: int) -> None:
        """Grow to ``slots`` x ``capacity`` (a copy of what is held, only when either grows)."""
        if slots == self.slots and capacity == self.capacity:
            return
        self.attend = _grown(self.attend, slots, capacity, dims=(0, 1))
        for layer in self.layers:
            layer.keys = _grown(layer.keys, slots, capacity, dims=(0, 2))
            layer.values = _grown(layer.values, slots, capacity, dims=(0, 2))
        self._mark_static()

    def _mark_static(self) -> None:
        """For a compiled step: the cache's tensors keep their addresses while they keep their size,
        so CUDA graphs that read and write them stay valid."""
        if self.whole:
            for tensor in (self.attend, self.column_index, *(t for layer in self.layers for t in (layer.keys, layer.values))):
                torch._dynamo.mark_static_address(tensor)

    def _column_tensors(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Every tensor with a column axis, and that axis."""
        yield self.attend, 1
        for layer in self.layers:
            yield layer.keys, 2
            yield layer.values, 2

    def _shift_right(self, shift: int) -> None:
        """Move every row ``shift`` columns right (a prompt longer than the columns used so far joins)."""
        used = self.column
        for tensor, dim in self._column_tensors():
            tensor.narrow(dim, shift, used).copy_(tensor.narrow(dim, 0, used).clone())
            tensor.narrow(dim, 0, shift).zero_()
        self.column += shift
        self.column_index.fill_(self.column)

    def _drop_unused_columns(self, live_columns: torch.Tensor) -> None:
        """Move the columns from the first one a running row attends to, to column 0 (one read of
        the device: admission only)."""
        used = live_columns[: self.column]
        first = int(torch.cat([used, used.new_ones(1)]).long().argmax())  # self.column when none is used
        if first == 0:
            return
        kept = self.column - first
        for tensor, dim in self._column_tensors():
            tensor.narrow(dim, 0, kept).copy_(tensor.narrow(dim, first, kept).clone())
            tensor.narrow(dim, kept, first).zero_()
        self.column = kept
        self.column_index.fill_(self.column)

    def _write(self, slots: torch.Tensor, prefilled: Cache, prefilled_mask: torch.Tensor) -> None:
        """The group's keys and values into its slots, each layer's ending at ``column`` (a sliding
        window layer holds fewer columns: those before them are zero and outside its window)."""
        end = self.column
        self.attend.index_fill_(0, slots, False)
        length = prefilled_mask.shape[1]
        self.attend[:, end - length:end].index_copy_(0, slots, prefilled_mask.bool())
        for layer, new in zip(self.layers, prefilled.layers):
            for held, given in ((layer.keys, new.keys), (layer.values, new.values)):
                held.index_fill_(0, slots, 0)
                kept = given.shape[2]
                held[:, :, end - kept:end].index_copy_(0, slots, given.to(held.dtype))


def _grown(tensor: torch.Tensor, rows: int, columns: int, dims: tuple[int, int]) -> torch.Tensor:
    """``tensor`` in a zero tensor ``rows`` long on dims[0] and ``columns`` on dims[1]."""
    shape = list(tensor.shape)
    shape[dims[0]], shape[dims[1]] = rows, columns
    grown = tensor.new_zeros(shape)
    grown.narrow(dims[0], 0, tensor.shape[dims[0]]).narrow(dims[1], 0, tensor.shape[dims[1]]).copy_(tensor)
    return grown
