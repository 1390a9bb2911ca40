"""Choosing a memory for a request from its prompt alone (``model: "auto"``).

A ``Router`` holds one centroid per memory: the mean, over text of that memory's domain, of the
backbone's hidden state at one early decoder layer, mean-pooled over the tokens and normalised. A
prompt is embedded the same way and goes to the memory whose centroid is nearest (cosine). The
forward pass stops at that layer (a hook ends it), so routing costs a fraction of a prefill. The
confidence is the margin between the best and the second-best cosine similarity; a prompt below
``threshold`` goes to the fallback (the bare backbone unless the server names a memory).

The file is ``router.safetensors`` in the export: the centroids as one tensor, the names, layer,
threshold and token count in its metadata (no pickles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from koff.errors import UserInputError
from koff.models.architecture import decoder_layout
from koff.tensor_files import load_tensors, read_header, save_tensors

ROUTER_FILE = "router.safetensors"
FORMAT = "koff-router-v1"
PROMPT_TOKENS = 256  # a prompt is embedded over its first tokens at most
DEFAULT_THRESHOLD = 0.0


class RouterError(UserInputError):
    """A router file that is missing, corrupt, or made for other memories."""


class _Reached(Exception):
    """Raised by the hook at the routing layer: the rest of the forward pass is not needed."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def routing_layer(num_layers: int) -> int:
    """The layer whose output embeds a prompt: a quarter of the way up (language and topic are
    already separated there, and the pass stops early)."""
    return max(0, num_layers // 4)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """(batch, hidden) unit vectors: the mean over real tokens of decoder layer ``layer``'s output,
    from a forward pass of the bare ``model`` that stops there."""
    parts = decoder_layout(model).layers[layer]

    def reached(module, args, output):
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    handle = parts.layer.register_forward_hook(reached)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        raise RuntimeError(f"decoder layer {layer} was not reached")
    except _Reached as stop:
        hidden = stop.hidden.float()
    finally:
        handle.remove()
    weights = mask[..., None].to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass
class Router:
    names: list[str]
    centroids: torch.Tensor  # (memories, hidden), unit rows
    layer: int
    threshold: float = DEFAULT_THRESHOLD

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, memories) cosine similarities."""
        return embeddings @ self.centroids.to(embeddings.device, embeddings.dtype).T

    def choose(self, embeddings: torch.Tensor) -> list[tuple[str | None, float]]:
        """Each prompt's memory (None below the threshold) and its confidence (the cosine margin
        of the best memory over the second best; the best cosine where there is one memory)."""
        scores = self.scores(embeddings)
        top = scores.topk(min(2, len(self.names)), dim=1)
        margin = top.values[:, 0] - (top.values[:, 1] if len(self.names) > 1 else 0)
        return [(self.names[i] if m >= self.threshold else None, m)
                for i, m in zip(top.indices[:, 0].tolist(), margin.tolist())]

    def save(self, path: Path) -> None:
        metadata = {"format": FORMAT, "names": json.dumps(self.names), "layer": str(self.layer),
                    "threshold": repr(float(self.threshold)), "prompt_tokens": str(PROMPT_TOKENS)}
        save_tensors({"centroids": self.centroids.float()}, path, metadata)

    @classmethod
    def load(cls, path: Path, hidden_size: int, num_layers: int) -> "Router":
        """The router in ``path``, checked against the backbone it routes for."""
        try:
            header = read_header(path)
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            names, layer, threshold = json.loads(metadata["names"]), int(metadata["layer"]), float(metadata["threshold"])
        except (UserInputError, OSError, KeyError, ValueError, TypeError) as err:
            raise RouterError(f"{path} is not a readable koff router ({err})") from err
        info = header.get("centroids")
        if metadata.get("format") != FORMAT or info is None or info.shape != (len(names), hidden_size) \
                or not 0 <= layer < num_layers or not all(isinstance(n, str) for n in names):
            raise RouterError(f"{path} does not fit this backbone (a router for another export?)")
        centroids = load_tensors(path)["centroids"]
        if not torch.isfinite(centroids).all():
            raise RouterError(f"{path}: its centroids hold NaN or infinite values")
        return cls(names, centroids, layer, threshold)


def build_router(model: nn.Module, texts: dict[str, list[torch.Tensor]], pad_id: int,
                 threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8) -> Router:
    """A router from token blocks of each memory's domain (name -> 1D id tensors)."""
    layer = routing_layer(decoder_layout(model).num_layers)
    device = next(model.parameters()).device
    names, centroids = sorted(texts), []
    for name in names:
        pooled = []
        for start in range(0, len(texts[name]), batch_size):
            ids, mask = pad_left(texts[name][start:start + batch_size], pad_id, device)
            pooled.append(embed(model, ids, mask, layer))
        centroids.append(torch.nn.functional.normalize(torch.cat(pooled).mean(0), dim=-1))
    return Router(names, torch.stack(centroids).cpu(), layer, threshold)


def spread(blocks: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Up to ``count`` evenly spaced rows of ``blocks`` (token blocks of one domain), so that one part
    of a corpus does not stand for all of it."""
    picks = torch.linspace(0, blocks.shape[0] - 1, min(count, blocks.shape[0])).round().long().unique()
    return list(blocks[picks])


def pad_left(sequences: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of 1D id tensors left-padded to the longest, each cut to its first PROMPT_TOKENS."""
    sequences = [s[:PROMPT_TOKENS] for s in sequences]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)
