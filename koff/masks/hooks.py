"""Apply gates to a stock Hugging Face model through forward pre-hooks.

A gate multiplies its unit's output where that output enters the next projection: the FFN
intermediate activation as it enters ``down_proj``, and each KV group's attention output (its
``n_rep`` query heads) as it enters ``o_proj``. No modelling code is copied or changed.
"""

from __future__ import annotations

from torch import nn

from koff.models.architecture import DecoderLayout
from koff.models.recompute import Restorer, attribute_snapshot


class GateHooks:
    """Owns the pre-hooks; ``set_gates`` supplies the gate vectors for the next forward pass.

    The hooks go in at ``install`` (once, for the model's lifetime: with no gates set they do
    nothing), so a model that never gets a mask, such as an exported backbone, runs without them."""

    def __init__(self, layout: DecoderLayout):
        self.layout = layout
        self.ffn: list = [None] * layout.num_layers
        self.attn: list = [None] * layout.num_layers
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        for parts in self.layout.layers:
            parts.projection("down_proj").register_forward_pre_hook(self._ffn_hook(parts.index))
            parts.projection("o_proj").register_forward_pre_hook(self._attn_hook(parts.index))
        self.installed = True

    def set_gates(self, ffn: list, attn: list) -> None:
        self.ffn, self.attn = list(ffn), list(attn)

    def snapshot(self) -> Restorer:
        """The gates of the pass under way, for a checkpointed layer's recompute in backward."""
        return attribute_snapshot(self, ("ffn", "attn"))

    def clear(self) -> None:
        self.set_gates([None] * self.layout.num_layers, [None] * self.layout.num_layers)

    def _ffn_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            gate = self.ffn[layer]
            if gate is None:
                return None
            return (args[0] * gate.to(args[0].dtype),) + args[1:]

        return hook

    def _attn_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            gate = self.attn[layer]
            if gate is None:
                return None
            x = args[0]
            grouped = x.view(*x.shape[:-1], gate.shape[0], -1) * gate.to(x.dtype)[:, None]
            return (grouped.view(x.shape),) + args[1:]

        return hook
