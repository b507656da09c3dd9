"""passes/fuse_siblings.py and the op it emits, fairy2i::packed_linear_cpu_multi.

The op: each output is bit-identical (atol = 0) to that layer's packed_linear_cpu call, on every
path (the loop over layers here; the shared lut8 call in a FAIRY2I_CPU_LUT8=1 subprocess), for
mixed shapes, stages, granularities, biases and token counts (Hypothesis), and the Python
implementation equals the C++ one. The pass: counted and dumped, exact, and the negative cases
(one layer on an input, different inputs, an argument defined after a sibling is used, the
switch off, training graphs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from fairy2i_compile import Fairy2iBackend
from fairy2i_compile.compiler.codegen import cpu_packed
from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely
from fairy2i_compile.compiler.ops.packed import packed_linear_cpu_multi_fallback
from fairy2i_compile.compiler.passes import fuse_siblings
from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model
from fairy2i_compile.quantization.packing import pack_widely

from helpers import tiny_llama

needs_cpu_op = pytest.mark.skipif(not cpu_packed.cpu_op_available()[0],
                                  reason=f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE = torch.ops.fairy2i.packed_linear_cpu.default
MULTI = torch.ops.fairy2i.packed_linear_cpu_multi.default


def _layers(in_f, specs, seed=0):
    """[(codes, scales, bias, group_size)] for specs [(out_f, stages, granularity, has_bias)]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for out_f, stages, gran, has_bias in specs:
        pk = pack_widely(*_real_to_widely(torch.randn(out_f, in_f, generator=g)), stages, gran)
        bias = torch.randn(out_f, generator=g) if has_bias else None
        out.append((pk.codes, pk.scales, bias, pk.packed_group_size))
    return out


def _singles(x, layers, m):
    return [SINGLE(x, c, s, b, m, gs) for c, s, b, gs in layers]


def _multi(x, layers, m, op=MULTI):
    c, s, b, gs = zip(*layers)
    return op(x, list(c), list(s), list(b), m, list(gs))


@needs_cpu_op
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 80), tokens=st.sampled_from([1, 2, 5, 9, 70]),
       specs=st.lists(st.tuples(st.integers(1, 70).map(lambda k: 2 * k), st.integers(1, 3),
                                st.sampled_from(["tensor", "row", 16]), st.booleans()), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_multi_equals_each_layer_alone(m, tokens, specs, seed):
    layers = _layers(2 * m, specs, seed)
    x = torch.randn(tokens, 2 * m, generator=torch.Generator().manual_seed(seed))
    want = _singles(x, layers, m)
    for got in (_multi(x, layers, m), _multi(x, layers, m, packed_linear_cpu_multi_fallback)):  # C++, Python
        assert len(got) == len(want)
        for g_, w in zip(got, want):
            torch.testing.assert_close(g_, w, rtol=0, atol=0)


@needs_cpu_op
def test_multi_keeps_leading_dims_and_dtype_and_checks_its_lists():
    layers = _layers(40, [(30, 2, "tensor", True), (10, 1, "row", False)])
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    got = _multi(x, layers, 20)
    assert [tuple(y.shape) for y in got] == [(2, 3, 30), (2, 3, 10)] and all(y.dtype == torch.bfloat16 for y in got)
    for y, w in zip(got, _singles(x, layers, 20)):
        torch.testing.assert_close(y, w, rtol=0, atol=0)
    c, s, b, gs = zip(*layers)
    torch.library.opcheck(MULTI, (torch.randn(3, 40), list(c), list(s), list(b), 20, list(gs)))  # schema, fake
    with pytest.raises((RuntimeError, ValueError), match="one .*entry per layer"):
        MULTI(x, list(c), list(s)[:1], list(b), 20, list(gs))
    with pytest.raises(ValueError, match="one codes, scales, bias and group_size entry per layer"):
        packed_linear_cpu_multi_fallback(x, list(c), list(s), list(b), 20, [0])


# ----------------------------------------------------------------------------- the pass on FX graphs
def _traced(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def test_pattern_fuses_siblings_and_leaves_a_lone_layer_and_other_inputs_alone():
    layers = _layers(16, [(12, 2, "tensor", True), (6, 2, "row", False), (8, 1, "tensor", False)])
    (c0, s0, b0, _), (c1, s1, _, _), (c2, s2, _, _) = layers

    def fn(x, z):
        q = SINGLE(x, c0, s0, b0, 8, 0)
        k = SINGLE(x, c1, s1, None, 8, 0)
        lone = SINGLE(z, c2, s2, None, 8, 0)  # another input: no sibling
        return q.sum(-1, keepdim=True) + k.sum(-1, keepdim=True) + lone

    gm = _traced(fn)
    x, z = torch.randn(3, 16), torch.randn(3, 16)
    want = gm(x, z)
    assert fuse_siblings.fuse_siblings(gm) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(MULTI) == 1 and targets.count(SINGLE) == 1
    torch.testing.assert_close(gm(x, z), want, rtol=0, atol=0)
    assert fuse_siblings.fuse_siblings(gm) == 0  # nothing left to fuse


def test_a_group_whose_argument_follows_a_siblings_use_is_left_alone():
    (c0, s0, _, _), (c1, s1, _, _) = _layers(16, [(16, 1, "tensor", False), (16, 1, "tensor", False)])

    def fn(x):
        q = SINGLE(x, c0, s0, None, 8, 0)
        bias = q[0] * 0.5  # k's bias is computed from q: k cannot move up to where q is made
        return SINGLE(x, c1, s1, bias, 8, 0)

    gm = _traced(fn)
    code = gm.code
    assert fuse_siblings.fuse_siblings(gm) == 0 and gm.code == code


def test_the_switch_turns_the_pass_off(monkeypatch):
    (c0, s0, _, _), (c1, s1, _, _) = _layers(16, [(4, 1, "tensor", False), (4, 1, "tensor", False)])
    gm = _traced(lambda x: SINGLE(x, c0, s0, None, 8, 0) + SINGLE(x, c1, s1, None, 8, 0))
    monkeypatch.setenv("FAIRY2I_CPU_FUSE", "0")
    assert not fuse_siblings.fuse_enabled() and fuse_siblings.fuse_siblings(gm) == 0
    monkeypatch.setenv("FAIRY2I_CPU_FUSE", "1")
    assert fuse_siblings.fuse_siblings(gm) == 2


# ----------------------------------------------------------------------------- the pass in the backend
def _packed_llama():
    model = tiny_llama(layers=1)
    pack_model(model, stages=2, granularity="row", skip=["lm_head"])
    return model.eval()


@needs_cpu_op
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_backend_fuses_qkv_and_gate_up_exactly(tmp_path, monkeypatch, compiler):
    ids = torch.randint(0, 96, (1, 5))
    model = _packed_llama()
    with torch.no_grad():
        monkeypatch.setenv("FAIRY2I_CPU_FUSE", "0")
        torch._dynamo.reset()
        want = torch.compile(model, backend=Fairy2iBackend({"compiler": compiler}))(ids).logits
        monkeypatch.setenv("FAIRY2I_CPU_FUSE", "1")
        torch._dynamo.reset()
        counters.clear()
        backend = Fairy2iBackend({"compiler": compiler, "dump_dir": str(tmp_path)})
        got = torch.compile(model, backend=backend)(ids).logits
    assert backend.reports[0].counters["fused_siblings"] == 5  # (q, k, v) + (gate, up)
    assert counters["fairy2i"]["fused_siblings"] == 5
    after = (tmp_path / "graph_0" / "06_fuse_siblings.py").read_text()
    assert after.count("fairy2i.packed_linear_cpu_multi.default(") == 2
    assert after.count("fairy2i.packed_linear_cpu.default(") == 2  # o_proj, down_proj
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_op
def test_training_graphs_are_not_fused(tmp_path):
    model = _packed_llama().train()
    counters.clear()
    torch._dynamo.reset()
    backend = Fairy2iBackend({"dump_dir": str(tmp_path)})
    torch.compile(model, backend=backend)(torch.randint(0, 96, (1, 5))).logits.sum().backward()
    assert "fused_siblings" not in counters["fairy2i"]
    assert not any("fuse_siblings" in f for f in os.listdir(tmp_path / "graph_0"))


# ----------------------------------------------------------------------------- the lut8 path, shared
_LUT8_SCRIPT = textwrap.dedent("""
    import torch
    from fairy2i_compile.compiler.codegen import cpu_packed
    from fairy2i_compile.compiler.ops import real_to_widely_reference as r2w
    from fairy2i_compile.quantization.packing import pack_widely

    assert cpu_packed.cpu_lut8_status() == "on" and cpu_packed.cpu_op_available()[0]
    torch.set_num_threads(2)
    SINGLE, MULTI = torch.ops.fairy2i.packed_linear_cpu.default, torch.ops.fairy2i.packed_linear_cpu_multi.default
    g = torch.Generator().manual_seed(0)

    def layers(in_f, specs):
        out = []
        for out_f, stages, gran, has_bias in specs:
            pk = pack_widely(*r2w(torch.randn(out_f, in_f, generator=g)), stages, gran)
            out.append((pk.codes, pk.scales, torch.randn(out_f, generator=g) if has_bias else None, pk.packed_group_size))
        return out

    def check(x, ls, m, lut8):
        c, s, b, gs = zip(*ls)
        got = MULTI(x, list(c), list(s), list(b), m, list(gs))
        for y, (ci, si, bi, gi) in zip(got, ls):
            want = cpu_packed.lut8_forward(x, ci, si, bi, m) if lut8 else SINGLE(x, ci, si, bi, m, gi)
            assert torch.equal(y, want) or (not lut8 and torch.allclose(y, want, equal_nan=True, atol=0, rtol=0))
            assert torch.equal(y.nan_to_num(7.0), SINGLE(x, ci, si, bi, m, gi).nan_to_num(7.0))

    for in_f, specs in ((96, [(70, 2, "tensor", True), (30, 2, "row", False), (64, 3, "row", True)]),
                        (150, [(66, 1, "row", False), (200, 2, "row", True)]),
                        (40, [(2, 1, "tensor", False), (8, 3, "tensor", True)])):
        ls = layers(in_f, specs)
        for M in (1, 3, cpu_packed.LUT8_MAX_TOKENS):
            check(torch.randn(M, in_f), ls, in_f // 2, lut8=True)  # all on lut8: one shared call
        check(torch.randn(cpu_packed.LUT8_MAX_TOKENS + 1, in_f), ls, in_f // 2, lut8=False)
    ls = layers(96, [(70, 2, "tensor", False), (30, 2, 16, False)])  # group scales: each layer its own path
    check(torch.randn(2, 96), ls, 48, lut8=False)
    ls = layers(96, [(70, 2, "row", False), (30, 2, "tensor", False)])
    xn = torch.randn(2, 96); xn[1, 7] = float("nan")  # refused by lut8: each layer's fold path
    check(xn, ls, 48, lut8=False)
    print("OK")
""")


@needs_cpu_op
@pytest.mark.skipif(cpu_packed.cpu_lut8_status() not in ("on", "off"),
                    reason=f"the lut8 path is not compiled in here ({cpu_packed.cpu_lut8_status()})")
def test_multi_shares_the_lut8_call_bit_identically():
    env = dict(os.environ, FAIRY2I_CPU_LUT8="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _LUT8_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
