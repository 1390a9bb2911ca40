"""The exported backbone on disk: a Hugging Face folder (safetensors + config + tokenizer) plus
``koff_backbone.json`` (fingerprint, per-layer widths, provenance).

A uniform backbone is a stock config: ``AutoModelForCausalLM.from_pretrained`` loads it. A
per-layer backbone records its widths in the config (``koff_layer_widths``); ``load_backbone``
builds the stock model on the meta device, narrows each layer's projections to the recorded
widths and loads the weights into them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from koff.errors import KoffError
from koff.io import read_json, write_json
from koff.models.adapter import Axis, Units
from koff.models.architecture import decoder_layout
from koff.models.folder_check import check_model_folder
from koff.tensor_files import load_tensors

META_FILE = "koff_backbone.json"
FORMAT = "koff-backbone-v1"


class BackboneError(KoffError, RuntimeError):
    """A backbone folder that is missing, incomplete or corrupt."""


def fingerprint(folder: Path) -> str:
    """sha256 over the backbone's safetensors files: memories record it to refuse foreign backbones."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


DEFAULT_SHARD_SIZE = "5GB"


def narrowed_config(config, head_dim: int, heads_per_group: int, widths: dict[str, list[int]], uniform: bool):
    """``config`` (changed in place) for a backbone of these widths: the widest layer's sizes in the
    stock fields, and, per layer, ``koff_layer_widths`` unless every layer has the same width."""
    config.head_dim = head_dim  # keep it explicit: the head count changes below
    config.intermediate_size = max(widths["intermediate_size"])
    config.num_key_value_heads = max(widths["num_key_value_heads"])
    config.num_attention_heads = config.num_key_value_heads * heads_per_group
    if uniform:
        if hasattr(config, "koff_layer_widths"):
            del config.koff_layer_widths
    else:
        config.koff_layer_widths = widths
    return config


def finish_backbone(folder: Path, config, tokenizer, generation_config, widths: dict[str, list[int]], uniform: bool,
                    info: dict) -> dict:
    """Write everything but the weights (already in ``folder``): the config, the tokenizer, the
    generation config and ``koff_backbone.json`` with the weights' fingerprint. Returns the latter."""
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"format": FORMAT, "fingerprint": fingerprint(folder), "uniform": uniform, "layer_widths": widths, **info}
    write_json(folder / META_FILE, meta)
    return meta


def read_backbone_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        raise BackboneError(f"{folder} is not a koff backbone ({META_FILE} missing)")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise BackboneError(f"{path}: unknown format {meta.get('format')!r}")
    return meta


def load_backbone(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, meta) of an exported backbone, frozen and in eval mode."""
    meta = read_backbone_meta(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if meta["uniform"]:
            check_model_folder(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        else:
            model = _load_per_layer(folder, meta["layer_widths"], dtype)
    except BackboneError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or corrupt files surface as many types (SafetensorError...)
        raise BackboneError(f"cannot load the backbone in {folder}: {type(err).__name__}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval().requires_grad_(False), tokenizer, meta


def _load_per_layer(folder: Path, widths: dict[str, list[int]], dtype: torch.dtype):
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = decoder_layout(model)
    rep, hd = layout.heads_per_group, layout.head_dim
    with init_empty_weights(include_buffers=False):
        for parts, ffn, groups in zip(layout.layers, widths["intermediate_size"], widths["num_key_value_heads"]):
            size = {Units.FFN: ffn, Units.QUERY: groups * rep * hd, Units.KV: groups * hd}
            for role, p in layout.projections.items():
                width = size[p.units]
                parts.replace(role, _resized(parts.projection(role), **({"out": width} if p.axis is Axis.OUT else {"inp": width})))
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state |= load_tensors(path)
    if not state:
        raise BackboneError(f"{folder} holds no safetensors weights")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise BackboneError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model.to(dtype)


def _resized(linear: nn.Linear, out: int | None = None, inp: int | None = None) -> nn.Linear:
    return nn.Linear(inp or linear.in_features, out or linear.out_features, bias=linear.bias is not None)
