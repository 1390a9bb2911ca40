"""Tokenise a domain's documents, pack them into fixed-length blocks, split train/validation.

The split is made on whole blocks, by a seeded permutation, so no validation token is ever in a
training block and the validation blocks are spread over the whole corpus (every topic file of
a bundled language contributes). Tokenised blocks are cached on disk, keyed by the tokenizer,
the text and the settings.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from koff.data.sources import DomainDataError, DomainSpec, iter_documents, no_text_error, parse_domain
from koff.paths import cache_dir
from koff.tensor_files import load_tensors, save_tensors


@dataclass
class DomainData:
    """Token blocks of one domain: ``train`` and ``val`` are ``(n_blocks, block_len)`` int32 (half the
    memory of int64; ``.long()`` the rows a batch takes)."""

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


# Characters per piece, and pieces per tokenizer call. A fast tokenizer keeps offsets and strings for
# all it is given at once (about 240 bytes per character): text goes to it at most 64K characters at
# a time, short documents many to a call.
PIECE_CHARS = 1 << 12
BATCH_PIECES = 16
# Changes whenever the same text and settings would give other blocks (or another dtype).
BLOCKS_FORMAT = f"int32-pieces{PIECE_CHARS}"
# Rows moved at a time by an in-place split.
COMPACT_ROWS = 1024


def split_pieces(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """The text of ``chunks`` again, in pieces of at most ``size`` characters, each cut just before a
    whitespace where the second half of the piece has one (so no word is split)."""
    rest = ""
    for chunk in chunks:
        text, start = rest + chunk, 0
        while len(text) - start > size:
            end = start + size
            cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
            cut = cut if cut > start else end
            yield text[start:cut]
            start = cut
        rest = text[start:]
    if rest:
        yield rest


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    return list(split_pieces([text], size))


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Iterable[Iterable[str]],
                 eos_id: int | None) -> tuple[torch.Tensor, int]:
    """Every document's token ids in one int32 stream, ``eos_id`` after each, and how many documents
    gave text; blank documents are skipped. Text goes to the tokenizer a few pieces at a time and ids
    into one growing int32 buffer, so memory follows the ids, not the longest document or line."""
    ids, n_docs = array("i"), 0
    current, start, seen_text = -1, 0, False

    def close_document() -> None:  # EOS after a document with text; a blank one leaves nothing
        nonlocal n_docs
        if current < 0:
            return
        if not seen_text:
            del ids[start:]
        else:
            n_docs += 1
            if eos_id is not None:
                ids.append(eos_id)

    pieces = ((i, piece) for i, doc in enumerate(documents) for piece in split_pieces(doc))  # read as consumed
    while batch := list(itertools.islice(pieces, BATCH_PIECES)):  # pieces of several short documents at once
        encoded = tokenizer([piece for _, piece in batch], add_special_tokens=False)["input_ids"]
        for (doc, piece), piece_ids in zip(batch, encoded):
            if doc != current:
                close_document()
                current, start, seen_text = doc, len(ids), False
            seen_text = seen_text or bool(piece.strip())
            ids.extend(piece_ids)
    close_document()
    return torch.from_numpy(np.frombuffer(ids, dtype=np.int32)) if ids else torch.empty(0, dtype=torch.int32), n_docs


def cut_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """``stream`` as full rows of ``block_len`` (a view; the tail is dropped)."""
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].view(n_blocks, block_len)


def pack_tokens(docs: Sequence[Sequence[int] | torch.Tensor], block_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate token lists (EOS after each) and cut into full int32 blocks; the tail is dropped."""
    eos = torch.tensor([eos_id] if eos_id is not None else [], dtype=torch.int32)
    parts = [part for ids in docs for part in (torch.as_tensor(ids, dtype=torch.int32), eos)]
    return cut_blocks(torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32), block_len)


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int,
                 in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic block-level split; both parts keep corpus order. ``in_place`` moves the training
    blocks to the front of ``blocks`` (the training part is then a view of it) instead of copying
    them: a corpus's blocks are held once, not twice."""
    n = blocks.shape[0]
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    val = blocks[val_idx]
    if not in_place:
        return blocks[train_idx], val
    # train_idx is sorted and train_idx[j] >= j: each chunk's sources lie at or after its
    # destination and after every earlier destination, so moving the chunks in order is safe.
    for begin in range(0, len(train_idx), COMPACT_ROWS):
        rows = train_idx[begin: begin + COMPACT_ROWS]
        blocks[begin: begin + len(rows)] = blocks[rows]
    return blocks[: len(train_idx)], val


def _cache_key(spec: DomainSpec, tokenizer: PreTrainedTokenizerBase, *settings) -> str:
    """A digest of the tokenizer, the settings and the domain's text, read a piece at a time."""
    key = hashlib.sha256()
    for part in (tokenizer_fingerprint(tokenizer), BLOCKS_FORMAT, *settings):
        key.update(str(part).encode())
        key.update(b"\0")
    for doc in iter_documents(spec):
        for piece in doc:
            key.update(piece.encode())
        key.update(b"\0")
    return key.hexdigest()[:20]


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
    cached = None
    if use_cache:
        cached = cache_dir("blocks") / f"{spec.name}-{_cache_key(spec, tokenizer, block_len, val_fraction, seed)}.safetensors"
    if cached is not None and cached.is_file():
        tensors = load_tensors(cached)
        return DomainData(spec.name, spec.source, tensors["train"], tensors["val"])

    blocks, n_tokens = _blocks(spec, tokenizer, block_len)
    if blocks.shape[0] < 2:
        raise DomainDataError(
            f"domain {spec.name!r}: {spec.source} gives {n_tokens} tokens, {blocks.shape[0]} block(s) of "
            f"{block_len}; at least 2 blocks are needed (one to train, one to validate)"
        )
    train, val = split_blocks(blocks, val_fraction, seed, in_place=True)
    if cached is not None:
        save_tensors({"train": train, "val": val}, cached)
    return DomainData(spec.name, spec.source, train, val)


def load_recorded_domain(name: str, record: dict, tokenizer: PreTrainedTokenizerBase, block_len: int,
                         val_fraction: float, seed: int) -> DomainData:
    """Domain ``name`` as a memory's manifest records it (``record``: its source, block length and the
    split its run made), loaded as that run loaded it; the arguments stand in for what an older record
    lacks."""
    return load_domain(parse_domain(f"{name}={record.get('source')}"), tokenizer, block_len=record.get("block_len") or block_len,
                       val_fraction=record.get("val_fraction", val_fraction), seed=record.get("seed", seed))


def load_heldout(spec: DomainSpec, tokenizer: PreTrainedTokenizerBase, block_len: int = 256,
                 max_blocks: int | None = None) -> DomainData:
    """Text that no run trains on (another source of a domain): every block is for evaluation, or
    ``max_blocks`` of them evenly spaced over the corpus, so that one part of it does not stand for all."""
    blocks, _ = _blocks(spec, tokenizer, block_len)
    if blocks.shape[0] < 1:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source} holds less than one block of {block_len} tokens")
    if max_blocks is not None and blocks.shape[0] > max_blocks:
        blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, max_blocks).round().long()]
    return DomainData(spec.name, spec.source, blocks[:0], blocks)


def _blocks(spec: DomainSpec, tokenizer: PreTrainedTokenizerBase, block_len: int) -> tuple[torch.Tensor, int]:
    """The domain's blocks (a view of its token stream) and the stream's length."""
    stream, n_docs = token_stream(tokenizer, iter_documents(spec), tokenizer.eos_token_id)
    if n_docs == 0:
        raise no_text_error(spec)
    return cut_blocks(stream, block_len), len(stream)


def load_domains(specs: list[DomainSpec], tokenizer: PreTrainedTokenizerBase, **kwargs) -> list[DomainData]:
    return [load_domain(spec, tokenizer, **kwargs) for spec in specs]
