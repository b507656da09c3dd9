"""Models whose linear layers hold Fairy2i 2-bit codes and no dense weight.

    report = pack_model(model, stages=2)          # nn.Linear -> PackedLinear, in place
    compiled = torch.compile(model, backend="fairy2i")

Compiling a float model in PTQ mode keeps the user's dense weights (the model object
owns them) and adds the packed codes. To free the dense weights, pack the model
first: `pack_model` replaces every convertible `nn.Linear` by a `PackedLinear`
(codes + scales as buffers, the bias as a parameter), one layer at a time, so the
dense weight of each layer is released as soon as its codes exist and the peak
memory is the dense model plus one layer's codes and the temporaries of one block
of rows (`ops.quantize.pack_layer` quantizes a layer block by block, chunked.py). (A weight shared with another
module, such as an `lm_head` tied to the embedding, stays alive through that other
module.) `checkpoint.load_packed` builds such a model straight from a packed file,
never materialising a dense quantized weight at all.

`PackedLinear.forward` is one `fairy2i.packed_linear` call, so the model also runs
eagerly; under `torch.compile(backend="fairy2i")` the `fuse_stages` pass records the
layers in the report and applies the `kernel` option. Run eagerly on CPU with nothing
to differentiate (inference), a layer whose `kernel` resolves to the C++ kernel calls
`fairy2i.packed_linear_cpu` instead, the op compiled graphs use (~10 us a call rather
than ~70 us through the autograd-capable op); traced or with gradients, it is always
`fairy2i.packed_linear`. Both paths quantize with
`ops.quantize.pack_layer`, the same PhaseQuant as the compiled PTQ graph, so a packed
model and a compiled float model give the same numbers.

A layer stays an `nn.Linear` (with the reason in the report) when its in/out
features are odd, its weight is not a real floating type, or its name matches `skip`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..compiler.codegen.dispatch import eager_cpu_op
from ..compiler.config import Fairy2iConfig, matching_skip_pattern
from ..compiler.ops.packed_reference import dequantize_packed
from ..compiler.options import group_size_of_packed
from ..compiler.ops.quantize import pack_layer
from .packing import PackedWidely, scale_shape, words_per_row

__all__ = ["PackedLinear", "PackReport", "pack_model", "packable_reason", "select_layers", "check_outliers",
           "set_submodule", "with_progress"]

Granularity = Union[str, int]


class PackedLinear(nn.Module):
    """A linear layer stored as 2T planes of 2-bit codes (packing.py) + float32 scales.

    codes:  int32 buffer [2T, out/2, ceil(in/32)]
    scales: float32 buffer [2T, 2, n_s, G]
    bias:   parameter [out] or None
    forward(x [..., in]) -> [..., out] = fairy2i.packed_linear(x, codes, scales, bias, ...)

    With ``outliers=k > 0`` (calibrated layers whose inputs carry massive activations) the
    layer also holds an exact correction of k input columns:

    outlier_index:  int64 buffer [k], distinct input columns
    outlier_weight: float16 buffer [out, k], the rounding residual A[:, c] - Â[:, c]
    forward adds ``x[..., outlier_index] @ outlier_weight.T`` (in x's dtype) to the packed op.
    """

    def __init__(self, in_features: int, out_features: int, stages: int = 2, granularity: Granularity = "tensor",
                 bias: bool = True, kernel: str = "auto", device=None, bias_dtype: torch.dtype = torch.float32,
                 outliers: int = 0):
        super().__init__()
        config = Fairy2iConfig(stages=stages, scale_granularity=granularity, kernel=kernel)  # validates
        if in_features % 2 or out_features % 2 or in_features < 2 or out_features < 2:
            raise ValueError(
                f"PackedLinear needs even in/out features (pairing by halves), got {in_features=}, {out_features=}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.stages, self.granularity, self.kernel = config.stages, config.scale_granularity, config.kernel
        self._group_size = config.granularity.packed_group_size  # read by every forward
        n, m = self.out_features // 2, self.in_features // 2
        n_s, g = scale_shape(n, m, self.granularity)
        self.register_buffer("codes", torch.zeros((2 * self.stages, n, words_per_row(m)), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((2 * self.stages, 2, n_s, g), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=bias_dtype, device=device)) if bias else None
        if isinstance(outliers, bool) or not isinstance(outliers, int) or not 0 <= outliers <= self.in_features:
            raise ValueError(f"outliers must be an int in 0..{self.in_features} (corrected input columns), "
                             f"got {outliers!r}")
        self.outliers = int(outliers)
        if self.outliers:
            self.register_buffer("outlier_index", torch.arange(self.outliers, dtype=torch.int64, device=device))
            self.register_buffer("outlier_weight", torch.zeros((self.out_features, self.outliers),
                                                               dtype=torch.float16, device=device))

    @property
    def m(self) -> int:
        return self.in_features // 2

    @property
    def group_size(self) -> int:
        """The packed ops' `group_size` argument: g, or 0 for "tensor" / "row" scales."""
        return self._group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, stages: int = 2, granularity: Granularity = "tensor",
                    kernel: str = "auto", name: str = "weight") -> "PackedLinear":
        """PhaseQuant `linear.weight` (T stages) and pack it; the bias is copied."""
        reason = packable_reason(linear)
        if reason:
            raise ValueError(f"cannot pack {name}: {reason}")
        weight = linear.weight.detach()
        packed = pack_layer(weight, stages, granularity, name)
        layer = cls(linear.in_features, linear.out_features, stages, granularity, linear.bias is not None,
                    kernel, device=weight.device,
                    bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        layer.load_packed(packed)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    def load_packed(self, packed: PackedWidely) -> None:
        """Copy a PackedWidely (same shape, stages and granularity) into the buffers."""
        if tuple(packed.codes.shape) != tuple(self.codes.shape) or tuple(packed.scales.shape) != tuple(self.scales.shape):
            raise ValueError(
                f"packed layer codes {tuple(packed.codes.shape)} / scales {tuple(packed.scales.shape)} do not fit "
                f"this PackedLinear (codes {tuple(self.codes.shape)}, scales {tuple(self.scales.shape)})"
            )
        with torch.no_grad():
            self.codes.copy_(packed.codes)
            self.scales.copy_(packed.scales.to(torch.float32))

    def load_outliers(self, index: Tensor, weight: Tensor) -> None:
        """Copy the outlier correction: distinct input columns [k] and residuals [out, k]."""
        check_outliers(index, weight, self.in_features, self.out_features, self.outliers, "outlier correction")
        with torch.no_grad():
            self.outlier_index.copy_(index)
            self.outlier_weight.copy_(weight.to(torch.float16))

    def packed(self) -> PackedWidely:
        return PackedWidely(self.codes, self.scales, self.out_features // 2, self.m,
                            group_size_of_packed(self.group_size))

    def dequantized_weight(self) -> Tensor:
        """The dense real weight A_hat [out, in] (float32), rebuilt on demand (not stored)."""
        a_hat = dequantize_packed(self.codes, self.scales, self.m, self.group_size)
        if self.outliers:
            a_hat[:, self.outlier_index] += self.outlier_weight.to(a_hat.dtype)
        return a_hat

    def forward(self, x: Tensor) -> Tensor:
        y = self._packed_forward(x)
        if self.outliers:
            # a matmul, not F.linear: the backend's passes convert every linear call they find,
            # and this exact correction must stay as it is
            y = y + torch.matmul(x.index_select(-1, self.outlier_index), self.outlier_weight.to(x.dtype).t())
        return y

    def _packed_forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and not torch.compiler.is_compiling() and x.is_floating_point()
                and not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None
                                                                           and self.bias.requires_grad)))
                and eager_cpu_op(self.kernel)):
            return torch.ops.fairy2i.packed_linear_cpu.default(x, self.codes, self.scales, self.bias, self.m,
                                                               self.group_size)
        return torch.ops.fairy2i.packed_linear.default(x, self.codes, self.scales, self.bias, self.m,
                                                       self.group_size, self.kernel)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * 4 + self.scales.numel() * 4 + outlier_nbytes(self.outliers, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, stages={self.stages}, "
                f"granularity={self.granularity!r}, bias={self.bias is not None}, kernel={self.kernel!r}"
                + (f", outliers={self.outliers}" if self.outliers else ""))


def outlier_nbytes(k: int, out_features: int) -> int:
    """Bytes of a k-column outlier correction: int64 indices and float16 residuals [out, k]."""
    return k * (8 + 2 * out_features)


def check_outliers(index: Any, weight: Any, in_features: int, out_features: int, k: int, what: str) -> None:
    """Raise a ValueError naming ``what`` unless index is int64 [k] of distinct columns in
    0..in_features-1 and weight a finite floating [out_features, k]."""
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or tuple(index.shape) != (k,):
        raise ValueError(f"{what}: outlier_index must be int64 [{k}], got "
                         f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
    if k and (int(index.min()) < 0 or int(index.max()) >= in_features or index.unique().numel() != k):
        raise ValueError(f"{what}: outlier_index must hold {k} distinct input columns in 0..{in_features - 1}, "
                         f"got {index.tolist()[:8]}")
    if (not isinstance(weight, Tensor) or not weight.is_floating_point()
            or tuple(weight.shape) != (out_features, k)):
        raise ValueError(f"{what}: outlier_weight must be floating [{out_features}, {k}], got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what}: outlier_weight holds NaN/Inf")


def packable_reason(module: nn.Module) -> Optional[str]:
    """None if `module` is an nn.Linear PackedLinear can replace, else why not."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    w = module.weight
    if not w.dtype.is_floating_point or w.is_complex():
        return f"weight dtype {w.dtype} is not a real floating type"
    if module.out_features % 2 or module.in_features % 2:
        return (f"odd dims: out_features={module.out_features}, in_features={module.in_features}; "
                "pairing by halves needs both even")
    return None


def select_layers(model: nn.Module, skip: Sequence[str], *, odd_dims_ok: bool = False
                  ) -> Tuple[List[str], Dict[str, str], Set[str]]:
    """Which nn.Linear layers a conversion quantizes: the one selector pack_model, save_packed,
    the folder converter and calibration share (the graph passes apply the same rules per site).

    Returns (names converted, in module order; {name: why kept real}; the skip patterns that
    matched). Names, not modules: holding the modules would keep their dense weights alive.
    ``odd_dims_ok``: the real baselines quantize layers with odd dims too.
    """
    targets: List[str] = []
    kept: Dict[str, str] = {}
    matched: Set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        reason = packable_reason(mod)
        if odd_dims_ok and reason and reason.startswith("odd dims"):
            reason = None
        pat = matching_skip_pattern(name, skip)
        if pat is not None:
            matched.add(pat)
            reason = reason or f"matches skip pattern {pat!r}"
        if reason:
            kept[name] = reason
        else:
            targets.append(name)
    return targets, kept, matched


@dataclass
class PackReport:
    """What pack_model did: the packed layers with their bytes before/after, the layers kept real and why."""
    packed: Dict[str, Dict[str, int]] = field(default_factory=dict)   # name -> {bytes_before, bytes_after}
    kept_real: Dict[str, str] = field(default_factory=dict)           # name -> reason
    unmatched_skip_patterns: list = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(v["bytes_before"] for v in self.packed.values())

    @property
    def bytes_after(self) -> int:
        return sum(v["bytes_after"] for v in self.packed.values())


def pack_model(model: nn.Module, stages: int = 2, granularity: Granularity = "tensor",
               skip: Sequence[str] = (), kernel: str = "auto", progress: bool = False) -> PackReport:
    """Replace every packable nn.Linear of `model` by a PackedLinear, in place; see the module docstring."""
    config = Fairy2iConfig(stages=stages, scale_granularity=granularity, skip=skip, kernel=kernel)  # validates
    if not isinstance(model, nn.Module):
        raise TypeError(f"pack_model needs an nn.Module, got {type(model).__name__}")
    report = PackReport()
    # names, not modules: a list of the nn.Linear objects would keep every dense weight alive
    # until the end, where the point is to free each one as soon as its codes exist
    targets, report.kept_real, matched = select_layers(model, config.skip)
    for name in with_progress(targets, progress):
        mod = model.get_submodule(name)
        packed = PackedLinear.from_linear(mod, config.stages, config.scale_granularity, config.kernel, name)
        set_submodule(model, name, packed)
        report.packed[name] = {"bytes_before": mod.weight.numel() * mod.weight.element_size(),
                               "bytes_after": packed.nbytes}
        del mod
    report.unmatched_skip_patterns = [p for p in config.skip if p not in matched]
    if report.unmatched_skip_patterns:
        warnings.warn(f"pack_model: skip pattern(s) {report.unmatched_skip_patterns} matched no nn.Linear of the "
                      f"model (names such as {targets[:3]}); those layers were packed. Check for "
                      f"a typo", UserWarning, stacklevel=2)
    return report


def with_progress(items: Sequence, enabled: bool) -> Iterable:
    """`items` under a tqdm bar when `enabled` and tqdm is installed, else `items` as they are."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="packing", unit="layer")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` of `root` by `module`."""
    if not name:
        raise ValueError("pack_model cannot replace the root module itself; wrap the nn.Linear in a container")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
