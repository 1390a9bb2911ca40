"""The structured units koff prunes and what each one costs in parameters.

* FFN neuron j of a gated MLP: row j of gate_proj and up_proj, column j of down_proj
  (and the matching bias entries where the MLP has biases).
* Attention KV group g: key/value head g with the ``n_rep`` query heads that share it: their rows
  of q/k/v_proj (and biases, as in Qwen2) and their columns of o_proj.

Sparsity is removed parameters over the parameters of the transformer blocks (embeddings and
LM head excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

from koff.models.architecture import DecoderLayout


def _bias_size(linear) -> int:
    return 0 if linear.bias is None else 1


@dataclass(frozen=True)
class UnitCosts:
    """Per-layer unit counts and per-unit parameter costs of one model."""

    ffn_units: tuple[int, ...]  # neurons per layer
    attn_units: tuple[int, ...]  # KV groups per layer
    ffn_cost: tuple[int, ...]  # parameters per neuron, per layer
    attn_cost: tuple[int, ...]  # parameters per KV group, per layer
    block_params: int  # parameters of all transformer blocks
    total_params: int  # the whole model

    @classmethod
    def of(cls, model, layout: DecoderLayout) -> "UnitCosts":
        ffn_units, attn_units, ffn_cost, attn_cost = [], [], [], []
        hd, rep = layout.head_dim, layout.heads_per_group
        for parts in layout.layers:
            gate, up, down = (parts.projection(n) for n in ("gate_proj", "up_proj", "down_proj"))
            q, k, v, o = (parts.projection(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            ffn_units.append(gate.out_features)
            ffn_cost.append(gate.in_features + up.in_features + down.out_features + _bias_size(gate) + _bias_size(up))
            attn_units.append(k.out_features // hd)
            per_head_in = q.in_features + _bias_size(q)
            attn_cost.append(rep * hd * per_head_in + 2 * hd * (k.in_features + _bias_size(k)) + rep * hd * o.out_features)
        block_params = sum(p.numel() for parts in layout.layers for p in parts.layer.parameters())
        total = sum(p.numel() for p in model.parameters())
        return cls(tuple(ffn_units), tuple(attn_units), tuple(ffn_cost), tuple(attn_cost), block_params, total)

    @property
    def num_layers(self) -> int:
        return len(self.ffn_units)
