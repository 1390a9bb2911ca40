"""Perplexities of the frozen dense base, kept on disk between tables.

Every ablation table opens with the dense base, and the base never changes: scored again on the
same blocks, with the same files, dtype, device and libraries, it gives the same numbers. Its row is
one of the four a run's table scores (the first command's table took 23-48 minutes on the 2-core
CPU). A result is keyed by all of those and by the blocks' bytes, so other text, another model or
a rewritten model file is scored afresh; ``KOFF_CACHE_DIR`` (``~/.cache/koff``) holds it under
``scores/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers

from koff.data.blocks import DomainData
from koff.evaluation.perplexity import DomainPerplexity, Scorer, domain_perplexity, scored_blocks
from koff.io import write_json
from koff.paths import cache_dir

SCORES_FORMAT = 1  # raise when the scoring changes what a perplexity means


def model_identity(folder: str | Path, dtype: torch.dtype, device: str | torch.device, how: str) -> str:
    """A model as it is scored: its folder's files (name, size, modification time), the dtype, the
    device type, ``how`` its logits are computed (which wrapper) and the libraries that compute them."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    parts += [str(Path(folder).resolve()), str(dtype), torch.device(device).type, how, torch.__version__, transformers.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ScoreCache:
    """Scores of one model (``identity``: ``model_identity``), read back where they were kept."""

    identity: str

    def perplexity(self, scorer: Scorer, data: DomainData, batch_size: int = 4, max_blocks: int | None = None,
                   progress: bool = True, device: str | torch.device = "cpu") -> DomainPerplexity:
        """``domain_perplexity`` of ``scorer`` on ``data``: kept from an earlier call on the same
        blocks, or scored now and kept."""
        path = cache_dir("scores") / f"{self._key(scored_blocks(data, max_blocks), batch_size)}.json"
        try:
            return replace(DomainPerplexity(**json.loads(path.read_text())), domain=data.name)
        except (OSError, ValueError, TypeError):  # not kept yet, or a file that cannot be read: score again
            pass
        result = domain_perplexity(scorer, data, batch_size, max_blocks, progress, device)
        write_json(path, asdict(result))
        return result

    def _key(self, blocks: torch.Tensor, batch_size: int) -> str:
        digest = hashlib.sha256(f"{SCORES_FORMAT}\0{self.identity}\0{batch_size}\0{tuple(blocks.shape)}\0".encode())
        digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]
