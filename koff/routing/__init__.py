"""Choosing a memory from a prompt: ``model: "auto"`` (see ``koff.routing.router``)."""

from koff.routing.router import (ROUTER_FILE, HiddenStateRouter, Router, RouterError, TokenRouter, embed,
                                 mean_embeddings, pad_left, spread)

__all__ = ["ROUTER_FILE", "HiddenStateRouter", "Router", "TokenRouter", "RouterError", "embed", "mean_embeddings", "pad_left", "spread"]
