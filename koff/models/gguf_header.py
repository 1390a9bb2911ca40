"""A GGUF file's header, read with every count and length checked against the bytes that remain.

GGUF stores its metadata as key-value pairs whose strings and arrays carry their own lengths, then
one record per tensor. A crafted header can claim an array of 2^62 elements or a key of 2^63 bytes;
a reader that trusts those numbers loops for ever or allocates until it dies. Here nothing is read,
skipped or looped over that the file cannot actually hold, so a bad header is refused in one line,
fast, before anything else (gguf's own reader, transformers' conversion) touches the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from koff.errors import UserInputError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 2
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class GGUFHeaderError(UserInputError):
    """A GGUF file whose header is truncated, corrupt or claims more than the file holds."""


@dataclass
class GGUFHeader:
    version: int
    tensor_count: int
    values: dict[str, object] = field(default_factory=dict)  # scalars and strings; arrays are skipped

    @property
    def architecture(self) -> str | None:
        value = self.values.get("general.architecture")
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    @property
    def remaining(self) -> int:
        return self.size - self.f.tell()

    def scalar(self, fmt: str):
        width = struct.calcsize(fmt)
        if width > self.remaining:
            raise GGUFHeaderError("it ends inside its header (truncated?)")
        return struct.unpack("<" + fmt, self.f.read(width))[0]

    def count(self, what: str, at_least_bytes_each: int) -> int:
        """A u64 count of things that take at least ``at_least_bytes_each`` bytes each in the file."""
        n = self.scalar("Q")
        if n * at_least_bytes_each > self.remaining:
            raise GGUFHeaderError(f"it claims {n:,} {what}, more than its remaining {self.remaining:,} bytes can hold")
        return n

    def string(self) -> str:
        raw = self.f.read(self.count("string bytes", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise GGUFHeaderError("a string in its header is not UTF-8") from err

    def skip(self, n_bytes: int) -> None:
        if n_bytes > self.remaining:
            raise GGUFHeaderError("it ends inside its header (truncated?)")
        self.f.seek(n_bytes, 1)

    def value(self, kind: int, depth: int = 0):
        """A value of ``kind``; arrays are skipped (None), in one seek where their elements are scalars."""
        if kind == STRING:
            return self.string()
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind != ARRAY or depth >= MAX_NESTING:
            raise GGUFHeaderError(f"its header holds a value of unknown type {kind}")
        element = self.scalar("I")
        if element in SCALARS:
            width = struct.calcsize(SCALARS[element])
            self.skip(self.count("array elements", width) * width)
        else:  # strings (8 bytes of length at least) or arrays (12 bytes of header at least)
            for _ in range(self.count("array elements", 8 if element == STRING else 12)):
                self.value(element, depth + 1)
        return None


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of ``path``: its key-value metadata, then every tensor record, all bounds-checked."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            reader = _Reader(f, size)
            if f.read(4) != MAGIC:
                raise GGUFHeaderError("no GGUF magic number")
            version = reader.scalar("I")
            if version not in VERSIONS:
                raise GGUFHeaderError(f"GGUF version {version} (koff reads versions {', '.join(map(str, VERSIONS))})")
            tensors = reader.count("tensors", 24)  # name length, dims, type, offset: 24 bytes at least
            header = GGUFHeader(version, tensors)
            for _ in range(reader.count("metadata entries", 12)):  # key length + value type: 12 bytes at least
                key = reader.string()
                header.values[key] = reader.value(reader.scalar("I"))
            for _ in range(tensors):
                reader.string()
                dims = reader.scalar("I")
                if not 1 <= dims <= MAX_DIMS:
                    raise GGUFHeaderError(f"a tensor record claims {dims} dimensions")
                reader.skip(8 * dims + 4 + 8)  # the dimensions, the type, the data offset
    except GGUFHeaderError as err:
        raise GGUFHeaderError(f"{path} is not a readable GGUF file: {err}") from None
    except OSError as err:
        raise GGUFHeaderError(f"cannot read {path}: {err}") from err
    return header
