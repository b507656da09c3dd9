"""T stages x {U, W} of a PTQ layer -> one packed op reading 2-bit codes   [PTQ]

Runs after `phase_quant`, in mode="ptq" with method="phase". Pattern (one layer):

    q  = fairy2i.ptq_phase_quant(A.detach(), slot, T, granularity, name)   # 4 dense [n, m]
    y  = fairy2i.widely_linear(x, q[0], q[1], q[2], q[3], b)

Replacement:

    y  = fairy2i.ptq_packed_linear(x, A.detach(), b, slot, T, granularity, name, kernel)

The packed op holds the layer as 2T planes of 2-bit codes + scales (packing.py) in
the PTQ cache slot, and applies all stages of U and W in one pass over x (the
stages are independent: y = sum_t Q^U_t x + Q^W_t conj(x)). The slot's dense
dequantized entry is replaced by the packed one here, so the compiled graph keeps
no dense copy of any quantized weight; the codes come from the PhaseQuant that
`phase_quant` already ran (no second quantization), so packed and fake-quant
weights are the same numbers.

Layers that arrive already packed (`fairy2i.packed_linear` from `PackedLinear`
modules, packed_model.py) get the configured `kernel` and a report entry.

Not fused (negative cases, tested): mode="qat" (the weights change every step;
the STE needs the dense fake-quant weights), mode="exact", the real baselines,
and any `widely_linear` whose inputs are not a `ptq_phase_quant`.

Counters: fuse_stages_fused, fuse_stages_prepacked.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..ops import ptq_cache
from ..options import ScaleGranularity
from ...quantization.packing import pack_phase, packed_nbytes
from . import GraphPass, PassContext
from ._fx import fake_value, insert_call

__all__ = ["fuse_stages_pattern", "fuse_stages_replace", "should_fuse", "PASS"]


def fuse_stages_pattern(node: fx.Node) -> Optional[fx.Node]:
    """The `ptq_phase_quant` node feeding `node` (a widely_linear) through 4 getitems, or None."""
    if node.op != "call_function" or node.target is not torch.ops.fairy2i.widely_linear.default:
        return None
    _, *items, _ = node.args
    sources = set()
    for i, item in enumerate(items):
        if not (isinstance(item, fx.Node) and item.target is operator.getitem and item.args[1] == i):
            return None
        sources.add(item.args[0])
    if len(sources) != 1:
        return None
    (q,) = sources
    if q.target is not torch.ops.fairy2i.ptq_phase_quant.default:
        return None
    return q


def should_fuse(q: fx.Node, node: fx.Node) -> bool:
    """Fuse only when the dense quantized weights have no other user than this layer."""
    return all(set(item.users) == {node} for item in q.users) and len(q.users) == 4


def fuse_stages_replace(gm: fx.GraphModule, node: fx.Node, q: fx.Node, ctx: PassContext) -> fx.Node:
    """Replace ptq_phase_quant `q` + widely_linear `node` by one stage-fused ptq_packed_linear call."""
    graph, fm = gm.graph, ctx.fake_mode
    x, *_, bias = node.args
    frozen, slot, stages, gran, name = q.args
    with graph.inserting_before(node):
        y = insert_call(graph, torch.ops.fairy2i.ptq_packed_linear.default,
                        (x, frozen, bias, slot, stages, gran, name, ctx.config.kernel), node, fm,
                        name="ptq_packed_linear")
    y.meta["fairy2i_layer"] = node.meta.get("fairy2i_layer")
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    for item in list(q.users):
        graph.erase_node(item)
    quantized = q.meta.pop("fairy2i_phase_quantized", None)
    graph.erase_node(q)

    layer = y.meta["fairy2i_layer"]
    rep = ctx.report.layers[layer] if layer is not None else None
    a = fake_value(frozen)
    nbytes = None
    if quantized is not None:
        packed = pack_phase(*quantized)
        # swap the slot's dense entry for the packed one (same weight version key)
        ptq_cache.replace_ptq_slot_value(slot, packed)
        nbytes = packed.nbytes
    elif isinstance(a, torch.Tensor):  # weight computed in the graph: packed at run time
        nbytes = packed_nbytes(a.shape[0] // 2, a.shape[1] // 2, stages, ScaleGranularity.from_op_arg(gran))
    if rep is not None and nbytes is not None:
        rep.bytes_after = nbytes
        rep.extra.update(dense_cache_bytes=0, packed=True, kernel=ctx.config.kernel)
    ctx.bump("fuse_stages_fused")
    return y


def _record_prepacked(node: fx.Node, ctx: PassContext) -> None:
    """A `packed_linear` already in the graph (PackedLinear module): set its kernel, report it."""
    from ._fx import owner_module

    x, codes, scales, bias, m, group_size, _ = node.args
    node.args = (x, codes, scales, bias, m, group_size, ctx.config.kernel)
    from ..report import LayerReport

    c, s = fake_value(codes), fake_value(scales)
    n = int(c.shape[1])
    owner = owner_module(node)
    rep = LayerReport(
        graph=ctx.report.graph, name=(owner[0] if owner and owner[0] else node.name), op="packed_linear",
        shape=[2 * n, 2 * int(m)], dtype=str(fake_value(x).dtype).replace("torch.", ""), bias=bias is not None,
        action="packed", reason=None,
        bytes_before=c.numel() * 4 + s.numel() * s.element_size(),
        bytes_after=c.numel() * 4 + s.numel() * s.element_size(), node=node.name,
    )
    rep.extra.update(stages=int(c.shape[0]) // 2, group_size=int(group_size), kernel=ctx.config.kernel,
                     dense_cache_bytes=0, packed=True)
    ctx.report.layers.append(rep)
    ctx.bump("fuse_stages_prepacked")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Fuse every PTQ phase-quantized widely-linear layer into the stage-fused packed op."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.fairy2i.packed_linear.default:
            _record_prepacked(node, ctx)
            continue
        if ctx.config.mode != "ptq" or ctx.config.method != "phase":
            continue  # defensive: the pipeline enables this pass in PTQ only
        q = fuse_stages_pattern(node)
        if q is not None and should_fuse(q, node):
            fuse_stages_replace(gm, node, q, ctx)


# PTQ only (the default mode): QAT must keep the dense fake-quant weights for its STE, and
# exact mode has nothing quantized; pre-packed layers compiled in other modes keep the
# kernel their PackedLinear module was built with.
PASS = GraphPass(name="fuse_stages", run=run, enabled=lambda config: config.mode == "ptq")
