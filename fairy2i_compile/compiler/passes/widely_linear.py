"""linear(x, A, b) -> fairy2i.widely_linear(x, *fairy2i.real_to_widely(A), b)   [exact]

Runs on the Dynamo graph (before AOTAutograd: afterwards a linear is already
`view -> t -> mm` and no longer recognisable). Parameters are placeholders there.

The weight applications it recognises (`linear_pattern`, `addmm_pattern` for
GPT-2's Conv1D) live in `_layers.py`, shared with the real-baseline pass; this
file holds `should_rewrite` and `widely_linear_replace`.

Replacement (one layer):

    A        = W.t()                                      # addmm only
    uw       = fairy2i.real_to_widely(A)                  # 4 x [out/2, in/2]
    u_re, u_im, w_re, w_im = uw[0], uw[1], uw[2], uw[3]
    y        = fairy2i.widely_linear(x, u_re, u_im, w_re, w_im, b)

Layers stay real (and the report says why) when in/out features are odd, the
weight is not floating point, or the module name matches a `skip` pattern.
Invariants: every new node has `meta["val"]`; the new `widely_linear` node
carries `meta["fairy2i_layer"]` (index into the graph's layer reports), which
later passes use to find the layer; no new aliasing (both ops return fresh
tensors).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.fairy2i.*)
from ..config import Fairy2iConfig
from . import GraphPass, PassContext
from ._fx import getitem_nodes, insert_call
from ._layers import WeightSite, addmm_pattern, kept_real_reason, linear_pattern, rewrite_layers

__all__ = ["WeightSite", "linear_pattern", "addmm_pattern", "should_rewrite", "widely_linear_replace", "PASS"]


def should_rewrite(site: WeightSite, name: str, config: Fairy2iConfig) -> Optional[str]:
    """None to rewrite, else the reason the layer stays real."""
    common = kept_real_reason(site, name, config)
    if common is not None:
        return common
    if site.out_features % 2 or site.in_features % 2:
        return (
            f"odd dims: out_features={site.out_features}, in_features={site.in_features}; "
            "pairing by halves needs both even"
        )
    return None


def widely_linear_replace(gm: fx.GraphModule, site: WeightSite, layer: int, ctx: PassContext) -> fx.Node:
    graph, node, fm = gm.graph, site.node, ctx.fake_mode
    with graph.inserting_before(node):
        a = site.weight
        if site.transposed:
            a = insert_call(graph, torch.t, (a,), node, fm)
        uw = insert_call(graph, torch.ops.fairy2i.real_to_widely.default, (a,), node, fm, name="real_to_widely")
        u_re, u_im, w_re, w_im = getitem_nodes(graph, uw, 4, fm)
        y = insert_call(
            graph,
            torch.ops.fairy2i.widely_linear.default,
            (site.x, u_re, u_im, w_re, w_im, site.bias),
            node,
            fm,
            name="widely_linear",
        )
    y.meta["fairy2i_layer"] = layer
    y.meta["fairy2i_site"] = site
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    return y


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    rewrite_layers(gm, ctx, should_rewrite, "widely_linear", widely_linear_replace, "widely_linear")


# exact mode always rewrites (whatever `method` says); quantized modes only for phase;
# calibrate mode never (it observes the float layers)
PASS = GraphPass(
    name="widely_linear", run=run,
    enabled=lambda config: config.mode == "exact" or (config.mode in ("ptq", "qat") and config.method == "phase"),
)
