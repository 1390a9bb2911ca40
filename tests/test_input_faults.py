"""Inputs that could hang, exhaust or silently corrupt a run: crafted GGUF headers, safetensors files
that claim more than they hold, incomplete model folders, two processes on one folder, a kill in
the middle of a write, broken config files, a full disk, a corpus that is one enormous line."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import koff.tensor_files as tensor_files
from koff.data.blocks import PIECE_CHARS, cut_blocks, split_pieces, text_pieces, token_stream
from koff.errors import KoffError
from koff.locks import FolderBusyError, folder_lock, lock_path
from koff.models.gguf_header import GGUFHeaderError, read_gguf_header
from koff.runtime import load
from koff.tensor_files import TensorFileError, read_header
from test_cli_faults import decompose, refused, world  # noqa: F401 - the module's fixture
from tiny import tiny_model


# ----- GGUF headers ------------------------------------------------------------------------------
def gguf_file(tmp_path, body: bytes, entries: int = 1, tensors: int = 0):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, entries) + body + b"\0" * 16)
    return path


def key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


CRAFTED = {
    "array of 2^62 strings": key(b"tokens") + struct.pack("<IIQ", 9, 8, 2**62),
    "array of 2^62 bytes": key(b"tokens") + struct.pack("<IIQ", 9, 0, 2**62),
    "nested arrays": key(b"a") + struct.pack("<IIQ", 9, 9, 2**40),
    "key of 2^40 bytes": struct.pack("<Q", 2**40),
    "key of 2^63 bytes": struct.pack("<Q", 2**63),
    "unknown value type": key(b"a") + struct.pack("<I", 77),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_gguf_header_is_refused_in_one_line(tmp_path, world, capsys, case):  # noqa: F811
    path = gguf_file(tmp_path, CRAFTED[case])
    with pytest.raises(GGUFHeaderError):
        read_gguf_header(path)
    refused(["decompose", "--model", path, "--domain", f"eng={world['corpus']['eng']}", "--out", tmp_path / "run"],
            capsys, "not a readable GGUF file")


def test_gguf_counts_are_bounded_by_the_file(tmp_path):
    with pytest.raises(GGUFHeaderError, match="metadata entries"):
        read_gguf_header(gguf_file(tmp_path, b"", entries=2**60))
    with pytest.raises(GGUFHeaderError, match="tensors"):
        read_gguf_header(gguf_file(tmp_path, b"", entries=0, tensors=2**50))


# ----- safetensors files that claim more than they hold ------------------------------------------
def claiming(path, shape, dtype="F32", data: bytes = b""):
    """A safetensors file whose header claims one tensor of ``shape``; ``data`` bytes follow."""
    size = 4 * int(torch.tensor(shape).prod())
    header = json.dumps({"t": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, size]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_headers_are_checked_against_the_file_before_a_tensor_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_files, "load_file", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(TensorFileError, match="past the end"):
        tensor_files.load_tensors(claiming(tmp_path / "short.safetensors", (16384, 16384), data=b"\0" * 100))
    with pytest.raises(TensorFileError, match="header"):
        (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
        tensor_files.load_tensors(tmp_path / "long.safetensors")
    with pytest.raises(TensorFileError, match="8-byte"):
        (tmp_path / "tiny.safetensors").write_bytes(b"\1\2")
        tensor_files.load_tensors(tmp_path / "tiny.safetensors")


def test_a_sparse_memory_file_claiming_a_huge_tensor_is_refused_from_its_header(world, tmp_path, monkeypatch):  # noqa: F811
    """A 1 GB sparse file (a few KB on disk) whose shape is not the backbone's: refused without reading it."""
    export = tmp_path / "export"
    subprocess.run(["cp", "-r", str(world["export"]), str(export)], check=True)
    kv = export / "memories" / "eng" / "kv_prefix.safetensors"
    header = {f"layers.{i}.{kind}": {"dtype": "F32", "shape": [16384, 16384],
                                     "data_offsets": [(2 * i + j) * 2**30, (2 * i + j + 1) * 2**30]}
              for i in range(2) for j, kind in enumerate(("keys", "values"))}
    raw = json.dumps(header).encode()
    with kv.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 4 * 2**30)  # sparse: no data blocks on disk
    real = tensor_files.load_file

    def load_file(path, **kwargs):
        assert "kv_prefix" not in str(path), "the huge tensor was read"
        return real(path, **kwargs)

    monkeypatch.setattr(tensor_files, "load_file", load_file)
    runtime = load(export)
    assert "eng" in runtime.broken and "shape" in runtime.broken["eng"]


# ----- model folders that do not hold what their config says -------------------------------------
def model_copy(world, tmp_path, change):  # noqa: F811
    folder = tmp_path / "model"
    subprocess.run(["cp", "-r", world["model"], str(folder)], check=True)
    change(folder)
    return folder


def drop_a_layer_tensor(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[sorted(k for k in tensors if ".layers.1." in k)[0]]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def claim_more_layers(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))


def truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def widen_in_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] * 2}))


@pytest.mark.parametrize("change, message", [(drop_a_layer_tensor, "not in its weight files"),
                                             (claim_more_layers, "not in its weight files"),
                                             (truncate_weights, "past the end of the file"),
                                             (widen_in_config, "do not match config.json")])
def test_an_incomplete_model_folder_is_refused_before_training(world, tmp_path, capsys, change, message):  # noqa: F811
    folder = model_copy(world, tmp_path, change)
    argv = decompose(world | {"model": str(folder)}, "--out", tmp_path / "run")
    refused(argv, capsys, message)
    assert not (tmp_path / "run").exists()


# ----- one owner per folder ----------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from koff.locks import folder_lock
    with folder_lock(sys.argv[1], "koff decompose"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of the folder it is given; kill it afterwards."""
    started = []

    def hold(folder):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(world, tmp_path, capsys, holder):  # noqa: F811
    out = tmp_path / "run"
    first = holder(out)
    last = refused(decompose(world, "--out", out), capsys, f"pid {first.pid}")
    assert "koff decompose" in last
    refused(decompose(world, "--out", out, "--resume"), capsys, "is in use by")
    refused(["export", out, tmp_path / "export"], capsys, "is in use by")
    assert not (out / "config.yaml").exists()


def test_export_and_add_domain_hold_the_export_folder(world, tmp_path, capsys, holder):  # noqa: F811
    holder(world["export"])
    refused(["export", world["run"], world["export"], "--force"], capsys, "is in use by")
    refused(["add-domain", world["export"], f"deu={world['corpus']['eng']}", "--steps", "1"], capsys, "is in use by")


def test_the_lock_of_a_killed_process_is_stale_and_taken(tmp_path, holder):
    folder = tmp_path / "run"
    process = holder(folder)
    with pytest.raises(FolderBusyError):
        with folder_lock(folder, "test"):
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert lock_path(folder).exists()  # left behind by the kill ...
    with folder_lock(folder, "test"):  # ... and taken all the same
        with folder_lock(folder, "nested, same process"):
            pass
    assert not lock_path(folder).exists()


# ----- kills, leftovers and full disks -----------------------------------------------------------
def test_sigterm_during_export_leaves_no_temporary_folder(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    import koff.export.exporter as exporter

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    (tmp_path / ".export.old-kill.tmp").mkdir()  # what an earlier, killed export left
    monkeypatch.setattr(exporter, "write_backbone_weights", terminated)
    from koff.cli import main

    assert main(["export", str(world["run"]), str(tmp_path / "export")]) == 143
    assert "koff: terminated" in capsys.readouterr().err
    monkeypatch.undo()
    assert not list(tmp_path.glob(".export*")) and not (tmp_path / "export").exists()
    assert main(["export", str(world["run"]), str(tmp_path / "export")]) == 0


def test_a_full_disk_is_one_line(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(tensor_files, "save_file", full)
    refused(decompose(world, "--out", tmp_path / "run"), capsys, "StorageFull")
    refused(["export", world["run"], tmp_path / "export"], capsys, "StorageFull")
    assert not list(tmp_path.glob(".export*"))


def test_add_domain_removes_what_a_killed_add_domain_left(world, tmp_path):  # noqa: F811
    from koff.cli import main

    export = tmp_path / "export"
    subprocess.run(["cp", "-r", str(world["export"]), str(export)], check=True)
    (export / ".add-domain-killed").mkdir()
    assert main(["add-domain", str(export), f"deu={world['corpus']['eng']}", "--steps", "1", "--block-len", "32",
                 "--kv-slots", "4"]) == 0
    assert not list(export.glob(".add-domain-*")) and (export / "memories" / "deu").is_dir()


CONFIGS = {"syntax": "steps: [1\n", "python tag": "steps: !!python/object/apply:os.system ['true']\n",
           "not a number": "steps: abc\n", "a number with two dots": "sparsity: 0.1.2\n", "a list": "steps: [1, 2]\n"}


@pytest.mark.parametrize("case", CONFIGS)
def test_a_broken_config_file_is_one_line(world, tmp_path, capsys, case):  # noqa: F811
    config = tmp_path / "config.yaml"
    config.write_text(CONFIGS[case])
    argv = ["decompose", "--config", config, "--model", world["model"], "--domain", f"eng={world['corpus']['eng']}",
            "--out", tmp_path / "run"]
    refused(argv, capsys, "is not valid YAML" if case in ("syntax", "python tag") else "setting")


def test_the_command_line_imports_nothing_heavy_before_its_error_handling():
    """A Ctrl-C while torch loads must land in ``main``'s handler (one line), not in an import."""
    code = "import sys, koff.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ----- a corpus that is one enormous line ---------------------------------------------------------
def test_text_is_tokenised_in_pieces_cut_before_whitespace():
    text = ("word " * 100_000).strip()
    pieces = text_pieces(text)
    assert "".join(pieces) == text and max(map(len, pieces)) <= PIECE_CHARS
    assert all(p.startswith(" ") for p in pieces[1:])  # no word is cut in two
    assert text_pieces("x" * (PIECE_CHARS + 5)) == ["x" * PIECE_CHARS, "xxxxx"]
    chunks = [text[i: i + 1000] for i in range(0, len(text), 1000)]  # as a file is read
    assert list(split_pieces(chunks)) == pieces


def test_a_one_line_corpus_never_reaches_the_tokenizer_whole(world):  # noqa: F811
    from koff.models.loader import load_tokenizer

    tokenizer = load_tokenizer(world["model"])
    longest = []
    real = tokenizer.__call__

    class Spy(type(tokenizer)):
        def __call__(self, texts, **kwargs):
            longest.append(max(map(len, texts)))
            return real(texts, **kwargs)

    tokenizer.__class__ = Spy
    line = "the cat sat on the mat " * 20_000
    stream, n_docs = token_stream(tokenizer, [[line[:1000], line[1000:]], ["a short one"], [" ", "\n"]], eos_id=0)
    assert max(longest) <= PIECE_CHARS and n_docs == 2  # the blank document is skipped
    whole = tokenizer(line[:PIECE_CHARS // 2], add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.int32 and stream[: len(whole) - 1].tolist() == whole[:-1]
    short = tokenizer("a short one", add_special_tokens=False)["input_ids"]
    assert stream[-len(short) - 2:].tolist() == [0, *short, 0]
    assert cut_blocks(stream, 16).shape[1] == 16
