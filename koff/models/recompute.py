"""Activation checkpointing of the decoder layers that keeps koff's per-pass state right.

Hugging Face's own ``gradient_checkpointing_enable`` cannot be used: it drops ``past_key_values``
(the learned KV prefix) inside checkpointed layers, and its recompute runs during ``backward()``,
after ``KoffModel.forward`` has already cleared the gates and the memory routing. Here each
layer's ``forward`` is wrapped (an instance attribute, so the module tree and its state-dict keys
do not change) in ``torch.utils.checkpoint``. At forward time the wrapper takes a snapshot of
every piece of per-pass state it is given (gates, routing) and of the layer's entry in the cache,
and reinstates those while the layer is recomputed.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from koff.models.architecture import DecoderLayout
from koff.models.cache_api import given_cache

Restorer = Callable[[], ContextManager]


class PassState(Protocol):
    """Something a forward pass sets and clears (the gate hooks, the batch's memories)."""

    def snapshot(self) -> Restorer:
        """A context manager factory that, inside, puts the state back as it is now."""


def enable_layer_checkpointing(layout: DecoderLayout, states: Sequence[PassState]) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    for parts in layout.layers:
        layer = parts.layer
        if "forward" in layer.__dict__:
            continue
        layer.forward = _checkpointed(layer.forward, parts.index, states)


def disable_layer_checkpointing(layout: DecoderLayout) -> None:
    for parts in layout.layers:
        parts.layer.__dict__.pop("forward", None)


def layer_checkpointing_enabled(layout: DecoderLayout) -> bool:
    return any("forward" in parts.layer.__dict__ for parts in layout.layers)


def _checkpointed(forward: Callable, index: int, states: Sequence[PassState]) -> Callable:
    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        restorers = [state.snapshot() for state in states]
        restorers.append(_cache_snapshot(given_cache(kwargs), index))

        def context_fn():
            return nullcontext(), _all(restorers)

        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return checkpointed_forward


@contextmanager
def _all(restorers: list[Restorer]) -> Iterator[None]:
    with ExitStack() as stack:
        for restore in restorers:
            stack.enter_context(restore())
        yield


def attribute_snapshot(owner, names: Sequence[str]) -> Restorer:
    """A restorer of ``owner``'s attributes ``names`` as they are now (the same objects, not copies:
    a pass replaces its state rather than changing it in place)."""
    saved = {name: getattr(owner, name) for name in names}

    @contextmanager
    def restore() -> Iterator[None]:
        now = {name: getattr(owner, name) for name in names}
        for name, value in saved.items():
            setattr(owner, name, value)
        try:
            yield
        finally:
            for name, value in now.items():
                setattr(owner, name, value)

    return restore


def _cache_snapshot(cache, index: int) -> Restorer:
    """The layer's cache entry as it was before the layer appended this pass's keys and values (the
    KV prefix); the recompute must append to that, not to what the first pass left."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return nullcontext
    return attribute_snapshot(layers[index], ("keys", "values", "is_initialized"))
