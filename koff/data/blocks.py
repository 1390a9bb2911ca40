"""Tokenise a domain's documents, pack them into fixed-length blocks, split train/validation.

The split is made on whole blocks, by a seeded permutation, so no validation token is ever in a
training block and the validation blocks are spread over the whole corpus (every topic file of
a bundled language contributes). Tokenised blocks are cached on disk, keyed by the tokenizer,
the text and the settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from koff.data.sources import DomainDataError, DomainSpec, read_documents
from koff.tensor_files import load_tensors, save_tensors
from koff.paths import cache_dir


@dataclass
class DomainData:
    """Token blocks of one domain: ``train`` and ``val`` are ``(n_blocks, block_len)`` int64."""

    name: str
    source: str
    train: torch.Tensor
    val: torch.Tensor

    @property
    def block_len(self) -> int:
        return int(self.train.shape[1])

    def summary(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "block_len": self.block_len,
            "train_blocks": int(self.train.shape[0]),
            "val_blocks": int(self.val.shape[0]),
            "train_tokens": int(self.train.numel()),
            "val_tokens": int(self.val.numel()),
        }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_tokens(docs: list[list[int]], block_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into full blocks; the tail is dropped."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n_blocks = len(stream) // block_len
    return torch.tensor(stream[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic block-level split; both parts keep corpus order."""
    n = blocks.shape[0]
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return blocks[train_idx], blocks[val_idx]


def load_domain(
    spec: DomainSpec,
    tokenizer: PreTrainedTokenizerBase,
    block_len: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    use_cache: bool = True,
) -> DomainData:
    """Read, tokenise, pack and split one domain (from the cache when possible)."""
    if block_len < 2:
        raise DomainDataError(f"block length must be at least 2 tokens, got {block_len}")
    if not 0.0 < val_fraction < 1.0:
        raise DomainDataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    docs = read_documents(spec)
    key = hashlib.sha256()
    for part in (tokenizer_fingerprint(tokenizer), block_len, val_fraction, seed, *docs):
        key.update(str(part).encode())
        key.update(b"\0")
    cached = cache_dir("blocks") / f"{spec.name}-{key.hexdigest()[:20]}.safetensors"
    if use_cache and cached.is_file():
        tensors = load_tensors(cached)
        return DomainData(spec.name, spec.source, tensors["train"], tensors["val"])

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    blocks = pack_tokens(ids, block_len, tokenizer.eos_token_id)
    n_tokens = sum(len(x) for x in ids)
    if blocks.shape[0] < 2:
        raise DomainDataError(
            f"domain {spec.name!r}: {spec.source} gives {n_tokens} tokens, {blocks.shape[0]} block(s) of "
            f"{block_len}; at least 2 blocks are needed (one to train, one to validate)"
        )
    train, val = split_blocks(blocks, val_fraction, seed)
    if use_cache:
        save_tensors({"train": train, "val": val}, cached)
    return DomainData(spec.name, spec.source, train, val)


def load_heldout(spec: DomainSpec, tokenizer: PreTrainedTokenizerBase, block_len: int = 256,
                 max_blocks: int | None = None) -> DomainData:
    """Text that no run trains on (another source of a domain): every block is for evaluation, or
    ``max_blocks`` of them evenly spaced over the corpus, so that one part of it does not stand for all."""
    ids = tokenizer(read_documents(spec), add_special_tokens=False)["input_ids"]
    blocks = pack_tokens(ids, block_len, tokenizer.eos_token_id)
    if blocks.shape[0] < 1:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source} holds less than one block of {block_len} tokens")
    if max_blocks is not None and blocks.shape[0] > max_blocks:
        blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, max_blocks).round().long()]
    return DomainData(spec.name, spec.source, blocks[:0], blocks)


def load_domains(specs: list[DomainSpec], tokenizer: PreTrainedTokenizerBase, **kwargs) -> list[DomainData]:
    return [load_domain(spec, tokenizer, **kwargs) for spec in specs]
