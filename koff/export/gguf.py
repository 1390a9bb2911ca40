"""An export as GGUF files that llama.cpp runs: the backbone, and each memory's LoRA as an adapter.

The backbone is written under llama.cpp's ``deci`` architecture: the Llama graph with a head
count, KV-head count and FFN width of its own in every layer (made for NVIDIA's pruned
Nemotron-NAS models), so a per-layer backbone loads as it is. Query and key projections are
permuted for llama.cpp's rotary embedding, which rotates adjacent pairs where transformers rotates
halves (as llama.cpp's own converter does); a Qwen2 backbone keeps its projection biases.

A memory's LoRA becomes a GGUF LoRA adapter (``general.type = adapter``) for that backbone. Its
learned KV prefix has no place in llama.cpp, which has no format for learned keys and values: a
memory served there is its LoRA alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from koff.errors import KoffError
from koff.formats.backbone import load_backbone
from koff.formats.exported_memory import MANIFEST, read_exported_state
from koff.io import atomic_path, read_json
from koff.memories.parts import MemoryFit, parse_lora_key
from koff.models.architecture import decoder_layout
from koff.models.families import FAMILIES
from koff.models.loader import source_gguf

ARCH = "deci"
# Model types whose layers are Llama's, up to projection biases (and whose GGUF is therefore deci):
# each family's adapter names its own.
SUPPORTED = tuple(t for adapter in FAMILIES for t in adapter.gguf_model_types)
TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
DTYPES = ("f16", "f32", "q8_0")


class GGUFExportError(KoffError):
    """An export that cannot be written as GGUF."""


def write_gguf(export: Path, out: Path, dtype: str = "f16") -> dict[str, Path]:
    """Write ``export``'s backbone as ``out/backbone-<dtype>.gguf`` and each memory's LoRA as
    ``out/<memory>-lora.gguf``; returns {"backbone" or memory name: path}."""
    check_dtype(dtype)
    model, tokenizer, meta = load_backbone(export / "backbone")
    written = {"backbone": out / f"backbone-{dtype}.gguf"}
    heads, kv_heads = write_model_gguf(model, tokenizer, meta.get("base_model"), written["backbone"], dtype)
    fit = MemoryFit.of(model)
    for folder in sorted((export / "memories").iterdir()) if (export / "memories").is_dir() else []:
        if (folder / MANIFEST).is_file():
            path = write_lora_gguf(folder, out, fit, heads, kv_heads)
            if path is not None:
                written[folder.name] = path
    return written


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise GGUFExportError(f"GGUF weights can be {', '.join(DTYPES)}, not {dtype!r}")


def write_model_gguf(model, tokenizer, base_model: str | None, path: Path, dtype: str = "f16") -> tuple[list[int], list[int]]:
    """One model (a backbone, or a dense base to compare with) as a GGUF file at ``path``;
    ``base_model`` names where its vocabulary came from. Returns its per-layer head and KV-head counts."""
    import gguf

    check_dtype(dtype)
    check_convertible(model.config)
    layout = decoder_layout(model)
    heads = [parts.projection("q_proj").out_features // layout.head_dim for parts in layout.layers]
    kv_heads = [parts.projection("k_proj").out_features // layout.head_dim for parts in layout.layers]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        write_hyperparameters(writer, model.config, layout, heads, kv_heads, dtype)
        write_vocabulary(writer, tokenizer, model.config, base_model)
        for name, tensor in backbone_tensors(model, layout, heads, kv_heads):
            array, raw_dtype = encoded(tensor, dtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        finish(writer)
    return heads, kv_heads


def check_convertible(config) -> None:
    if config.model_type not in SUPPORTED:
        raise GGUFExportError(f"GGUF export supports {', '.join(SUPPORTED)} models, not {config.model_type!r}")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise GGUFExportError("GGUF export does not support sliding-window attention")
    kind = rope_settings(config)["rope_type"]
    if kind not in ("default", "llama3"):
        raise GGUFExportError(f"GGUF export does not support {kind!r} rotary scaling")


def write_hyperparameters(writer, config, layout, heads: list[int], kv_heads: list[int], dtype: str) -> None:
    import gguf

    writer.add_name("koff backbone")
    writer.add_block_count(layout.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length([parts.projection("gate_proj").out_features for parts in layout.layers])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])


def rope_settings(config) -> dict:
    """The rotary settings (``rope_theta``, ``rope_type`` and the scaling's own), wherever this
    transformers version keeps them."""
    settings = dict(getattr(config, "rope_scaling", None) or {}) | dict(getattr(config, "rope_parameters", None) or {})
    settings.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    settings.setdefault("rope_type", settings.get("type", "default"))
    return settings


def write_vocabulary(writer, tokenizer, config, base_model: str | None) -> None:
    """The base model's own GGUF vocabulary where it came from a GGUF file; otherwise a BPE
    vocabulary made from the Hugging Face tokenizer."""
    import gguf

    source = source_gguf(base_model) if base_model else None
    if source is not None:
        reader = gguf.GGUFReader(source)
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                copy_field(writer, field)
        return
    vocabulary = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocabulary.items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(config.vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tokenizer))
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)


def bpe_merges(tokenizer) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def copy_field(writer, field) -> None:
    """One metadata field of a GGUF file read by ``gguf.GGUFReader``, written again as it was."""
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_array(field.name, field.contents())
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_string(field.name, field.contents())
    else:
        writer.add_key_value(field.name, field.contents(), kind)


def backbone_tensors(model, layout, heads: list[int], kv_heads: list[int]):
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's names and layout."""
    yield "token_embd.weight", model.get_input_embeddings().weight
    for parts, q_heads, k_heads in zip(layout.layers, heads, kv_heads):
        block = f"blk.{parts.index}"
        yield f"{block}.attn_norm.weight", parts.layer.input_layernorm.weight
        yield f"{block}.ffn_norm.weight", parts.layer.post_attention_layernorm.weight
        for projection, name in TENSORS.items():
            linear = parts.projection(projection)
            count = {"q_proj": q_heads, "k_proj": k_heads}.get(projection)
            for kind, tensor in (("weight", linear.weight), ("bias", linear.bias)):
                if tensor is not None:
                    yield f"{block}.{name}.{kind}", tensor if count is None else rotary_pairs(tensor, count)
    yield "output_norm.weight", model.get_decoder().norm.weight
    head = model.get_output_embeddings().weight
    if head is not model.get_input_embeddings().weight:
        yield "output.weight", head
    factors = llama3_rope_factors(model.config, layout.head_dim)
    if factors is not None:
        yield "rope_freqs.weight", factors


def rotary_pairs(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query or key projection (weight or bias) reordered so that rotating adjacent
    pairs, as llama.cpp does, equals rotating halves of each head, as transformers does."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def llama3_rope_factors(config, head_dim: int) -> torch.Tensor | None:
    """Llama 3's frequency-dependent rotary scaling as the per-frequency divisors llama.cpp reads."""
    scaling = rope_settings(config)
    if scaling["rope_type"] != "llama3":
        return None
    base = float(scaling["rope_theta"])
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in (1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def encoded(tensor: torch.Tensor, dtype: str) -> tuple:
    """(array, raw type) for ``GGUFWriter.add_tensor``: vectors stay float32, as llama.cpp's
    converter keeps them; matrices take ``dtype`` (q8_0 falls back to f16 for rows that are not a
    whole number of its 32-value blocks, as llama.cpp's converter does)."""
    import gguf

    array = tensor.detach().to(torch.float32).numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_gguf(folder: Path, out: Path, fit: MemoryFit, heads: list[int], kv_heads: list[int]) -> Path | None:
    """``folder``'s LoRA factors as a llama.cpp LoRA adapter (None for a memory without LoRA)."""
    import gguf

    manifest = read_json(folder / MANIFEST)
    state = read_exported_state(folder, fit, manifest)
    factors = {k[len("lora_A."):]: (v, state["lora_B." + k[len("lora_A."):]]) for k, v in state.items() if k.startswith("lora_A.")}
    if not factors:
        return None
    path = out / f"{folder.name}-lora.gguf"
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(manifest["lora_alpha"]))
        for key, (a, b) in sorted(factors.items()):
            layer, projection = parse_lora_key(key)
            count = {"q_proj": heads[layer], "k_proj": kv_heads[layer]}.get(projection)
            b = b if count is None else rotary_pairs(b, count)
            name = f"blk.{layer}.{TENSORS[projection]}.weight"
            writer.add_tensor(f"{name}.lora_a", a.to(torch.float32).contiguous().numpy())
            writer.add_tensor(f"{name}.lora_b", b.to(torch.float32).contiguous().numpy())
        finish(writer)
    return path
