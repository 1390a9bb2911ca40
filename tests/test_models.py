import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from koff.models import (
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    UnsupportedArchitectureError,
    decoder_layout,
    load_model,
)
from tiny import tiny_model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_layout_finds_every_projection(kind):
    model = tiny_model(kind)
    layout = decoder_layout(model)
    assert layout.model_type == kind
    assert layout.num_layers == 2 and layout.hidden_size == 64
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.heads_per_group) == (4, 2, 16, 2)
    parts = layout.layers[1]
    assert parts.projection("gate_proj").out_features == 96
    assert parts.projection("down_proj").in_features == 96
    assert parts.projection("q_proj").out_features == 4 * 16
    assert parts.projection("k_proj").out_features == 2 * 16
    assert parts.projection("o_proj").in_features == 4 * 16
    assert (parts.projection("q_proj").bias is not None) == (kind == "qwen2")


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError) as err:
        decoder_layout(model)
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)


def test_load_local_folder_is_frozen_and_matches_saved(model_dir):
    loaded = load_model(model_dir)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.source.startswith("folder:")
    assert loaded.tokenizer.pad_token_id is not None
    ids = loaded.tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.shape == (1, ids.shape[1], 300)


def test_load_in_bfloat16(model_dir):
    assert next(load_model(model_dir, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.gguf", "GGUF file not found"),
        ("./no/such/folder", "neither a known name"),
        ("not-a-model-name", "neither a known name"),
    ],
)
def test_bad_specs_are_refused_clearly(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Without network"):
        load_model("someone/not-cached-model-xyz")


def test_unknown_dtype_is_refused(model_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(model_dir, dtype="int3")


def test_an_unsupported_architecture_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    import json

    import numpy as np
    from gguf import GGUFWriter

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr("koff.models.loader.AutoModelForCausalLM.from_pretrained", no_weights)
    gguf = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(gguf), "gpt2")
    writer.add_uint32("gpt2.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        load_model(str(gguf))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))


def test_gguf_conversion_started_by_several_processes_at_once_runs_once(tmp_path):
    """Runs trained side by side all convert the embedded GGUF on first use: one converts, the others
    wait and read its finished folder (a GPU run once failed reading a folder another process was
    replacing)."""
    import threading

    from koff.models.loader import cached_conversion

    calls, results = [], []

    def convert(out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other threads to be waiting
        (out / "weights").write_text("w")
        (out / "config.json").write_text("{}")

    def worker():
        folder = cached_conversion(tmp_path / "models" / "m", convert)
        results.append(sorted(p.name for p in folder.iterdir()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [["config.json", "weights"]] * 4
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == ["m"]


class RenamedMLP(torch.nn.Module):
    """A gated MLP whose projections are called as another family calls them (w1 gate, w3 up, w2 down)."""

    def __init__(self, mlp):
        super().__init__()
        self.w1, self.w3, self.w2, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def test_a_family_with_other_module_names_is_one_adapter(monkeypatch):
    """Masks, gates and LoRA find a family's projections only through its adapter."""
    import koff.models.architecture as architecture
    from koff.masks.binary import BinaryMask
    from koff.memories.lora import RoutedLoRALinear
    from koff.memories.memory import MemoryConfig
    from koff.model import KoffModel
    from koff.models.adapter import ArchitectureAdapter, gated_mlp_gqa

    model = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
    for layer in model.model.layers:
        layer.feed_forward = RenamedMLP(layer.mlp)  # the family keeps its MLP under another name too
        layer.mlp = layer.feed_forward
    renamed = ArchitectureAdapter("renamed", ("llama",), mlp="feed_forward",
                                  projections=gated_mlp_gqa(gate_proj="w1", up_proj="w3", down_proj="w2"))
    monkeypatch.setitem(architecture.ADAPTERS, "llama", renamed)
    koff = KoffModel(model, MemoryConfig(kind="lora", lora_targets=["gate_proj", "down_proj"]))
    layer = model.model.layers[0]
    assert isinstance(layer.feed_forward.w1, RoutedLoRALinear) and isinstance(layer.feed_forward.w2, RoutedLoRALinear)
    assert koff.layout.layers[0].projection("up_proj") is layer.feed_forward.w3
    with torch.no_grad():
        assert torch.allclose(koff(ids, None), dense, atol=1e-5)
        mask = BinaryMask([torch.ones(96, dtype=torch.bool) for _ in range(2)], [torch.ones(2, dtype=torch.bool)] * 2)
        mask.ffn[0][:48] = False
        koff.set_mask(mask)
        assert not torch.allclose(koff(ids, None), dense, atol=1e-3)  # the gate sits on w2's input
