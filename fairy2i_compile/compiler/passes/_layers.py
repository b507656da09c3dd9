"""Finding the layers in a Dynamo graph: weight applications and their names.

Shared by the passes that act on layers (`widely_linear`, `real_quant`). Each
rule is a `<x>_pattern(node) -> WeightSite | None`:

    linear_pattern   torch._C._nn.linear(x, A, b)   nn.Linear, F.linear     A: [out, in]
    addmm_pattern    torch.addmm(b, x2d, W)          GPT-2 Conv1D            W: [in, out], a parameter
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx

from ..config import Fairy2iConfig, matching_skip_pattern
from ..report import LayerReport
from . import PassContext
from ._fx import fake_value, owner_module, param_of, source_path

__all__ = ["WeightSite", "linear_pattern", "addmm_pattern", "RULES", "find_sites", "layer_name",
           "matching_skip_pattern", "kept_real_reason", "add_layer_report", "rewrite_layers",
           "weight_value", "record_quantized"]


@dataclass
class WeightSite:
    """One linear layer found in the graph: its call node, the activations, weight and bias nodes."""
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
    """The WeightSite of a `torch._C._nn.linear(x, A, b)` call, else None."""
    if node.op != "call_function" or node.target is not torch._C._nn.linear:
        return None
    x, weight, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    w = fake_value(weight)
    if not isinstance(weight, fx.Node) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return WeightSite(node, "linear", x, weight, bias, False, int(w.shape[0]), int(w.shape[1]), w.dtype)


def addmm_pattern(node: fx.Node) -> Optional[WeightSite]:
    """The WeightSite of an `addmm(b, x, A)` call (GPT-2's Conv1D), else None."""
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


def find_sites(gm: fx.GraphModule) -> Iterator[Tuple[WeightSite, str]]:
    """Every weight application in graph order, with a unique dotted name.

    A module applied twice (shared weights) yields "name" and "name#1".
    """
    seen: dict = {}
    for node in list(gm.graph.nodes):
        site = next((s for s in (rule(node) for rule in RULES) if s is not None), None)
        if site is None:
            continue
        base = layer_name(site)
        seen[base] = seen.get(base, 0) + 1
        yield site, base if seen[base] == 1 else f"{base}#{seen[base] - 1}"


def kept_real_reason(site: WeightSite, name: str, config: Fairy2iConfig) -> Optional[str]:
    """Reasons every conversion shares: the weight's dtype and the user's skip list."""
    if not site.dtype.is_floating_point or site.dtype.is_complex:
        return f"weight dtype {site.dtype} is not a real floating type"
    pat = matching_skip_pattern(name.split("#")[0], config.skip)
    if pat is not None:
        return f"matches skip pattern {pat!r}"
    return None


def add_layer_report(ctx: PassContext, site: WeightSite, name: str, action: str, reason: Optional[str]) -> int:
    """Append the layer's report entry; returns its index (stored in node meta)."""
    nbytes = site.out_features * site.in_features * site.dtype.itemsize
    rep = LayerReport(
        graph=ctx.report.graph,
        name=name,
        op=site.op,
        shape=[site.out_features, site.in_features],
        dtype=str(site.dtype).replace("torch.", ""),
        bias=site.bias is not None,
        action=action,
        reason=reason,
        bytes_before=nbytes,
        bytes_after=nbytes,  # until a quantization pass says otherwise: A stays as it is
        node=site.node.name,
    )
    pat = matching_skip_pattern(name.split("#")[0], ctx.config.skip)
    if pat is not None:
        rep.extra["skip_pattern"] = pat
    ctx.report.layers.append(rep)
    return len(ctx.report.layers) - 1


def rewrite_layers(
    gm: fx.GraphModule,
    ctx: PassContext,
    keep_real: Callable[[WeightSite, str, Fairy2iConfig], Optional[str]],
    action: str,
    replace: Callable[[fx.GraphModule, WeightSite, int, PassContext], Any],
    counter: str,
) -> None:
    """The loop every layer pass runs: report each site, keep it real or `replace` it.

    `keep_real` returns None to convert or the reason the layer stays real;
    bumps `<counter>_kept_real` / `<counter>_rewritten`.
    """
    for site, name in find_sites(gm):
        reason = keep_real(site, name, ctx.config)
        layer = add_layer_report(ctx, site, name, "kept_real" if reason else action, reason)
        if reason:
            ctx.bump(f"{counter}_kept_real")
            continue
        replace(gm, site, layer, ctx)
        ctx.bump(f"{counter}_rewritten")


def weight_value(site: WeightSite) -> Optional[torch.Tensor]:
    """The real weight A [out, in] behind a site at compile time (a view, no copy), or None."""
    param = param_of(site.weight)
    if param is None:
        return None
    a = param.detach()
    return a.t() if site.transposed else a


def record_quantized(ctx: PassContext, layer: int, a: Optional[torch.Tensor], a_hat: Optional[torch.Tensor]) -> None:
    """Fill a layer's report with the quantization settings, storage and error."""
    from ...quantization import quant

    cfg = ctx.config
    rep = ctx.report.layers[layer]
    rep.action = "quantized"
    out_f, in_f = rep.shape
    rep.bytes_after = quant.storage_bytes(cfg.method, cfg.stages, out_f, in_f, cfg.scale_granularity)
    # What the compiled graph holds today besides the model's own weight: PTQ keeps the
    # dequantized weights (U/W in float32 for phase, A_hat for the real baselines) until
    # packed 2-bit storage and kernels replace them; QAT recomputes them every step.
    if cfg.mode == "ptq":
        held = out_f * in_f * (4 if cfg.method == "phase" else getattr(torch, rep.dtype).itemsize)
    else:
        held = 0
    rep.extra.update(
        dense_cache_bytes=held,
        mode=cfg.mode,
        method=cfg.method,
        stages=cfg.stages,
        granularity=cfg.scale_granularity,
        bits_per_weight=quant.bits_per_real_weight(cfg.method, cfg.stages),
    )
    if a is not None and a_hat is not None:
        err = quant.quant_error(a, a_hat)
        rep.extra.update(rel_fro=err["rel_fro"], sqnr_db=err["sqnr_db"])
        if cfg.mode == "qat":
            rep.extra["error_measured_on"] = "weights at compile time"
    else:
        rep.extra.update(rel_fro=None, sqnr_db=None, error_measured_on="n/a: weight computed in the graph")
