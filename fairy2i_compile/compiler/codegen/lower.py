"""Lowering of the packed ops in the inference graphs the backend runs.

Both runners, inference graphs only (AOTAutograd's graph when nothing records gradients):

    fairy2i.packed_linear      -> fairy2i.packed_linear_infer
    fairy2i.ptq_packed_linear  -> fairy2i.ptq_packed_linear_infer

the same computation without an autograd formula and without per-call argument checks
(the fake implementations checked shapes and dtypes while the graph was traced, and
Dynamo's guards recompile when they change). Inductor calls these as extern kernels.
Each node's implementation is decided once, here, where its device is known
(:func:`node_kernel`, through codegen/dispatch.py), and the twin is given the decided
name ("cpu", "triton", "torch") as its `kernel`.
Where `kernel` resolves to the C++ kernel on CPU and its C++ op registration builds
(cpu_packed.cpu_op_available), a packed layer goes one step further:

    fairy2i.packed_linear(x, codes, scales, b, m, g, k)     -> fairy2i.packed_linear_cpu(x, codes, scales, b, m, g)
    fairy2i.ptq_packed_linear(x, A, b, slot, T, g, n, k)   -> fairy2i.ptq_packed_linear_cpu(x, A, b, slot, T, g, n)

whose CPU kernels are C++ (cpu_packed_op.cpp), so the dispatcher never calls back into
Python (the PTQ one only when its weight changed: it then asks the PTQ cache to repack).

The eager runner (`compiler="eager"`, backend.py) turns the remaining CPU packed ops whose
`kernel` resolves to the C++ kernel into direct calls of that kernel with the op's
signature, no dispatcher at all:

    fairy2i.packed_linear(x, codes, scales, b, m, g, k)   -> cpu_packed.packed_linear_direct(...)
    fairy2i.ptq_packed_linear(x, A, b, slot, T, g, n, k)  -> ops.ptq_packed.ptq_packed_linear_direct(...)

Why: at decode sizes the Python and dispatcher cost of a packed-op call is as large as
the kernel's (a SmolLM2 token makes 211 such calls), and each step here removes a layer
of it; the measurements are in benchmarks/results/bench_cpu_notes.md. Both runners use
packed_linear_cpu where they can; the eager runner's direct calls remain for when the C++
registration is unavailable.
Training graphs keep the ops (their backward needs the autograd formulas).
Each rewrite is a pass of passes.INFERENCE_PIPELINE (passes/lower_cpu_op.py,
lower_cpu_direct.py, lower_infer.py), which holds their order and which runner applies
each; the backend runs it on AOTAutograd's inference graph like the passes before
AOTAutograd: counted, linted, dumped.

The MLIR export sees the graph before these passes (the ops, which say what is computed);
the dumps show it before and after each. The counters `lowered_infer` and
`lowered_cpu_direct` say how many calls were lowered, and `lowered_cpu_op` how many became
packed_linear_cpu or ptq_packed_linear_cpu.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .dispatch import resolve_kernel

__all__ = ["lower_packed_for_cpu_op", "lower_packed_for_eager", "lower_packed_for_inference", "node_kernel"]

KERNEL_INDEX = {  # packed op -> position of its `kernel` argument
    torch.ops.fairy2i.packed_linear.default: 6,
    torch.ops.fairy2i.packed_linear_infer.default: 6,
    torch.ops.fairy2i.ptq_packed_linear.default: 7,
    torch.ops.fairy2i.ptq_packed_linear_infer.default: 7,
}


def _direct_targets():
    from ..ops.ptq_packed import ptq_packed_linear_direct
    from .cpu_packed import packed_linear_direct

    return {
        torch.ops.fairy2i.packed_linear.default: (packed_linear_direct, 6),
        torch.ops.fairy2i.ptq_packed_linear.default: (ptq_packed_linear_direct, 7),
        torch.ops.fairy2i.packed_linear_infer.default: (packed_linear_direct, 6),
        torch.ops.fairy2i.ptq_packed_linear_infer.default: (ptq_packed_linear_direct, 7),
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
            kernel = node_kernel(node)
            node.target = twins[node.target]
            if kernel is not None:  # the twin runs the implementation decided here
                _set_arg(node, KERNEL_INDEX[node.target], kernel)
            lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered


def lower_packed_for_cpu_op(gm: fx.GraphModule) -> int:
    """Swap CPU packed layers whose `kernel` resolves to the C++ kernel for packed_linear_cpu
    (when its C++ registration builds and loads); returns how many."""
    from .cpu_packed import cpu_op_available

    ops = {  # op -> (its C++ twin, index of `kernel`, which the twin drops)
        torch.ops.fairy2i.packed_linear.default: (torch.ops.fairy2i.packed_linear_cpu.default, 6),
        torch.ops.fairy2i.ptq_packed_linear.default: (torch.ops.fairy2i.ptq_packed_linear_cpu.default, 7),
    }
    lowered = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        target, k = ops[node.target]
        if not _runs_cpu_kernel(node) or not cpu_op_available()[0]:
            continue
        node.target = target
        node.args = tuple(node.args[:k])
        if "eager_input_vals" in node.meta:  # Inductor matches these against the new schema
            vals, kwargs = node.meta["eager_input_vals"]
            node.meta["eager_input_vals"] = (tuple(vals[:k]), kwargs)
        lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered


def _device_of(node) -> "torch.device | None":
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else None


def node_kernel(node: fx.Node) -> "str | None":
    """The implementation ("cpu", "triton", "torch", ...) the packed-op call `node` runs, decided
    once per node (kept in node.meta["fairy2i_kernel"]) from its `kernel` argument and the device
    of its activations. None when that is unknown or cannot run there: the op then raises its
    error, with the fix, when it runs."""
    if "fairy2i_kernel" in node.meta:
        return node.meta["fairy2i_kernel"]
    kernel, k = None, KERNEL_INDEX.get(node.target)
    if k is not None and not node.kwargs and len(node.args) > k:
        device = _device_of(node.args[0])
        if device is not None:
            try:
                kernel = resolve_kernel(node.args[k], device)
            except RuntimeError:
                kernel = None
    node.meta["fairy2i_kernel"] = kernel
    return kernel


def _set_arg(node: fx.Node, index: int, value) -> None:
    node.args = (*node.args[:index], value, *node.args[index + 1:])
    if "eager_input_vals" in node.meta:  # Inductor matches these against the schema
        vals, kwargs = node.meta["eager_input_vals"]
        node.meta["eager_input_vals"] = ((*vals[:index], value, *vals[index + 1:]), kwargs)


def _runs_cpu_kernel(node: fx.Node) -> bool:
    """Whether the packed-op call `node` runs the C++ CPU kernel."""
    return node_kernel(node) == "cpu"


def lower_packed_for_eager(gm: fx.GraphModule) -> int:
    """Replace CPU packed-op calls by direct kernel calls in `gm` (in place); returns how many."""
    targets = _direct_targets()
    lowered = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        direct, _ = targets[node.target]
        if not _runs_cpu_kernel(node):
            continue
        node.target = direct
        lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return lowered
