"""sibling packed layers on one input -> one multi-layer call   [inference graphs, after AOTAutograd]

Runs after `lower_cpu_op` on AOTAutograd's inference graph (both runners). A transformer block
feeds one normalised activation to q_proj, k_proj and v_proj, and another to gate_proj and
up_proj: per decode token that is 5 of the 7 packed calls of a block, each paying the dispatcher,
its output allocation, a parallel region and (on the lut8 path) its own activation tables for the
same x. Pattern and replacement, for two or more C++ packed-layer calls on the same activations:

    q = fairy2i.packed_linear_cpu(x, cq, sq, bq, m, gq)
    k = fairy2i.packed_linear_cpu(x, ck, sk, bk, m, gk)        ->   ys = fairy2i.packed_linear_cpu_multi.n3(
    v = fairy2i.packed_linear_cpu(x, cv, sv, bv, m, gv)                  x, [cq, ck, cv], [sq, sk, sv], [bq, bk, bv],
                                                                         m, [gq, gk, gv])
                                                                   q, k, v = ys[0], ys[1], ys[2]

and the same for the PTQ op on dense weights (a model compiled without `pack_model`):

    y_l = fairy2i.ptq_packed_linear_cpu(x, A_l, b_l, slot_l, T_l, g_l, name_l)   (l = 1..k)
        ->  ys = fairy2i.ptq_packed_linear_cpu_multi.n{k}(x, [A_l], [b_l], [slot_l], [T_l], [g_l], [name_l])

Exact: each output of a multi op is bit-identical to the call it replaces (ops/packed.py,
ops/ptq_packed.py, cpu_packed_op.cpp), so the pass changes no number, only how many calls a
token makes (SmolLM2-135M: 211 -> 121). The op has one overload per group size k (2 ..
cpu_packed.MULTI_MAX, returning k tensors); a larger group is split into calls of at most that
many layers.

Where the fused call goes: right after the last definition of any argument of the group (its
earliest legal place). A group is left alone when that place is not before every use of every
member (an argument computed after a sibling's output is already in use), so no node ever moves
above its inputs or below its users.

`FAIRY2I_CPU_FUSE=0` in the environment switches the pass off (to measure what it is worth).

Counter: fused_siblings (layers moved into a multi call, either op). Negative cases (tested): a single
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
from ..codegen.cpu_packed import MULTI_MAX
from ..ops.packed import packed_linear_cpu_multi
from ..ops.ptq_packed import ptq_packed_linear_cpu_multi
from ..options import env_switch

__all__ = ["PASS", "fuse_siblings", "fuse_enabled"]

_SINGLE = torch.ops.fairy2i.packed_linear_cpu.default
_PTQ_SINGLE = torch.ops.fairy2i.ptq_packed_linear_cpu.default


def _packed_args(group: List[fx.Node]) -> tuple:
    """packed_linear_cpu(x, codes, scales, bias, m, g) calls -> the multi op's arguments."""
    x, m = group[0].args[0], group[0].args[4]
    return (x, [n.args[1] for n in group], [n.args[2] for n in group], [n.args[3] for n in group], m,
            [n.args[5] for n in group])


_DETACH = torch.ops.aten.detach.default


def _undetached(node):
    """The input of `aten.detach(w)`, else the node itself. The PTQ pass feeds each weight as
    w.detach(), which AOTAutograd places right before that layer's call, i.e. after the previous
    sibling's first use; in an inference graph detach changes nothing the op reads (same storage,
    same version counter, and the op records no gradient), so the multi call takes w itself."""
    return node.args[0] if isinstance(node, fx.Node) and node.op == "call_function" and node.target is _DETACH \
        else node


def _ptq_args(group: List[fx.Node]) -> tuple:
    """ptq_packed_linear_cpu(x, a, bias, slot, stages, granularity, name) calls -> the multi op's arguments."""
    return (group[0].args[0], [_undetached(n.args[1]) for n in group],
            *([n.args[i] for n in group] for i in range(2, 7)))


# single op -> (its positional arity, the group key of a call, the multi op for k layers, its arguments)
_KINDS = {
    _SINGLE: (6, lambda n: (n.args[0], n.args[4]), packed_linear_cpu_multi, _packed_args),
    _PTQ_SINGLE: (7, lambda n: (n.args[0],), ptq_packed_linear_cpu_multi, _ptq_args),
}


def fuse_enabled() -> bool:
    """False when FAIRY2I_CPU_FUSE is set to an off value (0 / off / false / no)."""
    return env_switch("FAIRY2I_CPU_FUSE")


def _siblings_pattern(gm: fx.GraphModule) -> List[List[fx.Node]]:
    """Groups (graph order) of 2 .. MULTI_MAX calls of one single op (packed_linear_cpu on the same x
    and m, or ptq_packed_linear_cpu on the same x) with positional args; larger groups are split."""
    groups: Dict[tuple, List[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        kind = _KINDS.get(node.target) if node.op == "call_function" else None
        if kind is not None and not node.kwargs and len(node.args) == kind[0]:
            groups[(node.target, *kind[1](node))].append(node)
    chunks = [g[i:i + MULTI_MAX] for g in groups.values() for i in range(0, len(g), MULTI_MAX)]
    return [c for c in chunks if len(c) >= 2]


def _should_fuse(group: List[fx.Node], args: tuple, order: Dict[fx.Node, int]) -> "fx.Node | None":
    """The node after which the fused call (arguments `args`) goes, or None when the group cannot be fused there."""
    defs: List[fx.Node] = []
    fx.node.map_arg(args, defs.append)
    anchor = max(defs, key=order.__getitem__)
    first_use = min(order[u] for n in group for u in n.users) if any(n.users for n in group) else len(order)
    return anchor if order[anchor] < first_use else None


def _siblings_replace(gm: fx.GraphModule, group: List[fx.Node], args: tuple, anchor: fx.Node, fake_mode) -> None:
    multi = _KINDS[group[0].target][2]
    with gm.graph.inserting_after(anchor):
        fused = insert_call(gm.graph, multi(len(group)), args, like=group[0], fake_mode=fake_mode, name="packed_multi")
    with gm.graph.inserting_after(fused):
        items = getitem_nodes(gm.graph, fused, len(group), fake_mode)
    for node, item in zip(group, items):
        dropped = node.all_input_nodes
        node.replace_all_uses_with(item)
        gm.graph.erase_node(node)
        for arg in dropped:  # a detach only that call read (_undetached)
            if arg.op == "call_function" and arg.target is _DETACH and not arg.users:
                gm.graph.erase_node(arg)


def fuse_siblings(gm: fx.GraphModule) -> int:
    """Fuse sibling packed_linear_cpu / ptq_packed_linear_cpu calls in `gm` (in place); returns how many
    calls were fused."""
    if not fuse_enabled():
        return 0
    groups = _siblings_pattern(gm)
    if not groups:
        return 0
    fake_mode = graph_fake_mode(gm)
    fused = 0
    for group in groups:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # renumbered: earlier groups added nodes
        args = _KINDS[group[0].target][3](group)
        anchor = _should_fuse(group, args, order)
        if anchor is None:
            continue
        _siblings_replace(gm, group, args, anchor, fake_mode)
        fused += len(group)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


PASS = counted_pass("fuse_siblings", "fused_siblings", fuse_siblings)
