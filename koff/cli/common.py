"""What every koff command shares: config files, logging, the data options, result tables."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from koff.config import DecomposeConfig, parse_setting
from koff.errors import UserInputError
from koff.io import markdown_table, read_yaml, write_yaml  # noqa: F401 - markdown_table: for the commands
from koff.models import DTYPE_CHOICES

log = logging.getLogger("koff")

MERGE_HELP = ("run a request that uses one memory alone on weights with its LoRA merged in: faster, "
              "at the price of one more copy of the adapted weights in memory")
COMPILE_HELP = ("decode through torch.compile (CUDA graphs on a GPU): faster steps, after a first step of each "
                "batch size that compiles (about a minute)")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Where and how an export runs (``generate`` and ``serve``)."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--merge-lora", action="store_true", help=MERGE_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


# Options that describe how to run, not what to compute: never stored in a resolved config.
_NOT_CONFIG = {"func", "config", "command", "resume", "verbose", "quiet", "explicit"}
_UNSET = object()


class UsageError(UserInputError):
    """A bad command-line value; reported without a traceback."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config written by an earlier run; flags given here override it"
    )


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per decomposition setting, its help text from the config's field."""
    defaults = DecomposeConfig()
    for f in fields(DecomposeConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, []) else "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name in ("domain", "heldout"):
            parser.add_argument(flag, action="append", default=None, metavar="NAME=SOURCE", help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_Setting(f.name, default), default=default, help=help_text)


class _Setting:
    """argparse ``type=`` for one setting: flags read text exactly as ``bench --set`` does."""

    def __init__(self, name: str, default):
        self.name, self.__name__ = name, type(default).__name__ if default is not None else "int"

    def __call__(self, text: str):
        return parse_setting(self.name, text)


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=False,
        default=None,
        help="smollm2-135m (embedded), a .gguf file, a local HF folder, or a hub id" + (" (required)" if required else ""),
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--domain",
        action="append",
        default=None,
        metavar="NAME=SOURCE",
        help="repeatable; SOURCE: a .txt file, a folder of .txt, a .jsonl with 'text', bundled:<iso639-3>, bundled:code/<lang>; A,B mixes sources, A|B falls back to B",
    )
    parser.add_argument("--block-len", type=int, default=256, help="tokens per training/eval block")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of blocks held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")


def resolve_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; where ``--config`` is given, its values fill every flag not given on the command line.

    A flag given on the command line always wins, even when its value equals the default.
    ``args.explicit`` names the options given on the command line."""
    args = parser.parse_args(argv)
    sub = _subparser(parser, args.command)
    args.explicit = _explicit_options(parser, sub, argv)
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            parser.exit(2, f"koff: error: config file not found: {path}\n")
        stored = read_yaml(path) or {}
        if not isinstance(stored, dict):
            parser.exit(2, f"koff: error: {path} is not a koff config (a YAML mapping of option: value)\n")
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(stored) - known - _NOT_CONFIG)
        if unknown:
            parser.exit(2, f"koff: error: {path} has keys that `koff {args.command}` does not know: {', '.join(unknown)}\n")
        for key, value in stored.items():
            if key not in _NOT_CONFIG and key not in args.explicit:
                setattr(args, key, value)
    return args


def _explicit_options(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of ``sub``'s options that ``argv`` sets: parse once more with every default
    replaced by a marker, and keep what the marker no longer holds."""
    saved = {action: action.default for action in sub._actions}
    try:
        for action in sub._actions:
            # append actions extend their default, so theirs must stay a list-like None
            action.default = None if isinstance(action, argparse._AppendAction) else _UNSET
        again = parser.parse_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return {
        a.dest for a in sub._actions
        if a.dest != argparse.SUPPRESS and getattr(again, a.dest, _UNSET) not in (_UNSET, None)
    }


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}


def save_resolved_config(args: argparse.Namespace, out_dir: Path) -> Path:
    path = out_dir / "config.yaml"
    write_yaml(path, resolved_config(args))
    return path


def require(value: Any, flag: str) -> Any:
    if value in (None, [], ""):
        raise UsageError(f"{flag} is required (on the command line or in --config)")
    return value


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)

