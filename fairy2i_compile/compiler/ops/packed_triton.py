"""The Triton kernels as ops: fairy2i::packed_linear_triton (+ its interpreter twin).

    packed_linear_triton(x, codes, scales, bias, m, group_size) -> y
    x [..., 2m] -> y [..., 2n]; codes int32 [2T, n, ceil(m/16)]; scales [2T, 2, n_s, G]

torch.library registration. The launch is registered as
``torch.library.triton_op("fairy2i::packed_linear_triton")`` and, on GPU, the
kernel is launched through ``torch.library.wrap_triton``, so Inductor sees it
(AOTAutograd decomposes the op into a `triton_kernel_wrapper_functional` node).
Under TRITON_INTERPRET=1 (measured on torch 2.13 + triton 3.7) wrap_triton is
not enough: eager calls run (wrap_triton hands an interpreted kernel back
unchanged), but `triton_op` also runs the function as its fake implementation
and as the AOT functional decomposition, and an interpreted kernel launched on
FakeTensors fails ("Cannot access data pointer of Tensor"); an interpreted
kernel has no JITFunction to capture as a higher-order op. So under the
interpreter the triton_op's body calls a second, opaque op,
``fairy2i::packed_linear_triton_interpreted`` (custom_op + register_fake), that
launches the kernel directly: torch.compile still traces it, Inductor sees an
extern call. The choice is made per call, so it does not matter whether
TRITON_INTERPRET was set before or after this module was imported.
Eager calls with plain tensors skip the op dispatch and launch directly (the
op's Python wrapper costs tens of microseconds, as much as a decode-sized kernel);
anything traced (FakeTensor, a dispatch mode, torch.compile) goes through the op.

Triton is imported lazily: the package imports this module only when kernel="triton" first runs (codegen/dispatch.py) or a caller imports it,
and this module imports triton only through `triton_op`'s registration on a
machine that has it (without triton it imports, generates sources and registers
a custom_op, so a missing triton surfaces when a kernel is launched).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch
from torch import Tensor

from ..codegen.triton_spec import triton_interpreter_enabled, triton_unavailable_reason
from ..codegen.triton_launch import run_packed_triton
from .packed_reference import check_packed_linear

__all__ = ["packed_linear_triton", "packed_linear_triton_impl", "packed_linear_triton_trusted"]


def _check_flat(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int, group_size: int) -> int:
    _, n, _ = check_packed_linear(x, codes, scales, bias, m, group_size)
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(
            f"fairy2i::packed_linear_triton takes x [M, 2m] contiguous, got shape {tuple(x.shape)} "
            f"strides {tuple(x.stride())}; call packed_linear_triton (it flattens) or pass x.contiguous()"
        )
    return n


def packed_linear_triton_impl(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                              group_size: int) -> Tensor:
    """Body of the op fairy2i::packed_linear_triton: x [M, 2m] contiguous -> y [M, 2n].

    triton_op runs it eagerly, under FakeTensorMode (as the fake kernel) and under AOTAutograd's
    functional decomposition, where wrap_triton turns the launch into a graph node. Under the
    interpreter it calls the opaque op fairy2i::packed_linear_triton_interpreted instead.
    """
    n = _check_flat(x, codes, scales, bias, m, group_size)
    if triton_interpreter_enabled():
        return torch.ops.fairy2i.packed_linear_triton_interpreted(x, codes, scales, bias, m, group_size)
    return run_packed_triton(x, codes, scales, bias, m, group_size, n, False, wrap=True)


def _interpreted_impl(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                      group_size: int) -> Tensor:
    n = _check_flat(x, codes, scales, bias, m, group_size)
    return run_packed_triton(x, codes, scales, bias, m, group_size, n, True, wrap=False)


def _fake(x, codes, scales, bias, m, group_size):
    n = _check_flat(x, codes, scales, bias, m, group_size)
    return x.new_empty((x.shape[0], 2 * n))


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _register_ops() -> Any:
    """Register fairy2i::packed_linear_triton (+ the interpreter's opaque op); returns the former."""
    if hasattr(torch.ops.fairy2i, "packed_linear_triton"):  # this module was loaded twice
        return torch.ops.fairy2i.packed_linear_triton
    interp = torch.library.custom_op("fairy2i::packed_linear_triton_interpreted", mutates_args=())(_interpreted_impl)
    interp.register_fake(_fake)
    if not _triton_installed():  # nothing to launch; keep the op traceable and let a launch say why
        op = torch.library.custom_op("fairy2i::packed_linear_triton", mutates_args=())(packed_linear_triton_impl)
        op.register_fake(_fake)
        return op
    # triton_op reads the function's source for kernels, which imports triton (installed, checked above)
    return torch.library.triton_op("fairy2i::packed_linear_triton", mutates_args=())(packed_linear_triton_impl)


# registered when the module loads, not on first call: torch.compile traces packed_linear_triton
# and cannot trace an op registration
_OP = _register_ops()


def _plain_eager(x: Tensor) -> bool:
    """No tracing in progress: a plain tensor, no dispatch mode (fake, proxy, functional), not compiling."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    # is_compiling() first: Dynamo cannot trace the dispatch-mode query
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor and _get_current_dispatch_mode() is None


def packed_linear_triton(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                         group_size: int) -> Tensor:
    """y = sum_t Q^U_t x + Q^W_t conj(x) + bias with the generated Triton kernels.

    x:      [..., 2m] float32 / bfloat16 / float16, contiguous (x[..., :m] = Re, x[..., m:] = Im)
    codes:  int32 [2T, n, ceil(m/16)];  scales: float [2T, 2, n_s, G];  bias: [2n] in x's dtype or None
    m:      complex input width;  group_size: the scale group size, 0 for tensor / row scales
    -> y:   [..., 2n] in x's dtype (y[..., :n] = Re, y[..., n:] = Im)

    M = prod(x.shape[:-1]) rows: the tensor-core atom kernel (mma) for M <= MMA_MAX_M, dense tiles above;
    group sizes that are not multiples of 16 take the GEMV (M <= GEMV_MAX_M) or the GEMM (choose_spec).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Eager calls launch directly;
    traced calls (torch.compile, make_fx, export) go through the op fairy2i::packed_linear_triton.
    """
    check_packed_linear(x, codes, scales, bias, m, group_size)
    if not x.is_contiguous():
        raise ValueError(
            f"fairy2i.packed_linear_triton: x must be contiguous, got shape {tuple(x.shape)} with strides "
            f"{tuple(x.stride())}; pass x.contiguous()"
        )
    why = triton_unavailable_reason(x.device)  # e.g. CPU tensors without the interpreter, with the fix
    if why is not None:
        raise RuntimeError(why)
    return packed_linear_triton_trusted(x, codes, scales, bias, m, group_size)


def packed_linear_triton_trusted(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                                 group_size: int) -> Tensor:
    """:func:`packed_linear_triton` on arguments checked already (the "triton" kernel of
    codegen/dispatch.py, which resolved the device once): x [..., 2m] contiguous -> y [..., 2n]."""
    n = codes.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, 2 * m)
    if _plain_eager(x):  # skip the op dispatch (tens of microseconds a call) when nothing traces
        y = run_packed_triton(x2, codes, scales, bias, m, group_size, n, triton_interpreter_enabled(), wrap=False)
    else:
        y = _OP(x2, codes, scales, bias, m, group_size)
    return y.reshape(*lead, 2 * n)
