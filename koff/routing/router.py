"""Choosing a memory for a request from its prompt alone (``model: "auto"``).

Two kinds of router, each a type with its own file contents:

* ``TokenRouter`` (what ``koff export`` builds): a unigram model of each memory's training text over
  the tokenizer's vocabulary (add-one smoothing). A prompt goes to the memory under which its tokens
  are most likely, per token (naive Bayes). It needs no forward pass, so it costs nothing next to a
  prefill, and on text of another source and genre it picked better than the hidden-state router
  (``bench/routing.py``).
* ``HiddenStateRouter``: one mean embedding per memory, the backbone's hidden state at a quarter of
  its depth, mean-pooled over the tokens; a prompt goes to the nearest (cosine, both measured from
  the center of all the means). The forward pass stops at that layer (a hook ends it).

The confidence is the margin of the best memory's score over the second best; a prompt below
``threshold`` goes to the fallback (the bare backbone unless the server names a memory). The file
is ``router.safetensors`` in the export: the router's tensor, its kind, names and threshold in the
metadata (no pickles).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from torch import nn

from koff.errors import UserInputError
from koff.models.architecture import decoder_layout
from koff.tensor_files import TensorInfo, load_tensors, read_header, save_tensors

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


class Router(ABC):
    """Picks a memory for each prompt (token ids); subclasses say how they score one."""

    kind: ClassVar[str]
    tensor: ClassVar[str]  # the name of the one tensor its file holds
    blocks_per_memory: ClassVar[int | None]  # training blocks it learns a memory from (None: every one)
    names: list[str]
    threshold: float

    @classmethod
    def training_blocks(cls, train: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of a memory's training text (``(n, block_len)``) this kind of router learns it from."""
        return spread(train, cls.blocks_per_memory or train.shape[0])

    @abstractmethod
    def scores(self, model: nn.Module, prompts: list[torch.Tensor], pad_id: int) -> torch.Tensor:
        """(prompts, memories), higher is better."""

    @abstractmethod
    def add(self, name: str, model: nn.Module, blocks: list[torch.Tensor], pad_id: int) -> "Router":
        """This router with one more memory, learnt from token blocks of its domain."""

    @abstractmethod
    def _fits(self, info: TensorInfo, model: nn.Module) -> bool:
        """Whether a stored tensor of this shape belongs to a router for ``model``."""

    def choose(self, model: nn.Module, prompts: list[torch.Tensor], pad_id: int) -> list[tuple[str | None, float]]:
        """Each prompt's memory (None below the threshold) and its confidence: the margin of the
        best memory's score over the second best's."""
        scores = self.scores(model, [p[:PROMPT_TOKENS] for p in prompts], pad_id)
        top = scores.topk(min(2, len(self.names)), dim=1)
        margin = top.values[:, 0] - (top.values[:, 1] if len(self.names) > 1 else 0)
        return [(self.names[i] if m >= self.threshold else None, m)
                for i, m in zip(top.indices[:, 0].tolist(), margin.tolist())]

    def save(self, path: Path) -> None:
        metadata = {"format": FORMAT, "kind": self.kind, "names": json.dumps(self.names),
                    "threshold": repr(float(self.threshold)), "prompt_tokens": str(PROMPT_TOKENS), **self._metadata()}
        save_tensors({self.tensor: getattr(self, self.tensor).float()}, path, metadata)

    def _metadata(self) -> dict[str, str]:
        return {}

    @staticmethod
    def load(path: Path, model: nn.Module) -> "Router":
        """The router in ``path``, of whichever kind it is, checked against the backbone it routes for."""
        try:
            header = read_header(path)
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            kind = ROUTER_KINDS[metadata["kind"]]
            names, threshold = json.loads(metadata["names"]), float(metadata["threshold"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("its names are not a list of strings")
            extra = kind.read_metadata(metadata)
        except (UserInputError, OSError, KeyError, ValueError, TypeError) as err:
            raise RouterError(f"{path} is not a readable koff router ({type(err).__name__}: {err})") from err
        info = header.get(kind.tensor)
        router = kind(names, torch.empty(0), threshold=threshold, **extra)
        if metadata.get("format") != FORMAT or info is None or info.shape[0] != len(names) or not router._fits(info, model):
            raise RouterError(f"{path} does not fit this backbone (a router for another export?)")
        tensor = load_tensors(path)[kind.tensor]
        if not router._valid(tensor):
            raise RouterError(f"{path}: its {kind.tensor} hold values no router makes (NaN, infinite or negative)")
        setattr(router, kind.tensor, tensor)
        return router

    @staticmethod
    def read_metadata(metadata: dict) -> dict:
        return {}

    def _valid(self, tensor: torch.Tensor) -> bool:
        return bool(torch.isfinite(tensor).all())


@dataclass
class TokenRouter(Router):
    names: list[str]
    counts: torch.Tensor  # (memories, vocabulary): each memory's training tokens, counted
    threshold: float = DEFAULT_THRESHOLD
    kind: ClassVar[str] = "tokens"
    tensor: ClassVar[str] = "counts"
    # Counting costs nothing, and every block beats 32 spread ones by 2-4 points at 16 tokens on text
    # of another source or genre (within a point at 64).
    blocks_per_memory: ClassVar[int | None] = None
    smoothing: ClassVar[float] = 1.0  # add-one: the best of 0.01, 0.1 and 1 on other-source text

    @classmethod
    def build(cls, texts: dict[str, list[torch.Tensor]], vocabulary: int, threshold: float = DEFAULT_THRESHOLD) -> "TokenRouter":
        """From token blocks of each memory's domain (name -> 1D id tensors): no model needed."""
        return cls(sorted(texts), torch.stack([token_counts(texts[n], vocabulary) for n in sorted(texts)]), threshold)

    @property
    def log_probs(self) -> torch.Tensor:
        """(memories, vocabulary): each memory's smoothed unigram log-probabilities."""
        return torch.log((self.counts + self.smoothing) / (self.counts.sum(1, keepdim=True)
                                                          + self.smoothing * self.counts.shape[1]))

    def scores(self, model, prompts, pad_id):
        """Mean log-probability per token of each prompt under each memory's unigram model."""
        log_probs = self.log_probs
        return torch.stack([log_probs[:, p.clamp(0, self.counts.shape[1] - 1).cpu()].mean(1) for p in prompts])

    def add(self, name, model, blocks, pad_id):
        counts = torch.cat([self.counts, token_counts(blocks, self.counts.shape[1])[None]])
        return TokenRouter([*self.names, name], counts, self.threshold)

    def _fits(self, info, model):
        return info.shape == (len(self.names), model.get_input_embeddings().num_embeddings)

    def _valid(self, tensor):
        return super()._valid(tensor) and bool((tensor >= 0).all())


@dataclass
class HiddenStateRouter(Router):
    names: list[str]
    means: torch.Tensor  # (memories, hidden): each memory's mean prompt embedding over its domain's text
    layer: int = 0
    threshold: float = DEFAULT_THRESHOLD
    kind: ClassVar[str] = "hidden"
    tensor: ClassVar[str] = "means"
    blocks_per_memory: ClassVar[int | None] = 32  # one forward pass each

    @classmethod
    def build(cls, model: nn.Module, texts: dict[str, list[torch.Tensor]], pad_id: int,
              threshold: float = DEFAULT_THRESHOLD, layer: int | None = None) -> "HiddenStateRouter":
        layer = routing_layer(decoder_layout(model).num_layers) if layer is None else layer
        return cls(sorted(texts), mean_embeddings(model, texts, pad_id, layer), layer, threshold)

    @property
    def center(self) -> torch.Tensor:
        return self.means.mean(0)

    @property
    def centroids(self) -> torch.Tensor:
        """(memories, hidden) unit rows: each mean measured from the center. Every hidden state
        shares a large common direction, which would otherwise dominate each cosine."""
        return torch.nn.functional.normalize(self.means - self.center, dim=-1)

    def scores(self, model, prompts, pad_id):
        """Cosine similarities, both sides measured from the center."""
        ids, mask = pad_left(prompts, pad_id, next(model.parameters()).device)
        embeddings = embed(model, ids, mask, self.layer)
        embeddings = torch.nn.functional.normalize(embeddings - self.center.to(embeddings), dim=-1)
        return embeddings @ self.centroids.to(embeddings.device, embeddings.dtype).T

    def add(self, name, model, blocks, pad_id):
        mean = mean_embeddings(model, {name: blocks}, pad_id, self.layer)
        return HiddenStateRouter([*self.names, name], torch.cat([self.means, mean]), self.layer, self.threshold)

    def _metadata(self):
        return {"layer": str(self.layer)}

    @staticmethod
    def read_metadata(metadata):
        return {"layer": int(metadata["layer"])}

    def _fits(self, info, model):
        layout = decoder_layout(model)
        return info.shape == (len(self.names), layout.hidden_size) and 0 <= self.layer < layout.num_layers


ROUTER_KINDS: dict[str, type[Router]] = {kind.kind: kind for kind in (TokenRouter, HiddenStateRouter)}


def token_counts(blocks: list[torch.Tensor], vocabulary: int) -> torch.Tensor:
    ids = torch.cat([b.flatten() for b in blocks]).clamp(0, vocabulary - 1)
    return torch.bincount(ids, minlength=vocabulary).float()


def mean_embeddings(model: nn.Module, texts: dict[str, list[torch.Tensor]], pad_id: int, layer: int,
                    batch_size: int = 8) -> torch.Tensor:
    """(domains, hidden): each domain's mean prompt embedding at decoder ``layer``, names in sorted order."""
    device = next(model.parameters()).device
    means = []
    for name in sorted(texts):
        pooled = [embed(model, *pad_left(texts[name][i:i + batch_size], pad_id, device), layer)
                  for i in range(0, len(texts[name]), batch_size)]
        means.append(torch.cat(pooled).mean(0))
    return torch.stack(means).cpu()


def spread(blocks: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Up to ``count`` evenly spaced rows of ``blocks`` (token blocks of one domain), so that one part
    of a corpus does not stand for all of it."""
    picks = torch.linspace(0, blocks.shape[0] - 1, min(count, blocks.shape[0])).round().long().unique()
    return list(blocks[picks].long())


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
