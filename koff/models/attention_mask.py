"""The attention mask of a decoding step, made on the device in the form the model's attention takes.

Given a 2D padding mask, transformers builds the 4D mask itself at every forward pass, and first
asks whether the padding mask is all ones (``fast_all``): a read of the device, so a wait for
the GPU, in every decoding step. A 4D mask is used as given, so a decoding step hands one over:
for one new token per row, the causal part is empty and the mask is the padding mask itself.
"""

from __future__ import annotations

import torch

# Attention implementations whose 4D mask form is known: a boolean (True = attend) for sdpa,
# an additive float (0 or the dtype's minimum) for eager.
_FORMS = {"sdpa", "eager"}


def decode_attention_mask(mask: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """For a step that feeds one token per row: the (rows, 1, 1, length) mask over ``mask``
    (rows, length; 1 = attend), or ``mask`` itself where the model builds its own (other attention
    implementations, and models with sliding-window layers, whose masks differ per layer)."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _FORMS or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return mask
    attend = mask[:, None, None, :].bool()
    if implementation == "sdpa":
        return attend
    return torch.zeros(attend.shape, dtype=dtype, device=mask.device).masked_fill_(~attend, torch.finfo(dtype).min)
