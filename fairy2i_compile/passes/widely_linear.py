"""linear(x, A, b) -> fairy2i.widely_linear(x, *fairy2i.real_to_widely(A), b)   [exact]

Runs on the Dynamo graph (before AOTAutograd: afterwards a linear is already
`view -> t -> mm` and no longer recognisable). Parameters are placeholders there.

Rules (each a `<x>_pattern` that recognises a weight application and returns a
`WeightSite`, then one shared `should_rewrite` / `widely_linear_replace`):

    linear_pattern   torch._C._nn.linear(x, A, b)   nn.Linear, F.linear     A: [out, in]
    addmm_pattern    torch.addmm(b, x2d, W)          GPT-2 Conv1D            W: [in, out], a parameter

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

import fnmatch
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.fairy2i.*)
from ..config import Fairy2iConfig
from ..report import LayerReport
from . import GraphPass, PassContext
from ._fx import fake_value, getitem_nodes, insert_call, owner_module, param_of, source_path

__all__ = ["WeightSite", "linear_pattern", "addmm_pattern", "should_rewrite", "widely_linear_replace", "PASS"]


@dataclass
class WeightSite:
    node: fx.Node                 # the linear / addmm call
    op: str                       # "linear" | "addmm"
    x: fx.Node
    weight: fx.Node               # as stored: [out, in] for linear, [in, out] for addmm
    bias: Optional[fx.Node]
    transposed: bool              # weight stored [in, out] (Conv1D)
    out_features: int
    in_features: int
    dtype: torch.dtype


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def linear_pattern(node: fx.Node) -> Optional[WeightSite]:
    if node.op != "call_function" or node.target is not torch._C._nn.linear:
        return None
    x, weight, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    w = fake_value(weight)
    if not isinstance(weight, fx.Node) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return WeightSite(node, "linear", x, weight, bias, False, int(w.shape[0]), int(w.shape[1]), w.dtype)


def addmm_pattern(node: fx.Node) -> Optional[WeightSite]:
    if node.op != "call_function" or node.target is not torch.addmm:
        return None
    bias, x, weight = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        return None
    if not isinstance(weight, fx.Node) or param_of(weight) is None:
        return None  # a general matmul of activations, not a layer
    w, b = fake_value(weight), fake_value(bias)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[1],):
        return None
    return WeightSite(node, "addmm", x, weight, bias, True, int(w.shape[1]), int(w.shape[0]), w.dtype)


RULES: List[Callable[[fx.Node], Optional[WeightSite]]] = [linear_pattern, addmm_pattern]


def layer_name(site: WeightSite) -> str:
    """Dotted name of the module that owns the weight (tied lm_head stays "lm_head")."""
    owner = owner_module(site.node)
    if owner is not None:
        path, cls = owner
        if isinstance(cls, type) and (issubclass(cls, torch.nn.Linear) or cls.__name__ == "Conv1D"):
            return path or "<root>"  # "<root>": the compiled module is the layer itself
    if site.weight.op == "placeholder":
        src = source_path(site.weight)
        if src:
            return src[: -len(".weight")] if src.endswith(".weight") else src
    if owner is not None and owner[0]:
        return f"{owner[0]}.{site.weight.name}"
    return site.node.name


def matching_skip_pattern(name: str, patterns) -> Optional[str]:
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, "*." + pat):
            return pat
    return None


def should_rewrite(site: WeightSite, name: str, config: Fairy2iConfig) -> Optional[str]:
    """None to rewrite, else the reason the layer stays real."""
    if not site.dtype.is_floating_point or site.dtype.is_complex:
        return f"weight dtype {site.dtype} is not a real floating type"
    if site.out_features % 2 or site.in_features % 2:
        return (
            f"odd dims: out_features={site.out_features}, in_features={site.in_features}; "
            "pairing by halves needs both even"
        )
    pat = matching_skip_pattern(name, config.skip)
    if pat is not None:
        return f"matches skip pattern {pat!r}"
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
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    return y


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    sites = []
    for node in list(gm.graph.nodes):
        site = next((s for s in (rule(node) for rule in RULES) if s is not None), None)
        if site is not None:
            sites.append(site)
    seen: dict = {}
    for site in sites:
        base = layer_name(site)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}#{seen[base] - 1}"
        nbytes = site.out_features * site.in_features * site.dtype.itemsize
        reason = should_rewrite(site, base, ctx.config)
        rep = LayerReport(
            graph=ctx.report.graph,
            name=name,
            op=site.op,
            shape=[site.out_features, site.in_features],
            dtype=str(site.dtype).replace("torch.", ""),
            bias=site.bias is not None,
            action="kept_real" if reason else "widely_linear",
            reason=reason,
            bytes_before=nbytes,
            bytes_after=nbytes,  # exact: A stays as it is; U/W are recomputed from it per call
            node=site.node.name,
        )
        pat = matching_skip_pattern(base, ctx.config.skip)
        if pat is not None:
            rep.extra["skip_pattern"] = pat
        ctx.report.layers.append(rep)
        if reason:
            ctx.bump("widely_linear_kept_real")
            continue
        widely_linear_replace(gm, site, len(ctx.report.layers) - 1, ctx)
        ctx.bump("widely_linear_rewritten")


PASS = GraphPass(name="widely_linear", run=run, enabled=lambda config: config.method == "phase")
