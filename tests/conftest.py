import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parent.parent / "bench"))  # code only benchmarks use (the sweep, parallel runs)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import save_tiny, tiny_tokenizer, write_corpus  # noqa: E402

ARCHS = ["llama", "qwen2"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own koff cache, so tests never see each other's tokenised blocks."""
    monkeypatch.setenv("KOFF_CACHE_DIR", str(tmp_path / "koff-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=ARCHS)
def model_dir(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def corpus(tmp_path):
    """Three small text domains on disk."""
    return write_corpus(tmp_path)


@pytest.fixture
def domains(tokenizer, corpus):
    """The three corpus domains as 32-token blocks."""
    from koff.data import DomainSpec, load_domain

    return [load_domain(DomainSpec(n, str(p)), tokenizer, block_len=32, use_cache=False) for n, p in corpus.items()]
