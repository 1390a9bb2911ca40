"""Everything a decomposition run needs, as one plain dataclass (saved as the run's config.yaml).

It sits low in the stack: training runs it, and the run-folder format (``koff.formats``) reads it back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from koff.errors import UserInputError
from koff.masks.oneshot import IMPORTANCES
from koff.masks.spec import MaskSpec, parse_mask_spec
from koff.models import DTYPE_CHOICES
from koff.memories.memory import DEFAULT_LORA_TARGETS, MEMORY_KINDS, MemoryConfig

CONSTRAINTS = ("projected", "lagrangian")


@dataclass(frozen=True)
class SamplingSpec:
    """``--sampling``, parsed. Balanced (``size_alpha`` None): a fixed cycle over the domains in which
    a domain comes ``weight(name)`` times (once unless named); by size: domains drawn at random with
    probability ~ train blocks ** ``size_alpha``."""

    size_alpha: float | None = None
    weights: tuple[tuple[str, int], ...] = ()

    def weight(self, name: str) -> int:
        return dict(self.weights).get(name, 1)


def parse_sampling(spec: str) -> SamplingSpec:
    """``balanced``, ``balanced:NAME=K,...`` (NAME K times per cycle, K >= 1) or ``size:<alpha >= 0>``."""
    kind, _, rest = spec.partition(":")
    usage = f"--sampling must be balanced, balanced:NAME=K[,NAME=K...] (K a whole number >= 1) or size:<alpha >= 0>, got {spec!r}"
    if kind == "balanced":
        pairs = [item.partition("=") for item in rest.split(",")] if rest else []
        weights = tuple((name.strip(), int(count)) for name, _, count in pairs
                        if name.strip() and count.strip().isdigit() and int(count) >= 1)
        if len(weights) != len(pairs) or len(dict(weights)) != len(weights):
            raise UserInputError(usage)
        return SamplingSpec(weights=weights)
    try:
        alpha = float(rest) if kind == "size" else math.nan
    except ValueError:
        alpha = math.nan
    if not 0 <= alpha < math.inf:
        raise UserInputError(usage)
    return SamplingSpec(size_alpha=alpha)


INIT_SHAPES = ("ranked", "mask")
LAYER_SHAPES = ("per-layer", "uniform")
SWITCHES = ("auto", "on", "off")
TEACHERS = ("base", "base+memories")


def setting(default, help: str):
    """A config field with its help text beside it (``koff decompose --help`` reads it from here)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DecomposeConfig:
    model: str = setting("smollm2-135m", "smollm2-135m (embedded), a .gguf file, a local HF folder, or a hub id")
    domain: list[str] = setting([], "NAME=SOURCE, repeatable (a .txt, a folder, a .jsonl, bundled:<iso639-3>, "
                                "bundled:code/<lang>; A,B mixes sources, A|B falls back to B)")
    heldout: list[str] = setting([], "NAME=SOURCE, repeatable: text of domain NAME from another source or genre, "
                                 "never trained on; at the end of the run it is scored beside the validation blocks "
                                 "(dense, dense + the same memories, mask alone, KOFF) into RUN/eval/table.md")
    out: str = setting("runs/decompose", "run folder (config, log, checkpoints, mask, memories)")
    dtype: str = setting("auto", "dtype of the frozen base: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | "
                         "bfloat16 | float16; gates, memories, optimiser states and losses stay float32")
    device: str = setting("cpu", "torch device, e.g. cpu or cuda")
    # data
    block_len: int = setting(256, "tokens per training/eval block")
    val_fraction: float = setting(0.1, "fraction of blocks held out for validation")
    seed: int = setting(0, "seed of the data split, the sampler and the memories' initialisation")
    sampling: str = setting("balanced", "balanced: one sample of each domain in turn | balanced:NAME=K,...: the same cycle "
                            "with domain NAME K times | size:<alpha>: domain drawn with probability ~ train blocks ** "
                            "alpha (more of a large corpus, fewer repeats of a small one)")
    # what to learn
    sparsity: float = setting(0.12, "target fraction of transformer-block parameters removed")
    mask: str = setting("learned", "learned | oneshot:wanda | oneshot:activation | file:<mask.safetensors or run folder> "
                        "(memories only) | none")
    layer_shape: str = setting("per-layer", "per-layer: each layer keeps its own widths | uniform: every layer keeps the "
                               "same number of FFN neurons and KV groups (export --uniform is then a smaller stock model)")
    # GEMMs whose dimensions are not multiples of 64 take slower kernels (and llama.cpp's quantised
    # blocks are 32 or 256 wide); 1 = any width
    ffn_align: int = setting(64, "the final mask keeps a multiple of this many FFN neurons in each layer")
    prune_ffn: bool = setting(True, "the mask may remove FFN neurons")
    prune_attention: bool = setting(True, "the mask may remove attention KV groups")
    constraint: str = setting("projected", "how the sparsity target is enforced: projected (a log_alpha offset solved "
                              "each step) | lagrangian (Sheared-LLaMA's multipliers)")
    memory: str = setting("lora+kv", "lora+kv | lora | kv | none")
    lora_rank: int = setting(8, "LoRA rank")
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_targets: list[str] = setting(list(DEFAULT_LORA_TARGETS), "projections that get LoRA")
    kv_slots: int = setting(16, "learned key/value slots per layer")
    # optimisation
    steps: int = setting(200, "training steps")
    batch_size: int = setting(4, "blocks per step (per process)")
    grad_accum: int = setting(1, "micro-batches accumulated per step")
    lr_lora: float = setting(1e-3, "learning rate of the LoRA factors")
    lr_kv: float = setting(1e-2, "learning rate of the KV prefixes")
    # the spec's ~1.0: at 0.1 no gate crossed the cut in 160 steps (the mask was the one-shot mask)
    lr_mask: float = setting(1.0, "learning rate of the gates (log_alpha)")
    lr_lambda: float = setting(20.0, "SGD ascent rate of the Lagrange multipliers (--constraint lagrangian)")
    init_from: str = setting("wanda", "one-shot importance that ranks the gates at the start (wanda | activation | none)")
    # a mask from no importance removed a 1,500x-median neuron and its bare backbone went 7.4x dense
    keep_outliers: int = setting(0, "learned mask: hold open the gates of the K FFN neurons of highest Wanda "
                                 "importance (massive activations), which the bare backbone needs; 0 = none")
    init_shape: str = setting("mask", "ranked: gates spread by importance | mask: gates start at the one-shot mask itself")
    init_spread: float = setting(6.0, "ranked: log_alpha = init_log_alpha + init_spread * standardised importance")
    # kept gates must sit far above the cut: at 3.0, 20% of samples are < 1 (loss 2.9 -> 4.9)
    init_log_alpha: float = setting(5.0, "log_alpha of a kept gate at the start (a cut one starts at minus this)")
    target_warmup: float = setting(0.25, "fraction of steps over which the sparsity target ramps up from 0")
    lr_warmup: float = setting(0.05, "fraction of steps of linear warm-up of the memories' learning rates")
    final_fraction: float = setting(0.4, "last fraction of steps trained with the final binary mask fixed "
                                    "(memories adapt to it)")
    distill_weight: float = setting(1.0, "weight of KL(dense teacher || student); 0 = LM loss only; unused without a mask")
    teacher: str = setting("base", "what the student (pruned base + memories) is distilled towards: base: the dense "
                           "base alone | base+memories: the dense base with the same memories (no gradient through it)")
    # At 2 a SmolLM2 step costs 1.33x a PEFT LoRA step instead of 1.71x (1.013x dense vs 0.991x).
    distill_every: int = setting(2, "distil on every k-th step only, weighted x k (same objective in expectation, "
                                 "1/k of the teacher's cost)")
    loss_chunk_tokens: int = setting(1024, "tokens whose logits are made at once for the LM loss and the KL (their "
                                     "memory is tokens x vocabulary x 4 bytes per copy); 0 = the whole batch at once")
    gradient_checkpointing: str = setting("auto", "on | off | auto: recompute decoder layers in backward; auto turns it on "
                                          "on a GPU when koff plan says the run does not fit without it")
    max_grad_norm: float = setting(1.0, "gradient clipping of the memories (0 = off)")
    calib_blocks: int = setting(32, "calibration blocks of one-shot importance (balanced over domains)")
    # bookkeeping
    checkpoint_every: int = setting(50, "steps between checkpoints")
    log_every: int = setting(1, "steps between log.jsonl records")
    eval: bool = setting(True, "evaluate dense / mask+memories / mask alone at the end")
    eval_max_blocks: int | None = setting(None, "evaluate at most this many validation blocks per domain")
    eval_batch_size: int = setting(4, "blocks per evaluation forward")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UserInputError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.memory not in MEMORY_KINDS:
            raise UserInputError(f"--memory must be one of {', '.join(MEMORY_KINDS)}, got {self.memory!r}")
        self.mask_spec: MaskSpec = parse_mask_spec(self.mask)  # not a field: config.yaml keeps the text
        unknown = {n for n, _ in parse_sampling(self.sampling).weights} - {d.partition("=")[0].strip() for d in self.domain}
        if unknown and self.domain:
            raise UserInputError(f"--sampling {self.sampling} weighs {', '.join(sorted(unknown))}, not among the domains")
        if self.init_from not in (*IMPORTANCES, "none"):
            raise UserInputError(f"--init-from must be none or one of {', '.join(IMPORTANCES)}, got {self.init_from!r}")
        if self.ffn_align < 1:
            raise UserInputError(f"--ffn-align must be at least 1, got {self.ffn_align}")
        if self.keep_outliers < 0:
            raise UserInputError(f"--keep-outliers must be at least 0, got {self.keep_outliers}")
        if self.keep_outliers and not self.mask_spec.learned:
            raise UserInputError(f"--keep-outliers holds gates of a learned mask open; --mask {self.mask} has none "
                                 "(a one-shot mask keeps the most important neurons anyway)")
        if self.init_shape not in INIT_SHAPES:
            raise UserInputError(f"--init-shape must be one of {', '.join(INIT_SHAPES)}, got {self.init_shape!r}")
        if self.layer_shape not in LAYER_SHAPES:
            raise UserInputError(f"--layer-shape must be one of {', '.join(LAYER_SHAPES)}, got {self.layer_shape!r}")
        if self.gradient_checkpointing not in SWITCHES:
            raise UserInputError(f"--gradient-checkpointing must be one of {', '.join(SWITCHES)}, "
                                 f"got {self.gradient_checkpointing!r}")
        if self.loss_chunk_tokens < 0:
            raise UserInputError(f"--loss-chunk-tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserInputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.teacher not in TEACHERS:
            raise UserInputError(f"--teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.constraint not in CONSTRAINTS:
            raise UserInputError(f"--constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if self.mask_spec.prunes and not (self.prune_ffn or self.prune_attention):
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
    def uniform_layers(self) -> bool:
        return self.layer_shape == "uniform"

    @property
    def teacher_holds_memories(self) -> bool:
        return self.teacher == "base+memories"

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
        defaults = cls()
        for name, value in values.items():
            _check_type(name, value, getattr(defaults, name))
        return cls(**values)


def _check_type(name: str, value, default) -> None:
    """A value from a YAML file or the API must have its setting's type (an int where a float goes is fine)."""
    expected = (list,) if isinstance(default, list) else (bool,) if isinstance(default, bool) else \
        (int, float) if isinstance(default, float) else (int, type(None)) if default is None else (type(default),)
    wrong_bool = isinstance(value, bool) and not isinstance(default, bool)
    if not isinstance(value, expected) or wrong_bool:
        kind = {list: "a list", bool: "true or false", float: "a number", str: "a string"}.get(type(default), "an integer")
        raise UserInputError(f"setting {name}: {value!r} is not {kind}")


def parse_setting(name: str, text: str):
    """``text`` as the value of setting ``name``, cast by the setting's type: the one way command-line
    flags and ``bench --set NAME=VALUE`` read text (lists: comma-separated; booleans: 1/true/yes)."""
    if name not in {f.name for f in fields(DecomposeConfig)}:
        raise UserInputError(f"unknown decompose setting {name!r}")
    default = getattr(DecomposeConfig(), name)
    try:
        if isinstance(default, bool):
            return text.strip().lower() in ("1", "true", "yes")
        if isinstance(default, list):
            return [v for v in text.split(",") if v]
        if default is None:  # optional ints (eval_max_blocks)
            return None if text.strip().lower() in ("", "none") else int(text)
        return type(default)(text)
    except ValueError as err:
        raise UserInputError(f"--{name.replace('_', '-')}: {text!r} is not a {type(default).__name__}") from err
