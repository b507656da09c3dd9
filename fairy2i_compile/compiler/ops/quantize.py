"""The quantizer op family: what the compiled graph calls to quantize a weight.

Every op body calls the pure-torch primitives in `quant.py` (the one source of
truth), so QAT's fake quant, PTQ and packing agree bit for bit.

QAT (straight-through estimator: identity backward for the whole T-stage quantizer)
    phase_quant(u_re, u_im, w_re, w_im, stages, granularity, name) -> (uq_re, uq_im, wq_re, wq_im)
    real_quant(a, method, stages, granularity, name)                -> a_hat

PTQ (inference; quantized once per weight version through ops/ptq_cache.py; no gradient to A)
    ptq_phase_quant(a, slot, stages, granularity, name)       == phase_quant(*real_to_widely(a), ...)
    ptq_real_quant(a, slot, method, stages, granularity, name) == real_quant(a, ...)

(The stage-fused PTQ op, ptq_packed_linear, is in ops/ptq_packed.py.)

`granularity` travels as a string ("tensor", "row", or the group size in
digits, e.g. "64") because op schemas have no Union type
(:func:`encode_granularity` / :func:`decode_granularity`); `name` is the layer's
module path, used in error messages (a NaN weight names its layer).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from ...quantization import quant
from ..options import ScaleGranularity
from .ptq_cache import cached
from .widely import real_to_widely_reference

__all__ = [
    "BODIES",
    "decode_granularity",
    "encode_granularity",
    "pack_layer",
    "phase_quant",
    "phase_quant_layer",
    "phase_quant_reference",
    "ptq_phase_quant",
    "ptq_phase_quant_traceable",
    "ptq_real_quant",
    "real_quant",
]


def encode_granularity(g: Union[str, int, ScaleGranularity]) -> str:
    """A scale granularity as an op schema carries it: "tensor", "row" or the group size in digits
    (options.ScaleGranularity.op_arg; checked)."""
    return ScaleGranularity.of(g).op_arg()


def decode_granularity(g: str) -> Union[str, int]:
    """The inverse of :func:`encode_granularity`: the option value ("tensor" | "row" | g)."""
    return ScaleGranularity.from_op_arg(g).option


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
    packed = pack_layer(a, stages, granularity, name)
    return packed.quantized("U"), packed.quantized("W")


def pack_layer(a: Tensor, stages: int, granularity: Union[str, int], name: str = "weight"):
    """A [2n, 2m] -> packing.PackedWidely (T stages of U and W, 2-bit codes + scales).

    Quantized in blocks of rows (chunked.py): the temporaries are those of one block,
    and the result equals ``pack_phase(*phase_quant_layer(...))`` bit for bit.
    """
    from ...quantization.chunked import pack_layer_chunked

    return pack_layer_chunked(a, stages, granularity, name)


# --------------------------------------------------------------------------- QAT ops
@torch.library.custom_op("fairy2i::phase_quant", mutates_args=())
def phase_quant(
    u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """T-stage PhaseQuant of U and W (each [n, m], independently) -> dequantized, input dtypes.

    QAT re-quantizes every weight every step, so the body is the fused one
    (``quant.quantize_widely(fused=True)``: compiled loops for large weights; the reference
    body, ``BODIES["phase_quant"]``, is what it is tested against)."""
    return quant.quantize_widely(u_re, u_im, w_re, w_im, stages, decode_granularity(granularity), name=name,
                                 fused=True)


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


# --------------------------------------------------------------------------- PTQ ops
@torch.library.custom_op("fairy2i::ptq_phase_quant", mutates_args=())
def ptq_phase_quant(
    a: Tensor, slot: int, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A [2n, 2m] -> quantized (uq_re, uq_im, wq_re, wq_im) [n, m], once per weight version."""
    return cached(slot, a, lambda: phase_quant_reference(a, stages, decode_granularity(granularity), name))


@ptq_phase_quant.register_fake
def _(a, slot, stages, granularity, name):
    n, m = a.shape[0] // 2, a.shape[1] // 2
    return tuple(a.new_empty((n, m), dtype=quant.compute_dtype(a.dtype)) for _ in range(4))


@torch.library.custom_op("fairy2i::ptq_real_quant", mutates_args=())
def ptq_real_quant(a: Tensor, slot: int, method: str, stages: int, granularity: str, name: str) -> Tensor:
    """A [out, in] -> binary / ternary A_hat (a's dtype), once per weight version."""
    return cached(
        slot, a, lambda: quant.real_quant(a, method, stages, decode_granularity(granularity), name=name).to(a.dtype)
    )


@ptq_real_quant.register_fake
def _(a, slot, method, stages, granularity, name):
    return torch.empty_like(a)


# --------------------------------------------------------------------------- pure-torch bodies
def ptq_phase_quant_traceable(a: Tensor, stages: int, granularity: str, name: str):
    """ptq_phase_quant's quantizer without cache or row blocks (the blocks' sizes come from
    values and cannot be traced by make_fx): equal to :func:`phase_quant_reference` bit for bit."""
    return quant.quantize_widely(*real_to_widely_reference(a), stages, decode_granularity(granularity), name=name)


def _real_quant_body(a, method, stages, g, name):
    return quant.real_quant(a, method, stages, decode_granularity(g), name=name).to(a.dtype)


BODIES = {
    "phase_quant": lambda ur, ui, wr, wi, stages, g, name: quant.quantize_widely(
        ur, ui, wr, wi, stages, decode_granularity(g), name=name),
    "real_quant": _real_quant_body,
    # PTQ: the quantizer itself, not the per-weight cache (data_ptr has no meaning while tracing)
    "ptq_phase_quant": lambda a, slot, stages, g, name: ptq_phase_quant_traceable(a, stages, g, name),
    "ptq_real_quant": lambda a, slot, method, stages, g, name: _real_quant_body(a, method, stages, g, name),
}
"""op name -> pure-torch body with the op's signature (what mlir_export traces)."""
