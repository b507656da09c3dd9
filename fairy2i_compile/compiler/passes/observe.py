"""linear(x, A, b) -> fairy2i.observe(x, A, name); linear(x, A, b)      [calibrate]

With ``options={"mode": "calibrate"}`` nothing is converted: every layer the
quantizing modes would convert (same selector: even dims, real floating weight,
not skipped) gets an observer in front of it, and the graph computes the float
model's outputs. Run inside ``fairy2i_compile.quantization.calibration.observing()``, each
call adds the layer's input activations to that layer's second-moment
accumulator (``quantization/calibration/observer.py``, through the sink of ``ops/observe.py``),
keyed by the layer's dotted name in the compiled module. This is how calibration sees every layer of a model in one
compiled run (the "all layers from float activations" variant).

The observer op returns nothing and is registered as side-effecting, so neither
FX dead-code elimination nor AOTAutograd drops it. It leaves the linear itself
as it is, so the pass is lossless (outputs bit-identical to the float model).
Counters: ``observe_rewritten`` per observed layer, ``observe_kept_real`` per
layer another mode would leave real too.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import observe as _observe_op  # noqa: F401  (registers torch.ops.fairy2i.observe)
from . import GraphPass, PassContext
from ._layers import WeightSite, rewrite_layers
from .widely_linear import should_rewrite

__all__ = ["observe_replace", "PASS"]


def observe_replace(gm: fx.GraphModule, site: WeightSite, layer: int, ctx: PassContext) -> None:
    graph, node = gm.graph, site.node
    name = ctx.report.layers[layer].name
    with graph.inserting_before(node):
        obs = graph.call_function(torch.ops.fairy2i.observe.default, (site.x, site.weight, name))
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                obs.meta[key] = node.meta[key]
        obs.meta["val"] = obs.meta["example_value"] = None
    node.meta["fairy2i_layer"] = layer


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    rewrite_layers(gm, ctx, should_rewrite, "observed", observe_replace, "observe")


PASS = GraphPass(name="observe", run=run, enabled=lambda config: config.mode == "calibrate")
