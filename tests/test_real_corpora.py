"""scripts/real_corpora.py: Debian manuals and Python sources as domain folders (no network here:
a .deb is built in the test)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from koff.data import DomainSpec, read_documents

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import real_corpora  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")


def build_deb(tmp_path: Path, package: str) -> Path:
    root = tmp_path / package
    html = root / "usr" / "share" / "doc" / package / "html"
    html.mkdir(parents=True)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: test\n")
    (html / "ch01.de.html").write_text("<html><body><h1>Einleitung</h1><p>Debian ist ein freies System.</p></body></html>")
    (html / "ch01.fr.html").write_text("<html><body><h1>Introduction</h1><p>Debian est libre.</p></body></html>")
    (html / "index.de.html").write_text("<html><body><a href='ch01.de.html'>Inhalt</a></body></html>")
    (html / "debian.css").write_text("body {}")
    deb = tmp_path / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


def test_a_manual_becomes_a_domain_folder_of_its_prose_pages(tmp_path, monkeypatch):
    deb = build_deb(tmp_path, "maint-guide-de")
    monkeypatch.setattr(real_corpora, "download", lambda package, into: deb)
    counts = real_corpora.write_manuals(tmp_path / "out", tmp_path, ["maint-guide"], ["deu"])
    assert counts == {"maint-guide/deu": 2}  # the index page is navigation, not prose
    assert "Einleitung\n\nDebian ist ein freies System.\n" in \
        read_documents(DomainSpec("deu", str(tmp_path / "out" / "maint-guide" / "deu")))


def test_a_package_of_every_language_gives_each_language_its_own_pages(tmp_path, monkeypatch):
    deb = build_deb(tmp_path, "debian-history")
    monkeypatch.setattr(real_corpora, "download", lambda package, into: deb)
    counts = real_corpora.write_manuals(tmp_path / "out", tmp_path, ["debian-history"], ["deu", "fra"])
    assert counts == {"debian-history/deu": 1, "debian-history/fra": 1}
    assert read_documents(DomainSpec("fra", str(tmp_path / "out" / "debian-history" / "fra"))) == \
        ["Introduction\n\nDebian est libre.\n"]


def test_python_sources_are_copied_as_text(tmp_path):
    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("def f():\n    return 1\n" * 200)
    (src / "pkg" / "tiny.py").write_text("x = 1\n")  # too small to be worth a file
    (src / "tests").mkdir()
    (src / "tests" / "test_mod.py").write_text("def test():\n    pass\n" * 200)
    assert real_corpora.write_python(tmp_path / "out", "python-x", src) == 1
    assert read_documents(DomainSpec("py", str(tmp_path / "out" / "python-x" / "python")))[0].startswith("def f():")
