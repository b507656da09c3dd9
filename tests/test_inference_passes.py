"""The passes over AOTAutograd's inference graph (passes.INFERENCE_PIPELINE): lower_cpu_op,
fuse_siblings (its own tests: test_fuse_siblings.py), lower_cpu_direct, lower_infer. Each is an ordinary pass: run by the backend in table order,
counted in the report and in torch's counters, dumped; and each leaves alone what it must not
rewrite (negative tests). Exact outputs (atol = 0) where a pass only changes which function
runs the same kernel; the kernel against the reference is test_packed.py's business.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from fairy2i_compile import Fairy2iBackend, Fairy2iConfig
from fairy2i_compile.compiler.codegen import cpu_packed
from fairy2i_compile.compiler.passes import INFERENCE_PIPELINE, PassContext, enabled_passes
from fairy2i_compile.compiler.report import GraphReport

needs_cpu_op = pytest.mark.skipif(not cpu_packed.cpu_op_available()[0],
                                  reason=f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")
needs_cpu_kernel = pytest.mark.skipif(not cpu_packed.cpu_kernel_available()[0],
                                      reason=f"C++ kernel unavailable: {cpu_packed.cpu_kernel_available()[1]}")
LOWERINGS = ("lowered_cpu_op", "lowered_cpu_direct", "lowered_infer")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16))


def _compile_ptq(tmp_path, **options):
    """Two PTQ layers (stage-fused packed ops) compiled for inference with a dump: (report, dump dir, y, y_ref)."""
    dump = tmp_path / "dump"
    backend = Fairy2iBackend({"mode": "ptq", "stages": 2, "dump_dir": str(dump), **options})
    x = torch.randn(3, 16)
    with torch.no_grad():
        y_ref = torch.compile(_mlp(), backend=Fairy2iBackend({"mode": "ptq", "stages": 2, "kernel": "torch"}))(x)
        torch._dynamo.reset()
        counters.clear()  # the counters of the compile under test only
        y = torch.compile(_mlp(), backend=backend)(x)
    return backend.reports[0], dump, y, y_ref


def _lowered(report):
    return {k: v for k, v in report.counters.items() if k in LOWERINGS}


def test_the_inference_pipeline_runs_in_table_order_and_the_direct_calls_only_in_the_eager_runner():
    assert [p.name for p in INFERENCE_PIPELINE] == ["lower_cpu_op", "fuse_siblings", "lower_cpu_direct", "lower_infer",
                                                    "gqa_attention"]
    names = lambda **o: [p.name for p in enabled_passes(Fairy2iConfig(**o), INFERENCE_PIPELINE)]  # noqa: E731
    assert names() == ["lower_cpu_op", "fuse_siblings", "lower_cpu_direct", "lower_infer", "gqa_attention"]
    # Inductor needs ops, not Python calls
    assert names(compiler="inductor") == ["lower_cpu_op", "fuse_siblings", "lower_infer", "gqa_attention"]


def test_no_inference_pass_touches_a_graph_without_packed_ops():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    code = gm.code
    ctx = PassContext(config=Fairy2iConfig(kernel="cpu"), report=GraphReport(graph=0), fake_mode=None)
    counters.clear()
    for graph_pass in INFERENCE_PIPELINE:
        graph_pass.run(gm, ctx)
    assert gm.code == code and ctx.report.counters == {} and dict(counters["fairy2i"]) == {}


@needs_cpu_op
def test_lower_cpu_op_is_counted_dumped_and_exact(tmp_path):
    report, dump, y, y_ref = _compile_ptq(tmp_path, kernel="cpu")
    assert _lowered(report) == {"lowered_cpu_op": 2}  # the C++ op took both layers: nothing left to lower
    assert counters["fairy2i"]["lowered_cpu_op"] == 2
    after = (dump / "graph_0" / "05_lower_cpu_op.py").read_text()
    assert after.count("fairy2i.ptq_packed_linear_cpu.default") == 2 and "ptq_packed_linear.default" not in after
    entry = next(p for p in report.passes if p["pass"] == "lower_cpu_op")
    assert entry["before"] == "graph_0/04_aot_inference.py" and entry["counters"] == {"lowered_cpu_op": 2}
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # C++ kernel vs the reference (float32 sums)


@needs_cpu_kernel
def test_lower_cpu_direct_takes_what_lower_cpu_op_cannot(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_packed, "cpu_op_available", lambda: (False, "disabled by the test"))
    report, dump, y, y_ref = _compile_ptq(tmp_path, kernel="cpu")
    assert _lowered(report) == {"lowered_cpu_direct": 2}  # negative for lower_cpu_op: no C++ op to swap in
    assert counters["fairy2i"]["lowered_cpu_direct"] == 2 and "lowered_cpu_op" not in counters["fairy2i"]
    assert (dump / "graph_0" / "07_lower_cpu_direct.py").read_text().count("ptq_packed_linear_direct") == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_lower_infer_takes_the_reference_kernel_and_the_cpu_lowerings_do_not(tmp_path):
    report, dump, y, y_ref = _compile_ptq(tmp_path, kernel="torch")
    assert _lowered(report) == {"lowered_infer": 2}  # negative for both CPU passes: not the C++ kernel
    assert counters["fairy2i"]["lowered_infer"] == 2
    files = sorted(os.listdir(dump / "graph_0"))
    assert files[-6:] == ["04_aot_inference.py", "05_lower_cpu_op.py", "06_fuse_siblings.py", "07_lower_cpu_direct.py", "08_lower_infer.py",
                          "09_gqa_attention.py"]
    after = (dump / "graph_0" / "08_lower_infer.py").read_text()
    assert after.count("fairy2i.ptq_packed_linear_infer.default") == 2
    assert "'torch'" in after  # the twin runs the implementation decided at lowering
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same reference arithmetic


def test_training_graphs_are_not_lowered(tmp_path):
    counters.clear()
    backend = Fairy2iBackend({"mode": "ptq", "stages": 2, "kernel": "torch", "dump_dir": str(tmp_path)})
    model = torch.compile(_mlp(), backend=backend)
    model(torch.randn(3, 16, requires_grad=True)).sum().backward()  # forward + backward graphs
    assert _lowered(backend.reports[0]) == {} and not any(k in counters["fairy2i"] for k in LOWERINGS)
    assert not any("lower" in f for f in os.listdir(tmp_path / "graph_0"))


# ----------------------------------------------------------------------------- Inductor's per-call asserts
def test_inductor_inference_wrapper_has_no_size_asserts():
    """compiler="inductor": the inference graph's Python wrapper is generated without Inductor's
    per-call assert_size_stride / assert_alignment checks (the backend patches them off for
    inference graphs only); plain Inductor on the same model emits them, so the check can fail.
    Outputs equal the eager-compiler backend's."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(3, 16)
    with torch.no_grad():
        torch._dynamo.reset()
        _, plain = run_and_get_code(torch.compile(_mlp()), x)
        torch._dynamo.reset()
        y, ours = run_and_get_code(torch.compile(_mlp(), backend=Fairy2iBackend({"compiler": "inductor"})), x)
        torch._dynamo.reset()
        y_ref = torch.compile(_mlp(), backend=Fairy2iBackend({"compiler": "eager"}))(x)
    assert any("assert_size_stride(" in code for code in plain)
    assert ours and not any("assert_size_stride(" in code or "assert_alignment(" in code for code in ours)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
