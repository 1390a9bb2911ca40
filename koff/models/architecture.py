"""Where the prunable parts of a decoder live, for each supported architecture.

koff never forks Hugging Face modelling code. It only needs to find, per decoder layer, the
gated MLP (gate/up/down projections) and the attention projections (q/k/v/o), plus a few
sizes. Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Gemma 2 and Gemma 3's
text model (GeGLU MLP, sliding-window and global layers, logit soft-capping, head_dim apart from
hidden / heads) share the same module names, so one layout serves them all: the gates sit on the
inputs of ``down_proj`` and ``o_proj`` whatever the activation, and the KV prefix goes through the
cache the model builds for itself (a sliding-window layer sees a memory's prefix while it lies
within its window). A new architecture is one entry in ``SUPPORTED_MODEL_TYPES`` and its tiny
model in the tests when its names match, or a small subclass when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from koff.errors import UserInputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# The narrowing geometry, in one place: which axis of each projection's weight a pruned unit
# removes ("out": rows, "in": columns) and which units index it ("ffn": FFN neurons, "query": the
# query heads of the kept KV groups, "kv": the key/value heads of those groups). Export, the
# per-layer backbone loader and the memories' slicing read it from here.
NARROWED_AXIS = {"gate_proj": "out", "up_proj": "out", "down_proj": "in",
                 "q_proj": "out", "k_proj": "out", "v_proj": "out", "o_proj": "in"}
NARROWING_UNITS = {"gate_proj": "ffn", "up_proj": "ffn", "down_proj": "ffn",
                   "q_proj": "query", "k_proj": "kv", "v_proj": "kv", "o_proj": "query"}


class UnsupportedArchitectureError(UserInputError):
    """The model's architecture is not one koff knows how to decompose."""


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer that koff prunes or adapts."""

    index: int
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module

    def owner(self, name: str) -> nn.Module:
        """The module that holds projection ``name`` as an attribute (the MLP or the attention)."""
        return self.mlp if name in MLP_PROJECTIONS else self.attention

    def projection(self, name: str) -> nn.Linear:
        return getattr(self.owner(name), name)


@dataclass(frozen=True)
class DecoderLayout:
    """Sizes and per-layer parts of a supported decoder-only model."""

    model_type: str
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


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def check_model_type(model_type: str | None, source: str = "the model") -> None:
    """Refuse an architecture koff cannot decompose (callers check before loading any weight)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: model type {model_type!r} is not supported; koff supports: " + ", ".join(SUPPORTED_MODEL_TYPES)
        )


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Describe ``model`` (a ``*ForCausalLM``) or raise a clear error if it is unsupported."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = tuple(
        LayerParts(index=i, layer=layer, attention=layer.self_attn, mlp=layer.mlp)
        for i, layer in enumerate(decoder.layers)
    )
    return DecoderLayout(
        model_type=model_type,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=_head_dim(config),
        layers=layers,
    )
