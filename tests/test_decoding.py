"""The decoding step as a GPU needs it: one read of the device per step, sampling on the device
with per-request seeds, and no training machinery left on an exported backbone."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import koff.runtime.generation as generation
from koff.export import export_run
from koff.runtime import Sampling, load
from koff.memories.lora import RoutedLoRALinear
from koff.runtime.sampling import RowSampling, uniform_noise
from test_export import make_run

# Operations that read a value back to the host (on a GPU: wait for every queued kernel).
SYNCHRONISING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
                 "aten.equal", "aten.is_nonzero", "aten.item"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCHRONISING:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def runtime(tmp_path, corpus):
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    return load(tmp_path / "export")


def test_a_decoding_step_reads_the_device_once(runtime, monkeypatch):
    reads = []
    monkeypatch.setattr(generation, "host_values", lambda t: reads.append(t.shape) or t.tolist())
    batch = runtime.new_batch()
    for prompt, memory, sampling in [("the cat", "eng", Sampling(12)), ("def f", "code", Sampling(12, 1.0, 0.9, 3)),
                                     ("a dog", None, Sampling(12, 0.7)), ("x", "eng", Sampling(12, 0.5, 1.0, 5))]:
        batch.add(runtime.encode(prompt), memory, sampling)
    batch.step()  # the prefill: admission may copy to and from the device
    reads.clear()
    for _ in range(5):
        with SyncCounter() as counter:
            tokens = batch.step()
        assert len(tokens) == 4 and not counter.ops, counter.ops
    assert reads == [torch.Size([4, 2])] * 5  # the new tokens with their finiteness flags, once per step


def test_an_exported_backbone_runs_without_gate_hooks(runtime, tmp_path):
    projections = [p for parts in runtime.model.layout.layers for p in (parts.projection("down_proj"), parts.projection("o_proj"))]
    assert not any(p._forward_pre_hooks for p in projections)


def test_a_seeded_request_samples_the_same_alone_and_in_a_mixed_batch(runtime):
    prompts, memories = ["the cat sat", "def f(x):", "the dog ran over the hill"], ["eng", "code", None]
    together = runtime.generate(prompts, memory=memories, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11)
    alone = [runtime.generate(p, memory=m, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11)
             for p, m in zip(prompts, memories)]
    assert together == alone
    other_seed = runtime.generate(prompts[0], memory="eng", max_new_tokens=10, temperature=1.0, seed=12)
    unseeded = {runtime.generate(prompts[0], memory="eng", max_new_tokens=10, temperature=1.0) for _ in range(3)}
    assert other_seed != alone[0] or len(unseeded) > 1  # the seed, not something fixed, drives the draws


def rows(n: int, **sampling) -> RowSampling:
    return RowSampling([Sampling(seed=s, **sampling) for s in range(n)], torch.device("cpu"))


def test_draws_follow_the_softmax_of_the_tempered_logits():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature in (1.0, 0.5):
        drawn = rows(n, temperature=temperature).choose(logits.expand(n, -1))
        frequencies = torch.bincount(drawn, minlength=4).float() / n
        assert torch.allclose(frequencies, torch.softmax(logits / temperature, -1), atol=0.015)


def test_nucleus_keeps_only_the_most_likely_tokens_and_greedy_rows_take_the_argmax():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    drawn = rows(n, temperature=1.0, top_p=0.7).choose(logits.expand(n, -1))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 then 0.3: the nucleus of 0.7 needs both, no more
    mixed = RowSampling([Sampling(temperature=0.0), Sampling(temperature=1e-9), Sampling(temperature=1.0, seed=1)],
                        torch.device("cpu"))
    assert mixed.choose(torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 3))[:2].tolist() == [1, 1]


def test_noise_depends_on_seed_and_step_only():
    seeds = torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0])
    first = uniform_noise(*seeds, torch.tensor([0, 0, 0]), 1000)
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert not torch.equal(first, uniform_noise(*seeds, torch.tensor([1, 1, 1]), 1000))
    assert 0 < first.min() and first.max() < 1 and abs(first.mean().item() - 0.5) < 0.03
    joined = RowSampling.joined([rows(2, temperature=1.0), rows(1, temperature=0.0)])
    assert joined.any_sampled and joined.temperature.tolist() == [1.0, 1.0, 0.0]
    joined.put(torch.tensor([2]), rows(1, temperature=0.5))  # a request takes a free slot
    assert joined.temperature.tolist() == [1.0, 1.0, 0.5] and joined.seed_lo.tolist() == [0, 1, 0]
    head = joined.head(2, [Sampling()])
    head.choose(torch.zeros(2, 5))  # the head shares the slots' step counters
    assert not head.any_sampled and joined.step.tolist() == [1, 1, 0]


def test_a_memory_merged_into_the_weights_gives_the_same_logits_and_text(runtime, tmp_path):
    merged = load(tmp_path / "export", merge_lora=True)
    ids = torch.tensor([runtime.encode("the cat sat on the mat")])
    wrappers = [m for m in merged.model.base.modules() if isinstance(m, RoutedLoRALinear)]
    assert any(w.key in m.lora_B and m.lora_B[w.key].abs().sum() > 0 for w in wrappers for m in merged.model.memories.values())
    with torch.no_grad():
        for memory in ("eng", "code", None):
            assert torch.allclose(merged.model(ids, memory), runtime.model(ids, memory), atol=1e-5)
    assert all(w._merged.memories == (merged.model.memories["code"],) for w in wrappers)  # the last one alone
    for prompt, memory in [("the cat sat", "eng"), ("def f(x):", "code")]:
        assert merged.generate(prompt, memory=memory, max_new_tokens=12) == runtime.generate(prompt, memory=memory, max_new_tokens=12)
    mixed = (["the cat sat", "def f(x):", "a dog"], ["eng", "code", None])
    assert merged.generate(mixed[0], memory=mixed[1], max_new_tokens=8) == runtime.generate(mixed[0], memory=mixed[1], max_new_tokens=8)
    merged.remove_memory("code")
    assert all(w._merged is None for w in wrappers)  # an unloaded memory's merged weights are let go


def test_a_compiled_runtime_writes_the_same_text_and_follows_its_memories(runtime, tmp_path):
    compiled = load(tmp_path / "export", compile=True)
    mixed = (["the cat sat", "def f(x):", "a dog"], ["eng", "code", None])
    assert compiled.generate(mixed[0], memory=mixed[1], max_new_tokens=8) == runtime.generate(mixed[0], memory=mixed[1], max_new_tokens=8)
    compiled.remove_memory("code")  # the memories side by side are taken again, without it
    assert compiled.generate("the cat sat", memory="eng", max_new_tokens=8) == runtime.generate("the cat sat", memory="eng", max_new_tokens=8)
    held = [m._held for m in compiled.model.base.modules() if isinstance(m, RoutedLoRALinear)]
    assert all(h is None or h[0].shape[0] == compiled.model.memories["eng"].rank for h in held)


def test_training_never_runs_on_merged_weights(runtime):
    runtime.model.batch_memories.merge_single = True
    ids = torch.tensor([runtime.encode("the cat sat")])
    runtime.model(ids, "eng").sum().backward()
    memory = runtime.model.memories["eng"]
    assert all(p.grad is not None for p in memory.lora_B.values())
