"""``koff.load(folder)``: one exported backbone, any number of swappable memories.

Switching memory is choosing which loaded memory a request names: a pointer, never a reload.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch

from koff.data.sources import validate_domain_name
from koff.errors import UserInputError
from koff.formats.backbone import BackboneError, load_backbone
from koff.formats.exported_memory import FORMAT as MEMORY_FORMAT
from koff.formats.exported_memory import MANIFEST, memory_size_bytes, read_exported_state
from koff.io import read_json
from koff.memories.memory import DEFAULT_LORA_TARGETS, DomainMemory, MemoryConfig
from koff.memories.parts import MemoryFit, parse_lora_key
from koff.model import KoffModel, UnknownMemoryError
from koff.models import resolve_dtype
from koff.routing import ROUTER_FILE, Router, RouterError
from koff.runtime.generation import BatchGeneration, DecodeBatch, Sampling, TextStream
from koff.scoring import token_nll_sum

log = logging.getLogger(__name__)

AUTO = "auto"  # the memory name that asks the router


class MemoryLoadError(UserInputError):
    """A memory folder that cannot be loaded onto this backbone."""


class KoffRuntime:
    def __init__(self, folder: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto",
                 merge_lora: bool = False, compile: bool = False):
        self.folder = Path(folder)
        self.compile = compile  # decoding steps through torch.compile (see compiled_step.py)
        dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
        base, self.tokenizer, self.meta = load_backbone(self.folder / "backbone", dtype, device)
        self._fit = MemoryFit.of(base)
        targets = self.meta.get("lora_targets") or list(DEFAULT_LORA_TARGETS)
        self.model = KoffModel(base, MemoryConfig(kind="lora+kv", lora_targets=list(targets)))
        self.model.eval()
        # A batch on one memory runs on weights with its LoRA merged in: faster, one more copy of them.
        self.model.batch_memories.merge_single = merge_lora
        self.sizes: dict[str, int] = {}
        # Memory folders of the export that could not be loaded, with the reason: one bad folder
        # must not keep the others (or a server) from starting.
        self.broken: dict[str, str] = {}
        memories = self.folder / "memories"
        for path in sorted(memories.iterdir()) if memories.is_dir() else []:
            try:
                self.add_memory(inside(path, memories))
            except MemoryLoadError as err:
                self.broken[path.name] = str(err)
                log.warning("memory %s not loaded: %s", path.name, err)
        # The router that picks a memory for memory="auto"; a missing or bad one leaves named memories working.
        self.router: Router | None = None
        self.router_problem: str | None = None
        if (self.folder / ROUTER_FILE).is_file():
            try:
                router = Router.load(self.folder / ROUTER_FILE, self.model.base)
                foreign = sorted(set(router.names) - set(self.memories) - set(self.broken))
                if foreign:
                    raise RouterError(f"{ROUTER_FILE} routes to {', '.join(foreign)}, which this export does not hold: "
                                      "it does not fit these memories (export again to rebuild it)")
                self.router = router
            except RouterError as err:
                self.router_problem = str(err)
                log.warning("memory=auto is off: %s", err)
        else:
            self.router_problem = f"this export has no {ROUTER_FILE} (made by `koff export` for two or more memories)"

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def memories(self) -> list[str]:
        return list(self.model.memories)

    @property
    def context(self) -> int:
        """Positions the backbone attends over (a memory's KV slots take some of them)."""
        return int(getattr(self.model.base.config, "max_position_embeddings", 0) or 1 << 30)

    def memory_slots(self, name: str | None) -> int:
        """The KV slots memory ``name`` puts before every prompt (0 for the bare backbone)."""
        return self.model.memories[name].slots if name is not None else 0

    @staticmethod
    def memory_name(folder: str | Path) -> str | None:
        """The name a memory folder's manifest gives it, or None where it cannot be read."""
        try:
            return read_json(Path(folder) / MANIFEST).get("name")
        except (OSError, ValueError, AttributeError):
            return None

    # ----- memories -----------------------------------------------------------------------------
    def add_memory(self, path: str | Path, name: str | None = None) -> str:
        """Load a memory folder; every check runs before the model sees it, so a refusal leaves nothing half-loaded."""
        memory = self._read_memory(Path(path), name)
        self.model.adapt_projections(sorted({parse_lora_key(k)[1] for k in memory.lora_A}))
        self.model.add_memory(memory)
        self.sizes[memory.name] = memory_size_bytes(Path(path))
        self.broken.pop(Path(path).name, None)
        return memory.name

    def remove_memory(self, name: str) -> None:
        self.model.remove_memory(name)
        self.sizes.pop(name, None)

    def _read_memory(self, path: Path, name: str | None) -> DomainMemory:
        if not (path / MANIFEST).is_file():
            raise MemoryLoadError(f"{path} is not a koff memory ({MANIFEST} missing)")
        try:
            manifest = read_json(path / MANIFEST)
            name = validate_domain_name(name or manifest["name"])
            if manifest.get("format") != MEMORY_FORMAT:
                raise MemoryLoadError(f"{path}: unknown memory format {manifest.get('format')!r}")
            if manifest.get("backbone_fingerprint") != self.fingerprint:
                raise MemoryLoadError(
                    f"memory {name!r} belongs to another backbone (fingerprint "
                    f"{str(manifest.get('backbone_fingerprint'))[:12]}..., this one is {self.fingerprint[:12]}...)"
                )
            if name in self.model.memories:
                raise MemoryLoadError(f"a memory named {name!r} is already loaded")
            if name == AUTO:
                raise MemoryLoadError(f"{AUTO!r} is reserved (it asks the router to pick a memory); load it under another name")
            state = read_exported_state(path, self._fit, manifest)
            if not state:
                raise MemoryLoadError(f"{path} holds neither LoRA nor KV weights")
            memory = DomainMemory.from_flat_state(name, state, manifest["lora_alpha"])
        except MemoryLoadError:
            raise
        except UserInputError as err:  # a file that does not fit this backbone: the message names it
            raise MemoryLoadError(str(err)) from err
        except Exception as err:  # corrupt JSON, a manifest without its keys
            raise MemoryLoadError(f"cannot load memory from {path}: {type(err).__name__}: {err}") from err
        return memory

    # ----- routing ----------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, texts: str | Sequence[str]) -> list[tuple[str | None, float]]:
        """The memory the router picks for each text (None: below its confidence threshold, or a
        memory that is not loaded) and its confidence."""
        if self.router is None:
            raise UserInputError(f"memory 'auto' needs a router: {self.router_problem}; name a memory instead")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [torch.tensor(self.encode(t) or [self.tokenizer.pad_token_id]) for t in texts]
        chosen = self.router.choose(self.model.base, ids, self.tokenizer.pad_token_id)
        return [(name if name in self.model.memories else None, confidence) for name, confidence in chosen]

    def _resolve_auto(self, prompts: list[str], memories: list[str | None]) -> list[str | None]:
        auto = [i for i, m in enumerate(memories) if m == AUTO]
        if not auto:
            return memories
        picks = self.route([prompts[i] for i in auto])
        resolved = list(memories)
        for i, (name, _) in zip(auto, picks):
            resolved[i] = name
        return resolved

    # ----- text -----------------------------------------------------------------------------------
    @property
    def eos_ids(self) -> set[int]:
        """Tokens that end a sample."""
        eos = self.tokenizer.eos_token_id
        return {eos} if eos is not None else set()

    def new_batch(self) -> DecodeBatch:
        """An empty running batch over this backbone and its memories (continuous batching)."""
        return DecodeBatch(self.model, self.tokenizer.pad_token_id, self.eos_ids, compile=self.compile)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompt: str | Sequence[str],
        memory: str | None | Sequence[str | None] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        stream: bool = False,
    ):
        """Complete one prompt (a string back) or several (a list back), each with its own memory;
        ``"auto"`` lets the router pick it from the prompt (``route`` says which).

        ``stream=True`` (one prompt) returns an iterator of text pieces instead."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        memories = [memory] * len(prompts) if memory is None or isinstance(memory, str) else list(memory)
        memories = self._resolve_auto(prompts, memories)
        params = Sampling(max_new_tokens, temperature, top_p, seed)
        params.validate()
        for name in memories:
            if name in self.broken:
                raise MemoryLoadError(f"memory {name!r} could not be loaded: {self.broken[name]}")
        if stream:
            if not single:
                raise UserInputError("stream=True takes one prompt")
            return self._stream(prompts[0], memories[0], params, stop)
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        for _ in self.run(prompts, memories, [params] * len(prompts), streams):
            pass
        texts = [s.text for s in streams]
        return texts[0] if single else texts

    def _stream(self, prompt: str, memory: str | None, params: Sampling, stop: Sequence[str]) -> Iterator[str]:
        text_stream = TextStream(self.tokenizer, stop)
        for step in self.run([prompt], [memory], [params], [text_stream]):
            for _, delta in step:
                if delta:
                    yield delta

    def run(self, prompts, memories, params, streams: list[TextStream]) -> Iterator[list[tuple[int, str]]]:
        """The batched loop behind ``generate`` and the server: yields (index, text delta) per step."""
        generation = BatchGeneration(
            self.model, [self.encode(p) for p in prompts], memories, params, self.tokenizer.pad_token_id, self.eos_ids,
            compile=self.compile,
        )
        for step in generation:
            deltas = []
            for i, token in step:
                delta = streams[i].push(token)
                if streams[i].stopped:
                    generation.stop(i)
                if generation.done[i]:
                    delta += streams[i].flush()
                deltas.append((i, delta))
            yield deltas

    @torch.no_grad()
    def perplexity(self, texts: str | Sequence[str], memory: str | None = None) -> float:
        """Token-weighted perplexity of the texts (each scored on its own) under ``memory``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        total, count = 0.0, 0
        for text in texts:
            ids = torch.tensor([self.encode(text)], device=self.model.device)
            if ids.shape[1] < 2:
                continue
            total += token_nll_sum(self.model(ids, memory), ids).item()
            count += ids.shape[1] - 1
        if count == 0:
            raise UserInputError("perplexity needs at least one text of two or more tokens")
        return math.exp(total / count)

    def info(self) -> dict:
        return {
            "folder": str(self.folder),
            "fingerprint": self.fingerprint,
            "uniform": self.meta["uniform"],
            "layer_widths": self.meta["layer_widths"],
            "parameters": self.meta.get("parameters"),
            "dense_parameters": self.meta.get("dense_parameters"),
            "sparsity": (self.meta.get("mask") or {}).get("sparsity"),
            "broken": dict(self.broken),
            "router": {"kind": self.router.kind, "memories": self.router.names, "threshold": self.router.threshold}
            if self.router else {"off": self.router_problem},
            "memories": {
                name: {"parameters": m.num_parameters(), "kv_slots": m.slots, "lora_rank": m.rank, "bytes": self.sizes.get(name)}
                for name, m in self.model.memories.items()
            },
        }


def inside(path: Path, root: Path) -> Path:
    """``path`` resolved (symlinks too), if it lies inside ``root``; a memory folder must not lead
    out of its export's ``memories/``."""
    root, resolved = root.resolve(), path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise MemoryLoadError(f"{path} leads outside {root} (a symlink?); memories must lie inside the export")
    return resolved


def load(folder: str | Path, device: str = "cpu", dtype: str = "auto", merge_lora: bool = False,
         compile: bool = False) -> KoffRuntime:
    """Load an exported koff folder (``koff export`` output); ``dtype`` auto: bfloat16 on a GPU, else
    float32. ``merge_lora``: a batch that uses one memory alone runs on weights with that memory's
    LoRA merged in (one matmul per projection instead of three more operations; the merged copy of
    the adapted weights is kept for the last such memory). ``compile``: decoding steps run through
    ``torch.compile`` (CUDA graphs on a GPU): the first step of each batch size compiles, for a while."""
    return KoffRuntime(folder, device=device, dtype=dtype, merge_lora=merge_lora, compile=compile)


__all__ = ["AUTO", "BackboneError", "KoffRuntime", "MemoryLoadError", "UnknownMemoryError", "load"]
