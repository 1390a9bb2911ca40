import pytest
import torch

from koff.formats.run_memory import load_memory_state, save_memory
from koff.masks import LearnedMask
from koff.memories import DomainMemory, MemoryConfig
from koff.memories import lora as lora_module
from koff.memories.parts import KV_PREFIX, LORA
from koff.model import KoffModel, UnknownMemoryError
from koff.runtime import DecodeBatch, Sampling
from tiny import tiny_model

ARCHS = ["llama", "qwen2"]


def perturb(module, scale=0.05, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("kind", ARCHS)
def test_open_gates_and_empty_memories_reproduce_the_base_exactly(kind):
    base = tiny_model(kind)
    ids = torch.randint(0, 300, (3, 12))
    expected = base(ids).logits
    koff = KoffModel(tiny_model(kind), MemoryConfig(kind="lora"))
    koff.set_mask(LearnedMask(koff.costs))
    koff.new_memory("eng")
    koff.eval()
    assert torch.equal(koff(ids, "eng"), expected)
    assert torch.equal(koff(ids, ["eng", None, "eng"]), expected)


@pytest.mark.parametrize("kind", ARCHS)
def test_kv_memory_starts_as_the_models_own_cache_of_its_text(kind):
    """A fresh KV memory over text t makes the model behave as if t preceded the input."""
    base = tiny_model(kind)
    text, ids = torch.randint(0, 300, (6,)), torch.randint(0, 300, (2, 9))
    expected = base(torch.cat([text.expand(2, -1), ids], dim=1)).logits[:, 6:]
    koff = KoffModel(tiny_model(kind), MemoryConfig(kind="lora+kv", kv_slots=6))
    koff.new_memory("eng", text)
    assert torch.allclose(koff(ids, "eng"), expected, atol=1e-5)


@pytest.fixture(params=["concatenated", "gathered"])
def mixed_path(request, monkeypatch):
    """Both ways a mixed batch adds its LoRA updates: few memories side by side, many gathered."""
    if request.param == "gathered":
        monkeypatch.setattr(lora_module, "CONCATENATED_MEMORIES", 0)
    return request.param


@pytest.mark.parametrize("kind", ARCHS)
def test_mixed_batch_equals_each_sample_alone(kind, mixed_path):
    koff = KoffModel(tiny_model(kind), MemoryConfig(kind="lora+kv", kv_slots=4))
    for i, name in enumerate(["a", "b", "c"]):
        perturb(koff.new_memory(name, torch.randint(0, 300, (8,))), seed=i)
    koff.eval()
    ids = torch.randint(0, 300, (4, 10))
    for domains in (["a", "c", "b", "a"], ["a", None, "b", None]):  # batched path, then segmented path (bare backbone in the mix)
        mixed = koff(ids, domains)
        for i, d in enumerate(domains):
            assert torch.allclose(mixed[i : i + 1], koff(ids[i : i + 1], d), atol=1e-5)


def test_mixed_batch_with_different_ranks_and_slot_counts(mixed_path):
    koff = KoffModel(tiny_model("llama"), MemoryConfig(kind="lora+kv", kv_slots=4))
    perturb(koff.new_memory("a", torch.randint(0, 300, (8,))))
    shapes = {k: (a.shape[1], koff.memories["a"].lora_B[k].shape[0]) for k, a in koff.memories["a"].lora_A.items()}
    other = DomainMemory("b", shapes, rank=2, alpha=4.0, prefix_shapes=[(2, 16), (2, 16)], slots=7)
    perturb(other, seed=3)
    koff.add_memory(other)
    ids = torch.randint(0, 300, (2, 10))
    mixed = koff(ids, ["a", "b"])
    assert torch.allclose(mixed[:1], koff(ids[:1], "a"), atol=1e-5)
    assert torch.allclose(mixed[1:], koff(ids[1:], "b"), atol=1e-5)


def test_mixed_batch_sees_memories_updated_in_place_between_calls(mixed_path):
    # Inference keeps the concatenated LoRA factors of a mixed batch between calls; a memory trained
    # (updated in place) in between must not be served stale.
    koff = KoffModel(tiny_model("llama"), MemoryConfig(kind="lora"))
    perturb(koff.new_memory("a"))
    koff.eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        before = koff(ids, ["a", None])
        for b in koff.memories["a"].lora_B.values():
            b.mul_(3.0)
        after = koff(ids, ["a", None])
        assert not torch.allclose(before[:1], after[:1], atol=1e-4)
        assert torch.allclose(after[:1], koff(ids[:1], "a"), atol=1e-5)
        assert torch.allclose(after[1:], koff(ids[1:], None), atol=1e-5)


def test_mixed_batch_after_a_memory_is_replaced_uses_the_new_one(mixed_path):
    koff = KoffModel(tiny_model("llama"), MemoryConfig(kind="lora"))
    perturb(koff.new_memory("a"), seed=1)
    koff.eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        koff(ids, ["a", None])
        koff.remove_memory("a")
        perturb(koff.new_memory("a"), seed=2)  # same name, fresh tensors (all at _version 0 again)
        mixed = koff(ids, ["a", None])
        assert torch.allclose(mixed[:1], koff(ids[:1], "a"), atol=1e-5)


def test_memory_kinds_hold_what_they_say():
    for kind, lora, kv in [("lora+kv", True, True), ("lora", True, False), ("kv", False, True)]:
        koff = KoffModel(tiny_model("llama"), MemoryConfig(kind=kind, kv_slots=3))
        memory = koff.new_memory("x", torch.arange(5))
        assert bool(memory.lora_parameters()) == lora and memory.has_prefix == kv
    with pytest.raises(ValueError, match="unknown memory kind"):
        MemoryConfig(kind="prefix")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        MemoryConfig(lora_targets=["q_proj", "lm_head"])


def test_a_memory_kind_names_its_parts_and_each_part_owns_its_tensors():
    assert MemoryConfig(kind="lora+kv").parts == (LORA, KV_PREFIX)
    assert MemoryConfig(kind="lora").parts == (LORA,) and MemoryConfig(kind="kv").parts == (KV_PREFIX,)
    assert MemoryConfig(kind="none").parts == ()
    memory = DomainMemory("x", {"0_q_proj": (8, 16)}, 4, 8.0, [(2, 4)], 3)
    state = memory.flat_state()
    assert {n for n in state if LORA.owns(n)} == {"lora_A.0_q_proj", "lora_B.0_q_proj"}
    assert {n for n in state if KV_PREFIX.owns(n)} == {"prefix.keys.0", "prefix.values.0"}
    assert LORA.parameters(memory) == memory.lora_parameters() and len(KV_PREFIX.parameters(memory)) == 2
    again = DomainMemory.from_flat_state("x", state, 8.0)
    assert (again.rank, again.slots) == (4, 3) and again.prefix_keys[0].shape == (2, 3, 4)
    lora_only = memory.keeping([LORA], "x-lora")
    assert lora_only.name == "x-lora" and not lora_only.has_prefix and lora_only.scaling == memory.scaling
    assert torch.equal(lora_only.lora_A["0_q_proj"], memory.lora_A["0_q_proj"])
    assert set(memory.keeping([KV_PREFIX]).flat_state()) == {"prefix.keys.0", "prefix.values.0"}


def test_unknown_memory_and_short_kv_text_are_refused():
    koff = KoffModel(tiny_model("llama"), MemoryConfig(kind="lora+kv", kv_slots=8))
    with pytest.raises(ValueError, match="needs 8 tokens"):
        koff.new_memory("x", torch.arange(3))
    koff.new_memory("eng", torch.arange(8))
    with pytest.raises(UnknownMemoryError, match="unknown memory 'deu'; this model holds: eng"):
        koff(torch.zeros(1, 4, dtype=torch.long), "deu")


def test_memory_files_round_trip(tmp_path):
    koff = KoffModel(tiny_model("qwen2"), MemoryConfig(kind="lora+kv", kv_slots=4))
    memory = koff.new_memory("eng", torch.arange(8))
    perturb(memory)
    save_memory(memory, tmp_path / "eng", {"note": "test"})
    manifest, tensors = load_memory_state(tmp_path / "eng")
    assert manifest["name"] == "eng" and manifest["kv_slots"] == 4 and manifest["note"] == "test"
    assert manifest["parameters"] == memory.num_parameters()
    fresh = KoffModel(tiny_model("qwen2"), MemoryConfig(kind="lora+kv", kv_slots=4)).new_memory("eng", torch.arange(8))
    fresh.load_flat_state(tensors)
    assert all(torch.equal(a, b) for a, b in zip(memory.parameters(), fresh.parameters()))
    with pytest.raises(ValueError, match="do not match"):
        fresh.load_flat_state({k: v for k, v in tensors.items() if "prefix" not in k})


def test_decode_batch_forgets_samples_that_left():
    # A long-running server adds and stops samples forever: none may stay behind, even one stopped
    # before its prefill.
    koff = KoffModel(tiny_model("llama"), MemoryConfig(kind="lora")).eval()
    batch = DecodeBatch(koff, 0, set())
    batch.stop(batch.add([1, 2, 3], None, Sampling(4)))  # the client left before the first step
    batch.add([4, 5], None, Sampling(1))
    batch.step()
    batch.step()
    assert len(batch) == 0 and batch._by_key == {} and batch.rows == []


def test_single_memory_inference_reuses_cast_factors_and_sees_updates():
    # Decoding with one memory keeps its factors cast to the model's dtype (B already scaled): after
    # the first step the memory adds no cast to the model's own, the output equals the training
    # path's, and a memory updated in place is not served stale.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Casts.count += func.__name__.startswith("_to_copy")
            return func(*args, **(kwargs or {}))

    koff = KoffModel(tiny_model("llama").to(torch.bfloat16), MemoryConfig(kind="lora"))
    perturb(koff.new_memory("a"))  # the memory stays in float32, as trained
    koff.eval()
    ids = torch.randint(0, 300, (1, 6))
    training_path = koff(ids, "a")  # gradients enabled: the factors are cast on every call
    with torch.no_grad():
        assert torch.allclose(koff(ids, "a").float(), training_path.float(), atol=1e-2)
        with Casts():
            koff(ids, None)  # the model's own casts (norms in float32, ...)
        bare, Casts.count = Casts.count, 0
        with Casts():
            koff(ids, "a")
        assert Casts.count == bare > 0
        before = koff(ids, "a")
        for b in koff.memories["a"].lora_B.values():
            b.mul_(3.0)
        after = koff(ids, "a")
    assert not torch.allclose(after.float(), before.float(), atol=1e-3)
    assert torch.allclose(after.float(), koff(ids, "a").float(), atol=1e-2)  # the training path agrees
