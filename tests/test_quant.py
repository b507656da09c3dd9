"""Tests for fairy2i_compile.quantization.quant (PhaseQuant, real baselines, STEs).

Tolerances: codes, scales on hand values and dequant round-trips are exact
(atol=0); Gaussian error figures are +-0.01 absolute on rel_fro; the
"one more stage never hurts" property allows 1e-6 absolute slack on rel_fro
(float32 rounding of the stage sum).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import PhaseQuantSTE, RealQuantSTE
from fairy2i_compile.quantization.quant import (
    METHODS,
    SCALE_EPS,
    PhaseQuantized,
    bits_per_real_weight,
    check_finite,
    dequant_phase,
    phase_codes,
    phase_quant,
    quant_error,
    quantize_widely,
    real_quant,
    validate_granularity,
)

GRANULARITIES = ["tensor", "row", 1, 3, 4, 7, 64]
HYP = settings(max_examples=60, deadline=None, database=None)


def _angle_codes(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Reference codes from torch.angle and the half-open intervals (complex, tests only)."""
    # + 0.0 turns -0.0 into +0.0, the module's documented treatment of signed zeros
    z = torch.complex(re.double() + 0.0, im.double() + 0.0)
    phi = torch.angle(z)
    q = math.pi / 4
    codes = torch.full(phi.shape, -1, dtype=torch.int64)
    codes[(phi >= -q) & (phi < q)] = 0
    codes[(phi >= q) & (phi < 3 * q)] = 1
    codes[(phi >= 3 * q) | (phi < -3 * q)] = 2
    codes[(phi >= -3 * q) & (phi < -q)] = 3
    assert (codes >= 0).all()
    return codes


def _complex_err(re, im, q: PhaseQuantized) -> float:
    return quant_error(torch.stack([re, im]), torch.stack([q.re, q.im]))["rel_fro"]


def _gaussian(n: int, m: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=dtype), torch.randn(n, m, generator=g, dtype=dtype)


@st.composite
def complex_matrices(draw, max_n: int = 6, max_m: int = 11):
    """(re, im) float32 [n, m]: Gaussian, or drawn from a small set full of ties and zeros."""
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(1, max_m))
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**31 - 1))
        scale = draw(st.sampled_from([1e-2, 1.0, 100.0]))
        re, im = _gaussian(n, m, seed)
        return re * scale, im * scale
    vals = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0])
    flat = draw(st.lists(vals, min_size=2 * n * m, max_size=2 * n * m))
    t = torch.tensor(flat, dtype=torch.float32).reshape(2, n, m)
    return t[0].clone(), t[1].clone()


granularities = st.one_of(st.sampled_from(["tensor", "row"]), st.integers(1, 13))


# ----------------------------------------------------------------------------
# codes


BOUNDARY_CASES = [
    # (re, im, code)
    (1.0, 0.0, 0),  # phi = 0
    (0.0, 1.0, 1),  # pi/2
    (-1.0, 0.0, 2),  # pi
    (0.0, -1.0, 3),  # -pi/2
    (1.0, 1.0, 1),  # pi/4 -> +i (interval [pi/4, 3pi/4))
    (1.0, -1.0, 0),  # -pi/4 -> +1 ([-pi/4, pi/4))
    (-1.0, 1.0, 2),  # 3pi/4 -> -1 ([3pi/4, pi])
    (-1.0, -1.0, 3),  # -3pi/4 -> -i ([-3pi/4, -pi/4))
    (2.5, 2.5, 1),
    (-3.0, -3.0, 3),
    (0.0, 0.0, 0),  # angle(0) = 0
    (-0.0, 0.0, 0),  # -0.0 treated as +0.0 (torch.angle would say pi)
    (0.0, -0.0, 0),
    (-0.0, -0.0, 0),
    (-1.0, -0.0, 2),  # torch.angle = -pi, treated as pi
    (-0.0, 1.0, 1),
    (-0.0, -1.0, 3),
    (1.0, 0.999, 0),
    (0.999, 1.0, 1),
    (-1.0, 0.999, 2),
    (-0.999, 1.0, 1),
    (-1.0, -0.999, 2),
    (-0.999, -1.0, 3),
    (1.0, -0.999, 0),
    (0.999, -1.0, 3),
]


def test_codes_boundaries_hand_picked():
    re = torch.tensor([c[0] for c in BOUNDARY_CASES])
    im = torch.tensor([c[1] for c in BOUNDARY_CASES])
    want = torch.tensor([c[2] for c in BOUNDARY_CASES], dtype=torch.uint8)
    got = phase_codes(re, im)
    assert got.dtype == torch.uint8
    assert torch.equal(got, want), [(c, int(g)) for c, g in zip(BOUNDARY_CASES, got)]
    assert torch.equal(got.long(), _angle_codes(re, im))


def test_codes_match_angle_on_grid_and_random():
    vals = torch.tensor([0.0, -0.0, 0.25, -0.25, 1.0, -1.0, 3.0, -3.0, 1e-30, -1e-30, 7e5, -7e5])
    re, im = torch.meshgrid(vals, vals, indexing="ij")
    assert torch.equal(phase_codes(re, im).long(), _angle_codes(re, im))
    g = torch.Generator().manual_seed(1)
    re = torch.randn(200_000, generator=g) * torch.rand(200_000, generator=g).pow(4)
    im = torch.randn(200_000, generator=g)
    assert torch.equal(phase_codes(re, im).long(), _angle_codes(re, im))
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        r, i = re.to(dtype), im.to(dtype)
        assert torch.equal(phase_codes(r, i).long(), _angle_codes(r, i))


# ----------------------------------------------------------------------------
# scales on hand values

# w = [[3+1i, 0+2i, -1+0i], [0.5-4i, -2+2i, 0]] -> codes [[0, 1, 2], [3, 2, 0]]
HAND_RE = torch.tensor([[3.0, 0.0, -1.0], [0.5, -2.0, 0.0]])
HAND_IM = torch.tensor([[1.0, 2.0, 0.0], [-4.0, 2.0, 0.0]])
HAND_CODES = torch.tensor([[0, 1, 2], [3, 2, 0]], dtype=torch.uint8)


@pytest.mark.parametrize(
    "granularity, s_re, s_im",
    [
        # re-coded |re|: 3, 1, 2, 0 -> 1.5;  im-coded |im|: 2, 4 -> 3
        ("tensor", [[[1.5]]], [[[3.0]]]),
        ("row", [[[2.0], [1.0]]], [[[2.0], [4.0]]]),
        # groups of 2 over m = 3: cols {0, 1} and the ragged {2}
        # row 1, group 1 holds only w = 0: its re mean is exactly 0 -> scale 0
        (2, [[[3.0, 1.0], [2.0, 0.0]]], [[[2.0, SCALE_EPS], [4.0, SCALE_EPS]]]),
        (1, [[[3.0, SCALE_EPS, 1.0], [SCALE_EPS, 2.0, 0.0]]],
            [[[SCALE_EPS, 2.0, SCALE_EPS], [4.0, SCALE_EPS, SCALE_EPS]]]),
        (3, [[[2.0], [1.0]]], [[[2.0], [4.0]]]),
        (100, [[[2.0], [1.0]]], [[[2.0], [4.0]]]),  # g > m: one group per row
    ],
)
def test_scales_hand_computed(granularity, s_re, s_im):
    q = phase_quant(HAND_RE, HAND_IM, 1, granularity)
    assert torch.equal(q.codes[0], HAND_CODES)
    assert torch.equal(q.s_re, torch.tensor(s_re, dtype=torch.float32))
    assert torch.equal(q.s_im, torch.tensor(s_im, dtype=torch.float32))
    assert q.group_size == (None if isinstance(granularity, str) else granularity)


def test_tensor_dequant_hand():
    q = phase_quant(HAND_RE, HAND_IM, 1)
    assert torch.equal(q.re, torch.tensor([[1.5, 0.0, -1.5], [0.0, -1.5, 1.5]]))
    assert torch.equal(q.im, torch.tensor([[0.0, 3.0, 0.0], [-3.0, 0.0, 0.0]]))


def test_ragged_group_ignores_padding():
    # one row, m = 5, g = 4: last group is just column 4 (value 8); padded zeros
    # would be coded 0 and drag the mean to 2 if they leaked in
    re = torch.tensor([[1.0, 1.0, 1.0, 1.0, 8.0]])
    q = phase_quant(re, torch.zeros_like(re), 1, 4)
    assert torch.equal(q.s_re, torch.tensor([[[1.0, 8.0]]]))
    assert torch.equal(q.re, re)


def test_residual_stages_hand():
    # w = [2, 1]: stage 1 s = 1.5 -> residual [0.5, -0.5]; stage 2 s = 0.5 -> exact
    re = torch.tensor([[2.0, 1.0]])
    im = torch.zeros_like(re)
    q = phase_quant(re, im, 3)
    assert torch.equal(q.codes[:2, 0], torch.tensor([[0, 0], [0, 2]], dtype=torch.uint8))
    assert torch.equal(q.s_re[:2].flatten(), torch.tensor([1.5, 0.5]))
    # residual is exactly 0 after stage 2: stage 3 scales 0, adds exact zeros
    assert torch.equal(q.s_re[2].flatten(), torch.tensor([0.0]))
    assert torch.equal(q.re, re) and torch.equal(q.im, im)


# ----------------------------------------------------------------------------
# Gaussian sanity figures (DESIGN.md §1.3)


def test_gaussian_relative_error_matches_paper():
    re, im = _gaussian(1024, 1024, seed=0)
    for T, want in [(1, 0.603), (2, 0.361), (3, 0.242)]:
        err = _complex_err(re, im, phase_quant(re, im, T))
        assert abs(err - want) <= 0.01, (T, err)


# ----------------------------------------------------------------------------
# dequant_phase == PhaseQuantized.re/.im, bit for bit


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_dequant_bit_exact(granularity, T):
    re, im = _gaussian(9, 23, seed=T)
    q = phase_quant(re, im, T, granularity)
    d_re, d_im = dequant_phase(q.codes, q.s_re, q.s_im, 23, q.group_size)
    torch.testing.assert_close(d_re, q.re, atol=0, rtol=0)
    torch.testing.assert_close(d_im, q.im, atol=0, rtol=0)
    # m defaults to the code width
    d_re2, _ = dequant_phase(q.codes, q.s_re, q.s_im, group_size=q.group_size)
    assert torch.equal(d_re2, q.re)


def test_dequant_ignores_padded_code_columns():
    re, im = _gaussian(4, 10, seed=3)
    q = phase_quant(re, im, 2, 4)
    padded = torch.cat([q.codes, torch.full((2, 4, 6), 3, dtype=torch.uint8)], dim=2)
    d_re, d_im = dequant_phase(padded, q.s_re, q.s_im, 10, 4)
    assert torch.equal(d_re, q.re) and torch.equal(d_im, q.im)


@HYP
@given(w=complex_matrices(), granularity=granularities, T=st.integers(1, 4))
def test_dequant_bit_exact_property(w, granularity, T):
    re, im = w
    q = phase_quant(re, im, T, granularity)
    d_re, d_im = dequant_phase(q.codes, q.s_re, q.s_im, re.shape[1], q.group_size)
    assert torch.equal(d_re, q.re) and torch.equal(d_im, q.im)


# ----------------------------------------------------------------------------
# properties


def _expand_scales(s: torch.Tensor, m: int, g) -> torch.Tensor:
    """[n_s, g_s] -> [n_s, m] by plain indexing (independent of the module)."""
    if s.shape[-1] == 1:
        return s.expand(s.shape[0], m)
    cols = torch.arange(m) // g
    return s[:, cols]


@HYP
@given(w=complex_matrices(), granularity=granularities, T=st.integers(1, 4))
def test_every_stage_on_scaled_codebook(w, granularity, T):
    re, im = w
    n, m = re.shape
    q = phase_quant(re, im, T, granularity)
    assert q.codes.shape == (T, n, m) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 3
    assert q.s_re.shape == q.s_im.shape and q.s_re.shape[0] == T
    assert q.re.dtype == torch.float32
    for t in range(T):
        c = q.codes[t]
        sr = _expand_scales(q.s_re[t], m, q.group_size).expand(n, m)
        si = _expand_scales(q.s_im[t], m, q.group_size).expand(n, m)
        assert (q.s_re[t] >= 0).all() and (q.s_im[t] >= 0).all()
        st_re, st_im = dequant_phase(q.codes[t : t + 1], q.s_re[t : t + 1], q.s_im[t : t + 1], m, q.group_size)
        want_re = torch.where(c == 0, sr, torch.where(c == 2, -sr, torch.zeros_like(sr)))
        want_im = torch.where(c == 1, si, torch.where(c == 3, -si, torch.zeros_like(si)))
        assert torch.equal(st_re, want_re) and torch.equal(st_im, want_im)


@HYP
@given(w=complex_matrices(), granularity=granularities)
def test_first_stage_codes_and_scales_follow_rule(w, granularity):
    re, im = w
    n, m = re.shape
    q = phase_quant(re, im, 1, granularity)
    assert torch.equal(q.codes[0].long(), _angle_codes(re, im))
    # scales by a plain loop over groups (float64 means; tolerance: float32 rounding)
    g = m if granularity == "tensor" or granularity == "row" else granularity
    rows = [range(n)] if granularity == "tensor" else [[i] for i in range(n)]
    for ri, rset in enumerate(rows):
        for gi, c0 in enumerate(range(0, m, g)):
            if granularity == "tensor":
                cols = range(m)
            else:
                cols = range(c0, min(c0 + g, m))
            ents = [(i, j) for i in rset for j in cols]
            for axis, (vals, s) in enumerate([(re, q.s_re), (im, q.s_im)]):
                on = [abs(float(vals[i, j])) for i, j in ents if int(q.codes[0, i, j]) % 2 == axis]
                if not on:
                    want = SCALE_EPS
                else:
                    mean = sum(on) / len(on)
                    want = 0.0 if mean == 0 else max(mean, SCALE_EPS)
                got = float(s[0, ri, gi])
                assert math.isclose(got, want, rel_tol=1e-6, abs_tol=0), (axis, ri, gi, got, want)
            if granularity == "tensor":
                break


@HYP
@given(w=complex_matrices(max_n=8, max_m=16), granularity=granularities)
def test_more_stages_never_increase_error(w, granularity):
    re, im = w
    errs = [_complex_err(re, im, phase_quant(re, im, T, granularity)) for T in range(1, 5)]
    for a, b in zip(errs, errs[1:]):
        assert b <= a + 1e-6, errs


@HYP
@given(w=complex_matrices(), granularity=granularities, T=st.integers(1, 4))
def test_recursion_matches_complex_reference(w, granularity, T):
    """Residual recursion, re-derived with complex tensors from the codes/scales."""
    re, im = w
    m = re.shape[1]
    q = phase_quant(re, im, T, granularity)
    e = torch.complex(re, im)
    total = torch.zeros_like(e)
    unit = torch.tensor([1, 1j, -1, -1j], dtype=torch.complex64)
    for t in range(T):
        assert torch.equal(phase_codes(e.real, e.imag), q.codes[t])
        sr = _expand_scales(q.s_re[t], m, q.group_size)
        si = _expand_scales(q.s_im[t], m, q.group_size)
        k = q.codes[t].long()
        mag = torch.where(k % 2 == 0, sr, si)
        qt = unit[k] * mag
        e = e - qt
        total = total + qt
    torch.testing.assert_close(total.real, q.re, atol=0, rtol=0)
    torch.testing.assert_close(total.imag, q.im, atol=0, rtol=0)


def test_dtypes():
    re, im = _gaussian(8, 12, seed=5, dtype=torch.float64)
    q64 = phase_quant(re, im, 2, "row")
    assert q64.re.dtype == q64.s_re.dtype == torch.float64
    qb = phase_quant(re.bfloat16(), im.bfloat16(), 2, "row")
    assert qb.re.dtype == qb.s_re.dtype == torch.float32
    q32 = phase_quant(re.bfloat16().float(), im.bfloat16().float(), 2, "row")
    assert torch.equal(qb.re, q32.re) and torch.equal(qb.codes, q32.codes)
    out = quantize_widely(re.bfloat16(), im.bfloat16(), re.half(), im.half(), 2, 4)
    assert [t.dtype for t in out] == [torch.bfloat16, torch.bfloat16, torch.float16, torch.float16]
    assert real_quant(re, "binary", 1).dtype == torch.float64
    assert real_quant(re.half(), "ternary", 1).dtype == torch.float32


def test_quantize_widely_is_two_independent_phase_quants():
    u_re, u_im = _gaussian(6, 10, seed=7)
    w_re, w_im = _gaussian(6, 10, seed=8)
    out = quantize_widely(u_re, u_im, w_re, w_im, 2, "row")
    qu = phase_quant(u_re, u_im, 2, "row")
    qw = phase_quant(w_re, w_im, 2, "row")
    for a, b in zip(out, (qu.re, qu.im, qw.re, qw.im)):
        assert torch.equal(a, b)


@HYP
@given(w=complex_matrices(), granularity=granularities, T=st.integers(1, 4))
def test_fused_body_run_eagerly_is_the_reference_bit_for_bit(w, granularity, T):
    """quantize_widely(fused=True)'s body, eagerly: the reference's values exactly (every T, granularity)."""
    from fairy2i_compile.quantization import quant

    re, im = w
    typed = validate_granularity(granularity, re.shape[1])
    *out, finite = quant._widely_values(re, im, im.flip(0), re.flip(1), T, typed.option, typed.group_size)
    ref = quantize_widely(re, im, im.flip(0), re.flip(1), T, granularity)
    assert bool(finite)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("T, granularity, shape", [(1, "row", (12, 30)), (2, "tensor", (40, 52)), (3, 5, (9, 33)),
                                                    (4, 16, (35, 70))])
def test_fused_compiled_quantizer_equals_the_reference(monkeypatch, T, granularity, shape):
    """Compiled by Inductor: the same values up to the float rounding of the scale sums (1e-6 relative).
    (35, 70) with groups of 16: a ragged last group of 6 columns, the case Inductor once miscompiled."""
    from fairy2i_compile.quantization import fused

    monkeypatch.setenv("FAIRY2I_STE_COMPILE", "1")
    monkeypatch.setattr(fused, "MIN_NUMEL", 1)  # compile these small weights too
    u_re, u_im = _gaussian(*shape, seed=21)
    w_re, w_im = _gaussian(*shape, seed=22)
    out = quantize_widely(u_re, u_im, w_re, w_im, T, granularity, fused=True)
    assert fused.fused_impl() == "inductor"
    ref = quantize_widely(u_re, u_im, w_re, w_im, T, granularity)
    for a, b in zip(out, ref):
        # each entry is a sum of T stage scales, each within 1e-6 relative: so within 1e-6 of the
        # largest entry in absolute terms (a small entry is a difference of large scales)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    # a NaN weight takes the reference's path and its error, naming the layer
    u_re[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.q \(U\) \(real part\) has 1 NaN/Inf"):
        quantize_widely(u_re, u_im, w_re, w_im, T, granularity, name="layers.0.q", fused=True)


def test_expand_scales_compiled_equals_eager_with_a_ragged_last_group():
    """Each column takes its group's scale; compiled with a pointwise op after it, the ragged last
    group (m = 70, g = 16: columns 64..69) keeps its scale (repeat_interleave + slice did not)."""
    from fairy2i_compile.quantization.quant import expand_scales

    s = torch.rand(3, 35, 5, generator=torch.Generator().manual_seed(0)) + 0.5

    def f(s):
        return expand_scales(s, 70, 16) * 2.0

    want = torch.stack([s[..., c // 16] for c in range(70)], dim=-1) * 2.0
    assert torch.equal(f(s), want)
    assert torch.equal(torch.compile(f, dynamic=False, fullgraph=True)(s), want)


def test_no_grad_tracked():
    re, im = _gaussian(4, 6, seed=9)
    re.requires_grad_(True)
    q = phase_quant(re, im, 2)
    assert not q.re.requires_grad
    assert not real_quant(re, "ternary", 1).requires_grad


# ----------------------------------------------------------------------------
# STEs


@pytest.mark.parametrize("granularity", ["tensor", "row", 5])
def test_phase_ste_forward_and_identity_backward(granularity):
    ins = [t.requires_grad_(True) for t in (*_gaussian(6, 11, seed=10), *_gaussian(6, 11, seed=11))]
    outs = PhaseQuantSTE.apply(*ins, 3, granularity)
    want = quantize_widely(*[t.detach() for t in ins], 3, granularity)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, atol=0, rtol=0)
    g = torch.Generator().manual_seed(12)
    ups = [torch.randn(6, 11, generator=g) for _ in range(4)]
    torch.autograd.backward(outs, ups)
    for t, up in zip(ins, ups):
        torch.testing.assert_close(t.grad, up, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_real_ste_forward_and_identity_backward(method):
    a = _gaussian(6, 11, seed=13)[0].bfloat16().requires_grad_(True)
    out = RealQuantSTE.apply(a, method, 2, "row")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, real_quant(a.detach(), method, 2, "row").bfloat16(), atol=0, rtol=0)
    up = torch.randn(6, 11).bfloat16()
    out.backward(up)
    torch.testing.assert_close(a.grad, up, atol=0, rtol=0)


# dynamo itself instantiates autograd.Function (a torch-internal DeprecationWarning)
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
def test_phase_ste_traces_under_torch_compile():
    """QAT goes through the compiled graph: the STE must trace (no data-dependent checks)."""

    def f(u_re, u_im, w_re, w_im):
        outs = PhaseQuantSTE.apply(u_re, u_im, w_re, w_im, 2, 4)
        return sum(o.sum() for o in outs)

    ins = [t.requires_grad_(True) for t in (*_gaussian(4, 10, seed=14), *_gaussian(4, 10, seed=15))]
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*ins)
    want = f(*[t.detach() for t in ins])
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    loss.backward()
    for t in ins:
        assert torch.equal(t.grad, torch.ones_like(t))


# ----------------------------------------------------------------------------
# real baselines


def test_binary_hand():
    a = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    # mean 3, mean|A| 3, A - mean = [-2, -1, 0, 3], sign(0) := +1
    assert torch.equal(real_quant(a, "binary", 1), torch.tensor([[-3.0, -3.0, 3.0, 3.0]]))
    a2 = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.equal(real_quant(a2, "binary", 1, "row"), torch.tensor([[-3.0, -3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]]))
    # ragged group 3: {1, 3, 5} -> mean 3, mean|A| 3; {10} -> +10
    a3 = torch.tensor([[1.0, 3.0, 5.0, 10.0]])
    assert torch.equal(real_quant(a3, "binary", 1, 3), torch.tensor([[-3.0, 3.0, 3.0, 10.0]]))


def test_ternary_hand():
    a = torch.tensor([[0.25, -2.0, 1.0, 0.75]])
    # gamma = mean|A| = 1: round -> [0, -2, 1, 1] -> clamp [0, -1, 1, 1]
    assert torch.equal(real_quant(a, "ternary", 1), torch.tensor([[0.0, -1.0, 1.0, 1.0]]))
    # ragged group 3: {3, -3, 0}: gamma 2, A/gamma = [1.5, -1.5, 0] -> round half even
    # [2, -2, 0] -> clamp [1, -1, 0]; {4, 0}: gamma 2 -> [2, 0] -> [1, 0]
    a2 = torch.tensor([[3.0, -3.0, 0.0, 4.0, 0.0]])
    assert torch.equal(real_quant(a2, "ternary", 1, 3), torch.tensor([[2.0, -2.0, 0.0, 2.0, 0.0]]))
    # residual stage: [4, 1]: gamma 2.5 -> [2.5, 0]; residual [1.5, 1]: gamma 1.25 -> [1.25, 1.25]
    a3 = torch.tensor([[4.0, 1.0]])
    assert torch.equal(real_quant(a3, "ternary", 2), torch.tensor([[3.75, 1.25]]))


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_real_residual_matches_manual_recursion(method):
    a = _gaussian(8, 13, seed=16)[0]
    total = torch.zeros_like(a)
    e = a.clone()
    for T in range(1, 5):
        q1 = real_quant(e, method, 1, 4)
        total = total + q1
        e = e - q1
        assert torch.equal(real_quant(a, method, T, 4), total)


def test_real_gaussian_error_decreases():
    a = _gaussian(256, 256, seed=17)[0]
    for method in ("binary", "ternary"):
        errs = [quant_error(a, real_quant(a, method, T))["rel_fro"] for T in range(1, 5)]
        assert all(b < a_ for a_, b in zip(errs, errs[1:])), (method, errs)
    # one binary stage on a Gaussian: sqrt(1 - 2/pi) ~ 0.603
    assert abs(quant_error(a, real_quant(a, "binary", 1))["rel_fro"] - 0.603) < 0.01


# ----------------------------------------------------------------------------
# accounting


def test_bits_per_real_weight():
    assert bits_per_real_weight("phase", 1) == 1.0
    assert bits_per_real_weight("phase", 2) == 2.0
    assert bits_per_real_weight("binary", 3) == 3.0
    assert bits_per_real_weight("ternary", 1) == math.log2(3)
    assert bits_per_real_weight("ternary", 2) == 2 * math.log2(3)
    assert METHODS == ("phase", "binary", "ternary")
    with pytest.raises(ValueError, match="unknown method"):
        bits_per_real_weight("int4", 1)
    with pytest.raises(ValueError, match="stages"):
        bits_per_real_weight("phase", 5)


def test_quant_error_hand():
    ref = torch.tensor([3.0, 4.0])  # ||ref|| = 5
    e = quant_error(ref, torch.tensor([3.0, 3.0]))  # ||err|| = 1
    assert e["rel_fro"] == pytest.approx(0.2, abs=1e-15)
    assert e["sqnr_db"] == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert quant_error(ref, ref.clone()) == {"rel_fro": 0.0, "sqnr_db": float("inf")}
    z = torch.zeros(3)
    assert quant_error(z, z) == {"rel_fro": 0.0, "sqnr_db": float("inf")}
    assert quant_error(z, torch.ones(3))["rel_fro"] == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        quant_error(ref, torch.zeros(3))


# ----------------------------------------------------------------------------
# bad input


def test_nan_inf_raise_with_name():
    re, im = _gaussian(4, 5, seed=18)
    bad = re.clone()
    bad[0, 0] = float("nan")
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.q_proj .* 2 NaN/Inf values.*not finite"):
        check_finite(bad, "model.layers.0.q_proj")
    check_finite(re, "ok")
    with pytest.raises(ValueError, match=r"layers\.3\.o_proj \(imaginary part\) has 2 NaN/Inf"):
        phase_quant(re, bad, 1, name="layers.3.o_proj")
    with pytest.raises(ValueError, match=r"1 NaN/Inf"):
        phase_quant(torch.tensor([[1.0, float("-inf")], [0.0, 2.0]]), im[:2, :2], 1)
    with pytest.raises(ValueError, match=r"lm_head has 2 NaN/Inf"):
        real_quant(bad, "ternary", 1, name="lm_head")
    with pytest.raises(ValueError, match=r"mlp \(W\) \(real part\) has 2"):
        quantize_widely(re, im, bad, im, 1, "tensor", name="mlp")


def test_all_zero_gives_zeros():
    z = torch.zeros(3, 5)
    for granularity in ("tensor", "row", 2):
        for T in (1, 4):
            q = phase_quant(z, z, T, granularity)
            assert torch.equal(q.re, z) and torch.equal(q.im, z)
            assert torch.isfinite(q.s_re).all() and torch.isfinite(q.s_im).all()
        for method in ("binary", "ternary"):
            assert torch.equal(real_quant(z, method, 3, granularity), z)


def test_bad_stages_method_granularity():
    re, im = _gaussian(4, 6, seed=19)
    for stages in (0, 5, -1, True, 1.5):
        with pytest.raises(ValueError, match="stages"):
            phase_quant(re, im, stages)
        with pytest.raises(ValueError, match="stages"):
            real_quant(re, "binary", stages)
    with pytest.raises(ValueError, match="unknown method"):
        real_quant(re, "quaternary", 1)
    with pytest.raises(ValueError, match="phase_quant"):
        real_quant(re, "phase", 1)
    for g in (0, -1, "col", True, 2.0, None):
        with pytest.raises(ValueError, match="granularity|group size"):
            validate_granularity(g, 6)
        with pytest.raises(ValueError, match="granularity|group size"):
            phase_quant(re, im, 1, g)
        with pytest.raises(ValueError, match="granularity|group size"):
            real_quant(re, "ternary", 1, g)
    validate_granularity(100, 6)  # g > m allowed: one group per row


def test_bad_tensors():
    re, im = _gaussian(4, 6, seed=20)
    with pytest.raises(TypeError, match="complex"):
        phase_quant(torch.complex(re, im), im, 1)
    with pytest.raises(TypeError, match="floating"):
        phase_quant(re.long(), im, 1)
    with pytest.raises(ValueError, match="2-D"):
        phase_quant(re[0], im[0], 1)
    with pytest.raises(ValueError, match="same shape"):
        phase_quant(re, im[:, :5], 1)
    q = phase_quant(re, im, 2, 4)
    with pytest.raises(ValueError, match="group_size"):
        dequant_phase(q.codes, q.s_re, q.s_im)
    with pytest.raises(ValueError, match="group_size=2"):
        dequant_phase(q.codes, q.s_re, q.s_im, 6, 2)
    with pytest.raises(ValueError, match="uint8"):
        dequant_phase(q.codes.long(), q.s_re, q.s_im, 6, 4)
    with pytest.raises(ValueError, match="0..3"):
        dequant_phase(q.codes + 4, q.s_re, q.s_im, 6, 4)
