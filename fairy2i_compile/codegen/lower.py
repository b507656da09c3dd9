"""Lowering of the packed ops in the inference graphs the backend runs.

Both runners, inference graphs only (AOTAutograd's graph when nothing records gradients):

    fairy2i.packed_linear      -> fairy2i.packed_linear_infer
    fairy2i.ptq_packed_linear  -> fairy2i.ptq_packed_linear_infer

the same computation without an autograd formula and without per-call argument checks
(the fake implementations checked shapes and dtypes while the graph was traced, and
Dynamo's guards recompile when they change). Inductor calls these as extern kernels.

The eager runner (`compiler="eager"`, backend.py) goes one step further for CPU tensors
whose `kernel` resolves to the C++ kernel: a direct call of that kernel with the op's
signature, no dispatcher at all:

    fairy2i.packed_linear(x, codes, scales, b, m, g, k)   -> cpu_packed.packed_linear_direct(...)
    fairy2i.ptq_packed_linear(x, A, b, slot, T, g, n, k)  -> quant_ops.ptq_packed_linear_direct(...)

Measured on this project's 2-core CPU: the op costs ~70 us of Python and dispatcher per
call with autograd registered, ~50 us as *_infer, ~10 us called directly; a SmolLM2 token
makes 211 such calls (benchmarks/bench_cpu.py). Training graphs keep the ops (their
backward needs the autograd formulas).

The dumps and the MLIR export see the graph before this step (the ops, which say what is
computed); the report's counters `lowered_infer` and `lowered_cpu_direct` say how many
calls were lowered.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import resolve_kernel

__all__ = ["lower_packed_for_eager", "lower_packed_for_inference"]


def _direct_targets():
    from .. import quant_ops
    from .cpu_packed import packed_linear_direct

    return {
        torch.ops.fairy2i.packed_linear.default: (packed_linear_direct, 6),
        torch.ops.fairy2i.ptq_packed_linear.default: (quant_ops.ptq_packed_linear_direct, 7),
        torch.ops.fairy2i.packed_linear_infer.default: (packed_linear_direct, 6),
        torch.ops.fairy2i.ptq_packed_linear_infer.default: (quant_ops.ptq_packed_linear_direct, 7),
    }


def lower_packed_for_inference(gm: fx.GraphModule) -> int:
    """Swap packed ops for their no-autograd, no-check *_infer twins in `gm`; returns how many."""
    twins = {
        torch.ops.fairy2i.packed_linear.default: torch.ops.fairy2i.packed_linear_infer.default,
        torch.ops.fairy2i.ptq_packed_linear.default: torch.ops.fairy2i.ptq_packed_linear_infer.default,
    }
    lowered = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in twins:
            node.target = twins[node.target]
            lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered


def _device_of(node) -> "torch.device | None":
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else None


def lower_packed_for_eager(gm: fx.GraphModule) -> int:
    """Replace CPU packed-op calls by direct kernel calls in `gm` (in place); returns how many."""
    targets = _direct_targets()
    lowered = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets or node.kwargs:
            continue
        direct, kernel_index = targets[node.target]
        device = _device_of(node.args[0])
        if device is None or device.type != "cpu":
            continue
        try:
            impl = resolve_kernel(node.args[kernel_index], device)
        except RuntimeError:
            continue  # the op raises the same error, with its message, when it runs
        if impl != "cpu":
            continue
        node.target = direct
        lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered
