"""The packed op's pure-torch body and its argument check.

Both sit below every implementation of `fairy2i::packed_linear`: the op boundary
(ops/packed.py, ops/ptq_packed.py) calls :func:`check_packed_linear` once, and the
kernels the dispatcher picks (codegen/dispatch.py) trust their arguments.
:func:`packed_linear_body` is the "torch" kernel, the CPU fallback and the test oracle:
unpack, :func:`quant.dequant_phase`, rebuild the real weight, one F.linear,
bit-identical to the fake-quant PTQ path (same arithmetic, same order).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import group_size_of_packed
from ...quantization.packing import check_packed, unpack_codes
from ...quantization.quant import dequant_phase
from .widely import widely_to_real_reference

__all__ = ["FLOAT_DTYPES", "check_packed_linear", "dequantize_packed", "packed_linear_body"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_packed_linear(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                        group_size: int) -> Tuple[int, int, int]:
    """Validate the packed op's arguments; returns (P, n, KW). Errors name the value and the fix."""
    P, n, kw = check_packed(codes, scales, m, group_size)
    if not isinstance(x, Tensor):
        raise TypeError(f"fairy2i.packed_linear: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fairy2i.packed_linear: activations must be one of {[str(d) for d in FLOAT_DTYPES]}, "
            f"got {x.dtype=}; cast with .float() or .to(torch.bfloat16)"
        )
    if x.dim() < 1 or x.shape[-1] != 2 * m:
        raise ValueError(
            f"fairy2i.packed_linear: activations must have last dim 2*m = {2 * m} "
            f"(the layer's in_features), got {tuple(x.shape)=}"
        )
    if x.device != codes.device:
        raise ValueError(
            f"fairy2i.packed_linear: activations on {x.device} but the packed weights on {codes.device}; "
            f"move them to one device (model.to(device))"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (2 * n,):
            raise ValueError(
                f"fairy2i.packed_linear: bias must have shape ({2 * n},), got {tuple(getattr(bias, 'shape', ()))}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(
                f"fairy2i.packed_linear: bias dtype {bias.dtype} differs from activations {x.dtype}; "
                f"cast the bias (bias.to({x.dtype}))"
            )
        if bias.device != x.device:
            raise ValueError(f"fairy2i.packed_linear: bias on {bias.device}, activations on {x.device}")
    return P, n, kw


def dequantize_packed(codes: Tensor, scales: Tensor, m: int, group_size: int) -> Tensor:
    """Dense real weight A_hat [2n, 2m] (scales' dtype) rebuilt from packed codes.

    Bit-identical to ``widely_to_real(*quantize_widely(...))`` for the weights that were packed.
    """
    P = codes.shape[0]
    g = group_size_of_packed(group_size)
    c = unpack_codes(codes, m)
    u = dequant_phase(c[0::2], scales[0::2, 0], scales[0::2, 1], m, g)
    w = dequant_phase(c[1::2], scales[1::2, 0], scales[1::2, 1], m, g)
    assert P == 2 * c[0::2].shape[0]
    return widely_to_real_reference(u[0], u[1], w[0], w[1])


def packed_linear_body(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                       group_size: int) -> Tensor:
    """The "torch" kernel on validated arguments: x [..., 2m] -> y [..., 2n] in x's dtype."""
    a_hat = dequantize_packed(codes, scales, m, group_size)
    return F.linear(x, a_hat.to(x.dtype), bias)
