"""Pure-torch quantizers: Fairy2i PhaseQuant and the real BitNet-style baselines.

This module is the single source of truth for quantization arithmetic. PTQ,
QAT (through the straight-through ops of ``compiler/ops/quantize.py``) and packing all
call it, so fake-quant weights and packed weights agree bit for bit.
No complex dtypes: a complex matrix is carried as two real tensors (re, im).

PhaseQuant (DESIGN.md §1.2)
---------------------------
Codebook {+1, +i, -1, -i}; code k in {0, 1, 2, 3} means ``i**k``. With
phi = angle(w), w = re + i*im::

    [-pi/4, pi/4)              -> 0  (+1)
    [pi/4, 3pi/4)              -> 1  (+i)
    [3pi/4, pi] u (-pi, -3pi/4) -> 2  (-1)
    [-3pi/4, -pi/4)            -> 3  (-i)

Because |re| vs |im| decides the axis, this needs comparisons only (no atan2);
``-re`` and ``-im`` are exact in floating point, so the ties land exactly as
the half-open intervals say::

    code 0 <=> re > 0 and -re <= im <  re
    code 1 <=> im > 0 and -im <  re <= im
    code 2 <=> re < 0 and  re <  im <= -re
    code 3 <=> im < 0 and  im <= re < -im
    w == 0 -> code 0 (angle(0) = 0)

The four conditions are disjoint and cover every finite w != 0. Signed zeros
are treated as +0.0 (comparisons ignore the sign of zero): ``-1 - 0.0i`` has
torch.angle = -pi, which the intervals leave out, and gets code 2 like
``-1 + 0i``; ``-0.0 + 0i`` (torch.angle = pi) gets code 0 like ``0``.

Scales, per scale group (granularity) and per stage::

    s_re = max(mean |re| over entries coded 0 or 2, 1e-6)
    s_im = max(mean |im| over entries coded 1 or 3, 1e-6)

A group with no entry on an axis gets 1e-6 on that axis (never 0/0; no entry
selects that value). One exception to the clamp: when every entry on an axis
is exactly zero (then w == 0 there, coded 0) the mean is 0 and the scale stays
0, so all-zero weights and exactly-zero residual groups dequantize to exact
zeros instead of +-1e-6; otherwise this is the paper's rule. Given the codes,
mean |re| is the least-squares optimal scale for the +-1 entries (likewise
mean |im| for +-i), so no stage can increase the Frobenius error except
through the 1e-6 clamp. Dequantized: code0 -> +s_re, code2 -> -s_re,
code1 -> +i*s_im, code3 -> -i*s_im (the other component is exactly 0).

Each mean is (sum of the members) / (count), summed in the compute dtype; a
"tensor" mean is the float64 sum of its rows' sums, divided in float64 and rounded
to the compute dtype once. Either way a
row is summed in an order that depends on that row alone (:func:`row_sums`), so
``chunked.py`` can quantize a layer in blocks of rows and get the same bits.

Granularity (a scale group):

* ``"tensor"``: one (s_re, s_im) per matrix per stage (the paper's rule, default);
  scales have shape [T, 1, 1].
* ``"row"``: one per output row; shape [T, n, 1].
* ``g`` (int > 0): one per row and per g consecutive input columns; shape
  [T, n, ceil(m / g)]. The last group may be ragged: it averages only its own
  m - (G-1)*g entries. ``g >= m`` is allowed and gives one group per row (the
  same scales as ``"row"``), so one group size can be used across layers of
  different widths; ``group_size`` is then recorded as given.

Recursive residual (DESIGN.md §1.3), T in 1..4::

    e_0 = w;  q_t = PQ(e_{t-1}) (scales recomputed on e_{t-1});  e_t = e_{t-1} - q_t
    w_hat = sum_t q_t   (accumulated in stage order, starting from q_1)

:func:`phase_quant` builds ``w_hat`` with :func:`dequant_phase` itself, so the
packed path (codes + scales -> :func:`dequant_phase`) reproduces it exactly.

Real baselines (BitNet-style) on a real weight A [out, in], same granularity
(row = output row of A, groups along A's input dim), same residual recursion:

* binary:  ``sign(A - mean A) * mean |A|`` with sign(0) := +1
  (mean and mean |A| over the scale group; an all-zero group gives zeros);
* ternary (BitNet b1.58 absmean): ``g = max(mean |A|, 1e-6);
  clamp(round(A / g), -1, 1) * g`` (round half to even, as torch.round).

Dtypes: arithmetic runs in float32, or float64 when the input is float64;
``PhaseQuantized`` tensors (scales included) and :func:`real_quant` results are
in that compute dtype. :func:`quantize_widely` and the STEs cast back to the
input dtype.

Bits (DESIGN.md §1.3): a stage stores 2 bits per complex weight of U and of W,
which together replace 4 real weights per complex index pair: 1 bit per real
weight per stage. Binary is 1 bit, ternary log2(3) bits per real weight per
stage. Scales are not counted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiler.options import MAX_STAGES, Method, ScaleGranularity, check_stages

__all__ = [
    "Granularity",
    "METHODS",
    "MAX_STAGES",
    "SCALE_EPS",
    "PhaseQuantized",
    "phase_quant",
    "phase_codes",
    "phase_masks",
    "mask_codes",
    "phase_step",
    "mask_values",
    "phase_quant_values",
    "stage_values",
    "real_stage_params",
    "real_stage_apply",
    "expand_scales",
    "dequant_phase",
    "real_quant",
    "quantize_widely",
    "bits_per_real_weight",
    "compute_dtype",
    "scale_groups",
    "row_sums",
    "tensor_sum",
    "storage_bytes",
    "quant_error",
    "check_finite",
    "validate_granularity",
]

Granularity = Union[str, int, ScaleGranularity]  # "tensor" | "row" | g, or the typed value (options.py)
METHODS = tuple(Method)  # "phase", "binary", "ternary"
SCALE_EPS = 1e-6


# ----------------------------------------------------------------------------
# validation


def _is_tracing(t: Tensor) -> bool:
    """True while Dynamo traces Python or `t` is fake: data-dependent checks can't run.

    Not `torch.compiler.is_compiling()`: that is also true inside a backend,
    where the fairy2i passes quantize real parameters and must check them.
    """
    if torch.compiler.is_dynamo_compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake

        return bool(is_fake(t))
    except ImportError:  # private API moved: fall back to running the checks
        return False


def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError if ``t`` (any shape) holds NaN or Inf.

    ``name`` (e.g. the layer's qualified name) is put in the message. The
    check is skipped while tracing (fake tensors have no values).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"check_finite expects a Tensor for {name!r}, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()) or _is_tracing(t):
        return
    bad = int((~torch.isfinite(t)).sum().item())
    if bad:
        raise ValueError(
            f"{name} has {bad} NaN/Inf values out of {t.numel()} (shape {tuple(t.shape)}): "
            f"the weight is not finite and cannot be quantized; fix or reload the "
            f"checkpoint, or exclude this layer from conversion"
        )


def validate_granularity(g: Any, m: int) -> ScaleGranularity:
    """Check a granularity for a matrix with ``m`` input columns; returns it typed.

    Valid: ``"tensor"``, ``"row"``, an int group size ``g >= 1`` (bool is rejected), or a
    :class:`options.ScaleGranularity`. ``g >= m`` is allowed (one group per row, same as ``"row"``).
    """
    granularity = ScaleGranularity.of(g)
    if granularity.group_size is not None and (not isinstance(m, numbers.Integral) or m < 1):
        raise ValueError(f"number of input columns must be a positive int, got m={m!r}")
    return granularity


def _validate_stages(stages: Any) -> int:
    return check_stages(stages)


def _validate_method(method: Any) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    return Method(method)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weights are quantized (and U/W computed) in: float32 at least, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_matrix(t: Any, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(
            f"{what} is complex ({t.dtype}); pass the real and imaginary parts as "
            f"separate real tensors (t.real, t.imag)"
        )
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}; cast with .float()")
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------
# scale groups


def row_sums(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Sum of each row of ``x`` [r, m] -> [r] (in ``dtype``, default x's dtype).

    The order a row is summed in depends only on the row, never on how many rows
    ``x`` has: that is what lets a matrix be quantized in row chunks bit for bit
    (``chunked.py``). torch reduces a single row of 32768+ entries as a full
    reduction split across threads (another order than the same row inside a
    taller matrix), so a 1-row input is reduced as 2 rows (a zero row added).
    """
    r = x.shape[0]
    if r == 1:
        x = F.pad(x, (0, 0, 0, 1))
    return x.sum(dim=1, dtype=dtype)[:r]


def _group_sum(x: Tensor, granularity: Granularity) -> Tensor:
    """Sum ``x`` [n, m] over each scale group -> [1, 1] | [n, 1] | [n, ceil(m/g)].

    "tensor": the float64 sum of the row sums (:func:`row_sums`, :func:`tensor_sum`),
    so a matrix streamed in row chunks (``chunked.py``) reduces in exactly this order.
    Ragged last group: zero-padding adds exact zeros to the sum; callers pass
    values already multiplied by a 0/1 membership mask and sum the mask itself
    for the counts, so padding never enters a mean.
    """
    n, m = x.shape
    if granularity == "tensor":
        return tensor_sum(row_sums(x))
    if granularity == "row":
        return row_sums(x).unsqueeze(1)
    g = int(granularity)
    if g >= m:
        return row_sums(x).unsqueeze(1)
    groups = -(-m // g)
    if groups * g != m:
        x = F.pad(x, (0, groups * g - m))
    return x.reshape(n, groups, g).sum(dim=2)


def tensor_sum(rows: Tensor) -> Tensor:
    """Row sums [n] (all rows of the matrix, in order) -> the tensor's sum [1, 1], summed in float64."""
    return rows.to(torch.float64).sum().reshape(1, 1)


def expand_scales(s: Tensor, m: int, group_size: Optional[int]) -> Tensor:
    """Scales [n_s, g_s] -> broadcastable against [n, m] (no arithmetic).

    Column c takes its group's scale, ``s[..., c // group_size]``, by an index gather. Not
    ``repeat_interleave(...)[..., :m]`` (nor expand + reshape + slice), which are the same values
    eagerly, but which Inductor on CPU (torch 2.13) compiled wrongly when the last group is ragged
    and a pointwise op follows: the ragged group's columns came out as garbage (m = 70, g = 16;
    tests/test_quant.py keeps the case).
    """
    if s.shape[-1] == 1:
        return s
    assert group_size is not None
    return s.index_select(-1, torch.arange(m, device=s.device) // group_size)


def _group_mean(values: Tensor, mask: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over masked entries per group, and the member count."""
    total = _group_sum(values * mask, granularity)
    count = _group_sum(mask, granularity)
    return _mean_of(total, count, values.dtype), count


def _mean_of(total: Tensor, count: Tensor, dtype: torch.dtype) -> Tensor:
    """total / count where count > 0, else 0, in ``dtype`` (per-tensor sums arrive in float64)."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).to(dtype)


# ----------------------------------------------------------------------------
# PhaseQuant


@dataclass(frozen=True)
class PhaseQuantized:
    """PhaseQuant of ONE complex matrix [n, m] with T stages.

    codes: uint8 [T, n, m], k in 0..3 meaning i**k (0:+1, 1:+i, 2:-1, 3:-i)
    s_re:  [T, 1, 1] (tensor) | [T, n, 1] (row) | [T, n, ceil(m/g)] (group g),
           scale of the +-1-coded entries, compute dtype (float32 or float64)
    s_im:  same shape, scale of the +-i-coded entries
    re, im: [n, m] dequantized sum over stages (compute dtype);
           == dequant_phase(codes, s_re, s_im, m, group_size) bit for bit
    group_size: g for int granularity, None for "tensor" / "row"
    """

    codes: Tensor
    s_re: Tensor
    s_im: Tensor
    re: Tensor
    im: Tensor
    group_size: Optional[int]

    @property
    def stages(self) -> int:
        return int(self.codes.shape[0])


def phase_masks(re: Tensor, im: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The phase rule's decisions for w = re + i*im as bool masks (c1, c2, c3): w is coded
    +i, -1, -i respectively; where none holds, +1. Comparisons only (module docstring: ties, zero)."""
    c1 = (im > 0) & (-im < re) & (re <= im)
    c2 = (re < 0) & (re < im) & (im <= -re)
    c3 = (im < 0) & (im <= re) & (re < -im)
    return c1, c2, c3


def phase_codes(re: Tensor, im: Tensor) -> Tensor:
    """PhaseQuant codes of w = re + i*im, both [...]; returns uint8 [...] in 0..3.

    Comparisons only; see the module docstring for the tie and zero rules.
    """
    return mask_codes(*phase_masks(re, im))


def mask_codes(c1: Tensor, c2: Tensor, c3: Tensor) -> Tensor:
    """The uint8 codes of :func:`phase_masks`' decisions."""
    # code 0 (re > 0 and -re <= im < re, or w == 0) is what remains
    return c1.to(torch.uint8) + 2 * c2.to(torch.uint8) + 3 * c3.to(torch.uint8)


def stage_values(codes: Tensor, s_re: Tensor, s_im: Tensor) -> tuple[Tensor, Tensor]:
    """One stage: codes [n, m] uint8, scales broadcastable -> (re, im) [n, m].

    Selects only (no multiply), so every entry is exactly 0, +-s_re or +-s_im.
    """
    zero = torch.zeros((), dtype=s_re.dtype, device=s_re.device)
    re = torch.where(codes == 0, s_re, torch.where(codes == 2, -s_re, zero))
    im = torch.where(codes == 1, s_im, torch.where(codes == 3, -s_im, zero))
    return re, im


def phase_step(e_re: Tensor, e_im: Tensor, s_re: Tensor, s_im: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stage of the phase rule at given scales on a residual [n, m]: (c1, c2, c3, q) where
    (c1, c2, c3) are :func:`phase_masks` and q = (q_re, q_im) the stage's values.

    ``phase_codes`` of the masks and ``stage_values(codes, s_re, s_im)`` give the same codes and the
    same values bit for bit (selects only); selecting straight from the masks is what a compiler
    fuses well (Inductor's CPU loops: 1 ms for a 1536 x 576 weight at T = 2, against 10 ms through
    uint8 code comparisons, measured).
    """
    c1, c2, c3 = phase_masks(e_re, e_im)
    return c1, c2, c3, mask_values(c1, c2, c3, s_re, s_im)


def mask_values(c1: Tensor, c2: Tensor, c3: Tensor, s_re: Tensor, s_im: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`stage_values` of the codes ``mask_codes(c1, c2, c3)``, selected from the masks."""
    zero = torch.zeros((), dtype=s_re.dtype, device=s_re.device)
    q_re = torch.where(c1 | c2 | c3, torch.where(c2, -s_re, zero), s_re)
    q_im = torch.where(c1, s_im, torch.where(c3, -s_im, zero))
    return q_re, q_im


def _phase_stage(
    e_re: Tensor, e_im: Tensor, granularity: Granularity
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """One PhaseQuant stage on residual [n, m] -> (phase masks), s_re, s_im [n_s, g_s]."""
    c1, c2, c3 = phase_masks(e_re, e_im)
    on_im_mask = c1 | c3  # coded +-i; the rest (+-1) lies on the real axis
    on_re, on_im = (~on_im_mask).to(e_re.dtype), on_im_mask.to(e_re.dtype)
    return (c1, c2, c3), _phase_scale(e_re.abs(), on_re, granularity), _phase_scale(e_im.abs(), on_im, granularity)


def _phase_scale(mag: Tensor, on_axis: Tensor, granularity: Granularity) -> Tensor:
    """max(mean, 1e-6) per group; exactly 0 if every member is 0; 1e-6 if no members."""
    mean, count = _group_mean(mag, on_axis, granularity)
    return _scale_of(mean, count)


def _scale_of(mean: Tensor, count: Tensor) -> Tensor:
    """The clamp rule of :func:`_phase_scale` on a group mean and its member count."""
    floor = torch.where(count > 0, torch.zeros_like(mean), torch.full_like(mean, SCALE_EPS))
    return torch.where(mean > 0, mean.clamp_min(SCALE_EPS), floor)


def phase_quant(
    re: Tensor,
    im: Tensor,
    stages: int,
    granularity: Granularity = "tensor",
    *,
    name: str = "weight",
    first_scale: float = 1.0,
) -> PhaseQuantized:
    """T-stage recursive PhaseQuant of w = re + i*im, both [n, m].

    Returns codes uint8 [T, n, m], scales [T, n_s, g_s] and the dequantized
    sum (re, im) [n, m], in float32 (float64 if the input is float64).
    ``name`` labels the weight in error messages. Gradients are not tracked
    (the QAT ops in ``compiler/ops/quantize.py`` add the straight-through backward).

    ``first_scale`` multiplies stage 1's scales (the later stages follow the rule
    on the residual that leaves). 1.0 is the paper's rule, which every mode uses;
    calibration searches it per layer: with the mean as stage 1's scale the T
    stages reach at most about 2-2.5 times the mean magnitude, which clips the
    large weights of heavy-tailed layers.
    """
    _check_matrix(re, "re")
    _check_matrix(im, "im")
    if re.shape != im.shape:
        raise ValueError(f"re and im must have the same shape, got {tuple(re.shape)} and {tuple(im.shape)}")
    T = _validate_stages(stages)
    n, m = re.shape
    typed = validate_granularity(granularity, m)
    granularity, group_size = typed.option, typed.group_size
    check_finite(re, f"{name} (real part)")
    check_finite(im, f"{name} (imaginary part)")

    dtype = compute_dtype(torch.promote_types(re.dtype, im.dtype))
    # contiguous: reductions (scale means) then run in one order whatever the input layout
    e_re = re.detach().to(dtype).contiguous()
    e_im = im.detach().to(dtype).contiguous()
    codes, s_re, s_im = [], [], []
    if not (isinstance(first_scale, (int, float)) and math.isfinite(first_scale) and first_scale > 0):
        raise ValueError(f"first_scale must be a positive finite float (1.0 = the paper's rule), got {first_scale!r}")
    for masks, sr, si, _ in phase_stages(e_re, e_im, T, granularity, group_size, first_scale):
        codes.append(mask_codes(*masks))
        s_re.append(sr)
        s_im.append(si)
    codes_t = torch.stack(codes)
    s_re_t = torch.stack(s_re)
    s_im_t = torch.stack(s_im)
    w_re, w_im = dequant_phase(codes_t, s_re_t, s_im_t, m, group_size)
    return PhaseQuantized(codes_t, s_re_t, s_im_t, w_re, w_im, group_size)


def phase_stages(e_re: Tensor, e_im: Tensor, stages: int, granularity: Granularity, group_size: Optional[int],
                 first_scale: float = 1.0):
    """PhaseQuant's recursion, unchecked, one stage at a time on the residual [n, m] (compute dtype):
    yields ((c1, c2, c3) phase masks, s_re, s_im [n_s, g_s], (q_re, q_im) the stage's values)."""
    m = e_re.shape[1]
    for t in range(stages):
        masks, sr, si = _phase_stage(e_re, e_im, granularity)
        if t == 0 and first_scale != 1.0:
            sr, si = sr * first_scale, si * first_scale
        q_re, q_im = mask_values(*masks, expand_scales(sr, m, group_size), expand_scales(si, m, group_size))
        yield masks, sr, si, (q_re, q_im)
        e_re = e_re - q_re
        e_im = e_im - q_im


def phase_quant_values(re: Tensor, im: Tensor, stages: int, granularity: Granularity,
                       group_size: Optional[int]) -> tuple[Tensor, Tensor]:
    """``phase_quant(re, im, stages, granularity)``'s dequantized (re, im) [n, m] without its codes,
    checks or copies: the body a compiler fuses for QAT (``fused.run_fused``). ``re``/``im`` in the
    compute dtype, contiguous; ``granularity`` the option value ("tensor" | "row" | g), ``group_size``
    its group size (None for "tensor" / "row"). The stages are summed in ``dequant_phase``'s order,
    so eagerly this equals ``phase_quant``'s (re, im) bit for bit."""
    acc_re = acc_im = None
    for _, _, _, (q_re, q_im) in phase_stages(re, im, stages, granularity, group_size):
        acc_re = q_re if acc_re is None else acc_re + q_re
        acc_im = q_im if acc_im is None else acc_im + q_im
    return acc_re, acc_im


def dequant_phase(
    codes: Tensor,
    s_re: Tensor,
    s_im: Tensor,
    m: Optional[int] = None,
    group_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Rebuild (re, im) [n, m] = sum over stages from codes and scales.

    codes: uint8 [T, n, m_c] with m_c >= m (columns past ``m`` are ignored,
    so padded code storage works); s_re, s_im: [T, 1 | n, 1 | ceil(m/g)].
    ``group_size`` is required when the scales have more than one column.
    Output dtype = scale dtype. Bit-identical to ``phase_quant(...).re/.im``.
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 3:
        raise ValueError(
            f"codes must be a uint8 tensor [T, n, m], got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}"
        )
    T, n, m_c = codes.shape
    if m is None:
        m = m_c
    if not isinstance(m, numbers.Integral) or not 1 <= m <= m_c:
        raise ValueError(f"m must be an int in 1..{m_c} (codes have {m_c} columns), got m={m!r}")
    m = int(m)
    for s, nm in ((s_re, "s_re"), (s_im, "s_im")):
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() != 3:
            raise ValueError(f"{nm} must be a floating tensor [T, n_s, g_s], got {getattr(s, 'shape', s)!r}")
        if s.shape[0] != T or s.shape[1] not in (1, n):
            raise ValueError(f"{nm} has shape {tuple(s.shape)}, expected [{T}, 1 or {n}, groups] for codes {tuple(codes.shape)}")
    if s_re.shape != s_im.shape or s_re.dtype != s_im.dtype:
        raise ValueError(f"s_re and s_im must match, got {tuple(s_re.shape)} {s_re.dtype} and {tuple(s_im.shape)} {s_im.dtype}")
    groups = s_re.shape[2]
    if group_size is not None:
        validate_granularity(group_size, m)
        group_size = int(group_size)
        if groups != -(-m // group_size):
            raise ValueError(
                f"scales have {groups} groups but group_size={group_size} over m={m} "
                f"columns gives {-(-m // group_size)}; pass the group_size used to quantize"
            )
    elif groups != 1:
        raise ValueError(f"scales have {groups} groups per row; pass group_size= (the one used to quantize)")
    if not _is_tracing(codes) and codes.numel() and int(codes.max()) > 3:
        raise ValueError(f"codes must be in 0..3, got max {int(codes.max())}")

    codes = codes[:, :, :m]
    acc_re: Optional[Tensor] = None
    acc_im: Optional[Tensor] = None
    for t in range(T):
        q_re, q_im = stage_values(codes[t], expand_scales(s_re[t], m, group_size), expand_scales(s_im[t], m, group_size))
        # q_re is already [n, m] (torch.where broadcasts against codes)
        acc_re = q_re if acc_re is None else acc_re + q_re
        acc_im = q_im if acc_im is None else acc_im + q_im
    assert acc_re is not None and acc_im is not None
    return acc_re, acc_im


# ----------------------------------------------------------------------------
# real baselines


def real_stage_params(e: Tensor, method: str, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """One binary / ternary stage's parameters on a real residual e [n, m], per scale group.

    Returns (center, scale), each [1, 1] | [n, 1] | [n, ceil(m/g)]:
    binary: (mean e, mean |e|); ternary: (0, max(mean |e|, 1e-6)).
    :func:`real_stage_apply` with these reproduces the stage; calibration
    (``calibration/rounding.py``) fixes them from the float weights and rounds
    column by column with the same function.
    """
    ones = torch.ones_like(e)
    mean_abs, _ = _group_mean(e.abs(), ones, granularity)
    if method == "binary":
        mean, _ = _group_mean(e, ones, granularity)
        return mean, mean_abs
    return torch.zeros_like(mean_abs), mean_abs.clamp_min(SCALE_EPS)


def real_stage_apply(e: Tensor, method: str, center: Tensor, scale: Tensor) -> Tensor:
    """Quantize e [...] with per-entry (broadcast) center and scale -> dequantized [...].

    binary: ``where(e - center >= 0, scale, -scale)``;
    ternary: ``clamp(round(e / scale), -1, 1) * scale`` (center unused).
    """
    if method == "binary":
        return torch.where(e - center >= 0, scale, -scale)
    return torch.clamp(torch.round(e / scale), -1, 1) * scale


def _real_stage(e: Tensor, method: str, granularity: Granularity) -> Tensor:
    """One binary / ternary stage on a real residual [n, m] -> dequantized [n, m]."""
    m = e.shape[1]
    group_size = ScaleGranularity.of(granularity).group_size
    center, scale = real_stage_params(e, method, granularity)
    return real_stage_apply(e, method, expand_scales(center, m, group_size), expand_scales(scale, m, group_size))


def real_quant(
    a: Tensor,
    method: str,
    stages: int,
    granularity: Granularity = "tensor",
    *,
    name: str = "weight",
) -> Tensor:
    """Real baseline quantization of A [out, in] -> dequantized A_hat [out, in].

    method: "binary" or "ternary" ("phase" is complex; use phase_quant).
    Residual stages: A_hat = sum_t q_t with q_t = Q(A - sum_{s<t} q_s).
    Result in float32 (float64 if ``a`` is float64); no gradient tracked.
    """
    _validate_method(method)
    if method == "phase":
        raise ValueError(
            "real_quant does not do 'phase': convert A to (U, W) and use "
            "phase_quant / quantize_widely, or pick 'binary' or 'ternary'"
        )
    _check_matrix(a, "a")
    T = _validate_stages(stages)
    granularity = validate_granularity(granularity, a.shape[1]).option
    check_finite(a, name)

    e = a.detach().to(compute_dtype(a.dtype)).contiguous()
    acc: Optional[Tensor] = None
    for _ in range(T):
        q = _real_stage(e, method, granularity)
        e = e - q
        acc = q if acc is None else acc + q
    assert acc is not None
    return acc


# ----------------------------------------------------------------------------
# widely-linear pair and STEs


def quantize_widely(
    u_re: Tensor,
    u_im: Tensor,
    w_re: Tensor,
    w_im: Tensor,
    stages: int,
    granularity: Granularity = "tensor",
    *,
    name: str = "weight",
    fused: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize U and W (each [n, m], independently) -> (uq_re, uq_im, wq_re, wq_im).

    Each output has its input's dtype. ``fused=True`` (QAT's op) runs :func:`phase_quant_values`
    through ``fused.run_fused``: the
    same stages and sums, compiled into fused loops for large weights, equal to this function's own
    result up to the order its scale sums are reduced in (``fused`` module docstring); a weight that
    is not finite falls back here and gets the reference's error naming it.
    """
    if fused and isinstance(u_re, Tensor) and u_re.dim() == 2 and not _is_tracing(u_re):
        if all(isinstance(t, Tensor) and t.shape == u_re.shape for t in (u_im, w_re, w_im)) and u_re.numel():
            from .fused import run_fused

            T = _validate_stages(stages)
            typed = validate_granularity(granularity, u_re.shape[1])
            *out, finite = run_fused(_widely_values, u_re.numel(), u_re, u_im, w_re, w_im, T, typed.option,
                                     typed.group_size)
            if bool(finite):
                return tuple(out)
    uq = phase_quant(u_re, u_im, stages, granularity, name=f"{name} (U)")
    wq = phase_quant(w_re, w_im, stages, granularity, name=f"{name} (W)")
    return (
        uq.re.to(u_re.dtype),
        uq.im.to(u_im.dtype),
        wq.re.to(w_re.dtype),
        wq.im.to(w_im.dtype),
    )


def _widely_values(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, stages: int, granularity: Granularity,
                   group_size: Optional[int]):
    """The body ``quantize_widely(fused=True)`` compiles: the four dequantized [n, m] in the input
    dtypes, and whether every input entry is finite."""
    out = []
    for re, im in ((u_re, u_im), (w_re, w_im)):
        dtype = compute_dtype(torch.promote_types(re.dtype, im.dtype))
        q_re, q_im = phase_quant_values(re.to(dtype).contiguous(), im.to(dtype).contiguous(), stages, granularity,
                                        group_size)
        out += [q_re.to(re.dtype), q_im.to(im.dtype)]
    finite = torch.isfinite(u_re).all() & torch.isfinite(u_im).all() & torch.isfinite(w_re).all() & \
        torch.isfinite(w_im).all()
    return (*out, finite)


# ----------------------------------------------------------------------------
# accounting


def bits_per_real_weight(method: str, stages: int) -> float:
    """Storage bits per real weight (scales not counted).

    phase: 1.0 * T (2 bits per complex weight of U and of W = 1 bit per real
    weight); binary: 1.0 * T; ternary: log2(3) * T.
    """
    _validate_method(method)
    T = _validate_stages(stages)
    return (math.log2(3.0) if method == "ternary" else 1.0) * T


def scale_groups(rows: int, cols: int, granularity: Granularity) -> int:
    """Number of scale groups of a [rows, cols] matrix (per axis, per stage)."""
    typed = ScaleGranularity.of(granularity)
    if typed.group_size is None:
        return 1 if typed.kind == "tensor" else rows
    return rows * -(-cols // typed.group_size)


def storage_bytes(method: str, stages: int, out_features: int, in_features: int,
                  granularity: Granularity = "tensor") -> int:
    """Bytes a quantized layer needs packed: codes at their bit width + float32 scales.

    phase: 2 bits per complex weight of U and W ([out/2, in/2] each) per stage,
    plus s_re and s_im per scale group of U and of W per stage.
    binary / ternary: bits_per_real_weight per weight of A (ternary counted at
    log2(3) bits), plus one scale per group of A per stage.
    """
    bits = bits_per_real_weight(method, stages) * out_features * in_features
    if method == "phase":
        scales = stages * 2 * 2 * scale_groups(out_features // 2, in_features // 2, granularity)
    else:
        scales = stages * scale_groups(out_features, in_features, granularity)
    return int(math.ceil(bits / 8)) + 4 * scales


def quant_error(ref: Tensor, q: Tensor) -> dict:
    """Error of ``q`` against ``ref`` (same shape, any real dtype), in float64.

    Returns {"rel_fro": ||ref - q||_F / ||ref||_F,
             "sqnr_db": 10 log10(||ref||^2 / ||ref - q||^2)}.
    Zero error -> rel_fro 0.0, sqnr_db inf; zero ref with nonzero q ->
    rel_fro inf, sqnr_db -inf. For a complex matrix, stack (re, im) first.
    """
    if not isinstance(ref, Tensor) or not isinstance(q, Tensor):
        raise TypeError("quant_error expects two tensors")
    if ref.shape != q.shape:
        raise ValueError(f"ref and q must have the same shape, got {tuple(ref.shape)} and {tuple(q.shape)}")
    if ref.is_complex() or q.is_complex():
        raise TypeError("quant_error takes real tensors; stack (re, im) for complex weights")
    r = ref.detach().to(torch.float64)
    d = r - q.detach().to(torch.float64)
    ref_sq = float((r * r).sum())
    err_sq = float((d * d).sum())
    if err_sq == 0.0:
        return {"rel_fro": 0.0, "sqnr_db": float("inf")}
    if ref_sq == 0.0:
        return {"rel_fro": float("inf"), "sqnr_db": float("-inf")}
    return {
        "rel_fro": math.sqrt(err_sq / ref_sq),
        "sqnr_db": 10.0 * math.log10(ref_sq / err_sq),
    }
