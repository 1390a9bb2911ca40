"""The preallocated cache of a running batch: requests join into free slots, leave without moving
anything, and each sees exactly what a forward pass over its own text alone sees."""

import pytest
import torch

from koff.memories import MemoryConfig
from koff.model import KoffModel
from koff.runtime import DecodeBatch, Sampling
from recording import RecordingBatch
from tiny import tiny_model


def memories_model(kind: str) -> KoffModel:
    koff = KoffModel(tiny_model(kind), MemoryConfig(kind="lora+kv", kv_slots=4))
    for i, name in enumerate(["a", "b"]):
        memory = koff.new_memory(name, torch.randint(0, 300, (8,)))
        torch.manual_seed(i)
        with torch.no_grad():
            for p in memory.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return koff.eval()


# step -> requests (prompt length, memory, new tokens) that join before it. What each exercises:
SCHEDULE = {
    0: [(12, "a", 10)],   # slot 0; 64 columns
    1: [(40, "b", 3)],    # longer than the columns used so far: every row shifts right; slot 1
    2: [(3, None, 50)],   # slot 2; the columns grow to 128
    5: [(6, "b", 4)],     # slot 1 is free again (its sample left): taken, nothing moves
    45: [(20, "a", 80)],  # the columns run out: those before the oldest running sample's are dropped
}


# gemma2: sliding-window layers (window 8); compiled: every slot runs, slots double, LoRA resident
@pytest.mark.parametrize("kind, compiled", [("llama", False), ("gemma2", False), ("llama", True)])
def test_samples_joining_and_leaving_see_what_a_forward_over_their_own_text_sees(kind, compiled):
    torch.manual_seed(0)
    koff = memories_model(kind)
    batch = RecordingBatch(koff, 0, set(), compile=compiled)
    requests, texts, step, geometry = {}, {}, 0, []
    while step in SCHEDULE or len(batch):
        for length, memory, n in SCHEDULE.get(step, []):
            prompt = torch.randint(1, 300, (length,)).tolist()
            key = batch.add(prompt, memory, Sampling(n))
            requests[key], texts[key] = (memory, n), list(prompt)
        for key, token in batch.step():
            texts[key].append(token)
        geometry.append((batch.cache.slots, batch.cache.capacity, batch.cache.column))
        step += 1
    # five requests, three slots (four when compiled: slots double): the fourth reused one
    assert max(s for s, _, _ in geometry) == (4 if compiled else 3)
    assert max(c for _, c, _ in geometry) == 128  # grew once; the last join dropped columns instead
    prompt = torch.randint(1, 300, (150,)).tolist()  # the batch ran empty; a longer request starts it anew
    key = batch.add(prompt, "b", Sampling(5))
    requests[key], texts[key] = ("b", 5), list(prompt)
    while len(batch):
        for k, token in batch.step():
            texts[k].append(token)
    assert batch.cache.capacity == 192
    for key, (memory, n) in requests.items():
        got = batch.logits[key]
        assert len(got) == n
        prompt_length = len(texts[key]) - n
        full = koff(torch.tensor([texts[key][:-1]]), memory)[0, prompt_length - 1:]
        for i, logits in enumerate(got):
            assert torch.allclose(logits, full[i], atol=1e-4), (key, i)


def test_a_decoding_step_writes_in_place():
    # The cache's tensors are allocated at admission; steps write into them and allocate none.
    torch.manual_seed(0)
    batch = DecodeBatch(memories_model("llama"), 0, set())
    batch.add(list(range(1, 9)), "a", Sampling(20))
    batch.add(list(range(1, 4)), None, Sampling(20))
    batch.step()
    held = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers]
    for _ in range(10):
        batch.step()
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers] == held
    assert batch.cache.column == 4 + 8 + 10  # the memory's 4 slots, the longest prompt, 10 steps
