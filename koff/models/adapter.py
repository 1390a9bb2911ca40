"""What koff needs to know about one family of decoder-only models, as one value: an adapter.

koff names the parts it prunes and adapts by *role*: the seven projections of a Llama-style layer
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of the attention; ``gate_proj``, ``up_proj``,
``down_proj`` of the gated MLP). Masks, LoRA keys, memory files and export all speak in roles. An
adapter says where each role lives in its family's modules (which sub-module of a decoder layer,
under which attribute), how a pruned unit narrows it (which axis of the weight, indexed by which
units), and which of its model types llama.cpp's per-layer (``deci``) GGUF graph can run. Adding a
family is one file in ``koff/models/families`` holding one ``ArchitectureAdapter``, and its tiny model
in the tests.

Nothing about the forward pass is here: koff never forks modelling code. Gates are pre-hooks on the
inputs of ``down_proj`` and ``o_proj`` whatever the MLP's activation, LoRA is a module swap, and a
memory's KV prefix goes through the cache the model builds for itself (a sliding-window layer sees
the prefix while it lies within its window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Mapping

from koff.errors import UserInputError


class UnsupportedArchitectureError(UserInputError):
    """The model's architecture is not one koff knows how to decompose."""


class Owner(Enum):
    """The sub-module of a decoder layer that holds a projection."""

    ATTENTION = "attention"
    MLP = "mlp"


class Axis(Enum):
    """Which axis of a projection's weight a pruned unit removes."""

    OUT = "out"  # rows: the projection produces the unit
    IN = "in"  # columns: the projection consumes it


class Units(Enum):
    """What indexes the narrowed axis: FFN neurons, the query heads of the kept KV groups, or the
    key/value heads of those groups."""

    FFN = "ffn"
    QUERY = "query"
    KV = "kv"


@dataclass(frozen=True)
class Projection:
    """Where one role lives and how pruning narrows it."""

    owner: Owner
    attribute: str
    axis: Axis
    units: Units


def gated_mlp_gqa(**renamed: str) -> Mapping[str, Projection]:
    """The Llama layer: a gated MLP and grouped-query attention. ``renamed`` maps a role to the
    attribute a family gives it where that is not the role's own name."""
    table = {"gate_proj": (Owner.MLP, Axis.OUT, Units.FFN), "up_proj": (Owner.MLP, Axis.OUT, Units.FFN),
             "down_proj": (Owner.MLP, Axis.IN, Units.FFN),
             "q_proj": (Owner.ATTENTION, Axis.OUT, Units.QUERY), "k_proj": (Owner.ATTENTION, Axis.OUT, Units.KV),
             "v_proj": (Owner.ATTENTION, Axis.OUT, Units.KV), "o_proj": (Owner.ATTENTION, Axis.IN, Units.QUERY)}
    unknown = sorted(set(renamed) - set(table))
    if unknown:
        raise ValueError(f"unknown roles {unknown}")
    return MappingProxyType({role: Projection(owner, renamed.get(role, role), axis, units)
                             for role, (owner, axis, units) in table.items()})


@dataclass(frozen=True)
class ArchitectureAdapter:
    """One family of models: its Hugging Face model types and where koff finds its parts."""

    family: str
    model_types: tuple[str, ...]
    attention: str = "self_attn"  # attribute of a decoder layer holding the attention projections
    mlp: str = "mlp"  # attribute of a decoder layer holding the MLP projections
    projections: Mapping[str, Projection] = field(default_factory=gated_mlp_gqa)
    gguf_model_types: tuple[str, ...] = ()  # those whose layers llama.cpp's "deci" graph runs as they are

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.projections)
