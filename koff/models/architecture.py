"""A loaded model's prunable parts, found through its family's adapter (``koff.models.adapter``).

``decoder_layout`` gives, per decoder layer, the attention and MLP modules and each projection by
role, plus the sizes koff needs. The supported model types are those of the adapters in
``koff.models.families``; anything else is refused in one line before a weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from koff.models.adapter import ArchitectureAdapter, Owner, Projection, UnsupportedArchitectureError
from koff.models.families import FAMILIES

ADAPTERS: dict[str, ArchitectureAdapter] = {t: a for a in FAMILIES for t in a.model_types}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def adapter_for(model_type: str | None, source: str = "the model") -> ArchitectureAdapter:
    """The adapter of ``model_type``, or one line saying which types koff supports."""
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{source}: model type {model_type!r} is not supported; koff supports: " + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    return ADAPTERS[model_type]


def check_model_type(model_type: str | None, source: str = "the model") -> None:
    """Refuse an architecture koff cannot decompose (callers check before loading any weight)."""
    adapter_for(model_type, source)


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that koff prunes or adapts, reached by role."""

    index: int
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    adapter: ArchitectureAdapter

    def owner(self, role: str) -> nn.Module:
        """The module that holds projection ``role`` (the MLP or the attention)."""
        return self.mlp if self.adapter.projections[role].owner is Owner.MLP else self.attention

    def projection(self, role: str) -> nn.Linear:
        return getattr(self.owner(role), self.adapter.projections[role].attribute)

    def replace(self, role: str, module: nn.Module) -> None:
        """Put ``module`` where projection ``role`` is (a LoRA wrapper, a narrower linear)."""
        setattr(self.owner(role), self.adapter.projections[role].attribute, module)


@dataclass(frozen=True)
class DecoderLayout:
    """Sizes and per-layer parts of a supported decoder-only model."""

    model_type: str
    adapter: ArchitectureAdapter
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerParts, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head (GQA's n_rep)."""
        return self.num_heads // self.num_kv_heads

    @property
    def projections(self) -> dict[str, Projection]:
        return dict(self.adapter.projections)


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Describe ``model`` (a ``*ForCausalLM``) or raise a clear error if it is unsupported."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    adapter = adapter_for(model_type)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = tuple(
        LayerParts(index=i, layer=layer, attention=getattr(layer, adapter.attention), mlp=getattr(layer, adapter.mlp),
                   adapter=adapter)
        for i, layer in enumerate(decoder.layers)
    )
    return DecoderLayout(
        model_type=model_type,
        adapter=adapter,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=_head_dim(config),
        layers=layers,
    )
