"""Hessian-aware (GPTQ / OBS-style) rounding onto the Fairy2i codebook.

Round-to-nearest minimises ||A - Â||_F, but what a layer's output feels is

    E ||(A - Â) x̃||² = tr(E H Eᵀ),   E = A - Â,   H = E[x̃ x̃ᵀ]  (2m × 2m, real input)

Rows of A are independent in it, columns are not. GPTQ (Frantar et al., 2022)
rounds one column at a time and pushes each column's error onto the columns
not yet rounded, weighted by the inverse Hessian, which is exact Optimal Brain
Surgeon for the column just fixed.

The unit of decision for Fairy2i
--------------------------------
A real weight A [2n, 2m] is the widely-linear pair (U, W) [n, m] complex
(pairing by halves):

    U = ((A11 + A22) + i (A21 - A12)) / 2      W = ((A11 - A22) + i (A12 + A21)) / 2
    A11 = Re U + Re W,  A12 = Im W - Im U,  A21 = Im W + Im U,  A22 = Re U - Re W

with A11 = A[:n, :m], A12 = A[:n, m:], A21 = A[n:, :m], A22 = A[n:, m:]. The
codes of column j of U and of W fix exactly the real column pair (j, j + m) of
A, in all 2n rows: that pair is one decision. So:

1. Permute A's columns (and H's rows and columns) to ``[0, m, 1, m+1, ...]``
   (pair j -> adjacent columns a = 2j, b = 2j + 1), damp
   ``H += damp * mean(diag H) * I``, and take the upper Cholesky factor L of
   H⁻¹ (``cholesky -> cholesky_inverse -> cholesky(upper=True)``).
2. For pair j, from the current (error-updated) block B = A[:, (a, b)] form
   U[:, j], W[:, j] with the formulas above, quantize each with the T-stage
   residual PhaseQuant **at scales fixed beforehand**, rebuild the real block Q,
   and with e = B - Q (per row)::

       err_a = e_a / L[a,a]
       err_b = (e_b - err_a * L[a,b]) / L[b,b]
       A[:, c] -= err_a * L[a,c] + err_b * L[b,c]      for every column c > b

   which is exact OBS for a 2-column group (= E · L_BB⁻¹ · L_{B,rest}).
   The pair's loss is ``sum over rows of err_a² + err_b²``.
3. Updates to the columns after the current block of ``block_size`` columns
   are applied lazily, once per block, as one matrix product (GPTQ's trick).

Scales are fixed before rounding, by the ordinary quantizer on the float
weights: stage t's (s_re, s_im) per tensor / row / group are what PhaseQuant
computes on the float U (or W) at stage t. Stage rounding of a column then is
the phase rule of ``quant.phase_codes`` on the running residual with those
scales. Hence the law the tests check: with H = I (no cross-column terms, L
diagonal) no error is ever propagated and the codes are PhaseQuant's, bit for
bit.

``refit_scales=True`` (tensor and row scales) then solves for the scales the
chosen codes should have: with the codes fixed, Â is linear in the 4T scales of
a scale group (stage t, U or W, re or im axis), Â = Σ_k s_k B_k with B_k the
real form of that group's ±1 code mask, so the H-weighted error is a least
squares problem with normal equations ``G s = c``, ``G_kl = tr(B_k H B_lᵀ)``,
``c_k = tr(A H B_kᵀ)`` (summed over the real rows i and i + n of complex row i
for row scales, over all rows for tensor scales). The old scales are a feasible
point, so the refit never increases the error (it is kept only if it lowers it).

``scale_search=True`` first picks, per layer, the multiplier of stage 1's
scales (``quant.phase_quant(first_scale=)``, grid ``SCALE_GRID``) whose
round-to-nearest has the lowest H-weighted output error, and fixes the scales
from that. Why: with the paper's rule (stage scale = mean magnitude of the
residual) T stages reach at most about 2-2.5 times the mean weight, so the
large weights of heavy-tailed layers are clipped; on SmolLM2 layers a
multiplier of 1.5-2 cuts the round-to-nearest output error 2-4 times at T = 4.

Outlier input columns (``outliers=``)
--------------------------------------
A few input channels of some layers carry "massive activations": in SmolLM2's
``layers.11.mlp.down_proj`` channel 1229 reaches 2.7e3 on the first token of a
window while the median channel's RMS is 0.14, so that one real column of A
holds 99% of tr(A H Aᵀ), and its weights are small (mean |w| 0.03 against 0.15
for the layer): any shared-scale codebook rounds them with an error that the
huge activation multiplies, and no other column can absorb it (the channel is
nearly uncorrelated with the rest). Those columns are rounded like all others
and then their residual e_c = A[:, c] - Â[:, c] is stored exactly, in float16,
as a sparse correction the layer adds: ``y += E_out · x[idx]`` with
``E_out [2n, k]`` (``PackedLinear`` does this next to the packed op). The codes
and the packed format are untouched; the correction costs ``16·2n`` bits per
column (0.01 bit per weight per column on a 576 × 1536 layer). In the OBS loop
a corrected column leaves only its float16 rounding error to propagate.
:func:`select_outliers` picks the columns: H[c, c] at least ``ratio`` times
the median of diag H, at most ``max_count`` of them, largest first.

``act_order=True`` visits the pairs by descending ``H[a,a] + H[b,b]``
(GPTQ's activation order); it changes only the order of decisions, never the
stored layout or the scales.

The real baselines (BitNet binary, absmean ternary) go through the same loop
with their own per-entry rule (``quant.real_stage_apply``) and scales fixed
from the float A by ``quant.real_stage_params``: the comparison stays fair.

Everything here works on one layer. ``driver.py`` gathers H and walks a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import quant
from ...compiler.ops.widely import real_to_widely_reference as _real_to_widely, widely_to_real_reference as _widely_to_real
from ...compiler.options import ScaleGranularity
from ..quant import Granularity, PhaseQuantized

__all__ = ["RoundedLayer", "gptq_round", "output_error", "rtn_round", "inverse_hessian_factor", "round_at_scales",
           "select_outliers", "check_outlier_options", "OUTLIER_RATIO", "MAX_OUTLIERS"]

OUTLIER_RATIO = 100.0  # H[c, c] / median(diag H) from which an input column is an outlier
MAX_OUTLIERS = 8       # at most this many corrected columns per layer


@dataclass
class RoundedLayer:
    """One layer rounded onto the codebook.

    a_hat:  [2n, 2m] float32 dequantized real weight (what the packed kernels compute with)
    qu, qw: PhaseQuantized of U and W (method "phase"; None for the real baselines);
            ``packing.pack_phase(qu, qw)`` stores them
    loss:   sum of the per-pair OBS losses (err_a² + err_b²), float
    outlier_index:  int64 [k] real input columns with an exact correction (module docstring)
    outlier_weight: float16 [2n, k] their residual A[:, c] - (codes' Â)[:, c]; ``a_hat``
            includes it
    """

    a_hat: Tensor
    qu: Optional[PhaseQuantized] = None
    qw: Optional[PhaseQuantized] = None
    loss: float = 0.0
    info: dict = field(default_factory=dict)
    outlier_index: Optional[Tensor] = None
    outlier_weight: Optional[Tensor] = None


def _check_inputs(a: Tensor, h: Tensor, method: str, stages: int, granularity: Granularity,
                  damp: float, block_size: int) -> None:
    if not isinstance(a, Tensor) or a.dim() != 2 or not a.is_floating_point():
        raise ValueError(f"weight must be a real floating 2-D tensor [out, in], got {getattr(a, 'shape', a)!r}")
    rows, cols = a.shape
    if method == "phase" and (rows % 2 or cols % 2):
        raise ValueError(f"phase rounding needs even out/in features (pairing by halves), got {tuple(a.shape)}")
    if not isinstance(h, Tensor) or tuple(h.shape) != (cols, cols):
        raise ValueError(f"H must be [{cols}, {cols}] for a weight with {cols} input features, "
                         f"got {tuple(getattr(h, 'shape', ()))}")
    if not torch.isfinite(h).all():
        raise ValueError("H holds NaN/Inf: the calibration activations were not finite")
    if method not in quant.METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {quant.METHODS}")
    quant.validate_granularity(granularity, cols // 2 if method == "phase" else cols)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= quant.MAX_STAGES:
        raise ValueError(f"stages must be an int in 1..{quant.MAX_STAGES}, got {stages!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a positive float (e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even int >= 2 (e.g. 128), got {block_size!r}")


def inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor L of (H + damp·mean(diag H)·I)⁻¹, [d, d] float64.

    Inputs that never fire (H[i, i] == 0) get H[i, i] = 1 first, as GPTQ does,
    so the factorisation exists; their columns then carry no output error.
    """
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    if bool(dead.all()):
        raise ValueError("H is all zero on its diagonal: the calibration activations were all zero")
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * mean_diag
    for _ in range(8):
        try:
            reg = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
            chol = torch.linalg.cholesky(reg)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
        except RuntimeError:  # not positive definite in float64: damp harder
            lam *= 10.0
    raise ValueError(f"H is not positive definite even with damping {lam:g}; use more calibration tokens")


def check_outlier_options(ratio: Any, max_count: Any) -> None:
    """Raise a ValueError naming the value unless ratio is a finite float > 1 and max_count an int >= 0."""
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"outlier ratio must be a finite float > 1 (e.g. {OUTLIER_RATIO}), got {ratio!r}")
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0:
        raise ValueError(f"max outliers must be an int >= 0 (0 = none, e.g. {MAX_OUTLIERS}), got {max_count!r}")


def select_outliers(h: Tensor, ratio: float = OUTLIER_RATIO, max_count: int = MAX_OUTLIERS) -> Tensor:
    """Real input columns c with H[c, c] >= ratio · median(diag H), largest first, at most
    ``max_count``; returned sorted ascending, int64 [k] (k may be 0). When more than half
    the inputs never fire (median 0), every input that fires counts."""
    check_outlier_options(ratio, max_count)
    if max_count == 0:
        return torch.zeros(0, dtype=torch.int64)
    d = torch.diagonal(h.to(torch.float64))
    med = float(d.median())
    cand = torch.nonzero(d >= ratio * med if med > 0 else d > 0).flatten()
    top = cand[torch.argsort(d[cand], descending=True, stable=True)[:max_count]]
    return torch.sort(top).values


def _check_outliers(outliers: Any, cols: int) -> Tensor:
    idx = torch.as_tensor(outliers if outliers is not None else [], dtype=torch.int64).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cols or idx.unique().numel() != idx.numel()):
        raise ValueError(f"outliers must be distinct input columns in 0..{cols - 1}, got {idx.tolist()}")
    return torch.sort(idx).values


def _pair_order(h: Tensor, m: int, act_order: bool) -> Tensor:
    """Order of the complex columns j (pairs (j, j+m)) to round in."""
    if not act_order:
        return torch.arange(m)
    d = torch.diagonal(h)
    return torch.argsort(d[:m] + d[m:], descending=True, stable=True)


def _phase_scales(a: Tensor, stages: int, granularity: Granularity, first_scale: float = 1.0
                  ) -> Tuple[PhaseQuantized, PhaseQuantized]:
    """Round-to-nearest PhaseQuant of the float U and W: fixes every stage's scales."""
    u_re, u_im, w_re, w_im = _real_to_widely(a.detach())
    return (quant.phase_quant(u_re, u_im, stages, granularity, name="U", first_scale=first_scale),
            quant.phase_quant(w_re, w_im, stages, granularity, name="W", first_scale=first_scale))


SCALE_GRID = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def search_first_scale(a: Tensor, h: Tensor, stages: int, granularity: Granularity,
                       grid: Sequence[float] = SCALE_GRID, max_rows: int = 2048,
                       outliers: Optional[Tensor] = None) -> Tuple[float, dict]:
    """The stage-1 scale multiplier (``quant.phase_quant(first_scale=)``) whose round-to-nearest
    minimises the H-weighted output error; the error is measured on at most ``max_rows``
    complex rows (rows i and i + n of A), the scales on the whole matrix. Columns in
    ``outliers`` are corrected exactly later, so their error does not count here.
    Returns (best, {mult: error}).
    """
    n = a.shape[0] // 2
    if n > max_rows:
        idx = torch.linspace(0, n - 1, max_rows).round().long()
        rows = torch.cat([idx, idx + n])
    else:
        rows = torch.arange(2 * n)
    hf = h.to(torch.float32)
    sub = a.detach().float()[rows]
    ref = float(((sub @ hf) * sub).sum())
    errors = {}
    for mult in grid:
        qu, qw = _phase_scales(a, stages, granularity, mult)
        e = sub - _widely_to_real(qu.re, qu.im, qw.re, qw.im)[rows]
        if outliers is not None and outliers.numel():
            e[:, outliers] = 0.0
        errors[float(mult)] = float(((e @ hf) * e).sum()) / ref if ref > 0 else float("inf")
    best = min(errors, key=errors.get)
    return best, errors


def _column_scales(s: Tensor, j: int, group_size: Optional[int]) -> Tensor:
    """Stage scales [T, n_s, G] -> the ones column j uses, [T, n_s]."""
    return s[:, :, 0] if group_size is None else s[:, :, j // group_size]


def stages_at_scales(re: Tensor, im: Tensor, s_re: Tensor, s_im: Tensor, m: int, group_size: Optional[int]):
    """The T-stage residual phase rule on w = re + i·im [n, m] at fixed scales [T, n_s, G], one stage
    at a time: yields ``quant.phase_step``'s (c1, c2, c3, (q_re, q_im)) for stage 1, 2, ..., each
    stage on the residual the earlier ones leave."""
    e_re, e_im = re, im
    for t in range(s_re.shape[0]):
        c1, c2, c3, (q_re, q_im) = quant.phase_step(e_re, e_im, quant.expand_scales(s_re[t], m, group_size),
                                                    quant.expand_scales(s_im[t], m, group_size))
        yield c1, c2, c3, (q_re, q_im)
        e_re, e_im = e_re - q_re, e_im - q_im


def round_at_scales(re: Tensor, im: Tensor, s_re: Tensor, s_im: Tensor, m: int,
                    group_size: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """T-stage residual phase rule on w = re + i·im [n, m] at fixed scales [T, n_s, G].

    Returns codes uint8 [T, n, m] and the dequantized (re, im) [n, m]; differentiable
    with respect to the scales (the codes are decisions). With the scales PhaseQuant
    chose for this same w, the codes are PhaseQuant's. The stages are summed in
    ``quant.dequant_phase``'s order, so (re, im) equal the dequantized codes bit for bit.
    """
    codes, acc_re, acc_im = [], None, None
    for c1, c2, c3, (q_re, q_im) in stages_at_scales(re, im, s_re, s_im, m, group_size):
        codes.append(quant.mask_codes(c1, c2, c3))
        acc_re = q_re if acc_re is None else acc_re + q_re
        acc_im = q_im if acc_im is None else acc_im + q_im
    return torch.stack(codes), acc_re, acc_im


def _round_phase_column(re: Tensor, im: Tensor, s_re: Tensor, s_im: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`round_at_scales` on one complex column [n] at fixed scales [T, n_s].

    Returns codes uint8 [T, n] and the dequantized column (re, im) [n].
    """
    codes, q_re, q_im = round_at_scales(re[:, None], im[:, None], s_re[..., None], s_im[..., None], 1, None)
    return codes[..., 0], q_re[:, 0], q_im[:, 0]


_OPT_RE = torch.tensor([1.0, 0.0, -1.0, 0.0])  # code k -> Re(i^k), Im(i^k)
_OPT_IM = torch.tensor([0.0, 1.0, 0.0, -1.0])


def _round_pair_hessian(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, scales, l_aa: float,
                        l_ab: float, l_bb: float):
    """T stages of greedy (U, W) code-pair choice by the pair's OBS loss, one column [n].

    Per stage and complex row, the 4 x 4 code pairs are scored by the loss of the real
    residual they leave in rows (i, i+n) of columns (a, b): with e = residual,
    ``(e_a / L_aa)² + ((e_b - e_a L_ab / L_aa) / L_bb)²``. With H = I this is the
    Euclidean-nearest point of the stage's codebook (greedy over stages).
    """
    su_re, su_im, sw_re, sw_im = scales  # [T, n_s] each
    dt = u_re.dtype
    ore, oim = _OPT_RE.to(dt), _OPT_IM.to(dt)
    codes_u, codes_w = [], []
    acc = None
    e = [u_re, u_im, w_re, w_im]
    for t in range(su_re.shape[0]):
        # candidate stage values [4, n] for U and W
        cu_re, cu_im = ore[:, None] * su_re[t], oim[:, None] * su_im[t]
        cw_re, cw_im = ore[:, None] * sw_re[t], oim[:, None] * sw_im[t]
        ur, ui = e[0] - cu_re, e[1] - cu_im            # [4, n] residual of U per U code
        wr, wi = e[2] - cw_re, e[3] - cw_im            # [4, n] residual of W per W code
        # real residual block per (U code, W code): [4, 4, n]
        top_a = ur[:, None] + wr[None]
        top_b = wi[None] - ui[:, None]
        bot_a = wi[None] + ui[:, None]
        bot_b = ur[:, None] - wr[None]
        r = l_ab / l_aa
        loss = ((top_a.square() + bot_a.square()) / (l_aa * l_aa)
                + ((top_b - top_a * r).square() + (bot_b - bot_a * r).square()) / (l_bb * l_bb))
        best = loss.reshape(16, -1).argmin(0)          # [n]
        ku, kw = best // 4, best % 4
        qur = torch.gather(cu_re.expand(4, ku.shape[0]), 0, ku[None])[0]
        qui = torch.gather(cu_im.expand(4, ku.shape[0]), 0, ku[None])[0]
        qwr = torch.gather(cw_re.expand(4, kw.shape[0]), 0, kw[None])[0]
        qwi = torch.gather(cw_im.expand(4, kw.shape[0]), 0, kw[None])[0]
        e = [e[0] - qur, e[1] - qui, e[2] - qwr, e[3] - qwi]
        codes_u.append(ku.to(torch.uint8))
        codes_w.append(kw.to(torch.uint8))
        acc = [qur, qui, qwr, qwi] if acc is None else [acc[0] + qur, acc[1] + qui, acc[2] + qwr, acc[3] + qwi]
    return torch.stack(codes_u), torch.stack(codes_w), acc[0], acc[1], acc[2], acc[3]


def _real_params(a: Tensor, method: str, stages: int, granularity: Granularity) -> List[Tuple[Tensor, Tensor]]:
    """Per-stage (center, scale) per group of the float A's residual recursion."""
    m = a.shape[1]
    gs = ScaleGranularity.of(granularity).group_size
    e = a.detach().to(quant.compute_dtype(a.dtype)).contiguous()
    params = []
    for _ in range(stages):
        center, scale = quant.real_stage_params(e, method, granularity)
        e = e - quant.real_stage_apply(e, method, quant.expand_scales(center, m, gs), quant.expand_scales(scale, m, gs))
        params.append((center, scale))
    return params


def _real_column(col: Tensor, c: int, method: str, params, group_size: Optional[int]) -> Tensor:
    """T-stage real rounding of column c of A [rows] at fixed per-group parameters."""
    e, acc = col, None
    for center, scale in params:
        g = 0 if group_size is None else c // group_size
        cen = center[:, 0] if center.shape[1] == 1 else center[:, g]
        sc = scale[:, 0] if scale.shape[1] == 1 else scale[:, g]
        q = quant.real_stage_apply(e, method, cen, sc)
        e = e - q
        acc = q if acc is None else acc + q
    return acc


@torch.no_grad()
def gptq_round(
    a: Tensor,
    h: Tensor,
    stages: int = 2,
    granularity: Granularity = "tensor",
    *,
    method: str = "phase",
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    refit_scales: bool = False,
    decision: str = "phase",
    scale_search: bool = False,
    outliers: Optional[Sequence[int]] = None,
) -> RoundedLayer:
    """Round A [2n, 2m] onto the codebook minimising tr(E H Eᵀ) greedily (module docstring).

    h: [2m, 2m] input second moment (any float dtype; float64 recommended).
    outliers: real input columns whose residual is kept exactly in float16 (module
    docstring; e.g. ``select_outliers(h)``); None / empty: none.
    Returns a :class:`RoundedLayer`; for ``method="phase"`` its ``qu``/``qw`` hold
    codes uint8 [T, n, m] and the fixed scales, and ``a_hat`` is rebuilt from them
    exactly as the packed kernels dequantize.
    """
    _check_inputs(a, h, method, stages, granularity, damp, block_size)
    if decision not in ("phase", "hessian"):
        raise ValueError(f"decision must be 'phase' (the PhaseQuant rule) or 'hessian' (the 16 (U, W) code "
                         f"pairs scored by the pair's OBS loss), got {decision!r}")
    if decision == "hessian" and method != "phase":
        raise ValueError(f"decision='hessian' is for method='phase', got method={method!r}")
    rows, cols = a.shape
    m = cols // 2
    work_dtype = quant.compute_dtype(a.dtype)
    gs = ScaleGranularity.of(granularity).group_size
    if gs is not None and method == "phase" and gs >= m:
        gs_col = None  # one group per row: the "row" scales
    else:
        gs_col = gs

    out_idx = _check_outliers(outliers, cols)
    search_info = {}
    if method == "phase":
        first = 1.0
        if scale_search:
            first, errs = search_first_scale(a, h, stages, granularity, outliers=out_idx)
            search_info = {"first_scale": first, "rtn_errors": errs}
        ref_u, ref_w = _phase_scales(a, stages, granularity, first)
        codes_u = torch.zeros((stages, rows // 2, m), dtype=torch.uint8)
        codes_w = torch.zeros_like(codes_u)
        n = rows // 2
    else:
        params = _real_params(a, method, stages, granularity)
        gs_real = None if gs is None or gs >= cols else gs

    order = _pair_order(h.to(torch.float64), m, act_order)
    perm = torch.stack([order, order + m], dim=1).reshape(-1)  # pair k -> columns 2k, 2k+1
    L = inverse_hessian_factor(h[perm][:, perm], damp).to(work_dtype)
    work = a.detach().to(work_dtype)[:, perm].clone()
    q_all = torch.zeros_like(work)
    total_loss = 0.0
    slot = torch.full((cols,), -1, dtype=torch.int64)      # original column -> its correction slot
    slot[out_idx] = torch.arange(out_idx.numel())
    slot_at = slot[perm]                                     # permuted position -> slot
    corr = torch.zeros((rows, out_idx.numel()), dtype=torch.float16)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        blk = work[:, i1:i2].clone()
        errs = torch.zeros_like(blk)
        for a_col in range(0, i2 - i1, 2):
            b_col = a_col + 1
            ga, gb = i1 + a_col, i1 + b_col  # permuted positions
            j = int(order[ga // 2])            # the complex column
            col_a, col_b = blk[:, a_col], blk[:, b_col]
            if method == "phase":
                top_a, bot_a, top_b, bot_b = col_a[:n], col_a[n:], col_b[:n], col_b[n:]
                u_re, u_im = (top_a + bot_b) * 0.5, (bot_a - top_b) * 0.5
                w_re, w_im = (top_a - bot_b) * 0.5, (top_b + bot_a) * 0.5
                scales = (_column_scales(ref_u.s_re, j, gs_col), _column_scales(ref_u.s_im, j, gs_col),
                          _column_scales(ref_w.s_re, j, gs_col), _column_scales(ref_w.s_im, j, gs_col))
                if decision == "hessian":
                    cu, cw, qu_re, qu_im, qw_re, qw_im = _round_pair_hessian(
                        u_re, u_im, w_re, w_im, scales, float(L[ga, ga]), float(L[ga, gb]), float(L[gb, gb]))
                else:
                    cu, qu_re, qu_im = _round_phase_column(u_re, u_im, scales[0], scales[1])
                    cw, qw_re, qw_im = _round_phase_column(w_re, w_im, scales[2], scales[3])
                codes_u[:, :, j] = cu
                codes_w[:, :, j] = cw
                q_a = torch.cat([qu_re + qw_re, qw_im + qu_im])
                q_b = torch.cat([qw_im - qu_im, qu_re - qw_re])
            else:
                q_a = _real_column(col_a, j, method, params, gs_real)
                q_b = _real_column(col_b, j + m, method, params, gs_real)
            for pos, col, q in ((ga, col_a, q_a), (gb, col_b, q_b)):
                k = int(slot_at[pos])
                if k >= 0:  # outlier column: keep its residual exactly (float16)
                    corr[:, k] = (col - q).to(torch.float16)
                    q += corr[:, k].to(q.dtype)   # in place: q_a / q_b now include it
            q_all[:, ga], q_all[:, gb] = q_a, q_b
            err_a = (col_a - q_a) / L[ga, ga]
            err_b = (col_b - q_b - err_a * L[ga, gb]) / L[gb, gb]
            total_loss += float((err_a * err_a).sum() + (err_b * err_b).sum())
            errs[:, a_col], errs[:, b_col] = err_a, err_b
            if b_col + 1 < i2 - i1:
                blk[:, b_col + 1:] -= torch.outer(err_a, L[ga, gb + 1:i2]) + torch.outer(err_b, L[gb, gb + 1:i2])
        if i2 < cols:
            work[:, i2:] -= errs @ L[i1:i2, i2:]

    if method == "phase":
        qu = _fixed(codes_u, ref_u, m)
        qw = _fixed(codes_w, ref_w, m)
        a_hat = _widely_to_real(qu.re, qu.im, qw.re, qw.im)
        info = dict(search_info)
        if refit_scales:
            if gs is not None and gs < m:
                raise ValueError(f"refit_scales supports 'tensor' and 'row' scales, got granularity={granularity!r}")
            if out_idx.numel():
                raise ValueError("refit_scales cannot be combined with outlier columns (the corrections are "
                                 "residuals of the scales before the refit); pass outliers=None")
            qu, qw, a_hat, refit = _refit(a, h, qu, qw, a_hat)
            info.update(refit)
        if out_idx.numel():
            a_hat[:, out_idx] += corr.to(a_hat.dtype)
        return RoundedLayer(a_hat, qu, qw, total_loss, info, out_idx if out_idx.numel() else None,
                            corr if out_idx.numel() else None)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(cols)
    return RoundedLayer(q_all[:, inv].contiguous(), None, None, total_loss, {},
                        out_idx if out_idx.numel() else None, corr if out_idx.numel() else None)


def _basis(qu: PhaseQuantized, qw: PhaseQuantized) -> List[Tensor]:
    """Real [2n, 2m] code masks B_k, k = (stage, U/W, re/im) in that nesting, float32."""
    out = []
    for t in range(qu.stages):
        for which, codes in ((0, qu.codes[t]), (1, qw.codes[t])):
            on_re = (codes == 0).float() - (codes == 2).float()   # Re of the stage value / s_re
            on_im = (codes == 1).float() - (codes == 3).float()   # Im / s_im
            zero = torch.zeros_like(on_re)
            if which == 0:   # U: A11 += re, A22 += re; A12 -= im, A21 += im
                out.append(_widely_to_real(on_re, zero, zero, zero))
                out.append(_widely_to_real(zero, on_im, zero, zero))
            else:            # W: A11 += re, A22 -= re; A12 += im, A21 += im
                out.append(_widely_to_real(zero, zero, on_re, zero))
                out.append(_widely_to_real(zero, zero, zero, on_im))
    return out


def _refit(a: Tensor, h: Tensor, qu: PhaseQuantized, qw: PhaseQuantized, a_hat: Tensor):
    """Least-squares scales for fixed codes (module docstring); tensor or row scales."""
    rows = a.shape[0]
    n = rows // 2
    per_row = qu.s_re.shape[1] > 1
    hf = h.to(torch.float32)
    basis = _basis(qu, qw)
    k = len(basis)
    ah = (a.detach().float() @ hf)
    gram = torch.zeros(n if per_row else 1, k, k, dtype=torch.float64)
    rhs = torch.zeros(n if per_row else 1, k, dtype=torch.float64)

    def fold(v: Tensor) -> Tensor:  # per real row [2n] -> per complex row [n] or total [1]
        v = v[:n] + v[n:]
        return v if per_row else v.sum(0, keepdim=True)

    for i, bi in enumerate(basis):
        yi = bi @ hf
        rhs[:, i] = fold((ah * bi).sum(1).double())
        for j in range(i, k):
            g = fold((yi * basis[j]).sum(1).double())
            gram[:, i, j] = g
            gram[:, j, i] = g
        del yi
    old = torch.stack([torch.stack([qu.s_re[t], qu.s_im[t], qw.s_re[t], qw.s_im[t]]) for t in range(qu.stages)])
    old = old.reshape(k, -1).t().double()                      # [n | 1, k]
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    ridge = 1e-9 * diag.mean(1, keepdim=True).clamp_min(1e-30)
    unused = diag <= 0
    reg = gram + torch.diag_embed(ridge.expand_as(diag) + unused.double())
    new = torch.linalg.solve(reg, rhs + unused.double() * old)  # an unused scale keeps its value
    new = torch.where(unused, old, new)
    s = new.t().reshape(qu.stages, 4, -1, 1).to(qu.s_re.dtype)  # [T, 4, n_s, 1]
    qu2 = _fixed(qu.codes, PhaseQuantized(qu.codes, s[:, 0], s[:, 1], qu.re, qu.im, qu.group_size), qu.codes.shape[2])
    qw2 = _fixed(qw.codes, PhaseQuantized(qw.codes, s[:, 2], s[:, 3], qw.re, qw.im, qw.group_size), qw.codes.shape[2])
    a_hat2 = _widely_to_real(qu2.re, qu2.im, qw2.re, qw2.im)
    before, after = output_error(a, a_hat, h), output_error(a, a_hat2, h)
    if not after < before:
        return qu, qw, a_hat, {"refit": False, "error_before": before, "error_after": after}
    return qu2, qw2, a_hat2, {"refit": True, "error_before": before, "error_after": after}


def _fixed(codes: Tensor, ref: PhaseQuantized, m: int) -> PhaseQuantized:
    re, im = quant.dequant_phase(codes, ref.s_re, ref.s_im, m, ref.group_size)
    return PhaseQuantized(codes, ref.s_re, ref.s_im, re, im, ref.group_size)


def rtn_round(a: Tensor, stages: int = 2, granularity: Granularity = "tensor", *, method: str = "phase") -> Tensor:
    """Round-to-nearest (the PTQ quantizer) of A [2n, 2m] -> Â [2n, 2m] float32, for comparison."""
    if method == "phase":
        qu, qw = _phase_scales(a, stages, granularity)
        return _widely_to_real(qu.re, qu.im, qw.re, qw.im)
    return quant.real_quant(a, method, stages, granularity)


def output_error(a: Tensor, a_hat: Tensor, h: Tensor) -> float:
    """Relative output error tr(E H Eᵀ) / tr(A H Aᵀ) with E = A - Â (float64)."""
    a64, h64 = a.detach().to(torch.float64), h.to(torch.float64)
    e = a64 - a_hat.detach().to(torch.float64)
    num = float(((e @ h64) * e).sum())
    den = float(((a64 @ h64) * a64).sum())
    return num / den if den > 0 else float("inf")
