"""The name under which a Hugging Face model (or decoder layer) takes and returns its KV cache.

transformers 5.24 renamed the models' and layers' ``past_key_values`` argument and output field
to ``cache``; models still take the old argument with a warning, until 5.40. koff supports every
5.x, so it asks the model's ``forward`` which name it takes instead of pinning either.
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


def given_cache(kwargs: dict):
    """The cache among a call's keyword arguments (a decoder layer's: the model passes whichever
    name its version uses), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))
