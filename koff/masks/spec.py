"""What ``--mask`` asks for, parsed once into a type.

The text form (``learned``, ``oneshot:wanda``, ``file:RUN_OR_MASK``, ``none``) is what config files
and flags hold; everything else works with the parsed ``MaskSpec``. A new mask family is one more
subclass here, registered in ``MASK_SPECS``, plus its branch where a run's first mask is made
(``koff.training.mask_init``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from koff.errors import UserInputError
from koff.masks.oneshot import IMPORTANCES


@dataclass(frozen=True)
class MaskSpec:
    kind: ClassVar[str]
    learned: ClassVar[bool] = False  # its gates train with the memories
    prunes: ClassVar[bool] = True  # it removes units (the dense "none" does not)

    @property
    def argument(self) -> str:
        """What follows ``kind:`` in the text form ("" for kinds that take nothing)."""
        return ""

    @property
    def text(self) -> str:
        """The form flags and config files hold."""
        return f"{self.kind}:{self.argument}" if self.argument else self.kind

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class LearnedMaskSpec(MaskSpec):
    kind: ClassVar[str] = "learned"
    learned: ClassVar[bool] = True

    def describe(self) -> str:
        return "learned mask"


@dataclass(frozen=True)
class OneShotMaskSpec(MaskSpec):
    importance: str
    kind: ClassVar[str] = "oneshot"

    @property
    def argument(self) -> str:
        return self.importance

    def describe(self) -> str:
        return f"one-shot {self.importance} mask"


@dataclass(frozen=True)
class FileMaskSpec(MaskSpec):
    path: str
    kind: ClassVar[str] = "file"

    @property
    def argument(self) -> str:
        return self.path

    @property
    def file(self) -> str:
        """The mask.safetensors to read: the path itself, or the one inside a run folder."""
        return str(Path(self.path) / "mask.safetensors") if Path(self.path).is_dir() else self.path

    def describe(self) -> str:
        return "fixed mask"


@dataclass(frozen=True)
class NoMaskSpec(MaskSpec):
    kind: ClassVar[str] = "none"
    prunes: ClassVar[bool] = False

    def describe(self) -> str:
        return "dense"


MASK_SPECS: dict[str, type[MaskSpec]] = {s.kind: s for s in (LearnedMaskSpec, OneShotMaskSpec, FileMaskSpec, NoMaskSpec)}


def parse_mask_spec(text: str) -> MaskSpec:
    """The ``MaskSpec`` a ``--mask`` value names; a bad value is one ``UserInputError`` line."""
    kind, _, argument = str(text).partition(":")
    spec = MASK_SPECS.get(kind)
    takes_argument = spec in (OneShotMaskSpec, FileMaskSpec)
    if spec is None or takes_argument != bool(argument):
        raise UserInputError(f"--mask must be learned, none, oneshot:<{'|'.join(IMPORTANCES)}> or "
                             f"file:<mask.safetensors or run folder>, got {text!r}")
    if spec is OneShotMaskSpec and argument not in IMPORTANCES:
        raise UserInputError(f"unknown one-shot importance {argument!r}; choose one of {', '.join(IMPORTANCES)}")
    return spec(argument) if takes_argument else spec()
