"""``KoffModel``: a frozen base model seen through a shared mask, with per-domain memories.

The base model is a stock Hugging Face module: gates act through forward pre-hooks
(``masks.hooks``), LoRA through a module swap (``memories.lora``) and the KV memory through the
cache API (``memories.prefix``). Each sample of a batch may use its own memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from koff.errors import KoffError, UserInputError
from koff.masks.binary import BinaryMask
from koff.masks.hooks import GateHooks
from koff.masks.learned import LearnedMask
from koff.masks.units import UnitCosts
from koff.memories.lora import RoutedLoRALinear, install_lora
from koff.memories.memory import DomainMemory, MemoryConfig
from koff.memories.prefix import prefix_from_text, prefix_inputs, prefix_shapes
from koff.memories.batch import BatchMemories
from koff.models.architecture import decoder_layout
from koff.models.cache_api import cache_inputs
from koff.models.recompute import disable_layer_checkpointing, enable_layer_checkpointing, layer_checkpointing_enabled

Domains = str | None | Sequence[str | None]


class UnknownMemoryError(KoffError, KeyError):
    """A memory name that the model does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class KoffModel(nn.Module):
    def __init__(self, base: nn.Module, memory_config: MemoryConfig | None = None, mask: LearnedMask | BinaryMask | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.layout = decoder_layout(base)
        self.costs = UnitCosts.of(base, self.layout)
        self.memory_config = memory_config or MemoryConfig(kind="none")
        self.batch_memories = BatchMemories()
        self.memories = nn.ModuleDict()
        self._lora_shapes = (
            install_lora(self.layout, self.memory_config.lora_targets, self.batch_memories) if self.memory_config.use_lora else {}
        )
        self.hooks = GateHooks(self.layout)  # its hooks go in with the first mask: an export has none to run
        self.mask = None
        self.set_mask(mask)
        self._mask_on = True  # off inside dense() and unmasked()
        self._memories_on = True  # off inside dense()

    # ----- mask ---------------------------------------------------------------------------------
    def set_mask(self, mask: LearnedMask | BinaryMask | None) -> None:
        if mask is not None:
            self.hooks.install()  # after the LoRA swap: gates then cover base and LoRA alike
        if isinstance(mask, LearnedMask):
            self.mask = mask  # registered as a submodule: its log_alphas train
        else:
            if "mask" in self._modules:
                del self._modules["mask"]
            self.mask = mask
        self._binary_gates = None

    def current_gates(self) -> tuple[list, list]:
        if self.mask is None or not self._mask_on:
            return [None] * self.layout.num_layers, [None] * self.layout.num_layers
        if isinstance(self.mask, BinaryMask):
            return self._constant_gates()
        return self.mask.gates()

    def _constant_gates(self) -> tuple[list, list]:
        """A binary mask's gates, built once on the model's device (its keep flags stay on the CPU)."""
        device = self.device
        if self._binary_gates is None or self._binary_gates[0] != device:
            ffn, attn = self.mask.gates()
            on_device = [[None if g is None else g.to(device) for g in gates] for gates in (ffn, attn)]
            self._binary_gates = (device, tuple(on_device))
        return self._binary_gates[1]

    # ----- memories -----------------------------------------------------------------------------
    def new_memory(self, name: str, init_ids: torch.Tensor | None = None) -> DomainMemory:
        """Create (and hold) an empty memory; its KV prefix starts from the base model's own keys and
        values over ``init_ids`` (``kv_slots`` tokens of the domain's text), as Cartridges does."""
        cfg = self.memory_config
        shapes = prefix_shapes(self.base, self.layout) if cfg.use_kv else None
        memory = DomainMemory(name, self._lora_shapes, cfg.lora_rank, cfg.lora_alpha, shapes, cfg.kv_slots)
        if cfg.use_kv:
            if init_ids is None or init_ids.numel() < cfg.kv_slots:
                raise UserInputError(f"memory {name!r}: the KV prefix needs {cfg.kv_slots} tokens of text to start from")
            with self.dense():
                keys, values = prefix_from_text(self.base, init_ids[: cfg.kv_slots].to(self.device, torch.long))
            memory.set_prefix(keys, values)
        self.add_memory(memory)
        return memory

    def add_memory(self, memory: DomainMemory) -> None:
        self.memories[memory.name] = memory.to(self.device)

    def remove_memory(self, name: str) -> None:
        memory = self._memory(name)
        del self.memories[name]
        for module in self.base.modules():  # what the LoRA wrappers kept of it (a merged weight is large)
            if isinstance(module, RoutedLoRALinear):
                module.forget(memory)

    def adapt_projections(self, targets: list[str]) -> None:
        """Give LoRA wrappers to more projections (a memory may adapt ones the others do not)."""
        extra = [t for t in targets if t not in self.memory_config.lora_targets]
        if extra:
            self.memory_config.lora_targets += extra
            self._lora_shapes |= install_lora(self.layout, extra, self.batch_memories)

    def _memory(self, name: str) -> DomainMemory:
        if name not in self.memories:
            known = ", ".join(self.memories) or "none"
            raise UnknownMemoryError(f"unknown memory {name!r}; this model holds: {known}")
        return self.memories[name]

    def resolve(self, domains: Domains, batch: int) -> list[DomainMemory | None]:
        if domains is None or isinstance(domains, str):
            domains = [domains] * batch
        if len(domains) != batch:
            raise UserInputError(f"{len(domains)} domains given for a batch of {batch}")
        return [None if d is None else self._memory(d) for d in domains]

    # ----- forward ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, domains: Domains = None, attention_mask: torch.Tensor | None = None,
                hidden: bool = False):
        """Logits for ``input_ids`` (batch, seq); ``domains`` names one memory per sample (or one for all).

        ``hidden=True`` returns the decoder's final hidden states instead, for losses that apply
        ``head`` a chunk of tokens at a time (the logits of a whole batch over a 128k vocabulary
        are gigabytes)."""
        per_sample = self.resolve(domains, input_ids.shape[0])
        with self.activate(per_sample) as active:
            return self._forward_with_prefix(input_ids, active, attention_mask, hidden)

    @property
    def head(self) -> nn.Module:
        """The output projection (hidden states -> logits)."""
        return self.base.get_output_embeddings()

    @property
    def gradient_checkpointing(self) -> bool:
        return layer_checkpointing_enabled(self.layout)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the decoder layers in backward (gates, routing and KV prefix as in the forward)."""
        if enabled:
            enable_layer_checkpointing(self.layout, [self.hooks, self.batch_memories])
        else:
            disable_layer_checkpointing(self.layout)

    @contextmanager
    def activate(self, per_sample: list[DomainMemory | None]) -> Iterator[list[DomainMemory | None]]:
        """Inside, calls to ``self.base`` see the current gates and each sample's memory (LoRA);
        the KV prefix is the caller's to pass (see ``memories.prefix.prefix_inputs``)."""
        if not self._memories_on:
            per_sample = [None] * len(per_sample)
        self.hooks.set_gates(*self.current_gates())
        try:
            with self.batch_memories.use(per_sample):
                yield per_sample
        finally:
            self.hooks.clear()

    def _forward_with_prefix(self, input_ids, per_sample, attention_mask, hidden: bool = False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache, full_mask, positions = prefix_inputs(per_sample, self.base.config, self.dtype, attention_mask)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if cache is not None:
            inputs |= {"attention_mask": full_mask, "position_ids": positions, **cache_inputs(self.base, cache)}
        if hidden:
            return self.base.get_decoder()(**inputs).last_hidden_state
        return self.base(**inputs).logits

    @contextmanager
    def dense(self) -> Iterator[None]:
        """The untouched base model inside: no gates, no memories (teacher, calibration, KV init)."""
        with self._switched(mask=False, memories=False):
            yield

    @contextmanager
    def unmasked(self) -> Iterator[None]:
        """The memories on the unpruned base inside: what the mask costs is measured against this."""
        with self._switched(mask=False, memories=self._memories_on):
            yield

    @contextmanager
    def _switched(self, mask: bool, memories: bool) -> Iterator[None]:
        previous = self._mask_on, self._memories_on
        self._mask_on, self._memories_on = mask, memories
        try:
            yield
        finally:
            self._mask_on, self._memories_on = previous

    def scorer(self):
        """A scorer for ``koff.evaluation``: each domain is evaluated with its own memory, if held."""

        def score(input_ids: torch.Tensor, domain: str) -> torch.Tensor:
            return self(input_ids, domain if domain in self.memories else None)

        return score
