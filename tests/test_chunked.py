"""Row-chunked quantize + pack (chunked.py) against the whole-matrix quantizer: exact (atol=0)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairy2i_compile import quant_ops
from fairy2i_compile.quantization import quant
from fairy2i_compile.quantization.chunked import chunk_rows_for, pack_layer_chunked, pack_layer_into
from fairy2i_compile.quantization.packing import pack_phase

HYP = settings(max_examples=60, deadline=None, database=None)


def _reference(a, stages, granularity, first_scale=1.0):
    from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely

    u_re, u_im, w_re, w_im = _real_to_widely(a)
    qu = quant.phase_quant(u_re, u_im, stages, granularity, first_scale=first_scale)
    qw = quant.phase_quant(w_re, w_im, stages, granularity, first_scale=first_scale)
    return qu, qw


def _assert_same(packed, qu, qw):
    ref = pack_phase(qu, qw)
    assert torch.equal(packed.codes, ref.codes)
    assert packed.scales.dtype == ref.scales.dtype
    assert torch.equal(packed.scales, ref.scales)
    for got, want in zip(packed.dequantize(), (qu.re, qu.im, qw.re, qw.im)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@st.composite
def layers(draw):
    n = draw(st.integers(1, 12))
    m = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * n, 2 * m, generator=g)
    kind = draw(st.sampled_from(["gauss", "heavy", "ties", "zero_rows"]))
    if kind == "heavy":
        a = a * torch.exp(2 * torch.randn(2 * n, 2 * m, generator=g))
    elif kind == "ties":  # few distinct values: equal |re| and |im| land on the tie rules
        a = torch.randint(-2, 3, (2 * n, 2 * m), generator=g).float()
    elif kind == "zero_rows":
        a[: n // 2] = 0
        a[n : n + n // 2] = 0
    return a


granularities = st.one_of(st.sampled_from(["tensor", "row"]), st.integers(1, 50))


@HYP
@given(a=layers(), granularity=granularities, T=st.integers(1, 4), chunk=st.integers(1, 13))
def test_chunked_equals_whole_matrix(a, granularity, T, chunk):
    packed = pack_layer_chunked(a, T, granularity, chunk_rows=chunk)
    _assert_same(packed, *_reference(a, T, granularity))


@HYP
@given(a=layers(), granularity=granularities, chunk=st.integers(1, 5),
       first=st.sampled_from([0.5, 1.0, 1.75, 3.0]))
def test_chunked_first_scale(a, granularity, chunk, first):
    packed = pack_layer_chunked(a, 3, granularity, chunk_rows=chunk, first_scale=first)
    _assert_same(packed, *_reference(a, 3, granularity, first))


class _RowSink:
    """A CodeSink that keeps each written block apart and checks that a read asks for written rows."""

    def __init__(self):
        self.blocks = {}

    def write(self, plane, j0, words):
        assert (plane, j0) not in self.blocks, "a block of codes written twice"
        self.blocks[plane, j0] = words.clone()

    def read(self, plane, j0, j1):
        words = self.blocks[plane, j0]  # KeyError: read before it was written
        assert words.shape[0] == j1 - j0
        return words

    def codes(self, planes):
        return torch.stack([torch.cat([w for (p, _), w in sorted(self.blocks.items()) if p == q])
                            for q in range(planes)])


@HYP
@given(a=layers(), granularity=granularities, T=st.integers(1, 3), chunk=st.integers(1, 5))
def test_pack_into_a_sink_equals_pack_layer_chunked(a, granularity, T, chunk):
    # the codes go to the sink (convert.py: the output file) and per-tensor stages read them back
    sink = _RowSink()
    scales = pack_layer_into(sink, a, T, granularity, chunk_rows=chunk)
    want = pack_layer_chunked(a, T, granularity, chunk_rows=chunk)
    assert torch.equal(sink.codes(2 * T), want.codes)
    assert torch.equal(scales, want.scales)


@pytest.mark.parametrize("granularity", ["tensor", "row", 4096])
def test_wide_rows_one_row_blocks(granularity):
    # rows of 32768+ entries: torch reduces a lone row as a full (thread-split) reduction;
    # quant.row_sums keeps the order of a row inside a taller matrix
    a = torch.randn(6, 2 * 40000, generator=torch.Generator().manual_seed(1))
    for chunk in (1, 2):
        _assert_same(pack_layer_chunked(a, 2, granularity, chunk_rows=chunk), *_reference(a, 2, granularity))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    a = torch.randn(40, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    for granularity in ("tensor", 5):
        packed = pack_layer_chunked(a, 2, granularity, chunk_rows=3)
        _assert_same(packed, *_reference(a, 2, granularity))
        assert packed.scales.dtype == quant.compute_dtype(dtype)


def test_transposed_weight_and_reader():
    a = torch.randn(30, 20, generator=torch.Generator().manual_seed(3)).t()  # non-contiguous [20, 30]
    ref = _reference(a, 2, "tensor")
    _assert_same(pack_layer_chunked(a, 2, "tensor", chunk_rows=4), *ref)
    calls = []

    def reader(r0, r1):
        calls.append((r0, r1))
        return a[r0:r1].clone()

    _assert_same(pack_layer_chunked(reader, 2, "tensor", shape=(20, 30), dtype=a.dtype, chunk_rows=4), *ref)
    assert max(r1 - r0 for r0, r1 in calls) == 4  # never more than one block of rows read at once


def test_pack_layer_is_chunked_and_exact():
    a = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    _assert_same(quant_ops.pack_layer(a, 2, "row"), *_reference(a, 2, "row"))


def test_chunk_rows_for():
    assert chunk_rows_for(10, 3, chunk_elements=7) == 2
    assert chunk_rows_for(10, 100, chunk_elements=7) == 1
    assert chunk_rows_for(10, 1, chunk_elements=1000) == 10


def test_errors_name_value_and_fix():
    with pytest.raises(ValueError, match="even in/out"):
        pack_layer_chunked(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="shape=.*dtype="):
        pack_layer_chunked(lambda r0, r1: None, 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        pack_layer_chunked(torch.randn(4, 4), 2, chunk_rows=0)
    bad = torch.randn(8, 8)
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="layer.x .*NaN"):
        pack_layer_chunked(bad, 2, name="layer.x", chunk_rows=2)


def test_pack_model_frees_each_dense_weight_as_it_goes(monkeypatch):
    import gc
    import weakref

    from fairy2i_compile.quantization import packed_model

    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    weights = [weakref.ref(m.weight) for m in model]
    alive_at_call = []
    real = quant_ops.pack_layer

    def spy(a, *args, **kwargs):
        gc.collect()
        alive_at_call.append(sum(w() is not None for w in weights))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(packed_model, "pack_layer", spy)
    packed_model.pack_model(model, stages=2)
    # layer k is quantized while the k layers before it are already gone
    assert alive_at_call == [4, 3, 2, 1]


@pytest.mark.parametrize("granularity", ["tensor", "row", 3])
def test_dense_ptq_paths_equal_quantize_widely(granularity):
    from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely

    a = torch.randn(40, 26, generator=torch.Generator().manual_seed(5))
    want = quant.quantize_widely(*_real_to_widely(a), 3, granularity)
    for got, w in zip(quant_ops.phase_quant_reference(a, 3, granularity), want):
        torch.testing.assert_close(got, w, atol=0, rtol=0)
    qu, qw = quant_ops.phase_quant_layer(a, 3, granularity)
    ru, rw = _reference(a, 3, granularity)
    for x, y in ((qu, ru), (qw, rw)):
        for f in ("codes", "s_re", "s_im", "re", "im"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
        assert x.group_size == y.group_size
