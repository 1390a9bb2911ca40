"""Real, human-written text as koff domain folders, from what Debian ships (issue 13).

Debian packages its manuals translated into many languages. Each manual is one *source*; a
memory trained on one source can be evaluated on another of the same language (transfer):

    debian-reference      Debian Reference          eng deu fra spa ita por
    maint-guide           New Maintainers' Guide    eng deu fra spa ita
    developers-reference  Developer's Reference     eng deu fra ita
    debian-history        A Short History of Debian eng deu fra spa ita por   (another genre: narrative prose)

and three sources of real Python: the interpreter's standard library (``python-stdlib``), the
Python files of this environment's installed packages (``python-site``), and CPython's example
scripts and tools from Debian's ``python3.X-examples`` (``python-examples``, another genre: programs,
not library code).

    python scripts/real_corpora.py --out corpora        # needs apt-get (Debian/Ubuntu) and its registry

Writes ``OUT/<source>/<iso639-3>/*.html`` (and ``OUT/python-*/python/*.txt``), each folder a
``--domain`` source: ``--domain deu=corpora/debian-reference/deu``. koff reads the HTML pages as
their prose. The .deb files are kept under ``$KOFF_CACHE_DIR/debian`` so a second run downloads
nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from koff.paths import cache_dir

LANGUAGES = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt": "por"}
MANUALS = {  # source -> {language code: package}
    "debian-reference": {code: f"debian-reference-{code}" for code in ("en", "de", "fr", "es", "it", "pt")},
    "maint-guide": {"en": "maint-guide", **{code: f"maint-guide-{code}" for code in ("de", "fr", "es", "it")}},
    "developers-reference": {"en": "developers-reference",
                             **{code: f"developers-reference-{code}" for code in ("de", "fr", "it")}},
    "debian-history": {code: "debian-history" for code in ("en", "de", "fr", "es", "it", "pt")},
}
# Sources whose one package holds every language, each page named PAGE.<code>.html.
MULTILINGUAL = {"debian-history"}
SKIPPED_PAGES = {"genindex", "search", "index"}  # navigation, not prose
PYTHON_CAP = 400  # files per Python source: plenty of tokens, a quick copy


def download(package: str, into: Path) -> Path:
    """The package's .deb, fetched once with ``apt-get download``."""
    found = sorted(into.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    subprocess.run(["apt-get", "download", "-q", package], cwd=into, check=True, capture_output=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(f"apt-get download {package} wrote no .deb in {into}")
    return found[-1]


@contextmanager
def extracted(deb: Path) -> Iterator[Path]:
    """A temporary folder holding the .deb's files while inside."""
    with tempfile.TemporaryDirectory(prefix="koff-deb-") as root:
        subprocess.run(["dpkg-deb", "-x", str(deb), root], check=True)
        yield Path(root)


def manual_pages(root: Path, language: str | None = None) -> list[Path]:
    """The HTML pages of an extracted manual (prose pages only); with ``language``, only the pages
    named PAGE.<language>.html (a package that holds every language)."""
    pages = [p for p in sorted(root.rglob("*.htm*")) if p.name.split(".")[0] not in SKIPPED_PAGES]
    return [p for p in pages if p.name.endswith(f".{language}.html")] if language else pages


def write_manuals(out: Path, debs: Path, sources: list[str], languages: list[str]) -> dict[str, int]:
    counts = {}
    for source in sources:
        for code, package in MANUALS[source].items():
            lang = LANGUAGES[code]
            if lang not in languages:
                continue
            target = out / source / lang
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            with extracted(download(package, debs)) as root:
                pages = manual_pages(root, code if source in MULTILINGUAL else None)
                for i, page in enumerate(pages):
                    shutil.copy(page, target / f"{i:03d}-{page.name}")
            counts[f"{source}/{lang}"] = len(pages)
            print(f"{source}/{lang}: {len(pages)} pages from {package}", flush=True)
    return counts


def write_python(out: Path, name: str, root: Path, skip: tuple[str, ...] = (), min_bytes: int = 2000) -> int:
    """Up to ``PYTHON_CAP`` .py files under ``root`` (sorted, tests and vendored copies skipped) as .txt."""
    def wanted(path: Path) -> bool:
        inside = path.relative_to(root)
        return not any(part in skip for part in inside.parts) and "test" not in inside.as_posix().lower() \
            and path.stat().st_size > min_bytes

    files = [p for p in sorted(root.rglob("*.py")) if wanted(p)][:PYTHON_CAP]
    target = out / name / "python"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for i, path in enumerate(files):
        (target / f"{i:04d}-{path.stem}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    print(f"{name}/python: {len(files)} files from {root}", flush=True)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpora")
    parser.add_argument("--sources", nargs="+", default=list(MANUALS), choices=list(MANUALS))
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES.values()), choices=list(LANGUAGES.values()))
    parser.add_argument("--no-python", action="store_true", help="skip the two Python sources")
    args = parser.parse_args()
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        sys.exit("real_corpora.py needs apt-get and dpkg-deb (a Debian or Ubuntu machine)")
    out = Path(args.out)
    write_manuals(out, cache_dir("debian"), args.sources, args.languages)
    if not args.no_python:
        write_python(out, "python-stdlib", Path(sysconfig.get_paths()["stdlib"]), skip=("site-packages", "idlelib"))
        write_python(out, "python-site", Path(sysconfig.get_paths()["purelib"]), skip=("_vendor", "koff"))
        examples = f"python{sys.version_info.major}.{sys.version_info.minor}-examples"
        with extracted(download(examples, cache_dir("debian"))) as root:
            write_python(out, "python-examples", root, min_bytes=500)


if __name__ == "__main__":
    main()
