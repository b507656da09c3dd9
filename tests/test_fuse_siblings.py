"""passes/fuse_siblings.py and the ops it emits, fairy2i::packed_linear_cpu_multi.n{k} and
fairy2i::ptq_packed_linear_cpu_multi.n{k}.

The ops: each output is bit-identical (atol = 0) to that layer's packed_linear_cpu (or
ptq_packed_linear_cpu) call, on every path (the loop over layers here; the shared lut8 call in a
FAIRY2I_CPU_LUT8=1 subprocess), for mixed shapes, stages, granularities, biases and token counts
(Hypothesis), and the Python implementation equals the C++ one; an overload called with another
layer count is refused by name; every overload returns plain tensors (what lets Inductor's C++
wrapper call it without Python). The pass: counted and dumped, exact, for packed and PTQ models,
groups larger than MULTI_MAX split, and the negative cases (one layer on an input, different
inputs, an argument defined after a sibling is used, the switch off, training graphs).
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
from fairy2i_compile.compiler.ops.packed import MULTI_MAX, packed_linear_cpu_multi, packed_linear_cpu_multi_fallback
from fairy2i_compile.compiler.ops.ptq_packed import ptq_packed_linear_cpu_multi, ptq_packed_linear_cpu_multi_fallback
from fairy2i_compile.compiler.passes import fuse_siblings
from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model
from fairy2i_compile.quantization.packing import pack_widely

from helpers import tiny_llama

needs_cpu_op = pytest.mark.skipif(not cpu_packed.cpu_op_available()[0],
                                  reason=f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE = torch.ops.fairy2i.packed_linear_cpu.default
PTQ_SINGLE = torch.ops.fairy2i.ptq_packed_linear_cpu.default


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


def _multi(x, layers, m, op=None):
    c, s, b, gs = zip(*layers)
    return (op or packed_linear_cpu_multi(len(layers)))(x, list(c), list(s), list(b), m, list(gs))


@needs_cpu_op
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 80), tokens=st.sampled_from([1, 2, 5, 9, 70]),
       specs=st.lists(st.tuples(st.integers(1, 70).map(lambda k: 2 * k), st.integers(1, 3),
                                st.sampled_from(["tensor", "row", 16]), st.booleans()), min_size=2, max_size=4),
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
    two = packed_linear_cpu_multi(2)
    torch.library.opcheck(two, (torch.randn(3, 40), list(c), list(s), list(b), 20, list(gs)))  # schema, fake
    with pytest.raises((RuntimeError, ValueError), match="one .*entry per layer"):
        two(x, list(c), list(s)[:1], list(b), 20, list(gs))
    with pytest.raises(ValueError, match="one codes, scales, bias and group_size entry for each of its 2 layers"):
        packed_linear_cpu_multi_fallback(x, list(c), list(s), list(b), 20, [0])
    with pytest.raises(RuntimeError, match="returns 3 outputs, but got 2 layers; call the overload n2"):
        packed_linear_cpu_multi(3)(x, list(c), list(s), list(b), 20, list(gs))
    for k in (1, MULTI_MAX + 1):
        with pytest.raises(ValueError, match=f"overloads for 2 .. {MULTI_MAX} layers, not {k}"):
            packed_linear_cpu_multi(k)


def test_every_multi_overload_returns_plain_tensors_for_the_cpp_wrapper():
    """Inductor's C++ wrapper (cpp_wrapper=True) calls a fallback op through the dispatcher when its
    returns are plain tensors, and through a Python callback (~100 us a call) when one is Tensor[]."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    for k in range(2, MULTI_MAX + 1):
        for op in (packed_linear_cpu_multi(k), ptq_packed_linear_cpu_multi(k)):
            assert [str(r.type) for r in op._schema.returns] == ["Tensor"] * k
            assert CppWrapperCpu._compatible_with_cpp_boxed_dispatch(op), op
    assert not CppWrapperCpu._compatible_with_cpp_boxed_dispatch(torch.ops.aten.split.Tensor)  # Tensor[]: Python


def _ptq_layers(in_f, outs, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(o, in_f, generator=g).to(dtype), torch.randn(o, generator=g).to(dtype) if i % 2 else None,
             1000 + 10 * seed + i, stages, gran, f"layer{i}")
            for i, (o, stages, gran) in enumerate(outs)]


def _ptq_multi(x, layers, op=None):
    a, b, slot, stages, gran, name = (list(v) for v in zip(*layers))
    return (op or ptq_packed_linear_cpu_multi(len(layers)))(x, a, b, slot, stages, gran, name)


@needs_cpu_op
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), tokens=st.sampled_from([1, 3, 70]),
       outs=st.lists(st.tuples(st.integers(1, 40).map(lambda k: 2 * k), st.integers(1, 3),
                               st.sampled_from(["tensor", "row", "16"])), min_size=2, max_size=3),
       seed=st.integers(0, 50))
def test_ptq_multi_equals_each_ptq_layer_alone(m, tokens, outs, seed):
    layers = _ptq_layers(2 * m, outs, seed)
    x = torch.randn(tokens, 2 * m, generator=torch.Generator().manual_seed(seed))
    want = [PTQ_SINGLE(x, *layer) for layer in layers]
    cpp = _ptq_multi(x, layers)
    py = _ptq_multi(x, layers, ptq_packed_linear_cpu_multi_fallback)
    for got in (cpp, py):
        assert len(got) == len(want)
        for g_, w in zip(got, want):
            torch.testing.assert_close(g_, w, rtol=0, atol=0)


@needs_cpu_op
def test_ptq_multi_checks_its_lists_and_shapes():
    layers = _ptq_layers(16, [(12, 2, "tensor"), (6, 1, "row")])
    x = torch.randn(2, 16)
    torch.library.opcheck(ptq_packed_linear_cpu_multi(2), (x, *(list(v) for v in zip(*layers))),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="returns 3 outputs, but got 2 layers"):
        _ptq_multi(x, layers, ptq_packed_linear_cpu_multi(3))
    with pytest.raises(RuntimeError, match=r"\(layer1\): every weight must have the in_features of the first, 16"):
        _ptq_multi(x, [layers[0], (torch.randn(6, 8), *layers[1][1:])])
    # like the single op: the fake (compile time) and the Python implementation refuse another dtype
    with pytest.raises(RuntimeError, match="activations are torch.float64 but the layer's weight is torch.float32"):
        _ptq_multi(x.double(), layers, ptq_packed_linear_cpu_multi_fallback)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    a, b, slot, stages, gran, name = (list(v) for v in zip(*layers))
    fake_args = (mode.from_tensor(x.double()), [mode.from_tensor(w) for w in a],
                 [None if v is None else mode.from_tensor(v) for v in b], slot, stages, gran, name)
    with mode, pytest.raises(RuntimeError, match="activations are torch.float64"):
        ptq_packed_linear_cpu_multi(2)(*fake_args)


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
    assert targets.count(packed_linear_cpu_multi(2)) == 1 and targets.count(SINGLE) == 1
    torch.testing.assert_close(gm(x, z), want, rtol=0, atol=0)
    assert fuse_siblings.fuse_siblings(gm) == 0  # nothing left to fuse


def test_groups_larger_than_multi_max_are_split_into_calls_of_at_most_that_many():
    k = MULTI_MAX + 3
    layers = _layers(16, [(4, 1, "tensor", False)] * k)

    def calls(n):
        def fn(x):
            ys = [SINGLE(x, c, s, b, 8, g) for c, s, b, g in layers[:n]]  # every call before any use
            return sum(y.sum(-1) for y in ys)
        return fn

    gm = _traced(calls(k))
    x = torch.randn(3, 16)
    want = gm(x)
    assert fuse_siblings.fuse_siblings(gm) == k
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(packed_linear_cpu_multi(MULTI_MAX)) == 1 and targets.count(packed_linear_cpu_multi(3)) == 1
    assert SINGLE not in targets
    torch.testing.assert_close(gm(x), want, rtol=0, atol=0)
    gm = _traced(calls(MULTI_MAX + 1))
    assert fuse_siblings.fuse_siblings(gm) == MULTI_MAX  # the one left over stays a single call
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(SINGLE) == 1


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
    assert after.count("fairy2i.packed_linear_cpu_multi.n3(") == 1 and after.count("fairy2i.packed_linear_cpu_multi.n2(") == 1
    assert after.count("fairy2i.packed_linear_cpu.default(") == 2  # o_proj, down_proj
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_op
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_backend_fuses_the_ptq_path_of_a_dense_model_exactly(tmp_path, monkeypatch, compiler):
    ids = torch.randint(0, 96, (1, 5))
    model = tiny_llama(layers=1).eval()  # dense weights: ptq_packed_linear_cpu, packed on first use
    options = {"compiler": compiler, "scale_granularity": "row", "skip": ["lm_head"]}
    with torch.no_grad():
        monkeypatch.setenv("FAIRY2I_CPU_FUSE", "0")
        torch._dynamo.reset()
        want = torch.compile(model, backend=Fairy2iBackend(options))(ids).logits
        monkeypatch.setenv("FAIRY2I_CPU_FUSE", "1")
        torch._dynamo.reset()
        backend = Fairy2iBackend({**options, "dump_dir": str(tmp_path)})
        compiled = torch.compile(model, backend=backend)
        got = compiled(ids).logits
        again = compiled(ids).logits  # the C++ kernel's weak-reference cache on the second call
    assert backend.reports[0].counters["fused_siblings"] == 5
    after = (tmp_path / "graph_0" / "06_fuse_siblings.py").read_text()
    assert after.count("fairy2i.ptq_packed_linear_cpu_multi.n3(") == 1
    assert after.count("fairy2i.ptq_packed_linear_cpu_multi.n2(") == 1
    assert after.count("fairy2i.ptq_packed_linear_cpu.default(") == 2  # o_proj, down_proj
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


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
    from fairy2i_compile.compiler.ops.packed import packed_linear_cpu_multi
    SINGLE = torch.ops.fairy2i.packed_linear_cpu.default
    g = torch.Generator().manual_seed(0)

    def layers(in_f, specs):
        out = []
        for out_f, stages, gran, has_bias in specs:
            pk = pack_widely(*r2w(torch.randn(out_f, in_f, generator=g)), stages, gran)
            out.append((pk.codes, pk.scales, torch.randn(out_f, generator=g) if has_bias else None, pk.packed_group_size))
        return out

    def check(x, ls, m, lut8):
        c, s, b, gs = zip(*ls)
        got = packed_linear_cpu_multi(len(ls))(x, list(c), list(s), list(b), m, list(gs))
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
    from fairy2i_compile.compiler.ops.ptq_packed import ptq_packed_linear_cpu_multi
    PTQ = torch.ops.fairy2i.ptq_packed_linear_cpu.default
    ws = [torch.randn(o, 96, generator=g) for o in (70, 30, 64)]
    args = ([None, torch.randn(30, generator=g), None], [900, 901, 902], [2, 2, 1], ["row", "tensor", "row"], ["q", "k", "v"])
    for M in (1, 3):
        x = torch.randn(M, 96, generator=g)
        got = ptq_packed_linear_cpu_multi(3)(x, ws, *args)
        for l, y in enumerate(got):
            assert torch.equal(y, PTQ(x, ws[l], *(v[l] for v in args))), ("ptq", M, l)
    print("OK")
""")


@needs_cpu_op
@pytest.mark.skipif(cpu_packed.cpu_lut8_status() not in ("on", "off"),
                    reason=f"the lut8 path is not compiled in here ({cpu_packed.cpu_lut8_status()})")
def test_multi_shares_the_lut8_call_bit_identically():  # both ops
    env = dict(os.environ, FAIRY2I_CPU_LUT8="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _LUT8_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
