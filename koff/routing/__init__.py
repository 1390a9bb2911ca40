"""Choosing a memory from a prompt: ``model: "auto"`` (see ``koff.routing.router``)."""

from koff.routing.router import ROUTER_FILE, Router, RouterError, build_router, embed, pad_left, spread

__all__ = ["ROUTER_FILE", "Router", "RouterError", "build_router", "embed", "pad_left", "spread"]
