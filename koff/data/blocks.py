"""Tokenise a domain's documents, pack them into fixed-length blocks, split train/validation.

The split is made on whole blocks, by a seeded permutation, so no validation token is ever in a
training block and the validation blocks are spread over the whole corpus (every topic file of
a bundled language contributes). Tokenised blocks are cached on disk, keyed by the tokenizer,
the text and the settings.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from koff.data.sources import DomainDataError, DomainSpec, read_documents
from koff.paths import cache_dir
from koff.tensor_files import load_tensors, save_tensors


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


# Characters per tokenizer call. A fast tokenizer keeps offsets and strings for all it is given at
# once (about 240 bytes per character of a single 50 MB line): text goes in pieces of this size.
PIECE_CHARS = 1 << 16
BATCH_PIECES = 16


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, each cut made just before a
    whitespace where the second half of the piece has one (so no word is split)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> list[torch.Tensor]:
    """Each document's token ids, tokenised a few pieces at a time (``text_pieces``), so that memory
    follows the ids, not the size of the longest document or line."""
    pieces = ((i, piece) for i, doc in enumerate(docs) for piece in text_pieces(doc))  # made as consumed
    ids: list[list[torch.Tensor]] = [[] for _ in docs]
    while batch := list(itertools.islice(pieces, BATCH_PIECES)):
        encoded = tokenizer([piece for _, piece in batch], add_special_tokens=False)["input_ids"]
        for (doc, _), piece_ids in zip(batch, encoded):
            ids[doc].append(torch.tensor(piece_ids, dtype=torch.int32))  # half the memory of int64 ids
        del encoded
    return [torch.cat(parts) if len(parts) != 1 else parts[0] for parts in ids]


def pack_tokens(docs: Sequence[Sequence[int] | torch.Tensor], block_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into full blocks; the tail is dropped."""
    eos = torch.tensor([eos_id] if eos_id is not None else [], dtype=torch.int32)
    parts = [part for ids in docs for part in (torch.as_tensor(ids, dtype=torch.int32), eos)]
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)
    del parts
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].view(n_blocks, block_len).long()


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

    ids = tokenize_documents(tokenizer, docs)
    blocks = pack_tokens(ids, block_len, tokenizer.eos_token_id)
    n_tokens = sum(len(x) for x in ids)
    del ids
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
    ids = tokenize_documents(tokenizer, read_documents(spec))
    blocks = pack_tokens(ids, block_len, tokenizer.eos_token_id)
    if blocks.shape[0] < 1:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source} holds less than one block of {block_len} tokens")
    if max_blocks is not None and blocks.shape[0] > max_blocks:
        blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, max_blocks).round().long()]
    return DomainData(spec.name, spec.source, blocks[:0], blocks)


def load_domains(specs: list[DomainSpec], tokenizer: PreTrainedTokenizerBase, **kwargs) -> list[DomainData]:
    return [load_domain(spec, tokenizer, **kwargs) for spec in specs]
