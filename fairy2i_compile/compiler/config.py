"""Backend options -> one frozen, validated config.

`torch.compile(model, backend="fairy2i", options={...})` hands the options dict to
the backend unchanged; `Fairy2iConfig.from_options` is the only place that reads
it, so every option is listed once, here, with its allowed values.

Whether a `kernel` can run on the tensors' device is checked when the op first
runs (`codegen.dispatch.resolve_kernel`), with the fix in the message. The values
of `kernel` come from that module's table of implementations; every other option
value, the stage bound and the granularity type from options.py. The config holds
`mode`, `method` and `compiler` as those str-Enum members (equal to their strings),
and `scale_granularity` as its option value ("tensor" | "row" | g; typed: `granularity`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from .codegen.dispatch import kernel_names
from .options import MAX_STAGES, Compiler, Method, Mode, ScaleGranularity, ScaleKind, check_stages
from ..quantization.quant import METHODS

__all__ = [
    "Fairy2iConfig",
    "MODES",
    "METHODS",
    "GRANULARITIES",
    "KERNELS",
    "COMPILERS",
    "MAX_STAGES",
    "matching_skip_pattern",
]

MODES = tuple(Mode)
GRANULARITIES = (ScaleKind.TENSOR, ScaleKind.ROW)  # or a positive int group size
KERNELS = kernel_names()  # the built-in kernels; validation reads the table, so registered ones count
COMPILERS = tuple(Compiler)

Granularity = Union[str, int, ScaleGranularity]


@dataclass(frozen=True)
class Fairy2iConfig:
    """Everything the fairy2i backend can be told.

    mode:              "ptq" (default: quantized weights for inference; the
                       quantized layers get no gradient), "qat" (fake-quant +
                       straight-through gradients for training), "exact" (the
                       lossless widely-linear rewrite alone), "calibrate" (nothing
                       converted: an observer in front of every convertible layer
                       collects input statistics inside
                       `fairy2i_compile.quantization.calibration.observing()`; float outputs).
    stages:            residual stages T, 1..4 (1 = Fairy2i-W1, 2 = Fairy2i-W2, default).
    method:            "phase" (Fairy2i) or the real baselines "binary" / "ternary".
    scale_granularity: "tensor" (the paper's), "row", or an int group size along
                       the input dim.
    skip:              module-name patterns left real (fnmatch; a pattern without a
                       dot also matches the last name components, so "lm_head" and
                       "*.q_proj" both do what they look like).
    dump_dir:          where graph dumps and report.json go (None: no dumps).
    kernel:            packed-op implementation: "auto" (Triton on CUDA, the C++ kernel on
                       CPU), "triton" (generated Triton kernels; CPU only under
                       TRITON_INTERPRET=1), "cpu" (the C++ kernel), "inductor" (decode-sized
                       packed layers as torch ops that Inductor fuses; the rest as "auto"),
                       "torch" (the pure-torch reference: unpack, dequantize, one GEMM).
    compiler:          what runs the graph after AOTAutograd: "eager" (default: no
                       code generation, compiles in about a second on CPU) or
                       "inductor" (generated code; 15-35 s per graph cold on 2 cores).
    cpp_wrapper:       with compiler="inductor": inference graphs are built with Inductor's C++
                       wrapper (the generated kernels and every op call, packed ops included,
                       run from generated C++ instead of a Python function: less fixed cost per
                       call, which is what a decode step of a small model is made of), the
                       wrapper compiled apart from the kernels (cpp_wrapper_build_separate).
                       Cold compiles take longer (C++ wrapper code); training graphs keep the
                       Python wrapper. Default False.
    """

    mode: str = "ptq"
    stages: int = 2
    method: str = "phase"
    scale_granularity: Granularity = "tensor"
    skip: Tuple[str, ...] = ()
    dump_dir: Optional[str] = None
    kernel: str = "auto"
    compiler: str = "eager"
    cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode, "option 'mode'"))
        object.__setattr__(self, "method", Method.parse(self.method, "option 'method'"))
        _check_choice("kernel", self.kernel, kernel_names())
        object.__setattr__(self, "compiler", Compiler.parse(self.compiler, "option 'compiler'"))
        if not isinstance(self.cpp_wrapper, bool):
            raise ValueError(f"option 'cpp_wrapper' must be True or False, got {self.cpp_wrapper!r}")
        if self.cpp_wrapper and self.compiler != Compiler.INDUCTOR:
            raise ValueError(
                f"option 'cpp_wrapper' builds Inductor's C++ wrapper, but compiler={str(self.compiler)!r} "
                "generates no code; pass compiler='inductor' with it"
            )
        stages = check_stages(self.stages, "option 'stages'", "use 1 for Fairy2i-W1 or 2 for Fairy2i-W2")
        object.__setattr__(self, "stages", stages)  # a plain int (a numpy int is not JSON)
        try:
            granularity = ScaleGranularity.of(self.scale_granularity)
        except ValueError:
            raise ValueError(
                f"option 'scale_granularity' must be one of {GRANULARITIES} or a positive "
                f"int group size, got {self.scale_granularity!r}"
            ) from None
        object.__setattr__(self, "scale_granularity", granularity.option)
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) and p for p in skip):
            raise ValueError(
                f"option 'skip' must be a list of non-empty module-name patterns, got {self.skip!r}; "
                "e.g. skip=['lm_head', '*.down_proj']"
            )
        object.__setattr__(self, "skip", tuple(skip))
        if self.dump_dir is not None:
            if not isinstance(self.dump_dir, (str, os.PathLike)):
                raise ValueError(
                    f"option 'dump_dir' must be a path (str or os.PathLike), got {self.dump_dir!r}"
                )
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))

    @property
    def granularity(self) -> ScaleGranularity:
        """`scale_granularity` as the typed value (options.ScaleGranularity)."""
        return ScaleGranularity.of(self.scale_granularity)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "Fairy2iConfig":
        """Build from a `torch.compile(..., options=...)` dict (or None)."""
        if options is None:
            return cls()
        if isinstance(options, Fairy2iConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"fairy2i options must be a dict, got {type(options).__name__}: {options!r}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(
                f"unknown fairy2i option(s) {unknown}; allowed options are {names}"
            )
        config = cls(**options)
        if config.mode == "exact":
            ignored = [k for k in ("stages", "method", "scale_granularity") if k in options]
            if ignored:
                warnings.warn(
                    f"fairy2i options {ignored} have no effect with mode='exact' (the lossless "
                    "rewrite); use mode='ptq' or mode='qat' to quantize",
                    stacklevel=2,
                )
        return config

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d


def _check_choice(option: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"option {option!r} must be one of {list(allowed)}, got {value!r}")


def matching_skip_pattern(name: str, patterns: Sequence[str]) -> Optional[str]:
    """The first `skip` pattern that matches the layer's dotted name (fnmatch, also as a
    suffix after a dot: "lm_head" matches "model.lm_head"), or None."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, "*." + pat):
            return pat
    return None
