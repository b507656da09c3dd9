"""sibling packed layers on one input -> one multi-layer call   [inference graphs, after AOTAutograd]

Runs after `lower_cpu_op` on AOTAutograd's inference graph (both runners). A transformer block
feeds one normalised activation to q_proj, k_proj and v_proj, and another to gate_proj and
up_proj: per decode token that is 5 of the 7 packed calls of a block, each paying the dispatcher,
its output allocation, a parallel region and (on the lut8 path) its own activation tables for the
same x. Pattern and replacement, for two or more C++ packed-layer calls on the same activations:

    q = fairy2i.packed_linear_cpu(x, cq, sq, bq, m, gq)
    k = fairy2i.packed_linear_cpu(x, ck, sk, bk, m, gk)        ->   ys = fairy2i.packed_linear_cpu_multi(
    v = fairy2i.packed_linear_cpu(x, cv, sv, bv, m, gv)                  x, [cq, ck, cv], [sq, sk, sv], [bq, bk, bv],
                                                                         m, [gq, gk, gv])
                                                                   q, k, v = ys[0], ys[1], ys[2]

Exact: each output of the multi op is bit-identical to the call it replaces (ops/packed.py,
cpu_packed_op.cpp), so the pass changes no number, only how many calls a token makes
(SmolLM2-135M: 211 -> 121).

Where the fused call goes: right after the last definition of any argument of the group (its
earliest legal place). A group is left alone when that place is not before every use of every
member (an argument computed after a sibling's output is already in use), so no node ever moves
above its inputs or below its users.

`FAIRY2I_CPU_FUSE=0` in the environment switches the pass off (to measure what it is worth).

Counter: fused_siblings (layers moved into a multi call). Negative cases (tested): a single
layer on an input, layers on different inputs, training graphs (not run there), an argument
defined after a sibling's first use, the switch off.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import torch
import torch.fx as fx

from . import counted_pass
from ._fx import getitem_nodes, graph_fake_mode, insert_call
from ..options import env_switch

__all__ = ["PASS", "fuse_siblings", "fuse_enabled"]

_SINGLE = torch.ops.fairy2i.packed_linear_cpu.default
_MULTI = torch.ops.fairy2i.packed_linear_cpu_multi.default


def fuse_enabled() -> bool:
    """False when FAIRY2I_CPU_FUSE is set to an off value (0 / off / false / no)."""
    return env_switch("FAIRY2I_CPU_FUSE")


def _siblings_pattern(gm: fx.GraphModule) -> List[List[fx.Node]]:
    """Groups (graph order) of >= 2 packed_linear_cpu calls with positional args on the same x and m."""
    groups: Dict[tuple, List[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _SINGLE and not node.kwargs and len(node.args) == 6:
            x, m = node.args[0], node.args[4]
            groups[(x, m)].append(node)
    return [g for g in groups.values() if len(g) >= 2]


def _should_fuse(group: List[fx.Node], order: Dict[fx.Node, int]) -> "fx.Node | None":
    """The node after which the fused call goes, or None when the group cannot be fused there."""
    defs = [a for n in group for a in n.all_input_nodes]
    anchor = max(defs, key=order.__getitem__)
    first_use = min(order[u] for n in group for u in n.users) if any(n.users for n in group) else len(order)
    return anchor if order[anchor] < first_use else None


def _siblings_replace(gm: fx.GraphModule, group: List[fx.Node], anchor: fx.Node, fake_mode) -> None:
    x, m = group[0].args[0], group[0].args[4]
    args = (x, [n.args[1] for n in group], [n.args[2] for n in group], [n.args[3] for n in group], m,
            [n.args[5] for n in group])
    with gm.graph.inserting_after(anchor):
        fused = insert_call(gm.graph, _MULTI, args, like=group[0], fake_mode=fake_mode, name="packed_multi")
    with gm.graph.inserting_after(fused):
        items = getitem_nodes(gm.graph, fused, len(group), fake_mode)
    for node, item in zip(group, items):
        node.replace_all_uses_with(item)
        gm.graph.erase_node(node)


def fuse_siblings(gm: fx.GraphModule) -> int:
    """Fuse sibling packed_linear_cpu calls in `gm` (in place); returns how many calls were fused."""
    if not fuse_enabled():
        return 0
    groups = _siblings_pattern(gm)
    if not groups:
        return 0
    fake_mode = graph_fake_mode(gm)
    fused = 0
    for group in groups:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # renumbered: earlier groups added nodes
        anchor = _should_fuse(group, order)
        if anchor is None:
            continue
        _siblings_replace(gm, group, anchor, fake_mode)
        fused += len(group)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


PASS = counted_pass("fuse_siblings", "fused_siblings", fuse_siblings)
