"""What makes large models fit: bf16, recomputed layers, chunked losses. Each must change memory,
never the numbers (beyond float rounding)."""

import pytest
import torch

from koff.masks import LearnedMask
from koff.memories import MemoryConfig
from koff.model import KoffModel
from koff.scoring import chunked_losses
from tiny import tiny_model


def koff_model(kind: str, layers: int = 3) -> KoffModel:
    model = KoffModel(tiny_model(kind, layers=layers), MemoryConfig("lora+kv", lora_rank=4, kv_slots=3))
    model.set_mask(LearnedMask(model.costs, init_log_alpha=1.0))  # gates often between 0 and 1
    torch.manual_seed(1)
    for name in ("eng", "code"):
        memory = model.new_memory(name, torch.randint(0, 300, (8,)))
        with torch.no_grad():
            for p in memory.lora_B.values():
                p.normal_(0, 0.05)  # B starts at zero; give the update a value so its gradient reaches A
    return model.train()


def gradients_of(model: KoffModel, ids: torch.Tensor, domains, checkpointing: bool) -> tuple[torch.Tensor, dict]:
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same gate samples in both runs
    hidden = model(ids, domains, hidden=True)
    loss, _ = chunked_losses(hidden, model.head, ids)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_recomputed_layers_give_the_same_loss_and_gradients(kind):
    model = koff_model(kind)
    ids = torch.randint(0, 300, (3, 10))
    domains = ["eng", None, "code"]  # mixed routing, a sample without memory, KV prefixes
    loss, grads = gradients_of(model, ids, domains, checkpointing=False)
    loss_ckpt, grads_ckpt = gradients_of(model, ids, domains, checkpointing=True)
    assert model.gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    kinds = {name.split(".")[0] + ("." + name.split(".")[2] if name.startswith("memories") else "") for name in grads}
    assert {"mask", "memories.lora_A", "memories.lora_B", "memories.prefix_keys", "memories.prefix_values"} <= kinds
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    model.gradient_checkpointing = False
    assert not model.gradient_checkpointing


def test_recomputed_layers_keep_their_activations_out_of_memory():
    """Checkpointing must actually drop what the layers save for backward."""
    model = koff_model("llama", layers=4)
    ids = torch.randint(0, 300, (2, 64))

    def saved_bytes(checkpointing: bool) -> int:
        model.gradient_checkpointing = checkpointing
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, ["eng", "code"], hidden=True)
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_losses_equal_the_whole_batch_at_once(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    teacher = torch.randn(3, 11, 16)
    ids = torch.randint(0, 50, (3, 11))

    def run(chunk_tokens: int):
        hidden.grad = None
        loss, kl = chunked_losses(hidden, head, ids, teacher, chunk_tokens)
        (loss.mean() + 0.5 * kl).backward()
        return loss.detach(), kl.detach(), hidden.grad.clone()

    whole = run(0)
    chunked = run(chunk)
    assert whole[0].shape == (3, 10)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)
    # the same numbers the plain definitions give
    log_probs = head(hidden).log_softmax(-1)
    plain = -log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(whole[0], plain.detach())
    t = head(teacher).log_softmax(-1)
    torch.testing.assert_close(whole[1], (t.exp() * (t - log_probs)).sum(-1).mean().detach())


def test_a_bfloat16_run_trains_and_its_export_matches_the_masked_model(tmp_path, corpus):
    import json

    from safetensors import safe_open

    from koff.export import export_run, load_run
    from koff.runtime import load
    from koff.training import DecomposeConfig, Decomposer
    from tiny import save_tiny

    config = DecomposeConfig(
        model=save_tiny(tmp_path / "model"), domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"],
        out=str(tmp_path / "run"), dtype="bfloat16", block_len=32, batch_size=2, kv_slots=4, steps=8, sparsity=0.2,
        eval=False, lr_lora=0.02, lr_kv=0.05, gradient_checkpointing="on", loss_chunk_tokens=24)
    dec = Decomposer(config)
    dec.train()
    assert dec.model.dtype == torch.bfloat16 and dec.model.gradient_checkpointing
    trainable = dict(dec._trainable())
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # gates, memories, lambdas
    losses = [json.loads(line)["lm"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0]

    export_run(tmp_path / "run", tmp_path / "export")
    shards = list((tmp_path / "export" / "backbone").glob("*.safetensors"))
    with safe_open(shards[0], "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # the base's dtype, not widened
    masked = load_run(tmp_path / "run").koff_model()
    runtime = load(tmp_path / "export", dtype="bfloat16")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        for name in (None, "eng", "code"):
            torch.testing.assert_close(runtime.model(ids, name).float(), masked(ids, name).float(), atol=0.05, rtol=0.02)


def test_export_of_an_auto_dtype_run_keeps_the_dtype_the_base_is_stored_in(tmp_path, corpus):
    """A bf16 model decomposed with --dtype auto on a CPU trains in fp32; its backbone stays bf16."""
    from safetensors import safe_open

    from koff.export import export_run
    from koff.runtime import load
    from koff.training import DecomposeConfig, Decomposer
    from tiny import tiny_tokenizer

    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    config = DecomposeConfig(model=str(tmp_path / "model"), domain=[f"eng={corpus['eng']}"], out=str(tmp_path / "run"),
                             block_len=32, batch_size=2, kv_slots=4, steps=2, sparsity=0.2, eval=False)
    dec = Decomposer(config)
    dec.train()
    assert config.dtype == "auto" and dec.model.dtype == torch.float32
    export_run(tmp_path / "run", tmp_path / "export")
    shard = next((tmp_path / "export" / "backbone").glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "export").model(ids, "eng"), dec.model.eval()(ids, "eng"),
                                   atol=0.05, rtol=0.02)


def test_the_cache_goes_in_and_comes_out_under_the_name_the_model_takes():
    """transformers 5.24 renamed the models' ``past_key_values`` argument and output to ``cache`` (the
    old argument goes in 5.40); koff passes and reads whichever the model has."""
    from types import SimpleNamespace

    from torch import nn

    from koff.models.cache_api import cache_inputs, given_cache, returned_cache

    class Before(nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return past_key_values

    class After(nn.Module):
        def forward(self, input_ids, cache=None):
            return cache

    cache = object()
    for model in (Before(), After()):
        assert model(None, **cache_inputs(model, cache)) is cache
    assert returned_cache(SimpleNamespace(cache=cache, past_key_values=None)) is cache
    assert returned_cache(SimpleNamespace(past_key_values=cache)) is cache
    # a checkpointed decoder layer's recompute must restore its cache entry under either name (with
    # neither, the KV prefix is appended twice and the recomputed attention fails)
    assert given_cache({"cache": cache}) is cache and given_cache({"past_key_values": cache}) is cache
    assert given_cache({}) is None
