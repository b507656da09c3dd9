"""FX helpers shared by the passes: fake values, provenance, module names.

Invariant every pass keeps: each node it creates carries `meta["val"]` and
`meta["example_value"]` (a FakeTensor, or a tuple of them) computed under the
graph's own fake mode, plus the provenance (`nn_module_stack`, `stack_trace`)
of the node it replaces, so later passes and the dumps see shapes and origins.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["fake_value", "graph_fake_mode", "insert_call", "module_path", "param_of"]

_PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack")


def fake_value(node: Any) -> Any:
    """The fake tensor a node produces (Dynamo stores `example_value`, AOT `val`)."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["val"] if "val" in meta else meta.get("example_value")


def graph_fake_mode(gm: fx.GraphModule):
    """The fake mode the graph's own meta values live in.

    Not `detect_fake_mode()`: inside a backend that returns the TracingContext's
    mode, which on torch 2.13 differs from the one Dynamo made `example_value` in.
    """
    for node in gm.graph.nodes:
        val = fake_value(node)
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def insert_call(graph: fx.Graph, target, args: tuple, like: fx.Node, fake_mode, name: Optional[str] = None) -> fx.Node:
    """Insert `target(*args)` at the graph's current insertion point with meta filled in."""
    node = graph.call_function(target, args)
    if name:
        node.name = graph._graph_namespace.create_name(name, None)
    for key in _PROVENANCE:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_args = fx.node.map_arg(args, fake_value)
    if fake_mode is not None:
        with fake_mode:
            val = target(*fake_args)
        node.meta["val"] = node.meta["example_value"] = val
    return node


def getitem_nodes(graph: fx.Graph, node: fx.Node, count: int, fake_mode) -> list:
    """Unpack a tuple-returning node into `count` getitem nodes (with meta)."""
    import operator

    out = []
    for i in range(count):
        item = graph.call_function(operator.getitem, (node, i))
        for key in _PROVENANCE:
            if key in node.meta:
                item.meta[key] = node.meta[key]
        val = node.meta.get("val")
        if val is not None:
            item.meta["val"] = item.meta["example_value"] = val[i]
        out.append(item)
    return out


def param_of(node: fx.Node) -> Optional[torch.Tensor]:
    """The real nn.Parameter behind a placeholder, or None (activations, buffers, computed)."""
    if node.op == "placeholder":
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None) if grapharg is not None else None
        if isinstance(example, torch.nn.Parameter):
            return example
    if node.op == "get_attr":
        owner = node.graph.owning_module
        try:
            value = owner.get_parameter(node.target) if owner is not None else None
        except AttributeError:
            return None
        return value
    return None


_SELF = re.compile(r"^L\[['\"](?:self|fn)['\"]\]")
_ARG = re.compile(r"^L\[['\"]([^'\"]+)['\"]\]")
_MODULES = re.compile(r"\.?_(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")
_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
_GETATTR = re.compile(r"getattr\(([^,]+),\s*['\"]([^'\"]+)['\"]\)")


def module_path(source_name: str) -> str:
    """Dynamo source text -> dotted path: "L['self'].model.layers[0].q_proj" -> "model.layers.0.q_proj"."""
    s = source_name
    prev = None
    while prev != s:
        prev = s
        s = _GETATTR.sub(r"\1.\2", s)
    s = _SELF.sub("", s)
    s = _ARG.sub(r"\1", s)
    s = _MODULES.sub(r".\1", s)
    s = _INDEX.sub(r".\1", s)
    return s.strip(".")


def owner_module(node: fx.Node) -> Optional[tuple]:
    """(dotted path, module class) of the innermost nn.Module the node was called in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return module_path(path), cls


def source_path(node: fx.Node) -> Optional[str]:
    """Dotted path of a placeholder's Dynamo source ("model.layers.0.q_proj.weight")."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return module_path(name() if callable(name) else name)
