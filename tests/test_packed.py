"""Packed 2-bit weights: format round trips, the packed op's reference and the C++ CPU
kernel against it, the stage-fusion pass (positive and negative), packed PTQ end to end,
storage in report.json, and bad input."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from fairy2i_compile import Fairy2iBackend, Fairy2iConfig, packed_ops, quant_ops
from fairy2i_compile.quantization import quant
from fairy2i_compile.compiler.codegen import cpu_packed, resolve_kernel
from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely, widely_to_real_reference as _widely_to_real
from fairy2i_compile.quantization.packing import (PackedWidely, pack_codes, pack_phase, pack_widely, packed_nbytes,
                                     unpack_codes, words_per_row)
from fairy2i_compile.compiler.passes import PassContext, fuse_stages
from fairy2i_compile.compiler.report import GraphReport

from helpers import tiny_llama

GRANULARITIES = ["tensor", "row", 16, 6]
needs_cpu_kernel = pytest.mark.skipif(not cpu_packed.cpu_kernel_available()[0],
                                      reason=f"C++ CPU kernel unavailable: {cpu_packed.cpu_kernel_available()[1]}")


def packed_layer(out_f, in_f, stages, granularity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    return a, pack_widely(*_real_to_widely(a), stages, granularity)


def args_of(pk: PackedWidely):
    return pk.codes, pk.scales, pk.m, pk.group_size or 0


def fake_quant_weight(a, stages, granularity):
    """A_hat of the fake-quant (QAT) path: the reference every packed path must reproduce."""
    return _widely_to_real(*quant_ops.phase_quant_reference(a, stages, granularity))


def assert_fp32_close(got, want):
    # The kernels sum in another order than the GEMM: each output is a K-term fp32 sum, so
    # its error is a few K * eps * max|term|; 1e-5 relative to the output's scale covers
    # K <= ~100 terms of float32 (eps 1.2e-7) with margin, and nothing looser.
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale))


# ------------------------------------------------------------------ format
@settings(max_examples=30)
@given(P=st.sampled_from([2, 4, 6]), n=st.integers(1, 5), m=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_exact(P, n, m, seed):
    codes = torch.randint(0, 4, (P, n, m), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    words = pack_codes(codes)
    assert words.dtype == torch.int32 and words.shape == (P, n, words_per_row(m)) and words.is_contiguous()
    assert torch.equal(unpack_codes(words, m), codes)
    # padding columns past m hold code 0
    assert torch.equal(unpack_codes(words, 16 * words_per_row(m))[:, :, m:], torch.zeros_like(unpack_codes(words, 16 * words_per_row(m))[:, :, m:]))


def test_worked_example_from_the_docstring():
    u_re, u_im = torch.tensor([[1.0, -0.2]]), torch.tensor([[0.1, 2.0]])
    w_re, w_im = torch.tensor([[-3.0, 0.0]]), torch.tensor([[0.0, -0.5]])
    pk = pack_widely(u_re, u_im, w_re, w_im, 1, "tensor")
    assert pk.codes.tolist() == [[[4]], [[14]]]
    assert pk.scales.tolist() == [[[[1.0]], [[2.0]]], [[[3.0]], [[0.5]]]]


def test_bit_31_codes_round_trip():
    codes = torch.full((2, 1, 16), 3, dtype=torch.uint8)  # every bit set: the word is -1 as int32
    words = pack_codes(codes)
    assert words.item() if words.numel() == 1 else words[0, 0, 0].item() == -1
    assert torch.equal(unpack_codes(words, 16), codes)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_packed_dequantize_is_the_fake_quant_weight_bit_for_bit(stages, granularity):
    a, pk = packed_layer(14, 46, stages, granularity)
    uq = quant_ops.phase_quant_reference(a, stages, granularity)
    for got, want in zip(pk.dequantize(), uq):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(packed_ops.dequantize_packed(*args_of(pk)), fake_quant_weight(a, stages, granularity), atol=0, rtol=0)
    assert pk.nbytes == packed_nbytes(7, 23, stages, granularity)


# ------------------------------------------------------------------ the reference op
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_reference_equals_fake_quant_linear_exactly(granularity):
    a, pk = packed_layer(10, 36, 2, granularity)
    x, b = torch.randn(3, 5, 36), torch.randn(10)
    got = packed_ops.packed_linear(x, *args_of(pk)[:2], b, pk.m, pk.group_size or 0, "torch")
    want = F.linear(x, fake_quant_weight(a, 2, granularity), b)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_op_passes_opcheck_and_gives_x_its_gradient():
    a, pk = packed_layer(6, 10, 2, "row")
    x = torch.randn(4, 10, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.fairy2i.packed_linear.default, (x, pk.codes, pk.scales, b, pk.m, 0, "torch"))
    torch.library.opcheck(torch.ops.fairy2i.packed_linear_infer.default,
                          (x.detach(), pk.codes, pk.scales, b.detach(), pk.m, 0, "auto"))
    torch.library.opcheck(torch.ops.fairy2i.ptq_packed_linear.default, (x, a, b, -1, 2, "row", "w", "torch"))
    y = packed_ops.packed_linear(x, pk.codes, pk.scales, b, pk.m, 0, "torch")
    y.square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x2, fake_quant_weight(a, 2, "row"), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the C++ CPU kernel
@needs_cpu_kernel
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 3, 5, 17, 70])  # fold, fold (3 tokens), tiled dots, tiled dots, blocked GEMM
def test_cpu_kernel_matches_reference(stages, granularity, tokens):
    # ragged on purpose: m = 23 and 40 are not multiples of 16, n = 7 is odd
    for out_f, in_f in ((14, 46), (64, 80)):
        a, pk = packed_layer(out_f, in_f, stages, granularity, seed=stages + tokens)
        x, b = torch.randn(tokens, in_f), torch.randn(out_f)
        for bias in (None, b):
            want = packed_ops.packed_linear_reference(x, *args_of(pk)[:2], bias, pk.m, pk.group_size or 0)
            got = cpu_packed.packed_linear_cpu(x, *args_of(pk)[:2], bias, pk.m, pk.group_size or 0)
            assert_fp32_close(got, want)


@needs_cpu_kernel
@pytest.mark.parametrize("granularity", ["row", 16, 32, 48, 8, 24])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
def test_cpu_fold_path_with_row_and_group_scales(granularity, tokens):
    """Decode-sized batches with per-row scales or groups of whole code words (16, 32, 48) take
    the fold path with per-output scales; groups of 8 / 24 columns take the decode path. m = 75:
    5 code words, the last group partial."""
    for stages in (1, 2, 3):
        a, pk = packed_layer(18, 150, stages, granularity, seed=stages + tokens)
        x, b = torch.randn(tokens, 150), torch.randn(18)
        for bias in (None, b):
            want = packed_ops.packed_linear_reference(x, *args_of(pk)[:2], bias, pk.m, pk.group_size or 0)
            got = cpu_packed.packed_linear_cpu(x, *args_of(pk)[:2], bias, pk.m, pk.group_size or 0)
            assert_fp32_close(got, want)


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_kernel_splits_rows_over_threads(threads):
    """Each path (fold/select, the LUT, decode, blocked GEMM) with its rows split over 2 and 3
    OpenMP threads gives the reference's output: the suite's workers run with one thread each
    (conftest), so the partition is checked here on purpose, at row counts that leave every
    thread a ragged share."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for granularity in ("tensor", "row", 16):
            for out_f, in_f in ((200, 80), (130, 150)):
                a, pk = packed_layer(out_f, in_f, 2, granularity, seed=threads)
                for tokens in (1, 3, 17, 70):
                    x, b = torch.randn(tokens, in_f), torch.randn(out_f)
                    want = packed_ops.packed_linear_reference(x, *args_of(pk)[:2], b, pk.m, pk.group_size or 0)
                    got = cpu_packed.packed_linear_cpu(x, *args_of(pk)[:2], b, pk.m, pk.group_size or 0)
                    assert_fp32_close(got, want)
    finally:
        torch.set_num_threads(before)


needs_lut = pytest.mark.skipif(cpu_packed.cpu_lut_status() not in ("lut", "off"),
                               reason=f"the LUT path is not compiled in here ({cpu_packed.cpu_lut_status()})")


@needs_lut
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 16])
def test_cpu_lut_path_matches_reference_and_select_path(stages, tokens):
    """The table-lookup fold path against the torch reference and the select path, forced each
    way: row counts around its 16-row lanes and 64-row register blocks (1, 7, 16, 17, 48, 65, 100
    complex rows), widths with a partial last code word (m = 1, 23, 40, 75), bias or none."""
    for out_f, in_f in ((2, 2), (14, 46), (32, 80), (34, 150), (96, 32), (130, 46), (200, 80)):
        a, pk = packed_layer(out_f, in_f, stages, "tensor", seed=stages * 10 + tokens)
        x, b = torch.randn(tokens, in_f), torch.randn(out_f)
        for bias in (None, b):
            want = packed_ops.packed_linear_reference(x, pk.codes, pk.scales, bias, pk.m, 0)
            lut = cpu_packed.fold_path_forward(x, pk.codes, pk.scales, bias, pk.m, "lut")
            assert_fp32_close(lut, want)
            assert_fp32_close(lut, cpu_packed.fold_path_forward(x, pk.codes, pk.scales, bias, pk.m, "select"))


@needs_lut
@settings(max_examples=25)
@given(n=st.integers(1, 90), m=st.integers(1, 70), tokens=st.integers(1, 16), stages=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_cpu_lut_path_property_random_shapes(n, m, tokens, stages, seed):
    a, pk = packed_layer(2 * n, 2 * m, stages, "tensor", seed=seed)
    x = torch.randn(tokens, 2 * m, generator=torch.Generator().manual_seed(seed))
    want = packed_ops.packed_linear_reference(x, pk.codes, pk.scales, None, pk.m, 0)
    assert_fp32_close(cpu_packed.fold_path_forward(x, pk.codes, pk.scales, None, pk.m, "lut"), want)


def test_fold_path_forward_rejects_bad_input():
    a, pk = packed_layer(8, 10, 2, "tensor")
    with pytest.raises(ValueError, match=r"path='gather'; use one of \['auto', 'lut', 'select'\]"):
        cpu_packed.fold_path_forward(torch.randn(1, 10), pk.codes, pk.scales, None, pk.m, "gather")
    if cpu_packed.cpu_kernel_available()[0]:
        with pytest.raises(ValueError, match=r"x must be contiguous float32 \[M >= 1, 2m = 10\], got torch.float64"):
            cpu_packed.fold_path_forward(torch.randn(1, 10, dtype=torch.float64), pk.codes, pk.scales, None, pk.m, "select")
        _, rows = packed_layer(8, 10, 2, "row")
        with pytest.raises(ValueError, match="tensor scales only"):
            cpu_packed.fold_path_forward(torch.randn(1, 10), rows.codes, rows.scales, None, rows.m, "select")


@needs_cpu_kernel
def test_models_run_the_path_cpu_lut_status_names():
    """cpu_forward (what packed layers run) equals the forced path that cpu_lut_status reports."""
    a, pk = packed_layer(40, 64, 2, "tensor", seed=3)
    x = torch.randn(1, 64)
    lut = cpu_packed.cpu_lut_status() == "lut"
    torch.testing.assert_close(cpu_packed.cpu_forward(x, pk.codes, pk.scales, None, pk.m, 0),
                               cpu_packed.fold_path_forward(x, pk.codes, pk.scales, None, pk.m, "lut" if lut else "select"),
                               atol=0, rtol=0)
    # past the select path's FOLD_MAX_TOKENS, up to LUT_MAX_TOKENS: the LUT path, or the decode path without it
    x = torch.randn(cpu_packed.LUT_MAX_TOKENS, 64)
    got = cpu_packed.cpu_forward(x, pk.codes, pk.scales, None, pk.m, 0)
    if lut:
        torch.testing.assert_close(got, cpu_packed.fold_path_forward(x, pk.codes, pk.scales, None, pk.m, "lut"),
                                   atol=0, rtol=0)
    assert_fp32_close(got, packed_ops.packed_linear_reference(x, pk.codes, pk.scales, None, pk.m, 0))


@needs_cpu_kernel
@settings(max_examples=15)
@given(n=st.integers(1, 20), m=st.integers(1, 50), tokens=st.integers(1, 9), stages=st.integers(1, 3),
       granularity=st.sampled_from(["tensor", "row", 1, 5, 8, 16, 64]), seed=st.integers(0, 2**31))
def test_cpu_kernel_property_random_shapes(n, m, tokens, stages, granularity, seed):
    a, pk = packed_layer(2 * n, 2 * m, stages, granularity, seed=seed)
    x = torch.randn(tokens, 2 * m, generator=torch.Generator().manual_seed(seed))
    want = packed_ops.packed_linear_reference(x, pk.codes, pk.scales, None, pk.m, pk.group_size or 0)
    got = cpu_packed.packed_linear_cpu(x, pk.codes, pk.scales, None, pk.m, pk.group_size or 0)
    assert_fp32_close(got, want)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_kernel_half_activations(dtype, tol):
    # the kernel computes in float32 and rounds once; compare with the float32 reference
    # rounded to `dtype` (tolerance: a few ulps of the output dtype, relative to its scale)
    a, pk = packed_layer(32, 48, 2, "tensor")
    x = torch.randn(2, 3, 48).to(dtype)
    got = packed_ops.packed_linear(x, pk.codes, pk.scales, None, pk.m, 0, "cpu")
    want = packed_ops.packed_linear_reference(x.float(), pk.codes, pk.scales, None, pk.m, 0)
    assert got.dtype == dtype and got.shape == (2, 3, 32)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))


@needs_cpu_kernel
def test_cpu_kernel_empty_batch_and_leading_dims():
    a, pk = packed_layer(8, 16, 1, "tensor")
    assert packed_ops.packed_linear(torch.randn(0, 16), pk.codes, pk.scales, None, 8, 0, "cpu").shape == (0, 8)
    x = torch.randn(2, 2, 3, 16)
    assert_fp32_close(packed_ops.packed_linear(x, pk.codes, pk.scales, None, 8, 0, "cpu"),
                      packed_ops.packed_linear_reference(x, pk.codes, pk.scales, None, 8, 0))


def test_auto_picks_the_cpu_kernel_or_the_reference():
    want = "cpu" if cpu_packed.cpu_kernel_available()[0] else "torch"
    assert resolve_kernel("auto", torch.device("cpu")) == want
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"


# ------------------------------------------------------------------ bad input
def test_bad_input_clear_errors(monkeypatch):
    a, pk = packed_layer(8, 32, 2, "tensor")
    c, s = pk.codes, pk.scales
    op = packed_ops.packed_linear
    with pytest.raises(ValueError, match="last dim 2\\*m = 32"):
        op(torch.randn(2, 30), c, s, None, 16, 0, "torch")
    with pytest.raises(TypeError, match="int32"):
        op(torch.randn(2, 32), c.to(torch.int64), s, None, 16, 0, "torch")
    with pytest.raises(ValueError, match="packed scales must be"):
        op(torch.randn(2, 32), c, s.reshape(4, 2, 1, 1).expand(4, 2, 3, 1).contiguous(), None, 16, 0, "torch")
    with pytest.raises(ValueError, match="m in 1..16"):
        op(torch.randn(2, 40), c, s, None, 20, 0, "torch")
    with pytest.raises(TypeError, match="bias dtype"):
        op(torch.randn(2, 32), c, s, torch.zeros(8, dtype=torch.float64), 16, 0, "torch")
    with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
        op(torch.randn(2, 32), c, s, torch.zeros(7), 16, 0, "torch")
    with pytest.raises(TypeError, match="activations must be one of"):
        op(torch.randn(2, 32, dtype=torch.float64), c, s, None, 16, 0, "torch")
    with pytest.raises(ValueError, match="different devices|activations on meta"):
        op(torch.randn(2, 32, device="meta"), c, s, None, 16, 0, "torch")
    with pytest.raises(ValueError, match="kernel must be one of"):
        op(torch.randn(2, 32), c, s, None, 16, 0, "cuda")
    with pytest.raises(ValueError, match="call x.contiguous\\(\\)"):
        cpu_packed.packed_linear_cpu(torch.randn(32, 2).t(), c, s, None, 16, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        op(torch.randn(2, 32), c, s, None, 16, 0, "triton")


def test_pack_codes_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must be in 0..3"):
        pack_codes(torch.full((2, 1, 3), 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 codes"):
        pack_codes(torch.zeros(2, 1, 3, dtype=torch.int32))


# ------------------------------------------------------------------ the fuse_stages pass
def compiled(model, **options):
    backend = Fairy2iBackend(options)
    return torch.compile(model, backend=backend), backend


def small_llama(seed=0):
    """Wide enough that per-layer scales are a small share of the bytes (the paper's regime)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_packed_ptq_equals_fake_quant_end_to_end(kernel):
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 10))
    ptq, backend = compiled(model, mode="ptq", stages=2, kernel=kernel)
    qat, _ = compiled(model, mode="qat", stages=2)
    counters.clear()
    with torch.no_grad():
        got = ptq(ids).logits
    want = qat(ids).logits.detach()
    rep = backend.reports[0]
    assert rep.counters["fuse_stages_fused"] == 15 and rep.counters["phase_quant_ptq"] == 15
    if kernel == "torch":  # same arithmetic in the same order as the fake-quant path
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:
        assert_fp32_close(got, want)
    assert counters["fairy2i"]["ptq_quantize"] == 0  # packed once, at compile time


def test_fused_graph_and_negative_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRY2I_MLIR", "0")  # the graphs are what this test reads (MLIR: test_dump.py)
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    _, backend = compiled(model, mode="ptq", dump_dir=str(tmp_path / "ptq"))
    with torch.no_grad():
        _(ids)
    fused = (tmp_path / "ptq" / "graph_0" / "03_fuse_stages.py").read_text()
    assert fused.count("torch.ops.fairy2i.ptq_packed_linear.default") == 15
    assert "ptq_phase_quant" not in fused and "widely_linear.default" not in fused
    assert "ptq_packed_linear" in (tmp_path / "ptq" / "graph_0" / "04_aot_inference.py").read_text()
    # negative: QAT (weights change every step) and exact mode are never fused
    for mode in ("qat", "exact"):
        torch._dynamo.reset()
        c, b = compiled(model, mode=mode, dump_dir=str(tmp_path / mode))
        c(ids)
        assert "fuse_stages_fused" not in b.reports[0].counters
        assert not (tmp_path / mode / "graph_0" / "03_fuse_stages.py").exists()
        aot = next((tmp_path / mode / "graph_0").glob("*_aot_forward.py")).read_text()
        assert "packed_linear" not in aot


def _ptq_pattern_graph(extra_user: bool):
    """x, A -> ptq_phase_quant -> 4 getitems -> widely_linear [-> + an extra use of q[0]]."""
    g = fx.Graph()
    x, a = g.placeholder("x"), g.placeholder("a")
    q = g.call_function(torch.ops.fairy2i.ptq_phase_quant.default, (a, -1, 2, "tensor", "w"))
    items = [g.call_function(operator.getitem, (q, i)) for i in range(4)]
    y = g.call_function(torch.ops.fairy2i.widely_linear.default, (x, *items, None))
    out = (y, g.call_function(torch.mul, (items[0], 2.0))) if extra_user else (y,)
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("extra_user, fused", [(False, 1), (True, 0)])
def test_fuse_pattern_requires_sole_use_of_the_dense_weights(extra_user, fused):
    gm = _ptq_pattern_graph(extra_user)
    ctx = PassContext(config=Fairy2iConfig(mode="ptq"), report=GraphReport(graph=0), fake_mode=None)
    fuse_stages.run(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    assert ctx.report.counters.get("fuse_stages_fused", 0) == fused
    targets = [n.target for n in gm.graph.nodes]
    assert (torch.ops.fairy2i.ptq_packed_linear.default in targets) == bool(fused)
    x, a = torch.randn(3, 8), torch.randn(6, 8)
    want = F.linear(x, fake_quant_weight(a, 2, "tensor"))
    torch.testing.assert_close(gm(x, a)[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stages, min_ratio", [(2, 7.5), (1, 15.0)])
def test_report_packed_bytes_vs_bf16(tmp_path, monkeypatch, stages, min_ratio):
    import json

    monkeypatch.setenv("FAIRY2I_MLIR", "0")
    model = small_llama()
    c, _ = compiled(model, mode="ptq", stages=stages, dump_dir=str(tmp_path))
    with torch.no_grad():
        c(torch.randint(0, 256, (1, 8)))
    layers = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert len(layers) == 15 and all(r["action"] == "quantized" and r["packed"] for r in layers)
    for r in layers:
        out_f, in_f = r["shape"]
        ratio = 2 * out_f * in_f / r["bytes_after"]
        assert r["bytes_after"] == packed_nbytes(out_f // 2, in_f // 2, stages, "tensor")
        assert ratio >= min_ratio, (r["name"], ratio)
        assert r["dense_cache_bytes"] == 0


class GraphKeepingBackend(Fairy2iBackend):
    """Fairy2iBackend that keeps the rewritten Dynamo graphs (the passes edit them in place)."""

    def __call__(self, gm, example_inputs):
        out = super().__call__(gm, example_inputs)
        self.graphs = getattr(self, "graphs", []) + [gm]
        return out


def test_ptq_cache_holds_packed_codes_only_and_repacks_after_an_update():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    backend = GraphKeepingBackend({"mode": "ptq", "stages": 2})
    c = torch.compile(model, backend=backend)
    with torch.no_grad():
        before = c(ids).logits
    slots = [n.args[3] for n in backend.graphs[0].graph.nodes
             if n.target is torch.ops.fairy2i.ptq_packed_linear.default]
    assert len(slots) == 15
    values = [quant_ops.cached_ptq_value(s) for s in slots]
    assert all(isinstance(v, PackedWidely) for v in values)  # no dense copy anywhere
    assert sum(v.nbytes for v in values) == sum(r.bytes_after for r in backend.reports[0].layers)
    counters.clear()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
        after = c(ids).logits
    assert counters["fairy2i"]["ptq_quantize"] == 1  # only the updated layer is packed again
    assert isinstance(quant_ops.cached_ptq_value(slots[6]), PackedWidely)
    assert not torch.equal(before, after)


# ------------------------------------------------------------------ packed models (no dense weights)
def test_pack_model_replaces_linears_and_matches_compiled_ptq():
    from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model

    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 7))
    ptq, _ = compiled(model, mode="ptq", stages=2, kernel="torch")
    with torch.no_grad():
        want = ptq(ids).logits
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"skip pattern\(s\) \['nothing_matches'\] matched no nn.Linear"):
        report = pack_model(model, stages=2, kernel="torch", skip=["nothing_matches"])
    assert len(report.packed) == 15 and not report.kept_real
    assert report.unmatched_skip_patterns == ["nothing_matches"]
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(eager, want, atol=0, rtol=0)  # same codes, same reference arithmetic
    backend = Fairy2iBackend({"mode": "ptq", "kernel": "auto"})
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids).logits
    assert_fp32_close(got, want)
    rep = backend.reports[0]
    assert rep.counters["fuse_stages_prepacked"] == 15 and "phase_quant_ptq" not in rep.counters
    assert all(r.action == "packed" and r.extra["kernel"] == "auto" for r in rep.layers)


def test_pack_model_keeps_odd_and_skipped_layers_real():
    from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3), torch.nn.Linear(3, 4))
    report = pack_model(model, stages=1, skip=["0"])
    assert report.kept_real == {"0": "matches skip pattern '0'", "2": "odd dims: out_features=3, in_features=6; "
                                "pairing by halves needs both even", "3": "odd dims: out_features=4, in_features=3; "
                                "pairing by halves needs both even"}
    assert not report.packed and not isinstance(model[0], PackedLinear)
    with pytest.raises(ValueError, match="even in/out features"):
        PackedLinear(3, 4)
    with pytest.raises(ValueError, match="option 'stages'"):
        pack_model(model, stages=7)


# ------------------------------------------------------------------ lowering for the eager runner, kernel dumps
@needs_cpu_kernel
@pytest.mark.parametrize("cpu_op", [True, False], ids=["cpp_op", "direct"])
def test_eager_runner_lowers_the_ptq_op_and_dumps_its_source(cpu_op, tmp_path, monkeypatch):
    """The stage-fused PTQ op on CPU becomes ptq_packed_linear_cpu (C++ op registration), or,
    where that library is unavailable, a direct call of the kernel through ctypes."""
    import json

    if cpu_op and not cpu_packed.cpu_op_available()[0]:
        pytest.skip(f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")
    if not cpu_op:
        monkeypatch.setattr(cpu_packed, "cpu_op_available", lambda: (False, "disabled by the test"))
    monkeypatch.setenv("FAIRY2I_MLIR", "0")
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    c, backend = compiled(model, mode="ptq", dump_dir=str(tmp_path))
    ref, ref_backend = compiled(model, mode="ptq", kernel="torch")
    with torch.no_grad():
        got = c(ids).logits
        want = ref(ids).logits
    counters_ = backend.reports[0].counters
    assert counters_["lowered_cpu_op" if cpu_op else "lowered_cpu_direct"] == 15
    assert ("lowered_cpu_direct" if cpu_op else "lowered_cpu_op") not in counters_
    # the reference keeps the op, in its no-autograd inference form
    assert "lowered_cpu_direct" not in ref_backend.reports[0].counters
    assert ref_backend.reports[0].counters["lowered_infer"] == 15
    assert_fp32_close(got, want)
    # the dumped inference graph still shows the op (what is computed), the kernel source sits beside it
    assert "fairy2i.ptq_packed_linear" in (tmp_path / "graph_0" / "04_aot_inference.py").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    kernels = report["graphs"][0]["kernels"]
    if cpu_op:
        assert "kernels/cpu_packed_op.cpp" in kernels
        assert (tmp_path / "kernels" / "cpu_packed_op.cpp").read_text() == cpu_packed.OP_SOURCE.read_text()
    else:
        assert kernels == ["kernels/cpu_packed.cpp"]
        assert (tmp_path / "kernels" / "cpu_packed.cpp").read_text() == cpu_packed.SOURCE.read_text()
    assert kernels[-1] in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------ the C++ op registration (packed_linear_cpu)
needs_cpu_op = pytest.mark.skipif(not cpu_packed.cpu_op_available()[0],
                                  reason=f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")


@needs_cpu_op
@pytest.mark.parametrize("granularity", ["tensor", "row", 6])
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 70])  # fold, tiled dots, blocked GEMM (at::mm)
def test_cpu_op_matches_reference_and_the_ctypes_path(stages, granularity, tokens):
    for out_f, in_f in ((14, 46), (64, 80)):
        a, pk = packed_layer(out_f, in_f, stages, granularity, seed=stages + tokens)
        x, b = torch.randn(2, tokens, in_f), torch.randn(out_f)
        for bias in (None, b):
            args = (pk.codes, pk.scales, bias, pk.m, pk.group_size or 0)
            got = torch.ops.fairy2i.packed_linear_cpu.default(x, *args)
            assert_fp32_close(got, packed_ops.packed_linear_reference(x, *args))
            # the same C++ kernel behind ctypes: the same numbers, bit for bit
            torch.testing.assert_close(got, cpu_packed.cpu_forward(x, *args), atol=0, rtol=0)
    x16 = torch.randn(3, 80).to(torch.bfloat16)
    got16 = torch.ops.fairy2i.packed_linear_cpu.default(x16, pk.codes, pk.scales, None, pk.m, pk.group_size or 0)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, cpu_packed.cpu_forward(x16, pk.codes, pk.scales, None, pk.m, pk.group_size or 0),
                               atol=0, rtol=0)


@needs_cpu_op
def test_cpu_op_passes_opcheck_and_rejects_bad_input():
    a, pk = packed_layer(6, 10, 2, "row")
    x, b = torch.randn(4, 10), torch.randn(6)
    torch.library.opcheck(torch.ops.fairy2i.packed_linear_cpu.default, (x, pk.codes, pk.scales, b, pk.m, 0))
    with pytest.raises(RuntimeError, match=r"last dim 2\*m = 10"):
        torch.ops.fairy2i.packed_linear_cpu.default(torch.randn(4, 12), pk.codes, pk.scales, b, pk.m, 0)
    with pytest.raises(RuntimeError, match="codes must be int32"):
        torch.ops.fairy2i.packed_linear_cpu.default(x, pk.codes.long(), pk.scales, b, pk.m, 0)
    # the Python implementation (used until or unless the C++ one loads) is the same kernel
    torch.testing.assert_close(packed_ops.packed_linear_cpu_fallback(x, pk.codes, pk.scales, b, pk.m, 0),
                               torch.ops.fairy2i.packed_linear_cpu.default(x, pk.codes, pk.scales, b, pk.m, 0),
                               atol=0, rtol=0)


def _packed_mlp():
    from fairy2i_compile.quantization.packed_model import pack_model

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32, bias=False))
    pack_model(model, stages=2)
    return model


@needs_cpu_op
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_packed_model_calls_the_cpu_op(compiler, tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRY2I_MLIR", "0")
    model, x = _packed_mlp(), torch.randn(3, 32)
    with torch.no_grad():
        want = model(x)  # PackedLinear eagerly: the autograd-capable op
        backend = Fairy2iBackend({"mode": "ptq", "compiler": compiler, "dump_dir": str(tmp_path)})
        got = torch.compile(model, backend=backend)(x)
    counters_ = backend.reports[0].counters
    assert counters_["lowered_cpu_op"] == 2 and "lowered_cpu_direct" not in counters_
    assert_fp32_close(got, want)
    assert (tmp_path / "kernels" / "cpu_packed_op.cpp").read_text() == cpu_packed.OP_SOURCE.read_text()
    # compiled again on warm caches: the backend's lowering still runs and reports (Inductor's
    # AOTAutograd cache would otherwise return the graph without calling it)
    torch._dynamo.reset()
    again = Fairy2iBackend({"mode": "ptq", "compiler": compiler})
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=again)(x), got, atol=0, rtol=0)
    assert again.reports[0].counters == counters_


@needs_cpu_op
def test_eager_packed_linear_takes_the_cpu_op_only_for_inference():
    from torch.utils._python_dispatch import TorchDispatchMode

    from fairy2i_compile import PackedLinear

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    lin = torch.nn.Linear(48, 32)
    layer = PackedLinear.from_linear(lin, 2, "row", "auto", "layer")
    x = torch.randn(3, 48)
    with torch.no_grad(), Record() as rec:
        fast = layer(x)
    assert "fairy2i.packed_linear_cpu.default" in rec.ops and "fairy2i.packed_linear.default" not in rec.ops
    xg = x.clone().requires_grad_(True)
    with Record() as rec:
        slow = layer(xg)
    assert "fairy2i.packed_linear.default" in rec.ops  # gradients: the autograd-capable op
    slow.sum().backward()
    assert xg.grad is not None and layer.bias.grad is not None
    torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)  # the same C++ kernel
    torch_layer = PackedLinear.from_linear(lin, 2, "row", "torch", "layer")
    with torch.no_grad(), Record() as rec:
        ref = torch_layer(x)
    assert "fairy2i.packed_linear.default" in rec.ops  # kernel="torch" keeps the reference
    assert_fp32_close(fast, ref)


@needs_cpu_op
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_ptq_cpu_op_skips_python_until_the_weight_changes(compiler):
    """Compiled dense model, mode='ptq': ptq_packed_linear_cpu runs from its C++ per-slot key
    (no Python cache lookups), repacks through the PTQ cache after an in-place update, and
    holds the cache's codes weakly (freed with the parameter)."""
    import gc
    import weakref

    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    backend = GraphKeepingBackend({"mode": "ptq", "stages": 2, "compiler": compiler})
    c = torch.compile(model, backend=backend)
    qat = torch.compile(model, backend=Fairy2iBackend({"mode": "qat", "stages": 2}))
    with torch.no_grad():
        c(ids)  # first call: the C++ side asks Python once per layer
        counters.clear()
        got = c(ids).logits
        c(ids)
    assert backend.reports[0].counters["lowered_cpu_op"] == 15
    assert counters["fairy2i"]["ptq_cache_hit"] == 0 and counters["fairy2i"]["ptq_quantize"] == 0
    assert_fp32_close(got, qat(ids).logits.detach())

    w = model.model.layers[1].self_attn.o_proj.weight
    with torch.no_grad():
        w.mul_(-2.0)  # in place: bumps _version
        got = c(ids).logits
        c(ids)
    assert counters["fairy2i"]["ptq_quantize"] == 1  # the changed layer only; the others never left C++
    assert counters["fairy2i"]["ptq_cache_hit"] == 0
    assert_fp32_close(got, qat(ids).logits.detach())

    slots = [n.args[3] for g in backend.graphs for n in g.graph.nodes
             if n.target is torch.ops.fairy2i.ptq_packed_linear.default]
    codes = [weakref.ref(quant_ops.cached_ptq_value(s).codes) for s in slots]
    del model, c, qat, backend, w, got
    gc.collect()
    assert all(r() is None for r in codes)  # the C++ side kept no reference


@needs_cpu_op
def test_ptq_cpu_op_rejects_mismatched_activations():
    a = torch.randn(8, 12)
    with pytest.raises(RuntimeError, match=r"ptq_packed_linear_cpu \(layers.0.q\): activations \[2, 10\] do not "
                                           r"match the weight \[8, 12\]"):
        torch.ops.fairy2i.ptq_packed_linear_cpu(torch.randn(2, 10), a, None, -1, 2, "tensor", "layers.0.q")
    x = torch.randn(2, 12)
    y = torch.ops.fairy2i.ptq_packed_linear_cpu(x, a, None, -1, 2, "tensor", "layers.0.q")  # slot -1: no cache
    pk = quant_ops.pack_layer(a, 2, "tensor", "layers.0.q")
    assert_fp32_close(y, packed_ops.packed_linear_reference(x, pk.codes, pk.scales, None, pk.m, 0))


@needs_cpu_kernel
def test_cpu_op_build_failure_warns_and_falls_back(monkeypatch):
    def no_headers(cache_dir=None):
        raise RuntimeError("building cpu_packed_op.cpp failed: torch/library.h: No such file")

    monkeypatch.setattr(cpu_packed, "_OP_PATH", None)
    monkeypatch.setattr(cpu_packed, "_OP_ERROR", None)
    monkeypatch.setattr(cpu_packed, "build_cpu_op", no_headers)
    model, x = _packed_mlp(), torch.randn(3, 32)
    backend = Fairy2iBackend({"mode": "ptq"})
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="torch/library.h: No such file.*FAIRY2I_CPU_OP=0"):
        got = torch.compile(model, backend=backend)(x)
    counters_ = backend.reports[0].counters
    assert "lowered_cpu_op" not in counters_ and counters_["lowered_cpu_direct"] == 2
    with torch.no_grad():
        assert_fp32_close(got, model(x))
    assert cpu_packed.cpu_op_available() == (False, "building cpu_packed_op.cpp failed: torch/library.h: No such file")


def test_training_graphs_keep_the_packed_op():
    # grad mode: AOT builds forward/backward graphs, which must keep the op (its backward formula)
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    c, backend = compiled(model, mode="ptq")
    out = c(ids, labels=ids)
    out.loss.backward()
    counters_ = backend.reports[0].counters
    assert "lowered_cpu_direct" not in counters_ and "lowered_infer" not in counters_
    assert model.model.norm.weight.grad is not None


# ------------------------------------------------------------------ the Inductor decomposition (kernel="inductor")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_decomposition_matches_reference(stages, granularity):
    from fairy2i_compile.compiler.codegen.inductor_packed import packed_linear_decomposed

    a, pk = packed_layer(14, 46, stages, granularity, seed=stages)
    for tokens in (1, 4):
        x, b = torch.randn(2, tokens, 46)[0], torch.randn(14)
        want = packed_ops.packed_linear_reference(x, *args_of(pk)[:2], b, pk.m, pk.group_size or 0)
        got = packed_linear_decomposed(x, *args_of(pk)[:2], b, pk.m, pk.group_size or 0)
        assert_fp32_close(got, want)


def test_decompose_pass_takes_decode_batches_only():
    from fairy2i_compile.quantization.packed_model import pack_model

    model = tiny_llama()
    pack_model(model, stages=2)
    for kernel, tokens, decomposed in (("inductor", 1, 15), ("inductor", 6, 0), ("cpu", 1, 0)):
        torch._dynamo.reset()
        backend = Fairy2iBackend({"kernel": kernel})
        ids = torch.randint(0, 96, (1, tokens))
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(ids).logits
            want = model(ids).logits
        assert backend.reports[0].counters.get("decompose_packed_decomposed", 0) == decomposed
        assert_fp32_close(got, want)


def test_decomposed_layer_through_inductor():
    from fairy2i_compile.quantization.packed_model import PackedLinear

    layer = PackedLinear.from_linear(torch.nn.Linear(64, 32), stages=2, granularity=16)
    x = torch.randn(1, 64)
    backend = Fairy2iBackend({"kernel": "inductor", "compiler": "inductor"})
    with torch.no_grad():
        got = torch.compile(layer, backend=backend)(x)
        want = packed_ops.packed_linear_reference(x, layer.codes, layer.scales, layer.bias, 32, 16)
    assert backend.reports[0].counters["decompose_packed_decomposed"] == 1
    assert_fp32_close(got, want)
