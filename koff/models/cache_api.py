"""The name under which a Hugging Face model takes and returns its KV cache.

transformers 5.24 renamed the models' ``past_key_values`` argument and output field to ``cache``;
it still takes the old argument with a warning, until 5.40. koff supports every 5.x, so it asks the
model's ``forward`` which name it takes instead of pinning either.
"""

from __future__ import annotations

import inspect
from functools import cache as memoised

from torch import nn


@memoised
def _argument_of(forward_owner: type) -> str:
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def cache_inputs(model: nn.Module, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model`` (a causal LM or its decoder)."""
    return {_argument_of(type(model)): cache}


def returned_cache(output):
    """The cache a model call returned (``use_cache=True``), read without the deprecated alias."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
