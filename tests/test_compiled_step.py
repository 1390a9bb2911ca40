"""The compiled decoding step (``--compile``): one graph, whatever memories the rows use; a batch's
tokens through it equal the eager step's (``test_slot_cache`` checks its logits against a forward
pass over each sample's own text)."""

import pytest
import torch
from torch._dynamo.utils import counters

from koff.errors import KoffError
from koff.memories.resident import ResidentMemories
from koff.runtime import DecodeBatch, Sampling
from test_slot_cache import memories_model


def generate(batch: DecodeBatch, requests) -> dict[int, list[int]]:
    texts = {batch.add(list(range(1, length + 1)), memory, Sampling(n)): [] for length, memory, n in requests}
    while len(batch):
        for key, token in batch.step():
            texts[key].append(token)
    return texts


def test_a_compiled_step_is_traced_once_whatever_the_rows_memories():
    torch.manual_seed(0)
    koff = memories_model("llama")
    torch._dynamo.reset()
    counters.clear()
    # the same slots and columns, three mixes: two memories, one memory and none, no memory at all
    mixes = [[(5, "a", 6), (9, "b", 6)], [(5, None, 6), (9, "a", 6)], [(5, None, 6), (9, None, 6)]]
    for mix in mixes:
        compiled = generate(DecodeBatch(koff, 0, set(), compile=True), mix)
        assert compiled == generate(DecodeBatch(koff, 0, set()), mix)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_a_compiled_step_refuses_more_memories_than_it_serves_side_by_side():
    koff = memories_model("llama")
    many = [koff.memories["a"]] * 17
    with pytest.raises(KoffError, match="at most 16 memories"):
        ResidentMemories(koff.base, many, koff.device, koff.dtype)
