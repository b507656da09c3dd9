"""The stage-fused PTQ op family: quantize + pack once per weight version, then the packed op.

    ptq_packed_linear(x, a, bias, slot, stages, granularity, name, kernel)
        == packed_linear(x, *pack(a), bias, ...): the stage-fused form `passes/fuse_stages.py`
        makes of ptq_phase_quant + widely_linear. Its cache entry (ops/ptq_cache.py) is the
        packed layer (2-bit codes + scales, packing.PackedWidely), never a dense copy; the codes
        stay inside the op (they are not graph values, so no compiler can reuse their memory).
    ptq_packed_linear_infer(...)   the same without autograd and checks (inference graphs, codegen/lower.py)
    ptq_packed_linear_cpu(x, a, bias, slot, stages, granularity, name)
        CPU inference graphs; its C++ kernel skips Python while the weight key is unchanged
    ptq_packed_linear_cpu_multi.n{k}(x, [a], [bias], [slot], [stages], [granularity], [name]) -> (y_1, .., y_k)
        sibling layers on the same x in one call (passes/fuse_siblings.py), each output exactly its
        ptq_packed_linear_cpu call
    ptq_pack_slot(a, slot, stages, granularity, name) -> (codes, scales, group_size)
        what that C++ kernel calls when the key changed
    ptq_packed_dequant(a, slot, stages, granularity, name) -> A_hat   (the backward's dense weight)

`granularity` and `name` as in ops/quantize.py. No gradient to A (PTQ weights are frozen).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...quantization import quant
from .packed import define_multi_overloads, multi_overload, packed_linear_cpu_multi_fallback, run_packed
from .packed_reference import check_packed_linear, dequantize_packed
from .ptq_cache import cached
from .quantize import decode_granularity, pack_layer, ptq_phase_quant_traceable
from .widely import widely_to_real_reference

__all__ = ["BODIES", "ptq_packed_linear_direct", "ptq_packed_linear_cpu_multi", "ptq_packed_linear_cpu_multi_fallback"]

# Defined with torch.library.Library (not @custom_op) for the same per-call overhead reason
# as fairy2i::packed_linear (ops/packed.py): it runs once per layer per decoded token.
_LIB = torch.library.Library("fairy2i", "FRAGMENT")
_LIB.define(
    "ptq_packed_linear(Tensor x, Tensor a, Tensor? bias, int slot, int stages, str granularity, str name, "
    "str kernel) -> Tensor"
)


def _packed_for(a: Tensor, slot: int, stages: int, granularity: str, name: str):
    return cached(slot, a, lambda: pack_layer(a, stages, decode_granularity(granularity), name))


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
    _check_same_dtype(x, a, name)
    if a.dim() != 2 or x.shape[-1] != a.shape[1]:
        raise ValueError(
            f"fairy2i.ptq_packed_linear ({name}): activations {tuple(x.shape)} do not match the weight "
            f"{tuple(a.shape)} (last dim must be in_features = {a.shape[1] if a.dim() == 2 else '?'})"
        )
    pk = _packed_for(a, slot, stages, granularity, name)
    check_packed_linear(x, pk.codes, pk.scales, bias, pk.m, pk.packed_group_size)
    return run_packed(x, pk.codes, pk.scales, bias, pk.m, pk.packed_group_size, kernel)


_LIB.impl("ptq_packed_linear", _ptq_packed_linear, "CompositeExplicitAutograd")


def _ptq_packed_linear_infer(x, a, bias, slot, stages, granularity, name, kernel):
    pk = _packed_for(a, slot, stages, granularity, name)
    return run_packed(x, pk.codes, pk.scales, bias, pk.m, pk.packed_group_size, kernel)


# ptq_packed_linear for inference graphs (codegen/lower.py): no autograd formula, no checks
# (see fairy2i::packed_linear_infer in ops/packed.py)
_LIB.define(
    "ptq_packed_linear_infer(Tensor x, Tensor a, Tensor? bias, int slot, int stages, str granularity, "
    "str name, str kernel) -> Tensor"
)
_LIB.impl("ptq_packed_linear_infer", _ptq_packed_linear_infer, "CompositeExplicitAutograd")


@torch.library.register_fake("fairy2i::ptq_packed_linear_infer", lib=_LIB)
def _(x, a, bias, slot, stages, granularity, name, kernel):
    _check_same_dtype(x, a, name)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


# The stage-fused PTQ op for CPU inference graphs (codegen/lower.py), like ops/packed.py's
# packed_linear_cpu: its CPU kernel is C++ (codegen/cpu_packed_op.cpp), which keeps weak
# references to the PTQ cache's codes per slot (ops/ptq_cache.py) and asks ptq_pack_slot only when the weight key
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
    return pk.codes, pk.scales, pk.packed_group_size


_LIB.impl("ptq_packed_linear_cpu", _ptq_packed_linear_cpu_fallback, "CompositeExplicitAutograd")
_LIB.impl("ptq_pack_slot", _ptq_pack_slot, "CompositeExplicitAutograd")


@torch.library.register_fake("fairy2i::ptq_packed_linear_cpu", lib=_LIB)
def _(x, a, bias, slot, stages, granularity, name):
    _check_same_dtype(x, a, name)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


# Sibling PTQ layers on the same activations (passes/fuse_siblings.py), like
# packed_linear_cpu_multi.n{k} in ops/packed.py: one overload per layer count k, k tensors out; the
# C++ kernel (cpu_packed_op.cpp) resolves each weight's codes as ptq_packed_linear_cpu does and
# runs them as one packed_linear_cpu_multi call. This Python implementation: the cache, then each
# layer through the same kernel.
def _check_ptq_multi(x, a, bias, slot, stages, granularity, name, k: int) -> None:
    if not (len(a) == len(bias) == len(slot) == len(stages) == len(granularity) == len(name) == k):
        raise ValueError(
            f"fairy2i.ptq_packed_linear_cpu_multi.n{k} needs one a, bias, slot, stages, granularity and name entry for "
            f"each of its {k} layers, got {len(a)}, {len(bias)}, {len(slot)}, {len(stages)}, {len(granularity)}, "
            f"{len(name)}"
        )
    for w, n in zip(a, name):
        _check_same_dtype(x, w, n)
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"fairy2i.ptq_packed_linear_cpu_multi ({n}): activations {tuple(x.shape)} do not match "
                             f"the weight {tuple(w.shape)}")


def _ptq_multi_body(x, a, bias, slot, stages, granularity, name) -> tuple:
    pks = [_packed_for(*args) for args in zip(a, slot, stages, granularity, name)]
    return packed_linear_cpu_multi_fallback(x, [p.codes for p in pks], [p.scales for p in pks], list(bias),
                                            pks[0].m, [p.packed_group_size for p in pks])


def ptq_packed_linear_cpu_multi_fallback(x, a, bias, slot, stages, granularity, name) -> tuple:
    """The Python implementation of fairy2i::ptq_packed_linear_cpu_multi.n{k}: each weight's codes
    from the PTQ cache, then packed_linear_cpu_multi's fallback (each layer through the same kernel)."""
    _check_ptq_multi(x, a, bias, slot, stages, granularity, name, len(a))
    return _ptq_multi_body(x, a, bias, slot, stages, granularity, name)


define_multi_overloads(
    _LIB, "ptq_packed_linear_cpu_multi",
    "Tensor x, Tensor[] a, Tensor?[] bias, int[] slot, int[] stages, str[] granularity, str[] name",
    _check_ptq_multi, _ptq_multi_body,
    lambda x, a, bias, slot, stages, granularity, name: tuple(x.new_empty((*x.shape[:-1], w.shape[0])) for w in a))


def ptq_packed_linear_cpu_multi(k: int):
    """The overload of fairy2i::ptq_packed_linear_cpu_multi for k layers (2 <= k <= MULTI_MAX)."""
    return multi_overload("ptq_packed_linear_cpu_multi", k)


def ptq_packed_linear_direct(x, a, bias, slot, stages, granularity, name, kernel):
    """`fairy2i.ptq_packed_linear` for the eager runner's CPU inference graphs (codegen/lower.py):
    the op's signature, cache lookup + the C++ kernel, no dispatcher (validated at compile time)."""
    from ..codegen.cpu_packed import cpu_forward

    pk = _packed_for(a, slot, stages, granularity, name)
    return cpu_forward(x if x.is_contiguous() else x.contiguous(), pk.codes, pk.scales, bias, pk.m,
                       pk.packed_group_size)

# The dense A_hat of a packed PTQ layer, rebuilt from its cached codes as a fresh tensor:
# only the backward of ptq_packed_linear (dL/dx = g @ A_hat) uses it. An op of its own
# so that AOTAutograd can trace that backward (the cache lookup reads data_ptr, which
# fake tensors do not have).
_LIB.define("ptq_packed_dequant(Tensor a, int slot, int stages, str granularity, str name) -> Tensor")


def _ptq_packed_dequant(a, slot, stages, granularity, name):
    pk = _packed_for(a, slot, stages, granularity, name)
    return dequantize_packed(pk.codes, pk.scales, pk.m, pk.packed_group_size)


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


def _ptq_packed_body(x, a, bias, slot, stages, g, name, kernel):
    a_hat = widely_to_real_reference(*ptq_phase_quant_traceable(a, stages, g, name))
    return torch.nn.functional.linear(x, a_hat.to(x.dtype), bias)


BODIES = {
    # through the quantizer, like ptq_phase_quant (the codes live in the PTQ cache)
    "ptq_packed_linear": _ptq_packed_body,
    "ptq_packed_dequant": lambda a, slot, stages, g, name: widely_to_real_reference(
        *ptq_phase_quant_traceable(a, stages, g, name)),
}
"""op name -> pure-torch body with the op's signature (what mlir_export traces)."""
