"""Inspection: dump_dir layout, per-pass summaries, MLIR through torch-mlir, TORCH_TRACE artifacts."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fairy2i_compile.compiler import mlir_export
from fairy2i_compile.compiler.mlir_export import decompose_fairy2i, widen_uint8
from fairy2i_compile.quant_ops import phase_quant_reference

from helpers import tiny_llama

needs_torch_mlir = pytest.mark.skipif(not mlir_export.torch_mlir_available(), reason="torch-mlir not installed")


def _fake(*tensors):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return [mode.from_tensor(t) for t in tensors]


# --------------------------------------------------------------------------- decomposition (no torch-mlir)
def test_decomposed_graph_computes_what_the_fairy2i_ops_compute():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, a, b):
        exact = torch.ops.fairy2i.widely_linear(x, *torch.ops.fairy2i.real_to_widely(a), b)
        quant = torch.ops.fairy2i.widely_linear(x, *torch.ops.fairy2i.ptq_phase_quant(a, -1, 2, "tensor", "w"), b)
        return exact, quant

    torch.manual_seed(0)
    x, a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    gm = make_fx(f)(x, a, b)  # the fairy2i ops stay opaque here, as in the AOT graphs
    assert any(str(n.target).startswith("fairy2i.") for n in gm.graph.nodes)

    aten = widen_uint8(decompose_fairy2i(gm, _fake(x, a, b)), _fake(x, a, b))
    targets = {str(n.target) for n in aten.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("fairy2i.") for t in targets), targets
    assert not any(n.meta["val"].dtype == torch.uint8 for n in aten.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor))

    exact, quant = aten(x, a, b)
    torch.testing.assert_close(exact, F.linear(x, a, b), atol=1e-12, rtol=1e-12)
    a_hat = torch.ops.fairy2i.widely_to_real(*phase_quant_reference(a, 2, "tensor"))
    torch.testing.assert_close(quant, F.linear(x, a_hat, b), atol=0, rtol=0)  # same arithmetic, same order


# --------------------------------------------------------------------------- dump_dir end to end
@needs_torch_mlir
def test_dump_dir_has_stages_pass_summaries_mlir_and_report(tmp_path, monkeypatch):
    monkeypatch.delenv("FAIRY2I_MLIR", raising=False)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.compile(model, backend="fairy2i", options={"mode": "ptq", "stages": 1, "dump_dir": str(tmp_path)})(ids)

    assert sorted(os.listdir(tmp_path / "graph_0")) == [
        "00_captured.py", "01_widely_linear.py", "02_phase_quant.py", "03_fuse_stages.py",
        "04_aot_inference.py", "05_lower_cpu_op.py", "06_fuse_siblings.py", "07_lower_cpu_direct.py", "08_lower_infer.py",
        "09_gqa_attention.py"]
    report = json.loads((tmp_path / "report.json").read_text())
    passes = report["graphs"][0]["passes"]
    assert [p["pass"] for p in passes] == ["widely_linear", "phase_quant", "fuse_stages", "lower_cpu_op",
                                           "fuse_siblings", "lower_cpu_direct", "lower_infer", "gqa_attention"]
    wl, pq, fs, *lowerings = passes
    # after AOTAutograd: the 8 stage-fused PTQ ops become the C++ op (q/k/v and gate/up then share
    # a call), or direct calls without it
    lowered = {k: v for p in lowerings for k, v in p["counters"].items()}
    assert lowered in ({"lowered_cpu_op": 8, "fused_siblings": 5}, {"lowered_cpu_direct": 8}), lowered
    assert lowerings[0]["before"] == "graph_0/04_aot_inference.py" and lowerings[-2]["after"] == "graph_0/08_lower_infer.py"
    assert (wl["before"], wl["after"]) == ("graph_0/00_captured.py", "graph_0/01_widely_linear.py")
    assert wl["removed"] == {"torch._C._nn.linear": 8}  # 7 per block + lm_head
    assert wl["added"]["fairy2i.widely_linear.default"] == 8 and wl["added"]["fairy2i.real_to_widely.default"] == 8
    assert wl["counters"] == {"widely_linear_rewritten": 8} and len(wl["layers_changed"]) == 8
    assert pq["removed"] == {"fairy2i.real_to_widely.default": 8}
    assert pq["added"]["fairy2i.ptq_phase_quant.default"] == 8
    assert pq["layers_changed"]["lm_head"] == "widely_linear -> quantized"
    assert fs["removed"]["fairy2i.ptq_phase_quant.default"] == 8 and fs["removed"]["fairy2i.widely_linear.default"] == 8
    assert fs["added"] == {"fairy2i.ptq_packed_linear.default": 8} and fs["counters"]["fuse_stages_fused"] == 8
    summary = (tmp_path / "summary.md").read_text()
    assert "### `widely_linear`: graph_0/00_captured.py -> graph_0/01_widely_linear.py" in summary
    assert "`torch._C._nn.linear` 8" in summary and "### MLIR of `aot_inference`" in summary

    mlir = report["graphs"][0]["mlir"]
    assert mlir["error"] is None, mlir["error"]
    assert mlir["files"] == {"torch": "mlir/graph_0/04_aot_inference.torch.mlir",
                             "linalg-on-tensors": "mlir/graph_0/04_aot_inference.linalg-on-tensors.mlir"}
    torch_ir = (tmp_path / mlir["files"]["torch"]).read_text()
    linalg_ir = (tmp_path / mlir["files"]["linalg-on-tensors"]).read_text()
    assert "func.func @aot_inference(" in torch_ir and "torch.aten.mm" in torch_ir
    assert "func.func @aot_inference(" in linalg_ir and "linalg.matmul" in linalg_ir
    assert "fairy2i" not in torch_ir and "torch.operator" not in torch_ir  # decomposed, not opaque
    assert not (tmp_path / "mlir" / "graph_0" / "mlir_error.txt").exists()
    aten_graph = (tmp_path / mlir["aten_graph"]).read_text()
    assert "fairy2i.ptq_phase_quant" not in aten_graph and "fairy2i.ptq_packed_linear" not in aten_graph


def test_mlir_off_writes_no_mlir(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRY2I_MLIR", "0")
    torch.compile(nn.Linear(4, 4), backend="fairy2i", options={"mode": "exact", "dump_dir": str(tmp_path)})(torch.randn(2, 4))
    assert not (tmp_path / "mlir").exists()
    assert json.loads((tmp_path / "report.json").read_text())["graphs"][0]["mlir"] is None


def _compile_linear(tmp_path):
    torch.manual_seed(0)
    lin, x = nn.Linear(8, 6), torch.randn(2, 8)
    with torch.no_grad():
        y = torch.compile(lin, backend="fairy2i", options={"mode": "exact", "dump_dir": str(tmp_path)})(x)
        torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)  # the compile itself is unaffected
    report = json.loads((tmp_path / "report.json").read_text())
    return report["graphs"][0]["mlir"], (tmp_path / "mlir" / "graph_0" / "mlir_error.txt")


@pytest.mark.parametrize("case", ["sigabrt", "timeout", "unknown_dialect"])
def test_mlir_failure_is_a_note_not_a_crash(tmp_path, monkeypatch, case):
    if case == "sigabrt":  # what torch-mlir's tosa path does to a process: stand in a child that aborts
        fake_python = tmp_path / "abort.sh"
        fake_python.write_text("#!/bin/sh\nkill -ABRT $$\n")
        fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setattr(mlir_export.sys, "executable", str(fake_python))
        monkeypatch.setattr(mlir_export, "torch_mlir_available", lambda: True)
        monkeypatch.delenv("FAIRY2I_MLIR", raising=False)
        expected = "killed by signal 6"
    elif case == "timeout":
        monkeypatch.setattr(mlir_export, "torch_mlir_available", lambda: True)
        monkeypatch.setenv("FAIRY2I_MLIR_TIMEOUT", "0.01")
        monkeypatch.delenv("FAIRY2I_MLIR", raising=False)
        expected = "ran past its 0.01 s limit"
    else:
        monkeypatch.setenv("FAIRY2I_MLIR", "bogus")
        expected = "unknown dialect(s) ['bogus']"
    mlir, note = _compile_linear(tmp_path / "dump")
    assert expected in mlir["error"]
    assert mlir["files"] == {} and mlir["error_file"] == "mlir/graph_0/mlir_error.txt"
    text = note.read_text()
    assert "did not complete" in text and expected in text
    assert "failed" in (tmp_path / "dump" / "summary.md").read_text()


# --------------------------------------------------------------------------- TORCH_TRACE / tlparse
@needs_torch_mlir
def test_torch_trace_has_fairy2i_artifacts(tmp_path):
    script = textwrap.dedent(f"""
        import torch, torch.nn as nn
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        with torch.no_grad():
            torch.compile(m, backend="fairy2i", options={{"mode": "ptq", "dump_dir": {str(tmp_path / 'dump')!r}}})(torch.randn(2, 8))
    """)
    env = {**os.environ, "TORCH_TRACE": str(tmp_path / "trace"), "FAIRY2I_MLIR": "torch"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    logs = list((tmp_path / "trace").iterdir())
    assert logs, "TORCH_TRACE wrote no log"
    text = "".join(p.read_text() for p in logs)
    names = {line.split('"name": "', 1)[1].split('"', 1)[0] for line in text.splitlines() if '"name": "fairy2i_' in line}
    assert {"fairy2i_captured", "fairy2i_widely_linear", "fairy2i_phase_quant", "fairy2i_aot_inference",
            "fairy2i_aot_inference_torch_mlir", "fairy2i_report"} <= names, names
    assert "torch.ops.fairy2i.widely_linear.default" in text  # the payloads are the graphs' code


# --------------------------------------------------------------------------- dump_dir values and reuse
def test_empty_dump_dir_is_an_error_not_the_working_directory(tmp_path, monkeypatch):
    from fairy2i_compile import Fairy2iBackend

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="option 'dump_dir' is an empty string"):
        Fairy2iBackend({"dump_dir": ""})
    with pytest.raises(Exception, match="option 'dump_dir' is an empty string"):
        torch.compile(nn.Linear(4, 4), backend="fairy2i", options={"dump_dir": ""})(torch.randn(1, 4))
    assert os.listdir(tmp_path) == []


def test_dump_dir_that_is_a_file_names_the_option(tmp_path):
    from fairy2i_compile import Fairy2iBackend

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"option 'dump_dir'=.*/f' is a file, not a folder"):
        Fairy2iBackend({"dump_dir": str(tmp_path / "f")})


def test_dump_into_a_used_folder_holds_only_the_new_dump(tmp_path, monkeypatch):
    from fairy2i_compile.compiler import backend as backend_mod

    monkeypatch.setenv("FAIRY2I_MLIR", "0")
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(2, 8)
    dump = tmp_path / "dump"
    (dump / "graph_0").mkdir(parents=True)
    (dump / "notes.txt").write_text("mine")              # the user's file: left alone
    with torch.no_grad():
        torch.compile(model, backend="fairy2i", options={"mode": "ptq", "dump_dir": str(dump)})(x)
    assert "02_phase_quant.py" in os.listdir(dump / "graph_0") and (dump / "kernels").is_dir()

    monkeypatch.setattr(backend_mod, "_DUMP_GRAPHS", {})  # as a new process would start
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="fairy2i", options={"mode": "exact", "dump_dir": str(dump)})(x)
    assert sorted(os.listdir(dump / "graph_0")) == ["00_captured.py", "01_widely_linear.py", "02_aot_inference.py",
                                                    "03_lower_cpu_op.py", "04_fuse_siblings.py", "05_lower_cpu_direct.py", "06_lower_infer.py",
                                                    "07_gqa_attention.py"]
    assert sorted(os.listdir(dump)) == ["graph_0", "notes.txt", "report.json", "summary.md"]
    report = json.loads((dump / "report.json").read_text())
    assert report["config"]["mode"] == "exact" and len(report["graphs"]) == 1
    assert "phase_quant" not in (dump / "summary.md").read_text()
