"""The quantizers as `fairy2i` torch.library ops: what the compiled graph calls.

Every op body calls the pure-torch primitives in `quant.py` (the one source of
truth), so QAT's fake quant, PTQ and (later) packing agree bit for bit.

QAT (straight-through estimator: identity backward for the whole T-stage quantizer)
    phase_quant(u_re, u_im, w_re, w_im, stages, granularity, name) -> (uq_re, uq_im, wq_re, wq_im)
    real_quant(a, method, stages, granularity, name)                -> a_hat

PTQ (inference; quantized once per weight version, see below; no gradient to A)
    ptq_phase_quant(a, slot, stages, granularity, name)       == phase_quant(*real_to_widely(a), ...)
    ptq_real_quant(a, slot, method, stages, granularity, name) == real_quant(a, ...)
    ptq_packed_linear(x, a, bias, slot, stages, granularity, name, kernel)
        == packed_linear(x, *pack(a), bias, ...): the stage-fused form `passes/fuse_stages.py`
        makes of ptq_phase_quant + widely_linear. Its cache entry is the packed layer
        (2-bit codes + scales, packing.PackedWidely), never a dense copy; the codes stay
        inside the op (they are not graph values, so no compiler can reuse their memory).
        CPU inference graphs call ptq_packed_linear_cpu(x, a, bias, slot, stages, granularity, name)
        instead, whose C++ kernel skips Python while the weight key is unchanged.

`granularity` travels as a string ("tensor", "row", or the group size in
digits, e.g. "64") because op schemas have no Union type; `name` is the layer's
module path, used in error messages (a NaN weight names its layer).

PTQ cache. A PTQ op is given a `slot` (an int the pass allocates per layer) and
keeps the quantized result for that slot keyed by the weight's
(data_ptr, _version, shape, dtype, device). In-place updates to a parameter
(optimizer steps, `load_state_dict`, `with torch.no_grad(): w.copy_(...)`) bump
`_version`, and rebinding `param.data` changes data_ptr, so either makes the
next call quantize again. (An update made through `param.data.copy_()` bypasses
the version counter and is NOT seen: PyTorch gives `.data` its own counter.)
A slot's entry is dropped when its parameter is garbage collected. Slot -1
means "do not cache" (a weight computed inside the graph).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import quant

__all__ = [
    "encode_granularity",
    "decode_granularity",
    "new_ptq_slot",
    "prefill_ptq_slot",
    "ptq_cache_size",
    "phase_quant_reference",
    "phase_quant_layer",
    "pack_layer",
    "cached_ptq_value",
    "replace_ptq_slot_value",
    "ptq_packed_linear_direct",
]


def encode_granularity(g: Union[str, int]) -> str:
    return g if isinstance(g, str) else str(int(g))


def decode_granularity(g: str) -> Union[str, int]:
    return int(g) if g.isdigit() else g


def phase_quant_reference(a: Tensor, stages: int, granularity: Union[str, int], name: str = "weight"):
    """A [2n, 2m] -> quantized (uq_re, uq_im, wq_re, wq_im): the arithmetic every path shares.

    Equal bit for bit to ``quant.quantize_widely(*real_to_widely(a), ...)`` (U and W are in
    the compute dtype, so its casts back are no-ops); computed in blocks of rows.
    """
    qu, qw = phase_quant_layer(a, stages, granularity, name)
    return qu.re, qu.im, qw.re, qw.im


def phase_quant_layer(a: Tensor, stages: int, granularity: Union[str, int], name: str = "weight"):
    """A [2n, 2m] -> (PhaseQuantized of U, of W): codes, scales and the dequantized sums.

    ``(qu.re, qu.im, qw.re, qw.im)`` equals :func:`phase_quant_reference` bit for bit, and
    everything equals ``quant.phase_quant`` of ``real_to_widely(a)``. Quantized in blocks of
    rows (chunked.py) and rebuilt from the packed codes, so the only layer-sized memory is
    the result (the dense sums, the codes) and not phase_quant's temporaries of the whole layer.
    """
    from .chunked import pack_layer_chunked

    packed = pack_layer_chunked(a, stages, granularity, name)
    return packed.quantized("U"), packed.quantized("W")


def pack_layer(a: Tensor, stages: int, granularity: Union[str, int], name: str = "weight"):
    """A [2n, 2m] -> packing.PackedWidely (T stages of U and W, 2-bit codes + scales).

    Quantized in blocks of rows (chunked.py): the temporaries are those of one block,
    and the result equals ``pack_phase(*phase_quant_layer(...))`` bit for bit.
    """
    from .chunked import pack_layer_chunked

    return pack_layer_chunked(a, stages, granularity, name)


# --------------------------------------------------------------------------- QAT ops
@torch.library.custom_op("fairy2i::phase_quant", mutates_args=())
def phase_quant(
    u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """T-stage PhaseQuant of U and W (each [n, m], independently) -> dequantized, input dtypes."""
    return quant.quantize_widely(u_re, u_im, w_re, w_im, stages, decode_granularity(granularity), name=name)


@phase_quant.register_fake
def _(u_re, u_im, w_re, w_im, stages, granularity, name):
    return tuple(torch.empty_like(t) for t in (u_re, u_im, w_re, w_im))


def _phase_quant_ste(ctx, g_ure, g_uim, g_wre, g_wim):
    return g_ure, g_uim, g_wre, g_wim, None, None, None


phase_quant.register_autograd(_phase_quant_ste)


@torch.library.custom_op("fairy2i::real_quant", mutates_args=())
def real_quant(a: Tensor, method: str, stages: int, granularity: str, name: str) -> Tensor:
    """Real binary / ternary baseline on A [out, in] -> dequantized A_hat, a's dtype."""
    return quant.real_quant(a, method, stages, decode_granularity(granularity), name=name).to(a.dtype)


@real_quant.register_fake
def _(a, method, stages, granularity, name):
    return torch.empty_like(a)


def _real_quant_ste(ctx, g):
    return g, None, None, None, None


real_quant.register_autograd(_real_quant_ste)


# --------------------------------------------------------------------------- PTQ cache
@dataclass
class _Entry:
    key: Tuple[Any, ...]
    value: Any


_CACHE: Dict[int, _Entry] = {}
_LOCK = threading.Lock()
_SLOTS = itertools.count()


def _weight_key(a: Tensor) -> Tuple[Any, ...]:
    return (a.data_ptr(), a._version, tuple(a.shape), a.dtype, a.device)


def new_ptq_slot(param: Optional[Tensor]) -> int:
    """A cache slot for one layer, freed with `param`; -1 (no cache) without a parameter."""
    if param is None:
        return -1
    slot = next(_SLOTS)
    weakref.finalize(param, _CACHE.pop, slot, None)
    return slot


def prefill_ptq_slot(slot: int, a: Tensor, value: Any) -> None:
    """Store a result computed outside the graph (at compile time) for weight `a`."""
    if slot >= 0:
        with _LOCK:
            _CACHE[slot] = _Entry(_weight_key(a), value)


def replace_ptq_slot_value(slot: int, value: Any) -> None:
    """Swap what a filled slot holds (same weight key), e.g. dense -> packed in fuse_stages."""
    with _LOCK:
        entry = _CACHE.get(slot)
        if entry is not None:
            entry.value = value


def ptq_cache_size() -> int:
    return len(_CACHE)


def cached_ptq_value(slot: int) -> Any:
    """What the PTQ cache holds for `slot` (None if nothing): dense tuple or PackedWidely."""
    entry = _CACHE.get(slot)
    return None if entry is None else entry.value


def _cached(slot: int, a: Tensor, compute: Callable[[], Any]) -> Any:
    from torch._dynamo.utils import counters

    key = _weight_key(a)
    entry = _CACHE.get(slot)
    if entry is not None and entry.key == key:
        counters["fairy2i"]["ptq_cache_hit"] += 1
        return entry.value
    value = compute()
    counters["fairy2i"]["ptq_quantize"] += 1
    if slot >= 0:
        with _LOCK:
            _CACHE[slot] = _Entry(key, value)
    return value


# --------------------------------------------------------------------------- PTQ ops
@torch.library.custom_op("fairy2i::ptq_phase_quant", mutates_args=())
def ptq_phase_quant(
    a: Tensor, slot: int, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A [2n, 2m] -> quantized (uq_re, uq_im, wq_re, wq_im) [n, m], once per weight version."""
    return _cached(slot, a, lambda: phase_quant_reference(a, stages, decode_granularity(granularity), name))


@ptq_phase_quant.register_fake
def _(a, slot, stages, granularity, name):
    n, m = a.shape[0] // 2, a.shape[1] // 2
    return tuple(a.new_empty((n, m), dtype=quant.compute_dtype(a.dtype)) for _ in range(4))


@torch.library.custom_op("fairy2i::ptq_real_quant", mutates_args=())
def ptq_real_quant(a: Tensor, slot: int, method: str, stages: int, granularity: str, name: str) -> Tensor:
    """A [out, in] -> binary / ternary A_hat (a's dtype), once per weight version."""
    return _cached(
        slot, a, lambda: quant.real_quant(a, method, stages, decode_granularity(granularity), name=name).to(a.dtype)
    )


@ptq_real_quant.register_fake
def _(a, slot, method, stages, granularity, name):
    return torch.empty_like(a)


# --------------------------------------------------------------------------- PTQ, stage-fused
# Defined with torch.library.Library (not @custom_op) for the same per-call overhead reason
# as fairy2i::packed_linear (packed_ops.py): it runs once per layer per decoded token.
_LIB = torch.library.Library("fairy2i", "FRAGMENT")
_LIB.define(
    "ptq_packed_linear(Tensor x, Tensor a, Tensor? bias, int slot, int stages, str granularity, str name, "
    "str kernel) -> Tensor"
)


def _packed_for(a: Tensor, slot: int, stages: int, granularity: str, name: str):
    return _cached(slot, a, lambda: pack_layer(a, stages, decode_granularity(granularity), name))


def _check_same_dtype(x: Tensor, a: Tensor, name: str) -> None:
    """What F.linear does for the layer this op replaces: activations in another dtype than the
    weight (integer ids, float64 into a float32 model) are an error, not a cast to and from the
    kernel's float32 (which returned an integer tensor of zeros)."""
    if x.dtype != a.dtype:
        raise RuntimeError(
            f"fairy2i.ptq_packed_linear ({name}): activations are {x.dtype} but the layer's weight is {a.dtype}; "
            f"the uncompiled layer raises here too (F.linear: mat1 and mat2 must have the same dtype). "
            f"Cast the input to {a.dtype}"
        )


def _ptq_packed_linear(x, a, bias, slot, stages, granularity, name, kernel):
    from . import packed_ops

    _check_same_dtype(x, a, name)
    if a.dim() != 2 or x.shape[-1] != a.shape[1]:
        raise ValueError(
            f"fairy2i.ptq_packed_linear ({name}): activations {tuple(x.shape)} do not match the weight "
            f"{tuple(a.shape)} (last dim must be in_features = {a.shape[1] if a.dim() == 2 else '?'})"
        )
    pk = _packed_for(a, slot, stages, granularity, name)
    packed_ops.check_packed_linear(x, pk.codes, pk.scales, bias, pk.m, pk.group_size or 0)
    return packed_ops.run_packed(x, pk.codes, pk.scales, bias, pk.m, pk.group_size or 0, kernel)


_LIB.impl("ptq_packed_linear", _ptq_packed_linear, "CompositeExplicitAutograd")


def _ptq_packed_linear_infer(x, a, bias, slot, stages, granularity, name, kernel):
    from . import packed_ops

    pk = _packed_for(a, slot, stages, granularity, name)
    return packed_ops.run_packed(x, pk.codes, pk.scales, bias, pk.m, pk.group_size or 0, kernel)


# ptq_packed_linear for inference graphs (codegen/lower.py): no autograd formula, no checks
# (see fairy2i::packed_linear_infer in packed_ops.py)
_LIB.define(
    "ptq_packed_linear_infer(Tensor x, Tensor a, Tensor? bias, int slot, int stages, str granularity, "
    "str name, str kernel) -> Tensor"
)
_LIB.impl("ptq_packed_linear_infer", _ptq_packed_linear_infer, "CompositeExplicitAutograd")


@torch.library.register_fake("fairy2i::ptq_packed_linear_infer", lib=_LIB)
def _(x, a, bias, slot, stages, granularity, name, kernel):
    _check_same_dtype(x, a, name)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


# The stage-fused PTQ op for CPU inference graphs (codegen/lower.py), like packed_ops'
# packed_linear_cpu: its CPU kernel is C++ (codegen/cpu_packed_op.cpp), which keeps weak
# references to this cache's codes per slot and asks ptq_pack_slot only when the weight key
# changed or the codes were freed; this Python implementation (the same cache + the kernel
# through ctypes) runs until that library is loaded, or where it cannot be built.
_LIB.define(
    "ptq_packed_linear_cpu(Tensor x, Tensor a, Tensor? bias, int slot, int stages, str granularity, str name) "
    "-> Tensor"
)
_LIB.define("ptq_pack_slot(Tensor a, int slot, int stages, str granularity, str name) -> (Tensor, Tensor, int)")


def _ptq_packed_linear_cpu_fallback(x, a, bias, slot, stages, granularity, name):
    return ptq_packed_linear_direct(x, a, bias, slot, stages, granularity, name, "cpu")


def _ptq_pack_slot(a, slot, stages, granularity, name):
    pk = _packed_for(a, slot, stages, granularity, name)
    return pk.codes, pk.scales, int(pk.group_size or 0)


_LIB.impl("ptq_packed_linear_cpu", _ptq_packed_linear_cpu_fallback, "CompositeExplicitAutograd")
_LIB.impl("ptq_pack_slot", _ptq_pack_slot, "CompositeExplicitAutograd")


@torch.library.register_fake("fairy2i::ptq_packed_linear_cpu", lib=_LIB)
def _(x, a, bias, slot, stages, granularity, name):
    _check_same_dtype(x, a, name)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


def ptq_packed_linear_direct(x, a, bias, slot, stages, granularity, name, kernel):
    """`fairy2i.ptq_packed_linear` for the eager runner's CPU inference graphs (codegen/lower.py):
    the op's signature, cache lookup + the C++ kernel, no dispatcher (validated at compile time)."""
    from .codegen.cpu_packed import cpu_forward

    pk = _packed_for(a, slot, stages, granularity, name)
    return cpu_forward(x if x.is_contiguous() else x.contiguous(), pk.codes, pk.scales, bias, pk.m,
                       pk.group_size or 0)

# The dense A_hat of a packed PTQ layer, rebuilt from its cached codes as a fresh tensor:
# only the backward of ptq_packed_linear (dL/dx = g @ A_hat) uses it. An op of its own
# so that AOTAutograd can trace that backward (the cache lookup reads data_ptr, which
# fake tensors do not have).
_LIB.define("ptq_packed_dequant(Tensor a, int slot, int stages, str granularity, str name) -> Tensor")


def _ptq_packed_dequant(a, slot, stages, granularity, name):
    from .packed_ops import dequantize_packed

    pk = _packed_for(a, slot, stages, granularity, name)
    return dequantize_packed(pk.codes, pk.scales, pk.m, pk.group_size or 0)


_LIB.impl("ptq_packed_dequant", _ptq_packed_dequant, "CompositeExplicitAutograd")


@torch.library.register_fake("fairy2i::ptq_packed_dequant", lib=_LIB)
def _(a, slot, stages, granularity, name):
    return a.new_empty(a.shape, dtype=quant.compute_dtype(a.dtype))


@torch.library.register_fake("fairy2i::ptq_packed_linear", lib=_LIB)
def _(x, a, bias, slot, stages, granularity, name, kernel):
    _check_same_dtype(x, a, name)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


def _ptq_packed_setup(ctx, inputs, output):
    x, a, bias, slot, stages, granularity, name, kernel = inputs
    ctx.save_for_backward(a)
    ctx.args = (slot, stages, granularity, name)
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _ptq_packed_backward(ctx, g):
    (a,) = ctx.saved_tensors
    gx = g_bias = None
    if ctx.needs_input_grad[0]:
        a_hat = torch.ops.fairy2i.ptq_packed_dequant.default(a, *ctx.args)
        gx = g.matmul(a_hat.to(g.dtype)).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        g_bias = g.reshape(-1, g.shape[-1]).sum(0)
    # no gradient to A: PTQ weights are frozen (the pass feeds A.detach())
    return gx, None, g_bias, None, None, None, None, None


torch.library.register_autograd(
    "fairy2i::ptq_packed_linear", _ptq_packed_backward, setup_context=_ptq_packed_setup, lib=_LIB
)
