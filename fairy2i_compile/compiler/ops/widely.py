"""The widely-linear op family: real linear map <-> widely-linear complex map.

A real weight A of shape (2n, 2m) (out x in) acts on x~ in R^{2m}. Pair the input
by halves, x = x~[:m] + i x~[m:], and the output the same way,
y~[:n] = Re y, y~[n:] = Im y. With the blocks A11 = A[:n,:m], A12 = A[:n,m:],
A21 = A[n:,:m], A22 = A[n:,m:] the real map is

    Re y = A11 Re x + A12 Im x
    Im y = A21 Re x + A22 Im x

and the widely-linear form y = U x + W conj(x) expands to

    Re y = (ReU + ReW) Re x + (ImW - ImU) Im x
    Im y = (ImU + ImW) Re x + (ReU - ReW) Im x

so matching coefficients gives the unique (U, W) for every A:

    ReU = (A11 + A22)/2    ImU = (A21 - A12)/2
    ReW = (A11 - A22)/2    ImW = (A12 + A21)/2

and back: A11 = ReU + ReW, A12 = ImW - ImU, A21 = ImW + ImU, A22 = ReU - ReW.
Both maps are linear; `widely_to_real` is 2x the adjoint of `real_to_widely`,
which is what the backward formulas below use. (tests/test_math.py proves the
identity symbolically with sympy.)

Complex dtypes never appear: U and W travel as four real (n, m) tensors
(u_re, u_im, w_re, w_im). For half-precision weights U and W are computed in
float32, where (a + b)/2 of two bf16/fp16 values is exact, so the exact rewrite
of a bf16 model reproduces its weights bit for bit.

Ops (namespace `fairy2i`, each with a fake impl and an autograd formula):
    real_to_widely(a)                                  -> (u_re, u_im, w_re, w_im)
    widely_to_real(u_re, u_im, w_re, w_im)             -> a
    widely_linear(x, u_re, u_im, w_re, w_im, bias?)    -> y       # x: [..., 2m] -> y: [..., 2n]
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...quantization.quant import compute_dtype

__all__ = [
    "BODIES",
    "real_to_widely",
    "real_to_widely_reference",
    "widely_to_real",
    "widely_to_real_reference",
    "widely_linear",
    "widely_linear_reference",
    "compute_dtype",
]


def _check_real_weight(a: Tensor) -> None:
    if a.dim() != 2 or a.shape[0] % 2 or a.shape[1] % 2:
        raise ValueError(
            f"fairy2i.real_to_widely needs a 2-D weight with even out/in features, "
            f"got {tuple(a.shape)=}; layers with odd dims must stay real"
        )
    if not a.is_floating_point():
        raise TypeError(f"fairy2i.real_to_widely needs a floating weight, got {a.dtype=}")


def _check_uw(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor) -> None:
    shapes = [tuple(t.shape) for t in (u_re, u_im, w_re, w_im)]
    if len(shapes[0]) != 2 or any(s != shapes[0] for s in shapes):
        raise ValueError(
            f"fairy2i: u_re, u_im, w_re, w_im must be 2-D of one shape (n, m), got {shapes}"
        )
    dtypes = {t.dtype for t in (u_re, u_im, w_re, w_im)}
    if len(dtypes) != 1:
        raise TypeError(f"fairy2i: u_re, u_im, w_re, w_im must share one dtype, got {dtypes}")


def _check_widely_linear(x: Tensor, u_re: Tensor, bias: Optional[Tensor]) -> None:
    n, m = u_re.shape
    if x.dim() < 1 or x.shape[-1] != 2 * m:
        raise ValueError(
            f"fairy2i.widely_linear: activations must have last dim 2*m = {2 * m} "
            f"(U/W are {n}x{m}), got {tuple(x.shape)=}"
        )
    if bias is not None and tuple(bias.shape) != (2 * n,):
        raise ValueError(
            f"fairy2i.widely_linear: bias must have shape ({2 * n},), got {tuple(bias.shape)=}"
        )


# --------------------------------------------------------------------------- #
# pure-torch bodies (also the references the tests call, and what mlir_export traces)
# --------------------------------------------------------------------------- #
def real_to_widely_reference(a: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of fairy2i::real_to_widely, unchecked: a [2n, 2m] -> (u_re, u_im, w_re, w_im), each [n, m]."""
    n, m = a.shape[0] // 2, a.shape[1] // 2
    a = a.to(compute_dtype(a.dtype))
    a11, a12 = a[:n, :m], a[:n, m:]
    a21, a22 = a[n:, :m], a[n:, m:]
    # contiguous whatever A's layout (Conv1D weights arrive transposed): the
    # quantizers' reductions then run in one order and every path agrees bit for bit
    return tuple(t.contiguous() for t in ((a11 + a22) * 0.5, (a21 - a12) * 0.5, (a11 - a22) * 0.5, (a12 + a21) * 0.5))


def widely_to_real_reference(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor) -> Tensor:
    """The body of fairy2i::widely_to_real, unchecked: four [n, m] -> a [2n, 2m]."""
    top = torch.cat([u_re + w_re, w_im - u_im], dim=1)
    bottom = torch.cat([w_im + u_im, u_re - w_re], dim=1)
    return torch.cat([top, bottom], dim=0)


def widely_linear_reference(x: Tensor, u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor,
                            bias: Optional[Tensor]) -> Tensor:
    """The body of fairy2i::widely_linear, unchecked: x [..., 2m] -> y [..., 2n]."""
    # One GEMM on the rebuilt real form: the same FLOPs as the original layer,
    # and exactly the block equations in the module docstring.
    a = widely_to_real_reference(u_re, u_im, w_re, w_im).to(x.dtype)
    return F.linear(x, a, bias)


# --------------------------------------------------------------------------- #
# real_to_widely
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fairy2i::real_to_widely", mutates_args=())
def real_to_widely(a: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """a: [2n, 2m] real weight -> (u_re, u_im, w_re, w_im), each [n, m] (float32 at least)."""
    _check_real_weight(a)
    return real_to_widely_reference(a)


@real_to_widely.register_fake
def _(a):
    _check_real_weight(a)
    n, m = a.shape[0] // 2, a.shape[1] // 2
    dt = compute_dtype(a.dtype)
    return tuple(a.new_empty((n, m), dtype=dt) for _ in range(4))


def _real_to_widely_setup(ctx, inputs, output):
    ctx.a_dtype = inputs[0].dtype


def _real_to_widely_backward(ctx, g_ure, g_uim, g_wre, g_wim):
    # adjoint of real_to_widely = widely_to_real / 2
    ref = next(g for g in (g_ure, g_uim, g_wre, g_wim) if g is not None)
    gs = [torch.zeros_like(ref) if g is None else g for g in (g_ure, g_uim, g_wre, g_wim)]
    return (torch.ops.fairy2i.widely_to_real(*gs) * 0.5).to(ctx.a_dtype)


real_to_widely.register_autograd(_real_to_widely_backward, setup_context=_real_to_widely_setup)


# --------------------------------------------------------------------------- #
# widely_to_real
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fairy2i::widely_to_real", mutates_args=())
def widely_to_real(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor) -> Tensor:
    """(u_re, u_im, w_re, w_im), each [n, m] -> real weight a: [2n, 2m]."""
    _check_uw(u_re, u_im, w_re, w_im)
    return widely_to_real_reference(u_re, u_im, w_re, w_im)


@widely_to_real.register_fake
def _(u_re, u_im, w_re, w_im):
    _check_uw(u_re, u_im, w_re, w_im)
    n, m = u_re.shape
    return u_re.new_empty((2 * n, 2 * m))


def _widely_to_real_backward(ctx, g):
    # adjoint of widely_to_real = 2 * real_to_widely
    return tuple(t * 2.0 for t in torch.ops.fairy2i.real_to_widely(g))


widely_to_real.register_autograd(_widely_to_real_backward)


# --------------------------------------------------------------------------- #
# widely_linear
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fairy2i::widely_linear", mutates_args=())
def widely_linear(
    x: Tensor, u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """y = U x + W conj(x) on halves-paired real tensors.

    x: [..., 2m] (x[..., :m] = Re, x[..., m:] = Im); u_*, w_*: [n, m]; bias: [2n] or None
    -> y: [..., 2n] (y[..., :n] = Re, y[..., n:] = Im), dtype of x.
    """
    _check_uw(u_re, u_im, w_re, w_im)
    _check_widely_linear(x, u_re, bias)
    return widely_linear_reference(x, u_re, u_im, w_re, w_im, bias)


@widely_linear.register_fake
def _(x, u_re, u_im, w_re, w_im, bias=None):
    _check_uw(u_re, u_im, w_re, w_im)
    _check_widely_linear(x, u_re, bias)
    return x.new_empty((*x.shape[:-1], 2 * u_re.shape[0]))


def _widely_linear_setup(ctx, inputs, output):
    x, u_re, u_im, w_re, w_im, bias = inputs
    ctx.save_for_backward(x, u_re, u_im, w_re, w_im)
    ctx.has_bias = bias is not None


def _widely_linear_backward(ctx, g):
    x, u_re, u_im, w_re, w_im = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = g_uw = g_bias = None
    if need[0]:
        gx = g.matmul(torch.ops.fairy2i.widely_to_real(u_re, u_im, w_re, w_im).to(g.dtype))
    if any(need[1:5]):
        g2 = g.reshape(-1, g.shape[-1])
        ga = g2.t().matmul(x.reshape(-1, x.shape[-1])).to(u_re.dtype)  # dL/dA: [2n, 2m]
        g_uw = tuple(t * 2.0 for t in torch.ops.fairy2i.real_to_widely(ga))
    if ctx.has_bias and need[5]:
        g_bias = g.reshape(-1, g.shape[-1]).sum(0)
    g_uw = g_uw or (None,) * 4
    return (gx, *g_uw, g_bias)


widely_linear.register_autograd(_widely_linear_backward, setup_context=_widely_linear_setup)


BODIES = {
    "real_to_widely": real_to_widely_reference,
    "widely_to_real": widely_to_real_reference,
    "widely_linear": widely_linear_reference,
}
"""op name -> pure-torch body with the op's signature (mlir_export decomposes the ops into these)."""
