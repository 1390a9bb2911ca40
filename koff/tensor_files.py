"""Safetensors files read defensively and written atomically.

A safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype, shape and
byte range, then the data. ``read_header`` checks that header against the file before any tensor is
read: a byte range that runs past the end, a shape whose size disagrees with its range, a header of
absurd length. Readers that know what shapes to expect (a memory for a given backbone, a checkpoint
for a given run) compare them with the header, so a small (or sparse) file that claims a huge tensor
is refused without allocating it. ``save_tensors`` turns a failed write (a full disk) into one
``KoffError`` line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from koff.errors import KoffError, UserInputError
from koff.io import atomic_path

# safetensors' own reader refuses headers over 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100 * 1024 * 1024
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32")


class TensorFileError(UserInputError):
    """A safetensors file that is truncated, corrupt, or not what its reader expects."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape, after checking the header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            length = struct.unpack("<Q", head)[0]
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise TensorFileError(f"{path}: corrupt safetensors header (claims {length:,} bytes in a file of {size:,})")
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TensorFileError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - length
    return {name: _entry(path, name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"}


def _entry(path: Path, name: str, entry, data_bytes: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        valid = (dtype in ITEM_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                 and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes)
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise TensorFileError(f"{path}: tensor {name!r} has a corrupt entry or lies past the end of the file "
                              "(truncated?)")
    if (end - begin) != math.prod(shape) * ITEM_BYTES[dtype]:
        raise TensorFileError(f"{path}: tensor {name!r} claims shape {list(shape)} but holds {end - begin:,} bytes")
    return TensorInfo(dtype, shape)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a file whose header checks out (see ``read_header``)."""
    read_header(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise TensorFileError(f"{path}: {err}") from err


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` atomically; a failed write (disk full, no permission) is one ``KoffError``."""
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except (SafetensorError, OSError) as err:
        raise KoffError(f"could not write {path}: {err}") from err
