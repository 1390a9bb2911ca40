"""The backbone's weights, written straight from the base's safetensors files, a shard at a time.

Export never loads the model. A copy of it on the meta device (no memory) gives the names,
shapes and layer layout; each tensor is then read from the base's files, narrowed to the kept
units, cast, and written into shards that huggingface_hub's own splitter planned beforehand from
the narrowed shapes (the file names and index ``save_pretrained`` writes). Host memory peaks at
about one shard plus one tensor of the base, however large the model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from torch import nn

from koff.errors import KoffError
from koff.export.prune import LayerSelection, Narrowing, projection_narrowings
from koff.models.architecture import DecoderLayout
from koff.tensor_files import save_tensors

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class BaseWeightsError(KoffError, RuntimeError):
    """The base's weight files cannot give the backbone's tensors."""


def base_weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / WEIGHTS).is_file():
        with safe_open(folder / WEIGHTS, "pt") as f:
            return {name: folder / WEIGHTS for name in f.keys()}
    raise BaseWeightsError(f"{folder} holds no {WEIGHTS} or {INDEX}; koff exports from safetensors weights")


def stored_dtype(config, files: dict[str, Path]) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` gives: the config's, else the first float tensor's."""
    if isinstance(getattr(config, "dtype", None), torch.dtype):
        return config.dtype
    for name, path in files.items():
        with safe_open(path, "pt") as f:
            dtype = f.get_slice(name).get_dtype()
        if dtype in ("F32", "BF16", "F16"):
            return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    return torch.float32


def projection_narrowings_by_name(model: nn.Module, layout: DecoderLayout,
                                  selections: list[LayerSelection]) -> dict[str, Narrowing]:
    """Tensor name -> its narrowing, for the weight and bias of every projection of every layer."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for parts, sel in zip(layout.layers, selections):
        for proj, narrowing in projection_narrowings(sel, layout.heads_per_group, layout.head_dim, layout.projections).items():
            module = parts.projection(proj)
            out[f"{names[id(module)]}.weight"] = narrowing
            if module.bias is not None:
                out[f"{names[id(module)]}.bias"] = narrowing.bias()
    return out


def saved_tensor_names(model: nn.Module) -> list[str]:
    """The state dict's names in order, less the second name of a tied parameter (``save_pretrained``
    writes ``model.embed_tokens.weight`` once when ``lm_head.weight`` is the same tensor)."""
    kept = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    return [name for name in model.state_dict() if name in kept or name not in every]


def write_backbone_weights(files: dict[str, Path], model: nn.Module, layout: DecoderLayout,
                           selections: list[LayerSelection], dtype: torch.dtype, out: Path, max_shard_size: str) -> int:
    """Write the narrowed weights of the base (``files``: ``base_weight_files`` of its folder) as
    safetensors shards into ``out``; ``model`` is the base built on the meta device. Returns the
    number of parameters written."""
    narrowings = projection_narrowings_by_name(model, layout, selections)
    state = model.state_dict()
    names = saved_tensor_names(model)
    missing = [n for n in names if n not in files]
    if missing:
        folder = next(iter(files.values())).parent if files else "the base folder"
        raise BaseWeightsError(f"{folder}: the weight files lack {', '.join(missing[:3])}"
                               f"{' and more' if len(missing) > 3 else ''} (not the weights of this config?)")
    keep = Narrowing()
    # the meta model's tensors, narrowed: the shapes the shards will hold, with no memory
    shapes = {n: narrowings.get(n, keep).weight(state[n]).to(dtype) for n in names}
    params = sum(t.numel() for t in shapes.values())
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        opened = {}

        def read(name: str) -> torch.Tensor:
            path = files[name]
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(path, "pt"))
            return opened[path].get_tensor(name)

        for shard, shard_names in split.filename_to_tensors.items():
            tensors = {n: cast(narrowings.get(n, keep).weight(read(n)), dtype) for n in shard_names}
            save_tensors(tensors, out / shard, metadata={"format": "pt"})
            del tensors
    if split.is_sharded:
        index = {"metadata": {"total_parameters": params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return params


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
