"""Readable dumps of every pipeline stage's graph, what each pass changed, and MLIR.

Layout under `dump_dir` (one folder per graph Dynamo captures; most models are
one graph):

    report.json                       config, summary, per graph: counters, passes, mlir; one entry per linear layer
    summary.md                        per graph and pass: nodes added/removed by op, layers rewritten, MLIR files
    graph_0/00_captured.py            the Dynamo FX graph as the backend received it
    graph_0/01_widely_linear.py       after each pass, numbered in pipeline order
    graph_0/02_aot_forward.py         AOTAutograd's forward (or _inference) graph
    graph_0/03_aot_backward.py        and its backward, when training
    mlir/graph_0/02_aot_inference.aten.py                  that forward graph with the fairy2i ops
                                                           decomposed to aten (what torch-mlir imports)
    mlir/graph_0/02_aot_inference.torch.mlir               torch-mlir, `torch` dialect
    mlir/graph_0/02_aot_inference.linalg-on-tensors.mlir   and `linalg-on-tensors`
    mlir/graph_0/mlir_error.txt                            only when the export failed (why)
    kernels/                          the kernel sources the packed ops ran (copied after the
                                      graph's first call): generated Triton kernels
                                      (<name>_<hash>.py) and/or the C++ CPU kernel (cpu_packed.cpp,
                                      and cpu_packed_op.cpp when its op registration ran)

graph_N/ holds exactly one `.py` per stage: each is the graph's `print_readable()`
code with a header naming the stage. A dump_dir written by an earlier run is cleared
of what a dump writes (report.json, summary.md, the files of graph_N/, mlir/graph_N/
and kernels/; anything else there is left alone) before this process's first graph
goes there, so a dump never mixes two runs; graphs compiled later in the same process
(graph breaks, recompiles, other torch.compile calls) add graph_1/, graph_2/, ... to one
report.json. MLIR export runs torch-mlir in a subprocess
(see `mlir_export.py`; `FAIRY2I_MLIR=0` turns it off) and never fails a compile.
Files are written atomically.

Structured trace. With `TORCH_TRACE=<dir>` set, every stage's code, the MLIR text
and the graph's report also go to PyTorch's structured trace as artifacts named
`fairy2i_<stage>` (`fairy2i_captured`, `fairy2i_widely_linear`, `fairy2i_aot_inference`,
`fairy2i_aot_inference_torch_mlir`, `fairy2i_report`, ...), whether or not `dump_dir`
is set; `tlparse <dir>` shows them beside Dynamo's and AOTAutograd's own graphs.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from .report import GraphReport, atomic_write_text, write_report

__all__ = ["GraphDumper", "check_dump_dir", "clear_previous_dump", "op_histogram", "trace_artifact", "write_summary"]


def check_dump_dir(dump_dir: Optional[str]) -> None:
    """ValueError naming the option unless `dump_dir` is None, a folder, or a path that does not exist yet."""
    if dump_dir is None:
        return
    if dump_dir == "":
        raise ValueError("option 'dump_dir' is an empty string, which would dump into the working directory; "
                         "give a folder such as dump_dir='dumps/', or leave it unset (None) for no dumps")
    if os.path.exists(dump_dir) and not os.path.isdir(dump_dir):
        raise ValueError(f"option 'dump_dir'={dump_dir!r} is a file, not a folder; give a folder path "
                         f"(it is created if missing)")


_OWNED_FOLDER = re.compile(r"graph_\d+")


def clear_previous_dump(dump_dir: str) -> List[str]:
    """Remove what an earlier dump wrote into `dump_dir` (module docstring); returns the paths removed."""
    removed: List[str] = []
    if not os.path.isdir(dump_dir):
        return removed

    def files_of(folder: str) -> None:
        if not os.path.isdir(folder) or os.path.islink(folder):
            return
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                os.unlink(entry.path)
                removed.append(entry.path)
        if not os.listdir(folder):
            os.rmdir(folder)

    for name in ("report.json", "summary.md"):
        path = os.path.join(dump_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.unlink(path)
            removed.append(path)
    for parent in (dump_dir, os.path.join(dump_dir, "mlir")):
        if os.path.isdir(parent):
            for entry in os.scandir(parent):
                if _OWNED_FOLDER.fullmatch(entry.name):
                    files_of(entry.path)
    files_of(os.path.join(dump_dir, "kernels"))
    mlir = os.path.join(dump_dir, "mlir")
    if os.path.isdir(mlir) and not os.path.islink(mlir) and not os.listdir(mlir):
        os.rmdir(mlir)
    return removed


def trace_artifact(name: str, payload_fn: Callable[[], str]) -> None:
    """One `artifact` entry in the structured trace (a no-op unless TORCH_TRACE is set)."""
    try:
        from torch._logging import trace_structured
    except ImportError:  # pragma: no cover - very old torch
        return
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload_fn)


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(t)                       # "aten.mm.default", "fairy2i.widely_linear.default"
        return fx.node._get_qualified_name(t)   # "torch._C._nn.linear", "_operator.getitem"
    if node.op in ("call_method", "call_module"):
        return f"{node.op}:{node.target}"
    return node.op                              # placeholder, get_attr, output


def op_histogram(gm: fx.GraphModule) -> Dict[str, int]:
    """How many nodes of each op target `gm` has."""
    return dict(collections.Counter(_target_name(n) for n in gm.graph.nodes))


class GraphDumper:
    def __init__(self, dump_dir: Optional[str], graph_id: int):
        self.root = dump_dir
        self.dir = os.path.join(dump_dir, f"graph_{graph_id}") if dump_dir else None
        self.graph_id = graph_id
        self.next_index = 0
        self.last_file: Optional[str] = None   # "graph_0/01_widely_linear.py": the latest stage written

    def stage_path(self, index: int, stage: str) -> Optional[str]:
        return os.path.join(self.dir, f"{index:02d}_{stage}.py") if self.dir else None

    def write(self, stage: str, gm: fx.GraphModule, note: str = "", index: Optional[int] = None) -> Optional[str]:
        """Write `gm` as stage number `index` (default: the next number); trace it as `fairy2i_<stage>`."""
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        path = self.stage_path(index, stage)
        text: List[str] = []

        def render() -> str:
            if not text:
                code = gm.print_readable(print_output=False, include_stride=False, include_device=True)
                header = f"# fairy2i_compile dump: graph {self.graph_id}, stage {index:02d} '{stage}'\n"
                if note:
                    header += "".join(f"# {line}\n" for line in note.splitlines())
                text.append(header + "\n" + code)
            return text[0]

        trace_artifact(f"fairy2i_{stage}", render)
        self.last_file = f"graph_{self.graph_id}/{index:02d}_{stage}.py"
        if path is None:
            return None
        atomic_write_text(path, render())
        return path

    # ----------------------------------------------------------------- per-pass summaries
    def before_pass(self, gm: fx.GraphModule, report: GraphReport) -> dict:
        return {"ops": op_histogram(gm), "counters": dict(report.counters),
                "actions": {r.name: r.action for r in report.layers}, "file": self.last_file}

    def after_pass(self, name: str, gm: fx.GraphModule, before: dict, report: GraphReport) -> dict:
        """What pass `name` changed, appended to `report.passes`."""
        after = op_histogram(gm)
        delta = {k: after.get(k, 0) - before["ops"].get(k, 0) for k in sorted(set(after) | set(before["ops"]))}
        counters = {k: v - before["counters"].get(k, 0) for k, v in report.counters.items()
                    if v != before["counters"].get(k, 0)}
        layers = {r.name: f"{before['actions'].get(r.name, '(new)')} -> {r.action}" for r in report.layers
                  if before["actions"].get(r.name) != r.action}
        entry = {
            "pass": name,
            "before": before["file"],
            "after": self.last_file,
            "nodes_before": sum(before["ops"].values()),
            "nodes_after": sum(after.values()),
            "added": {k: d for k, d in delta.items() if d > 0},
            "removed": {k: -d for k, d in delta.items() if d < 0},
            "counters": counters,
            "layers_changed": layers,
        }
        report.passes.append(entry)
        return entry

    # ----------------------------------------------------------------- MLIR
    def export_mlir(self, stage: str, index: int, gm: fx.GraphModule, inputs: Sequence[Any],
                    report: GraphReport) -> Optional[dict]:
        """torch-mlir export of a forward/inference graph into mlir/graph_N/; never raises."""
        from . import mlir_export

        dialects = mlir_export.mlir_dialects()
        if self.root is None or not dialects:
            return None
        out_dir = os.path.join(self.root, "mlir", f"graph_{self.graph_id}")
        try:
            result = mlir_export.export_mlir(gm, inputs, out_dir, f"{index:02d}_{stage}", dialects)
        except Exception as e:  # a bug in the exporter itself must not fail the user's compile either
            result = {"dialects": dialects, "files": {}, "seconds": 0.0,
                      "error": f"{type(e).__name__}: {e}", "error_file": None}
            try:
                result["error_file"] = mlir_export._write_error(out_dir, stage, result["error"])
            except OSError:
                pass
        result["stage"] = stage
        rel = lambda p: os.path.relpath(p, self.root) if p else p  # noqa: E731  (report paths relative to dump_dir)
        result["files"] = {d: rel(p) for d, p in result["files"].items()}
        for key in ("error_file", "aten_graph"):
            if key in result:
                result[key] = rel(result[key])
        report.mlir = result
        for dialect, path in result["files"].items():
            trace_artifact(f"fairy2i_{stage}_{dialect.replace('-', '_')}_mlir",
                           lambda p=os.path.join(self.root, path): _read(p))
        if result.get("error"):
            trace_artifact(f"fairy2i_{stage}_mlir_error", lambda: result["error"])
        return result

    # ----------------------------------------------------------------- kernel sources
    def copy_kernels(self, sources: Sequence[str], report: GraphReport) -> List[str]:
        """Copy kernel source files into dump_dir/kernels/ (and the trace); record them in `report`."""
        copied = []
        for src in sources:
            name = os.path.basename(str(src))
            text = _read(str(src))
            trace_artifact(f"fairy2i_kernel_{os.path.splitext(name)[0]}", lambda t=text: t)
            if self.root is not None:
                atomic_write_text(os.path.join(self.root, "kernels", name), text)
            copied.append(f"kernels/{name}")
        report.kernels = sorted(set(report.kernels) | set(copied))
        return copied

    # ----------------------------------------------------------------- report.json + summary.md
    def write_report(self, config: dict, report: GraphReport, graphs: Optional[List[GraphReport]],
                     skip_patterns: Sequence[str] = ()) -> None:
        trace_artifact("fairy2i_report", lambda: json.dumps(
            {"graph": report.graph, "counters": report.counters, "passes": report.passes, "mlir": report.mlir,
             "layers": [r.to_dict() for r in report.layers]}, indent=1, default=str))
        if self.root is None or graphs is None:
            return
        write_report(os.path.join(self.root, "report.json"), config, graphs, skip_patterns)
        write_summary(os.path.join(self.root, "summary.md"), graphs)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ops_cell(ops: Dict[str, int]) -> str:
    return ", ".join(f"`{k}` {v}" for k, v in ops.items()) or "none"


def write_summary(path: str, graphs: List[GraphReport]) -> None:
    """summary.md: for every graph, each pass's before/after side by side, and the MLIR export."""
    lines = ["# fairy2i_compile: what each pass did", "",
             "Per graph, per pass: the dump files before and after it, the nodes it added and removed "
             "(by op target), its counters and the layers whose action it changed. Details: report.json.", ""]
    for g in graphs:
        lines += [f"## graph {g.graph}", ""]
        if not g.passes:
            lines += ["No pass ran.", ""]
        for p in g.passes:
            lines += [f"### `{p['pass']}`: {p['before']} -> {p['after']}", "",
                      "| | before | after |", "|---|---|---|",
                      f"| nodes | {p['nodes_before']} | {p['nodes_after']} |",
                      f"| removed / added | {_ops_cell(p['removed'])} | {_ops_cell(p['added'])} |", ""]
            counters = ", ".join(f"{k} +{v}" for k, v in p["counters"].items()) or "none"
            lines.append(f"Counters: {counters}. Layers changed: {len(p['layers_changed'])}.")
            shown = list(p["layers_changed"].items())
            lines += [f"- `{name}`: {change}" for name, change in shown[:12]]
            if len(shown) > 12:
                lines.append(f"- ... and {len(shown) - 12} more (report.json)")
            lines.append("")
        if g.kernels:
            lines += ["### kernels the packed ops ran", ""] + [f"- `{k}`" for k in g.kernels] + [""]
        m = g.mlir
        if m is not None:
            lines += [f"### MLIR of `{m.get('stage')}` ({m.get('seconds', 0):.1f} s)", ""]
            if m.get("aten_graph"):
                lines.append(f"- the graph torch-mlir imported (fairy2i ops decomposed to aten): `{m['aten_graph']}`")
            lines += [f"- {d}: `{f}`" for d, f in m["files"].items()]
            if m.get("error"):
                where = f" (`{m['error_file']}`)" if m.get("error_file") else ""
                lines.append(f"- failed{where}: {m['error'].splitlines()[0]}")
            lines.append("")
    atomic_write_text(path, "\n".join(lines))
