"""Outlier FFN neurons: the few whose one-shot importance dwarfs every other neuron's.

Pretrained LMs hold a handful of neurons with "massive activations" (Sun et al. 2024), hundreds to
thousands of times the typical Wanda score. A mask that removes one can leave the backbone useless
on its own while the backbone with its memories is unharmed: on SmolLM2-135M, a mask learned from no
importance that dropped layer 11's neuron 1229 (1,500x the median score) was 7.4x dense alone and
1.3x with those two neurons put back, and with the KV memory attached the neuron made no difference
(docs/experiments.md). So when a bare backbone collapses, the first thing to check is which of these
neurons its mask removed; ``koff decompose --keep-outliers K`` holds the top K open while the mask learns.
"""

from __future__ import annotations

import torch

from koff.masks.binary import BinaryMask
from koff.masks.oneshot import top_ffn_neurons


def outlier_neurons(importance: list[torch.Tensor], mask: BinaryMask, top: int = 8) -> list[dict]:
    """The ``top`` FFN neurons of highest raw importance over all layers (``importance[i]``: layer i's
    per-neuron scores, as ``unit_importance`` gives them), highest first, each with its score as a
    multiple of the median over all neurons and whether ``mask`` keeps it."""
    scores, neurons = torch.cat([s.float().flatten() for s in importance]), sum(m.numel() for m in mask.ffn)
    if scores.numel() != neurons:
        raise ValueError(f"importance covers {scores.numel()} neurons, the mask {neurons}")
    median = scores.median().clamp_min(1e-12)
    return [{"layer": layer, "neuron": neuron, "importance": float(importance[layer][neuron]),
             "times_median": float(importance[layer][neuron] / median), "kept": bool(mask.ffn[layer][neuron])}
            for layer, neuron in top_ffn_neurons(importance, top)]
