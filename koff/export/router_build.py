"""The export's router: a token model of each memory's own training text (no model is loaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from koff.data import load_recorded_domain
from koff.formats.run import RunOutputs
from koff.models import load_tokenizer
from koff.routing import ROUTER_FILE, TokenRouter

log = logging.getLogger(__name__)


def write_router(run: RunOutputs, export: Path) -> Path | None:
    """``export/router.safetensors`` for the run's memories (None where the run has fewer than two:
    there is nothing to choose)."""
    if len(run.memories) < 2:
        return None
    tokenizer = load_tokenizer(export / "backbone")
    texts = {name: domain_blocks(run, name, tokenizer) for name in run.memories}
    router = TokenRouter.build(texts, AutoConfig.from_pretrained(export / "backbone").vocab_size)
    router.save(export / ROUTER_FILE)
    log.info("%s router over %s", router.kind, ", ".join(router.names))
    return export / ROUTER_FILE


def domain_blocks(run: RunOutputs, name: str, tokenizer) -> list[torch.Tensor]:
    """The training blocks of memory ``name``'s domain that the token router counts, as its run split them."""
    cfg = run.config
    domain = load_recorded_domain(name, run.manifests[name].get("data") or {}, tokenizer, cfg.block_len,
                                  cfg.val_fraction, cfg.seed)
    return TokenRouter.training_blocks(domain.train)
