"""The packed op family, stage-fused: y = sum over stages of (Q^U_t x + Q^W_t conj(x)), from 2-bit codes.

    fairy2i::packed_linear(x, codes, scales, bias, m, group_size, kernel) -> y

    x:      [..., 2m]   float32 / bfloat16 / float16 (x[..., :m] = Re, x[..., m:] = Im)
    codes:  int32 [2T, n, ceil(m/16)]       all T stages of U and W (packing.py)
    scales: float32 [2T, 2, n_s, G]
    bias:   [2n] in x's dtype, or None
    m:      complex input width (the codes' last word may be padded)
    group_size: the scale group size g, 0 for "tensor" / "row" scales
    kernel: "auto" | "triton" | "cpu" | "torch"   (which implementation runs; see below)
    -> y:   [..., 2n] in x's dtype (y[..., :n] = Re, y[..., n:] = Im)

One op for every implementation, so the graph (and its dumps) says what is
computed and the `kernel` argument says how:

    "torch"  :func:`packed_linear_reference`: unpack, :func:`quant.dequant_phase`,
             rebuild the real weight, one F.linear (ops/packed_reference.py). The test
             oracle and the fallback; bit-identical to the fake-quant PTQ path.
    "triton" the generated multiplication-free Triton kernels (codegen/triton_packed.py):
             CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    "cpu"    the vectorised C++ kernel (codegen/cpu_packed.py) for CPU tensors.
    "auto"   "triton" on CUDA, "cpu" on CPU when the C++ kernel builds, else "torch".

codegen/dispatch.py owns that table and resolves `kernel` once per (value, device type);
this op checks its arguments once (:func:`check_packed_linear`) and the kernel trusts them.

No dense quantized weight is kept anywhere: "triton" and "cpu" read the codes in
their inner loop; "torch" rebuilds the dense weight as a temporary per call (it is
the reference, not the fast path).

For CPU inference graphs, codegen/lower.py swaps a packed layer on the C++ kernel for

    fairy2i::packed_linear_cpu(x, codes, scales, bias, m, group_size) -> y

(the same arguments less `kernel`; no autograd), whose CPU kernel codegen/cpu_packed_op.cpp
registers in C++; its Python implementation here runs the same kernel through ctypes. Sibling
layers that read the same activations then become one call (passes/fuse_siblings.py):

    fairy2i::packed_linear_cpu_multi.n{k}(x, [codes], [scales], [bias], m, [group_size]) -> (y_1, .., y_k)

Autograd: no gradient to codes/scales/m (they are not trainable); x and bias get
theirs (dL/dx = g @ A_hat, rebuilt from the codes in the backward only).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..codegen.cpu_packed import MULTI_MAX
from ..codegen.dispatch import check_kernel_name, implementation
from .packed_reference import FLOAT_DTYPES, check_packed_linear, dequantize_packed, packed_linear_body

__all__ = [
    "BODIES",
    "FLOAT_DTYPES",
    "packed_linear",
    "packed_linear_cpu_fallback",
    "packed_linear_cpu_multi",
    "packed_linear_cpu_multi_fallback",
    "MULTI_MAX",
    "packed_linear_reference",
    "dequantize_packed",
    "check_packed_linear",
    "run_packed",
]


def packed_linear_reference(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                            group_size: int) -> Tensor:
    """Pure-torch packed op (same signature as the kernels, minus `kernel`): x [..., 2m] -> [..., 2n]."""
    check_packed_linear(x, codes, scales, bias, m, group_size)
    return packed_linear_body(x, codes, scales, bias, m, group_size)


def run_packed(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int, group_size: int,
               kernel: str) -> Tensor:
    """Run the implementation `kernel` stands for on already-validated arguments (one memo lookup)."""
    return implementation(kernel, x.device)(x.contiguous(), codes, scales, bias, m, group_size)


# A plain torch.library definition rather than @custom_op: the decode path calls this op
# once per layer per token, and custom_op's Python wrapper costs ~25-40 us a call on CPU
# (measured, torch 2.13) where Library.impl + register_autograd costs ~12 us.
_LIB = torch.library.Library("fairy2i", "FRAGMENT")
_LIB.define(
    "packed_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int m, int group_size, str kernel) -> Tensor"
)


def _packed_linear_impl(x, codes, scales, bias, m, group_size, kernel):
    check_packed_linear(x, codes, scales, bias, m, group_size)
    return run_packed(x, codes, scales, bias, m, group_size, kernel)


_LIB.impl("packed_linear", _packed_linear_impl, "CompositeExplicitAutograd")


def _packed_linear_fake(x, codes, scales, bias, m, group_size, kernel):
    check_kernel_name(kernel)
    _, n, _ = check_packed_linear(x, codes, scales, bias, m, group_size)
    return x.new_empty((*x.shape[:-1], 2 * n))


torch.library.register_fake("fairy2i::packed_linear", _packed_linear_fake, lib=_LIB)


def _packed_setup(ctx, inputs, output):
    x, codes, scales, bias, m, group_size, kernel = inputs
    ctx.save_for_backward(codes, scales)
    ctx.m, ctx.group_size, ctx.x_dtype = m, group_size, x.dtype
    ctx.has_bias = bias is not None


def _packed_backward(ctx, g):
    codes, scales = ctx.saved_tensors
    gx = g_bias = None
    if ctx.needs_input_grad[0]:
        a_hat = dequantize_packed(codes, scales, ctx.m, ctx.group_size).to(g.dtype)
        gx = g.matmul(a_hat).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        g_bias = g.reshape(-1, g.shape[-1]).sum(0)
    return gx, None, None, g_bias, None, None, None


torch.library.register_autograd("fairy2i::packed_linear", _packed_backward, setup_context=_packed_setup, lib=_LIB)

# The same op for inference graphs (codegen/lower.py swaps it in after AOTAutograd, when no
# gradient is being recorded): no autograd formula and no argument checks (the fake
# implementation checked them while tracing), so a decode step pays ~20 us less per layer
# in the dispatcher. Eagerly it behaves like packed_linear without the checks.
_LIB.define(
    "packed_linear_infer(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int m, int group_size, str kernel) "
    "-> Tensor"
)
_LIB.impl("packed_linear_infer", run_packed, "CompositeExplicitAutograd")
torch.library.register_fake("fairy2i::packed_linear_infer", _packed_linear_fake, lib=_LIB)


# The C++ kernel as an op of its own, for CPU inference graphs (codegen/lower.py swaps it in
# where `kernel` resolves to "cpu"): codegen/cpu_packed_op.cpp registers its CPU kernel in C++,
# so Inductor's call goes through the dispatcher straight into C++ (~5 us instead of ~50 us
# through a Python implementation). Until that library is built and loaded (or where it
# cannot be), this Python implementation runs the same kernel through ctypes.
_LIB.define("packed_linear_cpu(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int m, int group_size) -> Tensor")


def packed_linear_cpu_fallback(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                               group_size: int) -> Tensor:
    """The Python implementation of fairy2i::packed_linear_cpu: the C++ kernel through ctypes."""
    from ..codegen.cpu_packed import packed_linear_cpu

    return packed_linear_cpu(x.contiguous(), codes, scales, bias, m, group_size)


def _packed_linear_cpu_fake(x, codes, scales, bias, m, group_size):
    _, n, _ = check_packed_linear(x, codes, scales, bias, m, group_size)
    return x.new_empty((*x.shape[:-1], 2 * n))


_LIB.impl("packed_linear_cpu", packed_linear_cpu_fallback, "CompositeExplicitAutograd")
torch.library.register_fake("fairy2i::packed_linear_cpu", _packed_linear_cpu_fake, lib=_LIB)


# Several packed layers that read the same activations (q/k/v, gate/up), for CPU inference graphs
# (passes/fuse_siblings.py groups packed_linear_cpu calls into it): one dispatcher call and, on the
# lut8 path, one parallel region and one set of activation tables instead of one per layer. Each
# output equals that layer's packed_linear_cpu call exactly; its CPU kernel is in
# cpu_packed_op.cpp, this Python implementation runs the layers one by one. One overload per layer
# count k = 2 .. MULTI_MAX, returning k tensors: a fixed tuple, because Inductor's C++ wrapper calls
# an op with plain tensor returns straight through the dispatcher and one returning Tensor[]
# through a Python callback (~100 us a call).
def _check_multi(codes, scales, bias, group_size, k: int) -> None:
    if not (len(codes) == len(scales) == len(bias) == len(group_size) == k):
        raise ValueError(
            f"fairy2i.packed_linear_cpu_multi.n{k} needs one codes, scales, bias and group_size entry for each of its "
            f"{k} layers, got {len(codes)=}, {len(scales)=}, {len(bias)=}, {len(group_size)=}; call "
            f"packed_linear_cpu_multi(len(codes)) for the overload of that many layers"
        )


def _multi_body(x, codes, scales, bias, m, group_size) -> tuple:
    return tuple(packed_linear_cpu_fallback(x, c, s, b, m, g) for c, s, b, g in zip(codes, scales, bias, group_size))


def packed_linear_cpu_multi_fallback(x: Tensor, codes, scales, bias, m: int, group_size) -> tuple:
    """The Python implementation of fairy2i::packed_linear_cpu_multi.n{k}: each layer's packed_linear_cpu.
    x [..., 2m] -> (y_l [..., 2 n_l] for each layer l)."""
    _check_multi(codes, scales, bias, group_size, len(codes))
    return _multi_body(x, codes, scales, bias, m, group_size)


def _multi_fake(x, codes, scales, bias, m, group_size) -> tuple:
    return tuple(_packed_linear_cpu_fake(x, c, s, b, m, g) for c, s, b, g in zip(codes, scales, bias, group_size))


def define_multi_overloads(lib: torch.library.Library, op: str, params: str, check, body, fake) -> None:
    """Define fairy2i::{op}.n{k}({params}) -> (Tensor, .. k times) for k = 2 .. MULTI_MAX in `lib`: the
    Python implementation body(*args) and the fake fake(*args), each behind check(*args, k) (which
    refuses lists of another length than k by name). The sibling ops of ops/packed.py and
    ops/ptq_packed.py share this; their C++ kernels (cpu_packed_op.cpp) register the same overloads."""
    for k in range(2, MULTI_MAX + 1):
        name = f"{op}.n{k}"
        lib.define(f"{name}({params}) -> ({', '.join(['Tensor'] * k)})")

        def impl(*args, k=k):
            check(*args, k)
            return body(*args)

        def fake_impl(*args, k=k):
            check(*args, k)
            return fake(*args)

        lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fairy2i::{name}", fake_impl, lib=lib)


def multi_overload(op: str, k: int):
    """The overload of fairy2i::{op} for k layers (2 <= k <= MULTI_MAX)."""
    if not 2 <= k <= MULTI_MAX:
        raise ValueError(f"fairy2i.{op} has overloads for 2 .. {MULTI_MAX} layers, not {k}; "
                         f"split the group (passes/fuse_siblings.py does)")
    return getattr(getattr(torch.ops.fairy2i, op), f"n{k}")


define_multi_overloads(_LIB, "packed_linear_cpu_multi",
                       "Tensor x, Tensor[] codes, Tensor[] scales, Tensor?[] bias, int m, int[] group_size",
                       lambda x, codes, scales, bias, m, group_size, k: _check_multi(codes, scales, bias, group_size, k),
                       _multi_body, _multi_fake)


def packed_linear_cpu_multi(k: int):
    """The overload of fairy2i::packed_linear_cpu_multi for k layers (2 <= k <= MULTI_MAX)."""
    return multi_overload("packed_linear_cpu_multi", k)


packed_linear = torch.ops.fairy2i.packed_linear.default
"""y = sum_t Q^U_t x + Q^W_t conj(x) + bias from packed codes (module docstring)."""


BODIES = {
    "packed_linear": lambda x, codes, scales, bias, m, group_size, kernel: packed_linear_reference(
        x, codes, scales, bias, m, group_size),
}
"""op name -> pure-torch body with the op's signature (what mlir_export traces)."""
