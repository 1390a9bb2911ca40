"""`koff export --format gguf`: llama.cpp runs the per-layer backbone, and each memory's LoRA as an
adapter, with the logits koff's own runtime gives."""

import numpy as np
import pytest
import torch

from koff.cli import main
from koff.export import export_run
from koff.export.gguf import GGUFExportError, check_convertible, rotary_pairs, write_gguf
from koff.runtime import load
from test_export import make_run
from tiny import tiny_config

def llama_cpp_logits(model_path, ids: list[int], lora_path=None) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
    model = llama_cpp.Llama(model_path=str(model_path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                            lora_path=str(lora_path) if lora_path else None)
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_cpp_runs_the_per_layer_backbone_and_a_lora_memory_with_koffs_logits(tmp_path, corpus, kind):
    export_run(make_run(tmp_path, corpus, kind, memory="lora"), tmp_path / "export")
    written = write_gguf(tmp_path / "export", tmp_path / "gguf", "f32")
    runtime = load(tmp_path / "export")
    widths = runtime.meta["layer_widths"]
    assert len(set(widths["intermediate_size"])) > 1 and len(set(widths["num_key_value_heads"])) > 1  # really per layer
    ids = torch.randint(1, 300, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    for memory, lora in ((None, None), ("eng", written["eng"])):
        with torch.no_grad():
            expected = runtime.model(torch.tensor([ids]), memory)[0].numpy()
        got = llama_cpp_logits(written["backbone"], ids, lora)
        assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max()), memory


def test_cli_writes_gguf_beside_the_export(tmp_path, corpus, capsys):
    run_dir = make_run(tmp_path, corpus, "llama")
    assert main(["export", run_dir, str(tmp_path / "out"), "--format", "gguf", "--gguf-dtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "gguf backbone" in printed and "gguf eng" in printed
    assert (tmp_path / "out" / "gguf" / "backbone-q8_0.gguf").is_file()


def test_rotary_pairs_turn_half_rotation_into_pair_rotation():
    # A head of 4: transformers rotates (x0, x2) and (x1, x3); llama.cpp rotates (x0, x1) and (x2, x3).
    rows = torch.arange(8.0)[:, None]
    assert rotary_pairs(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unconvertible_models_are_refused_in_one_line():
    config = tiny_config("qwen3")
    with pytest.raises(GGUFExportError, match="supports llama, mistral, qwen2"):
        check_convertible(config)


def test_llama3_rotary_factors_give_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from koff.export.gguf import llama3_rope_factors

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64))
    factors = llama3_rope_factors(config, 64)
    assert factors.max() == 8.0 and factors.min() == 1.0  # both ends of the scaling are reached
    torch.testing.assert_close(base / factors, expected)  # llama.cpp divides each frequency by its factor
    assert llama3_rope_factors(tiny_config("llama"), 16) is None
