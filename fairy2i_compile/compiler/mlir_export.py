"""The rewritten forward graph as MLIR, through torch-mlir, in a subprocess.

    export_mlir(aot_graph, aot_inputs, out_dir, stem="02_aot_inference")
    # -> out_dir/02_aot_inference.aten.py                 the graph torch-mlir imported
    #    out_dir/02_aot_inference.torch.mlir              `torch` dialect
    #    out_dir/02_aot_inference.linalg-on-tensors.mlir  `linalg-on-tensors`
    #    out_dir/mlir_error.txt                           only when something failed

Why the fairy2i ops are decomposed first. torch-mlir's FX importer knows aten,
not our `fairy2i::*` custom ops: imported as they are they would be opaque
`torch.operator "fairy2i.widely_linear"` calls that no lowering (linalg, tosa)
accepts. Each fairy2i op has a pure-torch body (the reference the tests use), so
the AOT graph is re-traced with `make_fx`, running every fairy2i op through that
body (`_BODIES` below; any other `fairy2i::` op through the Python function it
was defined with). The MLIR then shows the real arithmetic the compiled graph
performs: U/W from A (`real_to_widely`), the PhaseQuant stages for PTQ/QAT, and
the GEMM on the rebuilt real weight. PTQ ops are traced through the quantizer
itself, not through their weight cache, so the MLIR computes the quantized weight
from A (what the cache holds is that computation's result).

Why a subprocess. torch-mlir's lowering can abort the whole process (its `tosa`
path raises SIGABRT on some graphs), and a native crash cannot be caught; the
user's compile must never die of a dump. The parent pickles the AOT graph
(`torch.save`) with the input shapes, runs `python -m fairy2i_compile.compiler.mlir_export`
under a timeout, and turns any failure (exception, signal, timeout, torch-mlir
not installed) into `mlir_error.txt` and the `error` field of the result. Each
dialect is lowered separately, so a failing one does not lose the others.

Shapes. AOT graph inputs arrive as fake tensors; symbolic sizes (dynamic=True or
a recompile with dynamic shapes) are specialized to their example values, so the
MLIR has static shapes (the note in the `.aten.py` header says so).

Switches (environment, read per compile):
    FAIRY2I_MLIR          "0"/"off"/"false" turns MLIR export off, "1"/"on" or unset
                          exports the default dialects "torch,linalg-on-tensors";
                          or a comma list of dialects (also "tosa", "stablehlo", "raw")
    FAIRY2I_MLIR_TIMEOUT  seconds for the subprocess (default 300)
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.fx as fx

from .ops import pure_torch_bodies
from .report import atomic_write_text

__all__ = ["DIALECTS", "DEFAULT_DIALECTS", "mlir_dialects", "mlir_timeout", "export_mlir", "decompose_fairy2i"]

DIALECTS = ("raw", "torch", "linalg-on-tensors", "tosa", "stablehlo")
DEFAULT_DIALECTS = ("torch", "linalg-on-tensors")
DEFAULT_TIMEOUT_S = 300.0
ERROR_FILE = "mlir_error.txt"
_OFF = {"0", "off", "false", "no", "none", ""}
_ON = {"1", "on", "true", "yes"}


def mlir_dialects() -> List[str]:
    """Dialects to export, from $FAIRY2I_MLIR (empty list: export is off)."""
    raw = os.environ.get("FAIRY2I_MLIR")
    if raw is None:
        return list(DEFAULT_DIALECTS)
    if raw.strip().lower() in _OFF:
        return []
    if raw.strip().lower() in _ON:
        return list(DEFAULT_DIALECTS)
    return [d.strip().lower() for d in raw.split(",") if d.strip()]


def mlir_timeout() -> float:
    """Seconds the torch-mlir worker may run (FAIRY2I_MLIR_TIMEOUT, else the default)."""
    raw = os.environ.get("FAIRY2I_MLIR_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S


def torch_mlir_available() -> bool:
    """Whether torch-mlir is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("torch_mlir") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- decomposition
def _generic_body(op: torch._ops.OpOverload):
    """The Python function a `torch.library.custom_op` was defined with (ops added later)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op._schema.name)
    if opdef is None:
        raise NotImplementedError(f"no pure-torch body known for {op._schema.name}; cannot decompose it for torch-mlir")
    return opdef._init_fn


def _positional(op: torch._ops.OpOverload, args, kwargs) -> list:
    """All schema arguments in order, defaults filled in (graphs omit trailing defaults)."""
    out = list(args)
    for arg in op._schema.arguments[len(args):]:
        out.append(kwargs[arg.name] if arg.name in kwargs else arg.default_value)
    return out


class _Decomposer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.bodies = pure_torch_bodies()

    def call_function(self, target, args, kwargs):
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "fairy2i":
            name = target._schema.name.split("::", 1)[1]
            body = self.bodies.get(name) or _generic_body(target)
            return body(*_positional(target, args, kwargs))
        return super().call_function(target, args, kwargs)


def widen_uint8(gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> fx.GraphModule:
    """The same graph with uint8 dtype arguments made int32, re-traced for fresh meta["val"].

    torch-mlir 20261001 cannot lower uint8 element conversions to linalg (it reports
    "for conversion to byte or char type dstOriginalDtype has to be passed" and then
    segfaults). PhaseQuant codes are uint8 values 0..3, so carrying them as int32 gives
    the same values through the same integer ops.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    def widen(a):
        return torch.int32 if a is torch.uint8 else a

    changed = False
    for n in gm.graph.nodes:
        args, kwargs = fx.node.map_aggregate(n.args, widen), fx.node.map_aggregate(n.kwargs, widen)
        if args != n.args or kwargs != n.kwargs:
            n.args, n.kwargs, changed = args, kwargs, True
    if not changed:
        return gm
    gm.recompile()
    return make_fx(gm, tracing_mode="fake")(*fake_inputs)


def decompose_fairy2i(gm: fx.GraphModule, fake_inputs: Sequence[Any], decomposition_table=None) -> fx.GraphModule:
    """Re-trace `gm` (an AOT graph) with every fairy2i op replaced by its pure-torch body.

    fake_inputs: fake tensors / ints matching gm's placeholders. The result is an
    aten-only graph whose nodes carry meta["val"] (what torch-mlir's importer reads).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(*args):
        return _Decomposer(gm).run(*args)

    return make_fx(run, decomposition_table=decomposition_table or {}, tracing_mode="fake")(*fake_inputs)


# --------------------------------------------------------------------------- input specs
def _int_hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise ValueError(f"symbolic size {s} has no example value")
        return int(hint)
    return int(s)


def input_specs(inputs: Sequence[Any]) -> List[dict]:
    """Shape/dtype descriptions of a graph's example inputs, for the worker to rebuild fake inputs from."""
    specs = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            specs.append({"kind": "tensor", "shape": [_int_hint(s) for s in t.shape],
                          "dtype": str(t.dtype).replace("torch.", ""), "requires_grad": bool(t.requires_grad)})
        elif isinstance(t, (int, torch.SymInt)) and not isinstance(t, bool):
            specs.append({"kind": "int", "value": _int_hint(t)})
        elif isinstance(t, (float, bool)) or t is None:
            specs.append({"kind": "const", "value": t})
        else:
            raise TypeError(f"cannot export a graph input of type {type(t).__name__} to MLIR")
    return specs


def _fake_inputs(specs: List[dict], mode) -> List[Any]:
    out = []
    with mode:
        for s in specs:
            if s["kind"] == "tensor":
                out.append(torch.empty(s["shape"], dtype=getattr(torch, s["dtype"])))
            else:
                out.append(s["value"])
    return out


# --------------------------------------------------------------------------- graph transport
# A GraphModule pickles as its Python code and is re-traced symbolically on load,
# which turns factory calls (arange) into baked-in constants; OpOverloads do not
# pickle at all. So the graph travels as a node table: ops by qualified name,
# node arguments as _NodeRef, get_attr tensors by value.
class _NodeRef(NamedTuple):
    name: str


class _OpRef(NamedTuple):
    qualname: str   # "aten::mm"
    overload: str   # "default"


def _encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return _NodeRef(a.name)
    if isinstance(a, (list, tuple)):
        return type(a)(_encode_arg(x) for x in a)
    if isinstance(a, dict):
        return {k: _encode_arg(v) for k, v in a.items()}
    return a


def _decode_arg(a: Any, env: Dict[str, fx.Node]) -> Any:
    if isinstance(a, _NodeRef):
        return env[a.name]
    if isinstance(a, (list, tuple)):
        return type(a)(_decode_arg(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _decode_arg(v, env) for k, v in a.items()}
    return a


def serialize_graph(gm: fx.GraphModule) -> dict:
    """A JSON-able description of `gm`'s nodes and tensor attributes (what the worker process receives)."""
    nodes, attrs = [], {}
    for n in gm.graph.nodes:
        target = n.target
        if isinstance(target, torch._ops.OpOverload):
            target = _OpRef(target._schema.name, target._overloadname)
        elif n.op == "get_attr":
            attrs[target] = operator.attrgetter(target)(gm)
        elif n.op not in ("placeholder", "output") and not callable(target):
            raise TypeError(f"cannot transport node {n.name} with target {target!r}")
        nodes.append((n.op, n.name, target, _encode_arg(n.args), _encode_arg(n.kwargs)))
    return {"nodes": nodes, "attrs": attrs}


def deserialize_graph(payload: dict) -> fx.GraphModule:
    """The GraphModule :func:`serialize_graph` described."""
    graph, env = fx.Graph(), {}
    root = torch.nn.Module()
    for name, value in payload["attrs"].items():
        setattr(root, name.replace(".", "_"), value)
    for op, name, target, args, kwargs in payload["nodes"]:
        if isinstance(target, _OpRef):
            ns, op_name = target.qualname.split("::", 1)
            target = getattr(getattr(getattr(torch.ops, ns), op_name), target.overload)
        elif op == "get_attr":
            target = target.replace(".", "_")
        env[name] = graph.create_node(op, target, _decode_arg(args, env), _decode_arg(kwargs, env), name=name)
    return fx.GraphModule(root, graph)


# --------------------------------------------------------------------------- parent side
def _write_error(out_dir: str, stem: str, text: str) -> str:
    path = os.path.join(out_dir, ERROR_FILE)
    atomic_write_text(path, f"fairy2i_compile: MLIR export of '{stem}' did not complete.\n"
                            f"The compile itself was not affected; see mlir_export.py for the switches.\n\n{text}\n")
    return path


def export_mlir(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    out_dir: str,
    stem: str,
    dialects: Optional[Sequence[str]] = None,
    timeout: Optional[float] = None,
) -> Dict[str, Any]:
    """Export `gm` to MLIR files in `out_dir`; never raises for an export failure.

    Returns {"dialects": [...], "files": {dialect: path}, "error": None or text,
    "error_file": path or None, "seconds": float}.
    """
    dialects = list(mlir_dialects() if dialects is None else dialects)
    timeout = mlir_timeout() if timeout is None else timeout
    result: Dict[str, Any] = {"dialects": dialects, "files": {}, "error": None, "error_file": None, "seconds": 0.0}
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    errors = []
    unknown = [d for d in dialects if d not in DIALECTS]
    if unknown:
        errors.append(f"unknown dialect(s) {unknown} in FAIRY2I_MLIR; allowed: {list(DIALECTS)}")
    good = [d for d in dialects if d in DIALECTS]
    if good and not torch_mlir_available():
        errors.append("torch-mlir is not installed in this environment "
                      "(fix: `pip install -c constraints.txt --no-deps torch-mlir`, or `make setup`)")
        good = []
    if good:
        errors += _run_worker(gm, inputs, out_dir, stem, good, timeout, result)
    if errors:
        result["error"] = "\n\n".join(errors)
        result["error_file"] = _write_error(out_dir, stem, result["error"])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _run_worker(gm, inputs, out_dir, stem, dialects, timeout, result) -> List[str]:
    tmp = tempfile.mkdtemp(prefix="fairy2i-mlir-")
    try:
        try:
            job = os.path.join(tmp, "graph.pt")
            torch.save({"graph": serialize_graph(gm), "inputs": input_specs(inputs)}, job)
        except Exception as e:  # an unpicklable graph: say so, do not fail the compile
            return [f"could not serialize the graph for the torch-mlir subprocess: {type(e).__name__}: {e}"]
        status_path = os.path.join(tmp, "status.json")
        cmd = [sys.executable, "-m", "fairy2i_compile.compiler.mlir_export", job, out_dir, stem, status_path, *dialects]
        env = dict(os.environ)
        env.pop("TORCH_TRACE", None)  # the child's own logs stay out of the user's trace
        errors = []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            rc, tail = None, (out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:]
            errors.append(f"the torch-mlir subprocess ran past its {timeout:g} s limit and was killed "
                          f"(raise FAIRY2I_MLIR_TIMEOUT, or FAIRY2I_MLIR=0 to skip MLIR)")
        status = {}
        if os.path.exists(status_path):
            with open(status_path) as f:
                status = json.load(f)
        for d in dialects:
            entry = status.get(d)
            if entry and entry.get("file"):
                result["files"][d] = entry["file"]
            elif entry and entry.get("error"):
                errors.append(f"dialect {d!r}: {entry['error']}")
            elif rc is not None:
                errors.append(f"dialect {d!r}: not produced")
        if status.get("_decompose_error"):
            errors.insert(0, f"decomposing the fairy2i ops failed: {status['_decompose_error']}")
        if status.get("_aten"):
            result["aten_graph"] = status["_aten"]
        if rc not in (0, None):
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            running = status.get("_running")
            errors.append(f"the torch-mlir subprocess failed ({how})"
                          + (f" while lowering to {running!r}" if running else "")
                          + (f"; its output ended with:\n{tail}" if tail.strip() else ""))
        return errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- worker (subprocess)
def _worker(job: str, out_dir: str, stem: str, status_path: str, dialects: List[str]) -> int:
    import traceback

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from . import ops  # noqa: F401  (registers every fairy2i op before unpickling)

    status: Dict[str, Any] = {}

    def save():
        atomic_write_text(status_path, json.dumps(status))

    payload = torch.load(job, weights_only=False)
    specs = payload["inputs"]
    try:
        gm = deserialize_graph(payload["graph"])
        from torch_mlir.extras.fx_decomp_util import get_decomposition_table

        fake = _fake_inputs(specs, FakeTensorMode(shape_env=ShapeEnv()))
        aten = widen_uint8(decompose_fairy2i(gm, fake, get_decomposition_table()), fake)
    except Exception as e:
        status["_decompose_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        save()
        return 1
    aten_path = os.path.join(out_dir, f"{stem}.aten.py")
    atomic_write_text(aten_path, f"# fairy2i_compile: '{stem}' with the fairy2i ops decomposed to aten through their "
                                 "pure-torch bodies;\n# this is the graph torch-mlir imports (sizes static: "
                                 "symbolic dims specialized to their example values;\n# uint8 PhaseQuant codes "
                                 "carried as int32, which torch-mlir lowers)\n\n"
                                 + aten.print_readable(print_output=False, include_stride=False, include_device=True))
    status["_aten"] = aten_path
    from torch_mlir import fx as tm_fx

    for d in dialects:
        status["_running"] = d
        save()
        try:
            module = tm_fx.stateless_fx_import(aten, output_type=d, model_name=stem.split("_", 1)[-1])
            path = os.path.join(out_dir, f"{stem}.{d}.mlir")
            atomic_write_text(path, str(module))
            status[d] = {"file": path}
        except Exception as e:
            status[d] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
        status.pop("_running")
        save()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 6:
        print("usage: python -m fairy2i_compile.compiler.mlir_export JOB OUT_DIR STEM STATUS DIALECT...", file=sys.stderr)
        raise SystemExit(2)
    # through the package module, not __main__: the job's _NodeRef/_OpRef unpickle as
    # fairy2i_compile.compiler.mlir_export classes
    from fairy2i_compile.compiler.mlir_export import _worker as worker

    raise SystemExit(worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
