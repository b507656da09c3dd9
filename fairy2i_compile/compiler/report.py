"""What the backend did to each linear layer, and the atomic writer for report.json.

One `LayerReport` per weight application found in a captured graph. The
widely-linear pass creates it; later passes (quantization, packing) fill in
their own fields. `report.json` in `dump_dir` holds the config, every graph's
layers, and a summary.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..cache import atomic_write_text

__all__ = ["LayerReport", "GraphReport", "atomic_write_text", "summarize"]


@dataclass
class LayerReport:
    """What the backend did to one linear layer of one captured graph."""
    graph: int
    name: str                      # dotted module path, e.g. "model.layers.0.self_attn.q_proj"
    op: str                        # "linear" or "addmm" (GPT-2 Conv1D)
    shape: List[int]               # real weight as [out, in]
    dtype: str
    bias: bool
    action: str                    # "widely_linear", "kept_real", later "quantized", ...
    reason: Optional[str] = None   # why a layer stayed real
    bytes_before: int = 0          # weight bytes as the model holds them
    bytes_after: int = 0           # bytes of the layer's weight in its converted format:
                                   # exact: A itself; quantized: codes at their bit width +
                                   # float32 scales (extra["dense_cache_bytes"]: the dense
                                   # quantized copy a PTQ layer holds, 0 once stage-fused)
    node: str = ""                 # FX node name in the captured graph
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class GraphReport:
    """The layer reports and counters of one captured graph."""
    graph: int
    layers: List[LayerReport] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    passes: List[Dict[str, Any]] = field(default_factory=list)   # per pass: nodes added/removed, layers changed
    mlir: Optional[Dict[str, Any]] = None                         # torch-mlir export: files, error, seconds
    kernels: List[str] = field(default_factory=list)              # kernel sources copied into dump_dir/kernels

    def converted(self) -> List[str]:
        return [r.name for r in self.layers if r.action != "kept_real"]

    def kept_real(self) -> Dict[str, str]:
        return {r.name: r.reason or "" for r in self.layers if r.action == "kept_real"}


def summarize(graphs: List[GraphReport], skip_patterns=()) -> dict:
    """Totals over all graphs' layer reports (converted, kept real, bytes, unmatched skip patterns)."""
    layers = [r for g in graphs for r in g.layers]
    matched = {r.extra.get("skip_pattern") for r in layers}
    return {
        "graphs": len(graphs),
        "layers": len(layers),
        "converted": sum(r.action != "kept_real" for r in layers),
        "kept_real": sum(r.action == "kept_real" for r in layers),
        "bytes_before": sum(r.bytes_before for r in layers),
        "bytes_after": sum(r.bytes_after for r in layers),
        "unmatched_skip_patterns": [p for p in skip_patterns if p not in matched],
    }


def write_report(path: str, config: dict, graphs: List[GraphReport], skip_patterns=()) -> None:
    """Write the config, the per-graph reports and their summary as JSON to `path` (atomically)."""
    payload = {
        "config": config,
        "summary": summarize(graphs, skip_patterns),
        "graphs": [{"graph": g.graph, "counters": g.counters, "passes": g.passes, "mlir": g.mlir,
                    "kernels": g.kernels} for g in graphs],
        "layers": [r.to_dict() for g in graphs for r in g.layers],
    }
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
