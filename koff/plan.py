"""Peak GPU memory of a decomposition and of serving, predicted from the model's config alone.

Parameter counts are exact: the model is built on PyTorch's ``meta`` device (shapes, no storage).
Activation memory follows what autograd keeps for backward in koff's forward pass, tensor by
tensor (see ``saved_per_token``); ``tests/test_plan.py`` holds it to what a real pass saves.
Everything is in bytes; the CUDA context (~0.5 GB, outside PyTorch's allocator) is not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from koff.config import DecomposeConfig
from koff.errors import UserInputError
from koff.memories.lora import CONCATENATED_MEMORIES
from koff.models import EMBEDDED_MODELS, decoder_layout, resolve_dtype
from koff.models.architecture import check_model_type

GiB = 1024**3
FP32 = 4
ADAMW_BYTES = 16  # fp32 value, gradient and AdamW's two moments
SHAPE_PREFIX = "shape:"
# A run "fits" when its predicted peak is at most this fraction of the GPU: the rest is for the CUDA
# context, the allocator's fragmentation and what the prediction misses.
HEADROOM = 0.9


class PlanError(UserInputError):
    """A model spec whose config cannot be read."""


def shape_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files("koff.models").joinpath("shapes").iterdir()
                  if p.name.endswith(".json"))


def read_model_config(spec: str) -> PretrainedConfig:
    """The config of ``spec``, reading no weights: ``shape:NAME`` (a shape shipped with koff), the
    embedded model's name, a config.json, a model folder, or a hub id (with network)."""
    name = spec[len(SHAPE_PREFIX):] if spec.startswith(SHAPE_PREFIX) else spec
    if spec.startswith(SHAPE_PREFIX) or spec in EMBEDDED_MODELS:
        if name not in shape_names():
            raise PlanError(f"no shipped shape {name!r}; shapes: {', '.join(shape_names())}")
        return _config_from_file(resources.files("koff.models").joinpath("shapes", f"{name}.json"))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        raise PlanError(f"{spec}: koff plan reads a config.json, not a GGUF file; give the folder koff converted it to "
                        "(under $KOFF_CACHE_DIR/models) or the original model's config.json")
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise PlanError(f"no model config at {path}")
        return _config_from_file(path)
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise PlanError(f"could not read a model config for {spec!r} (a config.json, a model folder, "
                        f"shape:<{'|'.join(shape_names())}>, or a hub id with network): {err}") from err


def _config_from_file(path) -> PretrainedConfig:
    try:
        values = json.loads(path.read_text())
        check_model_type(values.get("model_type"), str(path))
        return AutoConfig.for_model(**values)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise PlanError(f"{path} is not a model config (config.json): {err}") from err


@dataclass(frozen=True)
class ModelSizes:
    """Exact counts of a model, from a shape-only (meta) build."""

    params: int
    block_params: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_in_out: dict[str, tuple[int, int]]  # projection -> (in, out), the same in every layer

    @classmethod
    def of(cls, config: PretrainedConfig) -> "ModelSizes":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layout = decoder_layout(model)
        first = layout.layers[0]
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        in_out = {n: (first.projection(n).in_features, first.projection(n).out_features) for n in names}
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            block_params=sum(p.numel() for parts in layout.layers for p in parts.layer.parameters()),
            layers=layout.num_layers, hidden=layout.hidden_size, ffn=in_out["gate_proj"][1], heads=layout.num_heads,
            kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, vocab=config.vocab_size, lora_in_out=in_out,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class Plan:
    """Named parts of the peak memory, in bytes, of training and of serving."""

    training: dict[str, int] = field(default_factory=dict)
    training_without_checkpointing: int = 0
    training_with_checkpointing: int = 0
    serving: dict[str, int] = field(default_factory=dict)
    gpu_bytes: int | None = None
    checkpointing: bool = False

    @property
    def training_peak(self) -> int:
        return self.training_with_checkpointing if self.checkpointing else self.training_without_checkpointing

    @property
    def serving_peak(self) -> int:
        return sum(self.serving.values())

    def fits(self, peak: int) -> bool | None:
        return None if self.gpu_bytes is None else peak <= HEADROOM * self.gpu_bytes


def memory_parameters(sizes: ModelSizes, cfg: DecomposeConfig) -> int:
    """Parameters of one domain's memory: LoRA factors and the KV prefix of every layer."""
    return lora_parameters(sizes, cfg) + kv_parameters(sizes, cfg)


def lora_parameters(sizes: ModelSizes, cfg: DecomposeConfig) -> int:
    memory = cfg.memory_config()
    per_layer = sum(cfg.lora_rank * (i + o) for n, (i, o) in sizes.lora_in_out.items() if n in memory.lora_targets)
    return sizes.layers * per_layer if memory.use_lora else 0


def kv_parameters(sizes: ModelSizes, cfg: DecomposeConfig) -> int:
    return sizes.layers * 2 * sizes.kv_width * cfg.kv_slots if cfg.memory_config().use_kv else 0


def memories_per_batch(cfg: DecomposeConfig, domains: int) -> int:
    """The memories a training batch mixes: balanced sampling puts one domain after another in it."""
    return max(1, min(cfg.batch_size, domains))


def lora_side_by_side(cfg: DecomposeConfig, domains: int) -> bool:
    """Whether a training batch runs its memories' LoRA side by side (see ``memories.lora``) rather
    than gathering each sample's factors."""
    return memories_per_batch(cfg, domains) <= CONCATENATED_MEMORIES


def saved_per_token(sizes: ModelSizes, cfg: DecomposeConfig, dtype_bytes: int, domains: int = 1) -> float:
    """Bytes one decoder layer keeps for backward per token, without checkpointing.

    With the base frozen, its linear layers keep nothing: what is kept is the input of each LoRA
    factor, what attention and the gates need, and the fp32 inputs of the two RMSNorms. A batch that
    runs its memories' LoRA side by side keeps an intermediate as wide as their summed ranks."""
    memory, b = cfg.memory_config(), dtype_bytes
    targets = set(memory.lora_targets) if memory.use_lora else set()
    learned = cfg.mask_spec.learned and cfg.sparsity > 0
    seq = cfg.block_len + (cfg.kv_slots if memory.use_kv else 0)  # keys and values include the prefix
    q, h, f = sizes.q_width, sizes.hidden, sizes.ffn
    kept = 2 * h * FP32 + 2 * FP32  # RMSNorm inputs in fp32, and their 1/rms
    kept += q * b * (2 + 2 * seq / cfg.block_len) + sizes.heads * FP32  # sdpa: q, out, k and v (GQA-repeated), lse
    kept += seq * b  # the attention mask, in the model's dtype
    kept += 3 * f * b  # gate_proj and up_proj outputs, SiLU output
    kept += f * b if learned else 0  # the FFN activation, kept to differentiate its gate
    kept += h * b * (bool(targets & {"q_proj", "k_proj", "v_proj"}) + bool(targets & {"gate_proj", "up_proj"}))
    kept += q * b * ("o_proj" in targets) + f * b * ("down_proj" in targets)  # gated inputs of o_proj, down_proj
    side_by_side = memories_per_batch(cfg, domains) if lora_side_by_side(cfg, domains) else 1
    kept += len(targets) * cfg.lora_rank * side_by_side * b  # the rank-r intermediate of each LoRA
    return kept


def plan_decomposition(config: PretrainedConfig, cfg: DecomposeConfig, domains: int, gpus: int = 1,
                       gpu_memory_gb: float | None = None, device: str = "cuda") -> Plan:
    """Peak memory of one process of ``koff decompose`` with these settings (micro-batch
    ``batch_size`` x ``block_len``), and of serving its export."""
    sizes = ModelSizes.of(config)
    b = torch.tensor([], dtype=resolve_dtype(cfg.dtype, device)).element_size()
    tokens = cfg.batch_size * cfg.block_len
    memory = memory_parameters(sizes, cfg)
    units = sizes.layers * (sizes.ffn + sizes.kv_heads)
    trainable = domains * memory + units
    per_layer = tokens * saved_per_token(sizes, cfg, b, domains)
    # the batch's memories' LoRA factors side by side (or each sample's, stacked), each sample's KV prefix
    copies = memories_per_batch(cfg, domains) if lora_side_by_side(cfg, domains) else cfg.batch_size
    per_layer += (copies * lora_parameters(sizes, cfg) + cfg.batch_size * kv_parameters(sizes, cfg)) / sizes.layers * b
    chunk = tokens if cfg.loss_chunk_tokens <= 0 else min(cfg.loss_chunk_tokens, tokens)
    distill = cfg.distill_weight > 0 and cfg.mask_spec.prunes
    loss = chunk * sizes.vocab * ((b + 3 * FP32) + (b + 3 * FP32 if distill else 0))  # logits, fp32, log-softmax, grad
    parts = {
        "weights": sizes.params * b,  # the teacher is the same weights, with no mask and no memory
        "memories_and_optimizer": trainable * ADAMW_BYTES + (trainable * FP32 if gpus > 1 else 0),  # + DDP buckets
        "final_hidden_and_teacher": tokens * sizes.hidden * (2 * b + FP32),
        "loss_chunk": loss,
        "rotary_tables": 2 * tokens * sizes.head_dim * b,
    }
    # The loss chunk lives before backward reaches the layers and is freed by then: it adds to what
    # the layers keep, but never to one layer's backward (a bound the H100 measurements of
    # bench/scale.py showed the planner overestimating by 18-28% when it summed the two).
    static = sum(parts.values()) - loss
    without = static + sizes.layers * per_layer + max(loss, per_layer)  # per_layer: one layer's gradients
    inputs = sizes.layers * tokens * sizes.hidden * b  # each layer's input, kept for the recomputation
    with_ckpt = static + inputs + max(loss, 2 * per_layer)  # 2 * per_layer: one recomputed layer and its gradients
    checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and gpu_memory_gb is not None and without > HEADROOM * gpu_memory_gb * GiB)
    parts["activations"] = (with_ckpt if checkpointing else without) - static - loss  # what the peak holds beyond the loss
    serving = {
        "weights": int((sizes.params - cfg.sparsity * sizes.block_params) * b),
        "memories": domains * memory * FP32,
        "kv_cache": cfg.batch_size * (cfg.block_len + cfg.kv_slots) * sizes.layers * 2 * sizes.kv_width * b,
        "logits": cfg.batch_size * cfg.block_len * sizes.vocab * FP32,
    }
    return Plan({k: int(v) for k, v in parts.items()}, int(without), int(with_ckpt), serving,
                None if gpu_memory_gb is None else int(gpu_memory_gb * GiB), checkpointing)
