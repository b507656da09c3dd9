"""Real <-> widely-linear equivalence: symbolic proof, float64 properties, op registrations."""

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fairy2i_compile.compiler import ops  # noqa: F401
from conftest import rel_err

fairy2i = torch.ops.fairy2i


def complex_reference(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """y = U x + W conj(x) in complex128, straight from the DESIGN.md formulas."""
    n, m = a.shape[0] // 2, a.shape[1] // 2
    a11, a12, a21, a22 = a[:n, :m], a[:n, m:], a[n:, :m], a[n:, m:]
    u = torch.complex((a11 + a22) / 2, (a21 - a12) / 2)
    w = torch.complex((a11 - a22) / 2, (a12 + a21) / 2)
    xc = torch.complex(x[..., :m], x[..., m:])
    y = xc @ u.T + xc.conj() @ w.T
    return torch.cat([y.real, y.imag], dim=-1)


def test_block_identity_symbolic():
    """For symbolic 2x2 blocks (entries of A11..A22 and x), U x + W conj(x) == A x~ exactly."""
    a11, a12, a21, a22, xr, xi = sp.symbols("a11 a12 a21 a22 xr xi", real=True)
    u = (a11 + a22) / 2 + sp.I * (a21 - a12) / 2
    w = (a11 - a22) / 2 + sp.I * (a12 + a21) / 2
    x = xr + sp.I * xi
    y = sp.expand(u * x + w * sp.conjugate(x))
    assert sp.simplify(sp.re(y) - (a11 * xr + a12 * xi)) == 0
    assert sp.simplify(sp.im(y) - (a21 * xr + a22 * xi)) == 0
    # and the inverse map recovers the blocks
    ure, uim, wre, wim = sp.re(u), sp.im(u), sp.re(w), sp.im(w)
    back = [ure + wre, wim - uim, wim + uim, ure - wre]
    assert [sp.simplify(b - t) for b, t in zip(back, [a11, a12, a21, a22])] == [0, 0, 0, 0]


def test_block_identity_symbolic_matrix():
    """The same identity with 2x2 matrix blocks (non-commuting structure, n=m=2)."""
    n = m = 2
    A = sp.Matrix(2 * n, 2 * m, lambda i, j: sp.Symbol(f"a{i}{j}", real=True))
    xs = sp.Matrix(2 * m, 1, lambda i, j: sp.Symbol(f"x{i}", real=True))
    A11, A12, A21, A22 = A[:n, :m], A[:n, m:], A[n:, :m], A[n:, m:]
    U = (A11 + A22) / 2 + sp.I * (A21 - A12) / 2
    W = (A11 - A22) / 2 + sp.I * (A12 + A21) / 2
    x = xs[:m, :] + sp.I * xs[m:, :]
    y = (U * x + W * x.conjugate()).expand()
    real_y = A * xs
    for i in range(n):
        assert sp.simplify(sp.re(y[i]) - real_y[i]) == 0
        assert sp.simplify(sp.im(y[i]) - real_y[n + i]) == 0


even = st.integers(1, 12).map(lambda k: 2 * k)


@st.composite
def layer_case(draw):
    out_f, in_f = draw(even), draw(even)
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    bias = draw(st.booleans())
    return out_f, in_f, tuple(batch), seed, bias


def _tensors(out_f, in_f, batch, seed, bias, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    x = torch.randn(*batch, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    return a, x, b


@given(layer_case())
def test_widely_linear_equals_linear_float64(case):
    a, x, b = _tensors(*case)
    y = fairy2i.widely_linear(x, *fairy2i.real_to_widely(a), b)
    ref = F.linear(x, a, b)
    assert y.shape == ref.shape and y.dtype == torch.float64
    assert rel_err(y, ref) <= 1e-12
    # and the complex-arithmetic oracle agrees with both
    cref = complex_reference(x, a) + (b if b is not None else 0)
    assert rel_err(cref, ref) <= 1e-12


@given(layer_case())
def test_round_trip_exact_on_dyadic_values(case):
    """Integer-valued weights: (a+b)/2 and the sums are exact, so A -> (U, W) -> A is bit-exact."""
    out_f, in_f, _, seed, _ = case
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2**20, 2**20, (out_f, in_f), generator=g).double() / 8
    back = fairy2i.widely_to_real(*fairy2i.real_to_widely(a))
    torch.testing.assert_close(back, a, atol=0, rtol=0)


@given(layer_case())
def test_round_trip_within_one_ulp(case):
    """Each entry is rebuilt from itself and its partner block entry (A11<->A22, A12<->A21):
    (a+b)/2 + (a-b)/2 rounds at the scale of max(|a|, |b|), so the bound is eps * (|a| + |b|)."""
    a, _, _ = _tensors(*case)
    back = fairy2i.widely_to_real(*fairy2i.real_to_widely(a))
    partner = torch.roll(a, shifts=(a.shape[0] // 2, a.shape[1] // 2), dims=(0, 1))
    eps = torch.finfo(torch.float64).eps
    assert ((back - a).abs() <= eps * (a.abs() + partner.abs())).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_round_trip_bit_exact(dtype):
    """U/W are computed in float32, where half-precision sums are exact."""
    a = torch.randn(64, 48).to(dtype)
    uw = fairy2i.real_to_widely(a)
    assert all(t.dtype == torch.float32 for t in uw)
    back = fairy2i.widely_to_real(*uw).to(dtype)
    torch.testing.assert_close(back, a, atol=0, rtol=0)


def test_gradients_match_linear_float64():
    torch.manual_seed(1)
    a = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = fairy2i.widely_linear(x, *fairy2i.real_to_widely(a), b)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), gy)
    want = torch.autograd.grad(F.linear(x, a, b), (x, a, b), gy)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-12


def test_gradcheck_ops():
    torch.manual_seed(2)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: fairy2i.real_to_widely(a), (a,))
    uw = [t.detach().requires_grad_() for t in fairy2i.real_to_widely(a)]
    assert torch.autograd.gradcheck(lambda *t: fairy2i.widely_to_real(*t), tuple(uw))
    assert torch.autograd.gradcheck(lambda x, *t: fairy2i.widely_linear(x, *t[:4], t[4]), (x, *uw, b))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_registrations(with_bias):
    """torch.library.opcheck: schema, fake impl, autograd registration and AOT dispatch agree."""
    a = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    uw = [t.detach().requires_grad_() for t in fairy2i.real_to_widely(a)]
    b = torch.randn(6, requires_grad=True) if with_bias else None
    torch.library.opcheck(fairy2i.real_to_widely.default, (a,))
    torch.library.opcheck(fairy2i.widely_to_real.default, tuple(uw))
    torch.library.opcheck(fairy2i.widely_linear.default, (x, *uw, b))


def test_op_input_errors_name_the_shapes():
    with pytest.raises(ValueError, match="even out/in features"):
        fairy2i.real_to_widely(torch.randn(5, 4))
    uw = fairy2i.real_to_widely(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"last dim 2\*m = 6"):
        fairy2i.widely_linear(torch.randn(2, 5), *uw)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        fairy2i.widely_linear(torch.randn(2, 6), *uw, torch.randn(3))
    with pytest.raises(ValueError, match="one shape"):
        fairy2i.widely_to_real(uw[0], uw[1], uw[2], torch.randn(3, 3))
