"""FX passes over the Dynamo graph, in pipeline order.

Each pass lives in its own module, rewrites one thing, records what it did in
the layer reports and bumps `torch._dynamo.utils.counters["fairy2i"]`. The
backend runs `PIPELINE` in order, keeping only the passes whose `enabled(config)`
is true, and calls `graph.lint()` + `recompile()` after each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch.fx as fx

from ..config import Fairy2iConfig
from ..report import GraphReport
from ._fx import graph_fake_mode

__all__ = ["PassContext", "GraphPass", "PIPELINE", "enabled_passes", "graph_fake_mode"]


@dataclass
class PassContext:
    """What a pass is given besides the graph: the config, the report it records into, the fake mode."""
    config: Fairy2iConfig
    report: GraphReport
    fake_mode: Any
    example_inputs: List[Any] = field(default_factory=list)

    def bump(self, counter: str, by: int = 1) -> None:
        from torch._dynamo.utils import counters

        counters["fairy2i"][counter] += by
        self.report.counters[counter] = self.report.counters.get(counter, 0) + by


@dataclass(frozen=True)
class GraphPass:
    """One entry of PIPELINE: a pass's name (its dump file stem), its function, when it is enabled."""
    name: str                                   # also the dump file stem: "01_<name>.py"
    run: Callable[[fx.GraphModule, PassContext], None]
    enabled: Callable[[Fairy2iConfig], bool]


def _pipeline() -> List[GraphPass]:
    from . import decompose_packed, fuse_stages, observe, phase_quant, real_quant, widely_linear

    return [observe.PASS, widely_linear.PASS, phase_quant.PASS, real_quant.PASS, fuse_stages.PASS,
            decompose_packed.PASS]


PIPELINE: List[GraphPass] = _pipeline()


def enabled_passes(config: Fairy2iConfig) -> List[GraphPass]:
    """The passes of PIPELINE that `config` enables, in pipeline order."""
    return [p for p in PIPELINE if p.enabled(config)]
