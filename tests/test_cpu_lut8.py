"""The opt-in int8-table CPU path (lut8, cpu_packed.cpp): against the torch reference within its
stated worst-case bound, its exact laws (odd, and equivariant under powers of two), the int16
sums at their largest, NaN/Inf refused, and the op path switched on by FAIRY2I_CPU_LUT8=1
(eager and compiled, its transposed-code cache following an in-place update of the codes)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairy2i_compile import packed_ops
from fairy2i_compile.compiler.codegen import cpu_packed
from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely
from fairy2i_compile.quantization.packing import pack_codes, pack_widely

needs_lut8 = pytest.mark.skipif(cpu_packed.cpu_lut8_status() not in ("on", "off"),
                                reason=f"the lut8 path is not compiled in here ({cpu_packed.cpu_lut8_status()})")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packed(out_f, in_f, stages, seed=0, granularity="tensor"):
    g = torch.Generator().manual_seed(seed)
    return pack_widely(*_real_to_widely(torch.randn(out_f, in_f, generator=g)), stages, granularity)


def check_within_bound(x, pk, bias=None):
    """lut8 vs the reference: |error| <= the stated bound (+ float32 summation slack) per output,
    and small in relative rms (a wrong lookup or lost row is off by O(1), not 1%)."""
    got = cpu_packed.lut8_forward(x, pk.codes, pk.scales, bias, pk.m)
    want = packed_ops.packed_linear_reference(x, pk.codes, pk.scales, bias, pk.m, 0)
    bound = cpu_packed.lut8_error_bound(x, pk.scales, pk.m)
    slack = 1e-5 * want.abs().amax().clamp_min(1e-30)
    assert bool(((got - want).abs() <= bound + slack).all()), float(((got - want).abs() - bound).max())
    ref = (want - (0 if bias is None else bias)).norm()
    if ref > 0 and x.shape[1] >= 32:  # a few terms per output: too few for a statistical statement
        assert float((got - want).norm() / ref) < 0.03
    return got


@needs_lut8
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 2, 8])
def test_lut8_within_its_error_bound(granularity, stages, tokens):
    """Row counts around the 32-row blocks (1, 31, 32, 33, 100 complex rows), widths with a partial
    last code word and activation block (m = 1, 23, 75, 150, 300), bias or none."""
    for i, (out_f, in_f) in enumerate(((2, 2), (62, 46), (64, 150), (66, 300), (200, 600))):
        pk = packed(out_f, in_f, stages, seed=stages * 100 + tokens * 10 + i, granularity=granularity)
        x = torch.randn(tokens, in_f)
        check_within_bound(x, pk)
        check_within_bound(x, pk, torch.randn(out_f))


@needs_lut8
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 80), m=st.integers(1, 200), tokens=st.integers(1, 8), stages=st.integers(1, 4),
       granularity=st.sampled_from(["tensor", "row"]), seed=st.integers(0, 2**31))
def test_lut8_property_random_shapes(n, m, tokens, stages, granularity, seed):
    pk = packed(2 * n, 2 * m, stages, seed=seed, granularity=granularity)
    check_within_bound(torch.randn(tokens, 2 * m, generator=torch.Generator().manual_seed(seed)), pk)


@needs_lut8
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 100), stages=st.integers(1, 3), k=st.integers(-6, 6),
       granularity=st.sampled_from(["tensor", "row"]), seed=st.integers(0, 2**31))
def test_lut8_laws_odd_and_power_of_two_scaling(n, m, stages, k, granularity, seed):
    """Rounding to nearest (ties to even) is odd and sigma scales with max|x|, so the integer sums
    are those of x for -x and for 2^k x: lut8(-x) = -lut8(x), lut8(2^k x) = 2^k lut8(x), exactly."""
    pk = packed(2 * n, 2 * m, stages, seed=seed, granularity=granularity)
    x = torch.randn(2, 2 * m, generator=torch.Generator().manual_seed(seed))
    y = cpu_packed.lut8_forward(x, pk.codes, pk.scales, None, pk.m)
    torch.testing.assert_close(cpu_packed.lut8_forward(-x, pk.codes, pk.scales, None, pk.m), -y, rtol=0, atol=0)
    torch.testing.assert_close(cpu_packed.lut8_forward(x * 2.0 ** k, pk.codes, pk.scales, None, pk.m), y * 2.0 ** k,
                               rtol=0, atol=0)


@needs_lut8
def test_lut8_int16_sums_at_their_largest_are_exact():
    """Every activation at max|x| and every code +1 on both planes' real axis: each table entry is
    +-254 (the largest), each int16 run sums a block's 16 of them, and the rounding is exact
    (|s_re a| / sigma = 127), so lut8 equals the reference to float32 rounding over m = 700
    columns (22 blocks); an int16 run over more than 129 pairs would wrap and miss by thousands."""
    n, m, stages = 40, 700, 1
    codes = torch.zeros((2 * stages, n, m), dtype=torch.uint8)  # code 0 = +1
    scales = torch.tensor([0.5, 0.25, 0.5, 0.25], dtype=torch.float32).reshape(2 * stages, 2, 1, 1)
    words = pack_codes(codes)
    for sign in (1.0, -1.0):
        x = torch.full((1, 2 * m), 3.0 * sign)
        x[:, m:] = 0.0  # b = 0: U and W planes both add s_re * a to Re y
        got = cpu_packed.lut8_forward(x, words, scales, None, m)
        want = packed_ops.packed_linear_reference(x, words, scales, None, m, 0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        assert float(want[0, 0]) == pytest.approx(sign * 2 * 0.5 * 3.0 * m)


@needs_lut8
def test_lut8_refuses_non_finite_and_bad_input():
    pk = packed(8, 10, 2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, 10)
        x[0, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            cpu_packed.lut8_forward(x, pk.codes, pk.scales, None, pk.m)
    with pytest.raises(ValueError, match=r"x must be contiguous float32 \[M, 2m = 10\], got torch.float64"):
        cpu_packed.lut8_forward(torch.randn(1, 10, dtype=torch.float64), pk.codes, pk.scales, None, pk.m)
    groups = pack_widely(*_real_to_widely(torch.randn(8, 10)), 2, 2)
    with pytest.raises(ValueError, match="tensor or row scales only"):
        cpu_packed.lut8_forward(torch.randn(1, 10), groups.codes, groups.scales, None, groups.m)
    with pytest.raises(ValueError, match=r"layout must be lut8_layout\(codes\)"):
        cpu_packed.lut8_forward(torch.randn(1, 10), pk.codes, pk.scales, None, pk.m, torch.zeros(3, dtype=torch.uint8))


def test_lut8_is_off_unless_switched_on():
    expected = "on" if os.environ.get("FAIRY2I_CPU_LUT8", "").lower() in ("1", "on", "true", "yes") else "off"
    assert cpu_packed.cpu_lut8_status() in (expected, "absent", "unavailable")


_OP_SCRIPT = textwrap.dedent("""
    import torch
    from fairy2i_compile.compiler.codegen import cpu_packed
    from fairy2i_compile.quantization.packed_model import PackedLinear

    assert cpu_packed.cpu_lut8_status() == "on", cpu_packed.cpu_lut8_status()
    assert cpu_packed.cpu_op_available()[0]
    torch.manual_seed(0)
    layer = PackedLinear.from_linear(torch.nn.Linear(96, 70), 2, "tensor")
    other = PackedLinear.from_linear(torch.nn.Linear(96, 70), 2, "tensor")
    lut8 = lambda mod, x: cpu_packed.lut8_forward(x, mod.codes, mod.scales, mod.bias.detach(), mod.m)
    torch.set_num_threads(2)
    with torch.no_grad():
        for M in (1, 3, cpu_packed.LUT8_MAX_TOKENS):  # the op path runs lut8 up to here, the same arithmetic
            x = torch.randn(M, 96)
            assert torch.equal(layer(x), lut8(layer, x)), M
        x = torch.randn(cpu_packed.LUT8_MAX_TOKENS + 1, 96)  # past it: the float32 paths
        ref = torch.ops.fairy2i.packed_linear.default(x, layer.codes, layer.scales, layer.bias, layer.m, 0, "torch")
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        x = torch.randn(1, 96)
        layer(x)
        layer.load_packed(other.packed())  # in place: the cached transposed codes must follow
        assert torch.equal(layer(x), lut8(layer, x))
        xn = x.clone(); xn[0, 5] = float("nan")
        fold = cpu_packed.fold_path_forward(xn, layer.codes, layer.scales, layer.bias.detach(), layer.m, "auto")
        assert torch.isnan(fold).any()
        torch.testing.assert_close(layer(xn), fold, rtol=0, atol=0, equal_nan=True)  # refused by lut8: the fold path
        compiled = torch.compile(torch.nn.Sequential(layer), backend="fairy2i", options={"compiler": "inductor"})
        assert torch.equal(compiled(x), lut8(layer, x))
        rows = PackedLinear.from_linear(torch.nn.Linear(96, 70), 2, "row")
        assert torch.equal(rows(x), lut8(rows, x))
        groups = PackedLinear.from_linear(torch.nn.Linear(96, 70), 2, 16)  # group scales: the float32 fold path
        ref = torch.ops.fairy2i.packed_linear.default(x, groups.codes, groups.scales, groups.bias, groups.m, 16, "torch")
        torch.testing.assert_close(groups(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    print("OK")
""")


@needs_lut8
@pytest.mark.skipif(not cpu_packed.cpu_op_available()[0], reason="the C++ op registration is unavailable")
def test_op_runs_lut8_when_switched_on():
    env = dict(os.environ, FAIRY2I_CPU_LUT8="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _OP_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


@needs_lut8
@pytest.mark.skipif(not cpu_packed.cpu_op_available()[0], reason="the C++ op registration is unavailable")
@pytest.mark.parametrize("value, status", [(" On ", "on"), ("yes", "on"), ("off", "off"), ("maybe", "off")])
def test_the_switch_reaches_both_libraries_through_options_env_switch(value, status):
    """The C++ code reads no environment variable: cpu_packed.py hands it FAIRY2I_CPU_LUT8 as
    options.env_switch(..., default=False) reads it (spaces and case ignored, unknown words off), to
    the ctypes library and to the op registration alike."""
    script = textwrap.dedent("""
        import ctypes, torch
        from fairy2i_compile.compiler.codegen import cpu_packed
        ok, path = cpu_packed.cpu_op_available()
        op_lib = ctypes.CDLL(path)
        op_lib.fairy2i_cpu_lut8.restype = ctypes.c_int
        print(cpu_packed.cpu_lut8_status(), {0: "absent", 1: "off", 2: "on"}[op_lib.fairy2i_cpu_lut8()])
    """)
    env = dict(os.environ, FAIRY2I_CPU_LUT8=value, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [status, status]
