"""FX passes, in pipeline order: over the Dynamo graph, and over AOTAutograd's inference graph.

Each pass lives in its own module, rewrites one thing, records what it did in
the layer reports and bumps `torch._dynamo.utils.counters["fairy2i"]`. The
backend runs `PIPELINE` on the Dynamo graph and `INFERENCE_PIPELINE` on the
inference graph AOTAutograd traces from it (no gradient recorded: the packed ops
lower to their inference forms, codegen/lower.py), in order, keeping only the
passes whose `enabled(config)` is true; it calls `graph.lint()` + `recompile()`
after each and dumps the graph (dump.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch.fx as fx

from ..config import Fairy2iConfig
from ..report import GraphReport
from ._fx import graph_fake_mode

__all__ = ["PassContext", "GraphPass", "PIPELINE", "INFERENCE_PIPELINE", "counted_pass", "enabled_passes",
           "graph_fake_mode"]


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


def counted_pass(name: str, counter: str, rewrite: Callable[[fx.GraphModule], int],
                 enabled: Callable[[Fairy2iConfig], bool] = lambda config: True) -> GraphPass:
    """A pass whose whole work is `rewrite(gm)`, which returns how many calls it rewrote:
    that many are counted under `counter` (nothing when none)."""
    def run(gm: fx.GraphModule, ctx: PassContext) -> None:
        rewritten = rewrite(gm)
        if rewritten:
            ctx.bump(counter, rewritten)

    return GraphPass(name=name, run=run, enabled=enabled)


def _pipeline() -> List[GraphPass]:
    from . import decompose_packed, fuse_stages, observe, phase_quant, real_quant, widely_linear

    return [observe.PASS, widely_linear.PASS, phase_quant.PASS, real_quant.PASS, fuse_stages.PASS,
            decompose_packed.PASS]


def _inference_pipeline() -> List[GraphPass]:
    from . import fuse_siblings, gqa_attention, lower_cpu_direct, lower_cpu_op, lower_infer

    # the C++ op first, its sibling calls on one input merged, then direct calls for what is
    # left, then the twins; attention without its key/value head copies
    return [lower_cpu_op.PASS, fuse_siblings.PASS, lower_cpu_direct.PASS, lower_infer.PASS, gqa_attention.PASS]


PIPELINE: List[GraphPass] = _pipeline()
INFERENCE_PIPELINE: List[GraphPass] = _inference_pipeline()


def enabled_passes(config: Fairy2iConfig, pipeline: Optional[List[GraphPass]] = None) -> List[GraphPass]:
    """The passes of `pipeline` (default PIPELINE) that `config` enables, in pipeline order."""
    return [p for p in (PIPELINE if pipeline is None else pipeline) if p.enabled(config)]
