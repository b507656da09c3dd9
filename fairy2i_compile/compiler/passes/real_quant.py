"""linear(x, A, b) -> linear(x, real_quant(A), b)   real baselines  [QAT / PTQ]

The paper's "Real-Binary" / "Real-Ternary" rows: BitNet-style quantization of
the real weight A itself (no widely-linear rewrite), through the same layer
matching, options and report as Fairy2i so the two can be compared side by side.

    qat:  a_hat = fairy2i.real_quant(A, method, T, granularity, name)       # STE
    ptq:  a_hat = fairy2i.ptq_real_quant(A.detach(), slot, method, T, granularity, name)
    y     = torch._C._nn.linear(x, a_hat, b)

GPT-2's Conv1D (`addmm(b, x2d, W)`, W: [in, out]) becomes a linear on A = W.t(),
so scale rows and groups always run along A's output rows / input dim.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...quantization import quant
from ..ops import ptq_cache
from . import GraphPass, PassContext
from ._fx import insert_call, param_of
from ._layers import WeightSite, kept_real_reason, record_quantized, rewrite_layers, weight_value

__all__ = ["real_quant_replace", "PASS"]


def real_quant_replace(gm: fx.GraphModule, site: WeightSite, layer: int, ctx: PassContext) -> None:
    """Replace the layer's weight by its binary / ternary quantization (QAT or cached PTQ)."""
    cfg, graph, node, fm = ctx.config, gm.graph, site.node, ctx.fake_mode
    name = ctx.report.layers[layer].name
    gran, method = cfg.granularity.op_arg(), cfg.method.value  # op arguments: plain strings
    a_val = weight_value(site)
    a_hat = quant.real_quant(a_val, cfg.method, cfg.stages, cfg.scale_granularity, name=name).to(a_val.dtype) if a_val is not None else None

    with graph.inserting_before(node):
        a = site.weight
        if site.transposed:
            a = insert_call(graph, torch.t, (a,), node, fm)
        if cfg.mode == "qat":
            aq = insert_call(graph, torch.ops.fairy2i.real_quant.default, (a, method, cfg.stages, gran, name), node, fm, name="real_quant")
        else:
            slot = ptq_cache.new_ptq_slot(param_of(site.weight))  # the entry lives as long as the parameter
            if a_hat is not None:
                ptq_cache.prefill_ptq_slot(slot, a_val, a_hat)
            frozen = insert_call(graph, torch.detach, (a,), node, fm)
            aq = insert_call(graph, torch.ops.fairy2i.ptq_real_quant.default, (frozen, slot, method, cfg.stages, gran, name), node, fm, name="ptq_real_quant")
        y = insert_call(graph, torch._C._nn.linear, (site.x, aq, site.bias), node, fm)
    y.meta["fairy2i_layer"] = layer
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    record_quantized(ctx, layer, a_val, a_hat)


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Quantize every convertible linear layer with the real binary / ternary baseline."""
    rewrite_layers(gm, ctx, kept_real_reason, "quantized", real_quant_replace, "real_quant")


PASS = GraphPass(
    name="real_quant",
    run=run,
    enabled=lambda config: config.method in ("binary", "ternary") and config.mode in ("ptq", "qat"),
)
