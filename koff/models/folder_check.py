"""A Hugging Face folder's weights, checked against its config before any of them is loaded.

``from_pretrained`` fills a tensor that is missing from the files with random values and only logs
a warning, so a folder that lost a layer's file (or whose config claims more layers than were
saved) would decompose and export without a word. Here the config's model is built on the meta
device (no memory), and every tensor it needs must be named in the safetensors headers with its
shape; the headers themselves are checked against the files' sizes, so a truncated download is
refused too, before any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from koff.errors import UserInputError
from koff.tensor_files import TensorInfo, read_header

INDEX = "model.safetensors.index.json"


class IncompleteModelError(UserInputError):
    """A model folder whose weight files do not hold what its config describes."""


def stored_tensors(folder: Path) -> dict[str, TensorInfo] | None:
    """Every tensor of the folder's safetensors files (through the index where there is one); None
    where the folder holds no safetensors (a PyTorch .bin folder, left to transformers)."""
    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise IncompleteModelError(f"{folder / INDEX} is not a readable weight index: {err}") from err
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise IncompleteModelError(f"{folder}: the weight index names {', '.join(missing[:3])}, which is missing")
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        return None
    tensors: dict[str, TensorInfo] = {}
    for path in paths:
        tensors |= read_header(path)
    return tensors


def check_model_folder(folder: Path) -> None:
    """Refuse ``folder`` unless its files hold every tensor its config's model needs, with its shape."""
    stored = stored_tensors(folder)
    if stored is None:
        return
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IncompleteModelError(f"{folder}: its config.json cannot build a model ({type(err).__name__}: {err})") from err
    needed = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        needed.pop("lm_head.weight", None)
    missing = sorted(set(needed) - set(stored))
    if missing:
        raise IncompleteModelError(f"{folder}: {len(missing)} tensor(s) its config needs are not in its weight files "
                                   f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the download or "
                                   "copy is incomplete, or config.json describes another model")
    wrong = [f"{n} is {list(stored[n].shape)}, the config needs {list(s)}" for n, s in needed.items() if stored[n].shape != s]
    if wrong:
        raise IncompleteModelError(f"{folder}: weights do not match config.json: {'; '.join(wrong[:2])}")
