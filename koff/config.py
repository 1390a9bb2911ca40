"""Everything a decomposition run needs, as one plain dataclass (saved as the run's config.yaml).

It sits low in the stack: training runs it, and the run-folder format (``koff.formats``) reads it back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from koff.errors import UserInputError
from koff.masks.oneshot import IMPORTANCES
from koff.memories.memory import DEFAULT_LORA_TARGETS, MEMORY_KINDS, MemoryConfig

CONSTRAINTS = ("projected", "lagrangian")


def parse_sampling(spec: str) -> float | None:
    """``balanced`` -> None; ``size:<alpha>`` -> alpha (domain probability ~ train blocks ** alpha)."""
    if spec == "balanced":
        return None
    kind, _, alpha = spec.partition(":")
    try:
        value = float(alpha) if kind == "size" else None
    except ValueError:
        value = None
    if value is None or not 0 <= value < math.inf:
        raise UserInputError(f"--sampling must be balanced or size:<alpha >= 0>, got {spec!r}")
    return value
INIT_SHAPES = ("ranked", "mask")


@dataclass
class DecomposeConfig:
    model: str = "smollm2-135m"
    domain: list[str] = field(default_factory=list)  # NAME=SOURCE
    out: str = "runs/decompose"
    dtype: str = "float32"
    device: str = "cpu"
    # data
    block_len: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    sampling: str = "balanced"  # balanced | size:<alpha> (domain probability ~ train blocks ** alpha)
    # what to learn
    sparsity: float = 0.12
    mask: str = "learned"  # learned | oneshot:<importance> | file:<mask or run folder> | none
    prune_ffn: bool = True
    prune_attention: bool = True
    constraint: str = "projected"  # projected | lagrangian (how the sparsity target is enforced)
    memory: str = "lora+kv"  # lora+kv | lora | kv | none
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    kv_slots: int = 16
    # optimisation
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr_lora: float = 1e-3
    lr_kv: float = 1e-2
    lr_mask: float = 1.0  # the spec's ~1.0: at 0.1 no gate crossed the cut in 160 steps (mask = one-shot mask)
    lr_lambda: float = 20.0  # SGD ascent
    init_from: str = "wanda"  # learned gates start ranked by this one-shot importance (wanda | activation | none)
    init_shape: str = "mask"  # ranked: spread by importance | mask: start at the one-shot mask itself
    init_spread: float = 6.0  # ranked: log_alpha = init_log_alpha + init_spread * standardised importance
    init_log_alpha: float = 5.0  # kept gates must sit far above the cut: at 3.0, 20% of samples are < 1 (loss 2.9 -> 4.9)
    target_warmup: float = 0.25  # fraction of steps over which the sparsity target ramps from 0
    lr_warmup: float = 0.05  # fraction of steps of linear warm-up for memory learning rates
    final_fraction: float = 0.4  # last fraction of steps: binary mask fixed, memories adapt to it
    distill_weight: float = 1.0  # weight of KL(dense teacher || student); 0 = LM loss only; unused without a mask
    # Distil on every k-th step, weighted x k: the same objective in expectation, 1/k of the teacher's
    # forwards. At 2 a SmolLM2 step costs 1.33x a PEFT LoRA step instead of 1.71x (1.013x dense vs 0.991x).
    distill_every: int = 2
    max_grad_norm: float = 1.0
    calib_blocks: int = 32  # one-shot masks: calibration blocks (balanced over domains)
    # bookkeeping
    checkpoint_every: int = 50
    log_every: int = 1
    eval: bool = True  # evaluate dense / mask+memories / mask alone at the end
    eval_max_blocks: int | None = None
    eval_batch_size: int = 4

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UserInputError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.memory not in MEMORY_KINDS:
            raise UserInputError(f"--memory must be one of {', '.join(MEMORY_KINDS)}, got {self.memory!r}")
        kind, _, importance = self.mask.partition(":")
        if kind not in ("learned", "oneshot", "none", "file") or (kind in ("oneshot", "file")) != bool(importance):
            raise UserInputError(
                f"--mask must be learned, none, oneshot:<{'|'.join(IMPORTANCES)}> or file:<mask.safetensors or run folder>, "
                f"got {self.mask!r}"
            )
        if kind == "oneshot" and importance not in IMPORTANCES:
            raise UserInputError(f"unknown one-shot importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
        parse_sampling(self.sampling)
        if self.init_from not in (*IMPORTANCES, "none"):
            raise UserInputError(f"--init-from must be none or one of {', '.join(IMPORTANCES)}, got {self.init_from!r}")
        if self.init_shape not in INIT_SHAPES:
            raise UserInputError(f"--init-shape must be one of {', '.join(INIT_SHAPES)}, got {self.init_shape!r}")
        if self.constraint not in CONSTRAINTS:
            raise UserInputError(f"--constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if kind != "none" and not (self.prune_ffn or self.prune_attention):
            raise UserInputError("nothing to prune: enable --prune-ffn or --prune-attention, or use --mask none")
        if not 0.0 <= self.final_fraction < 1.0:
            raise UserInputError(f"final_fraction must be in [0, 1), got {self.final_fraction}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "distill_every",
                     "block_len", "lora_rank", "kv_slots", "calib_blocks", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if self.eval_max_blocks is not None and self.eval_max_blocks < 1:
            raise UserInputError(f"--eval-max-blocks must be at least 1, got {self.eval_max_blocks}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserInputError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("lr_lora", "lr_kv", "lr_mask", "lr_lambda", "lora_alpha", "distill_weight", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        for name in ("target_warmup", "lr_warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserInputError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")

    @property
    def mask_kind(self) -> str:
        return self.mask.partition(":")[0]

    @property
    def importance(self) -> str:
        return self.mask.partition(":")[2] if self.mask_kind == "oneshot" else ""

    @property
    def mask_file(self) -> str:
        """``file:`` masks: a mask.safetensors, or a run folder holding one."""
        path = self.mask.partition(":")[2] if self.mask_kind == "file" else ""
        return str(Path(path) / "mask.safetensors") if path and Path(path).is_dir() else path

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(self.memory, self.lora_rank, self.lora_alpha, list(self.lora_targets), self.kv_slots)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DecomposeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"unknown decompose option(s): {', '.join(unknown)}")
        return cls(**values)
