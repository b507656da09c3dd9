"""Option values and limits: one home for each.

Every named value an option takes (`mode`, `method`, `compiler`, the built-in `kernel`
names, the granularity names, the distributed strategies) is a member of a str-Enum here.
A member *is* its string: it compares, hashes, prints, reprs and JSON-encodes as its value,

    Mode.PTQ == "ptq"     {"ptq": 1}[Mode.PTQ] == 1     json.dumps(Mode.PTQ) == '"ptq"'
    f"{Mode.PTQ}" == "ptq"     repr(Mode.PTQ) == "'ptq'"

so code, reports and checkpoints that hold the plain strings keep working, and an FX graph
that carries one as an op argument prints it as a string literal. `Enum.parse` is the one
check of a value, with the allowed values and the option's name in the error.

Granularity (which weights share a scale) is one typed value, :class:`ScaleGranularity`:
"tensor", "row", or groups of g >= 1 consecutive input columns of each row. It is written
three ways, each converted here and nowhere else:

    option value  "tensor" | "row" | g (int)          Fairy2iConfig, CLI, report.json, checkpoints
    op argument   "tensor" | "row" | "g" (digits)     the `str granularity` of the fairy2i op schemas
    group size    None | g  (Python)   0 | g (packed op `int group_size`, and the kernels behind it)

(`ScaleGranularity.of`, `.option`, `.op_arg` / `from_op_arg`, `.group_size` and
`packed_group_size` / `group_size_of_packed`.) The kernel names of the table in
codegen/dispatch.py are the values of `kernel`, plus any registered at run time, so
`KernelName` lists the built-in ones only.
"""

from __future__ import annotations

import enum
import numbers
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

__all__ = [
    "OptionValue",
    "Mode",
    "Method",
    "Compiler",
    "KernelName",
    "ScaleKind",
    "Strategy",
    "MAX_STAGES",
    "check_stages",
    "ScaleGranularity",
    "packed_group_size",
    "group_size_of_packed",
    "env_switch",
]

ENV_OFF = ("0", "off", "false", "no")
ENV_ON = ("1", "on", "true", "yes")


def env_switch(name: str, default: bool = True) -> bool:
    """A switch in the environment (FAIRY2I_CPU_FUSE, FAIRY2I_CPU_OP, FAIRY2I_CPU_LUT8, ...), the one
    reader of them all (the C++ kernels get theirs from here): False when the variable holds 0 / off /
    false / no, True for 1 / on / true / yes (any case, surrounding spaces ignored), `default` when it
    is unset or holds anything else."""
    value = os.environ.get(name, "").strip().lower()
    return False if value in ENV_OFF else True if value in ENV_ON else default


MAX_STAGES = 4  # residual PhaseQuant stages T in 1..MAX_STAGES (the kernels are specialised up to 4)


class OptionValue(str, enum.Enum):
    """A str-Enum whose members behave as their string everywhere (module docstring)."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # Enum hashes the member's name; dict keys hold the value

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        """The allowed values, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value: Any, what: str) -> "OptionValue":
        """The member equal to `value`; ValueError naming `what`, the value and the allowed ones."""
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"{what} must be one of {list(cls.values())}, got {value!r}")


class Mode(OptionValue):
    """What the backend does to the convertible linear layers (config.py)."""

    EXACT = "exact"
    PTQ = "ptq"
    QAT = "qat"
    CALIBRATE = "calibrate"


class Method(OptionValue):
    """The quantizer: Fairy2i's complex PhaseQuant, or a real BitNet-style baseline (quant.py)."""

    PHASE = "phase"
    BINARY = "binary"
    TERNARY = "ternary"


class Compiler(OptionValue):
    """What runs the graphs after AOTAutograd (backend.py)."""

    EAGER = "eager"
    INDUCTOR = "inductor"


class KernelName(OptionValue):
    """The built-in values of `kernel` (codegen/dispatch.py; registered kernels add names)."""

    AUTO = "auto"
    TRITON = "triton"
    CPU = "cpu"
    INDUCTOR = "inductor"
    TORCH = "torch"


class ScaleKind(OptionValue):
    """How a ScaleGranularity groups weights; only "tensor" and "row" are option values by name."""

    TENSOR = "tensor"
    ROW = "row"
    GROUP = "group"


class Strategy(OptionValue):
    """How distributed.py wraps a model for several processes."""

    DDP = "ddp"
    FSDP2 = "fsdp2"


def check_stages(stages: Any, what: str = "stages", fix: str = "") -> int:
    """`stages` as an int in 1..MAX_STAGES; ValueError naming `what` (and `fix`) otherwise."""
    tail = f"; {fix}" if fix else ""
    if isinstance(stages, bool) or not isinstance(stages, numbers.Integral):
        raise ValueError(f"{what} must be an int in 1..{MAX_STAGES}, got {stages!r} "
                         f"({type(stages).__name__}){tail}")
    if not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"{what} must be in 1..{MAX_STAGES}, got {stages}{tail}")
    return int(stages)


_NAMED = (ScaleKind.TENSOR, ScaleKind.ROW)


@dataclass(frozen=True)
class ScaleGranularity:
    """Which weights share a scale: the whole matrix, each output row, or each run of
    `group_size` consecutive input columns of a row (the last run may be shorter).

    kind:       ScaleKind.TENSOR | ROW | GROUP
    group_size: g >= 1 for GROUP, None otherwise. A g at least the row length gives one
                group per row (the same scales as "row"); it is kept as given.
    """

    kind: ScaleKind
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        kind = ScaleKind.parse(self.kind, "ScaleGranularity.kind")
        object.__setattr__(self, "kind", kind)
        if kind is ScaleKind.GROUP:
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1:
                raise ValueError(f"group size must be an int >= 1, got group_size={g!r}; use e.g. 64 or 128")
            object.__setattr__(self, "group_size", int(g))
        elif self.group_size is not None:
            raise ValueError(f"granularity {kind.value!r} has no group size, got group_size={self.group_size!r}; "
                             f"use ScaleGranularity('group', {self.group_size!r}) for groups")

    @classmethod
    def of(cls, value: Union["ScaleGranularity", str, int]) -> "ScaleGranularity":
        """Normalise an option value ("tensor", "row", an int group size >= 1) or a ScaleGranularity.

        The one check of a granularity: ValueError with the allowed values otherwise (bool,
        float, digit strings and "group" by name are refused: digits are the op arguments'
        spelling, see from_op_arg)."""
        if isinstance(value, ScaleGranularity):
            return value
        if isinstance(value, str):
            if value in _NAMED:
                return cls(ScaleKind(value))
            raise ValueError(f"unknown granularity {value!r}: use 'tensor', 'row', or a positive int group size")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"granularity must be 'tensor', 'row' or a positive int group size, "
                             f"got {value!r} of type {type(value).__name__}")
        if value < 1:
            raise ValueError(f"group size must be >= 1, got granularity={value!r}; use e.g. 64 or 128")
        return cls(ScaleKind.GROUP, int(value))

    @property
    def option(self) -> Union[str, int]:
        """The option value: "tensor" | "row" | g (what configs, reports and checkpoints hold)."""
        return self.group_size if self.kind is ScaleKind.GROUP else self.kind.value

    def op_arg(self) -> str:
        """The `str granularity` argument of the fairy2i op schemas: "tensor" | "row" | "g"."""
        return str(self.group_size) if self.kind is ScaleKind.GROUP else self.kind.value

    @classmethod
    def from_op_arg(cls, arg: str) -> "ScaleGranularity":
        """The inverse of :meth:`op_arg`."""
        if isinstance(arg, str) and arg.isdigit():
            return cls(ScaleKind.GROUP, int(arg))
        return cls.of(arg)

    @property
    def packed_group_size(self) -> int:
        """The packed ops' `int group_size` argument: g, or 0 for "tensor" / "row"."""
        return packed_group_size(self.group_size)


def packed_group_size(group_size: Optional[int]) -> int:
    """A Python-side group size (None: no groups) as the packed ops take it (0: no groups)."""
    return 0 if group_size is None else int(group_size)


def group_size_of_packed(group_size: int) -> Optional[int]:
    """The inverse of :func:`packed_group_size`: the packed ops' 0 -> None."""
    return int(group_size) or None
