"""Insert T-stage PhaseQuant between real_to_widely and widely_linear   [QAT / PTQ]

Runs after `widely_linear`, on each `fairy2i.widely_linear` node it created.

mode="qat" (master weights stay the real A; straight-through gradients):

    uw = fairy2i.real_to_widely(A)
    q  = fairy2i.phase_quant(uw[0], uw[1], uw[2], uw[3], T, granularity, name)
    y  = fairy2i.widely_linear(x, q[0], q[1], q[2], q[3], b)

mode="ptq" (quantized once per weight version; no gradient to A):

    q  = fairy2i.ptq_phase_quant(A.detach(), slot, T, granularity, name)
    y  = fairy2i.widely_linear(x, q[0], q[1], q[2], q[3], b)

Both quantize through `quant.phase_quant` on `real_to_widely(A)`, so the two
modes give bit-identical outputs for the same weights. In PTQ, `fuse_stages`
then replaces `ptq_phase_quant` + `widely_linear` by one packed op. The pass also quantizes
each parameter once at compile time, for the report's error figures (and, in
PTQ, to fill the cache so the first call does not quantize again). A NaN/Inf
weight fails here with the layer's name.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import ptq_cache, quantize
from ..ops.widely import widely_to_real_reference
from . import GraphPass, PassContext
from ._fx import getitem_nodes, insert_call, param_of
from ._layers import record_quantized, weight_value

__all__ = ["phase_quant_replace", "PASS"]


def phase_quant_replace(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    """Insert the T-stage PhaseQuant (QAT: phase_quant; PTQ: cached ptq_phase_quant) in front of `node`."""
    cfg, graph, fm = ctx.config, gm.graph, ctx.fake_mode
    layer = node.meta["fairy2i_layer"]
    site = node.meta["fairy2i_site"]
    name = ctx.report.layers[layer].name
    gran = cfg.granularity.op_arg()
    x, u_re, u_im, w_re, w_im, bias = node.args
    uw = u_re.args[0]  # the real_to_widely node
    a = uw.args[0]

    a_val = weight_value(site)
    quantized = quantize.phase_quant_layer(a_val, cfg.stages, cfg.scale_granularity, name) if a_val is not None else None
    value = None if quantized is None else (quantized[0].re, quantized[0].im, quantized[1].re, quantized[1].im)

    with graph.inserting_before(node):
        if cfg.mode == "qat":
            q = insert_call(graph, torch.ops.fairy2i.phase_quant.default, (u_re, u_im, w_re, w_im, cfg.stages, gran, name), node, fm, name="phase_quant")
        else:
            slot = ptq_cache.new_ptq_slot(param_of(site.weight))  # the entry lives as long as the parameter
            if value is not None:
                ptq_cache.prefill_ptq_slot(slot, a_val, value)
            frozen = insert_call(graph, torch.detach, (a,), node, fm)
            q = insert_call(graph, torch.ops.fairy2i.ptq_phase_quant.default, (frozen, slot, cfg.stages, gran, name), node, fm, name="ptq_phase_quant")
            if quantized is not None:  # codes + scales for fuse_stages, which packs them (no second quantization)
                q.meta["fairy2i_phase_quantized"] = quantized
        items = getitem_nodes(graph, q, 4, fm)
    node.args = (x, *items, bias)
    if cfg.mode == "ptq":  # real_to_widely is now dead: A goes straight into the PTQ op
        for item in (u_re, u_im, w_re, w_im):
            graph.erase_node(item)
        graph.erase_node(uw)

    a_hat = widely_to_real_reference(*value) if value is not None else None
    record_quantized(ctx, layer, a_val, a_hat)
    ctx.bump(f"phase_quant_{cfg.mode}")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Quantize the U, W of every widely_linear layer the widely_linear pass produced."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.fairy2i.widely_linear.default and "fairy2i_layer" in node.meta:
            phase_quant_replace(gm, node, ctx)


PASS = GraphPass(
    name="phase_quant", run=run, enabled=lambda config: config.method == "phase" and config.mode in ("ptq", "qat")
)
