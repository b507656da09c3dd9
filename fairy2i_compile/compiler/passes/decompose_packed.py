"""fairy2i.packed_linear -> its torch-op decomposition, for Inductor to fuse   [kernel="inductor"]

Runs after `fuse_stages`, when `kernel="inductor"` (opt-in: see the measurements in
codegen/inductor_packed.py). Pattern and replacement (one layer, decode-sized):

    y = fairy2i.packed_linear(x, codes, scales, b, m, g, kernel)        # x: <= 4 tokens
    y = codegen.inductor_packed.packed_linear_decomposed(x, codes, scales, b, m, g, kernel)

AOTAutograd traces the replacement into aten ops (shifts, masks, selects, sums) and
Inductor generates the loop nest (codegen/inductor_packed.py). Only layers whose codes
are graph values qualify: `PackedLinear` modules (`pack_model`, `load_packed`). The
stage-fused PTQ op (`ptq_packed_linear`, codes in the PTQ cache) and larger batches keep
the op, which runs the C++ kernel on CPU and Triton on CUDA.

Counter: decompose_packed_decomposed. Negative cases (tested): more than 4 tokens, and
`kernel="cpu"` / `"torch"` / `"triton"`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.fairy2i.packed_linear)
from ..codegen.inductor_packed import DECOMPOSE_MAX_TOKENS, packed_linear_decomposed
from ..config import Fairy2iConfig
from . import GraphPass, PassContext
from ._fx import fake_value

__all__ = ["should_decompose", "PASS"]


def should_decompose(node: fx.Node, config: Fairy2iConfig) -> bool:
    """Whether `node` is a packed-op call this pass rewrites into aten ops (kernel="inductor")."""
    if node.op != "call_function" or node.target is not torch.ops.fairy2i.packed_linear.default:
        return False
    x = fake_value(node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return False
    tokens = x.numel() // max(int(x.shape[-1]), 1)
    if not isinstance(tokens, int) or not 1 <= tokens <= DECOMPOSE_MAX_TOKENS:
        return False  # symbolic or prefill-sized batch: the op's tiled kernels serve it
    return config.kernel == "inductor"


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Decompose every packed-op call that should_decompose selects."""
    for node in list(gm.graph.nodes):
        if should_decompose(node, ctx.config):
            node.target = packed_linear_decomposed
            node.meta["fairy2i_decomposed"] = True
            for rep in ctx.report.layers:
                if rep.node == node.name:
                    rep.extra["kernel"] = "inductor (decomposed)"
            ctx.bump("decompose_packed_decomposed")


PASS = GraphPass(
    name="decompose_packed",
    run=run,
    enabled=lambda config: config.kernel == "inductor",
)
