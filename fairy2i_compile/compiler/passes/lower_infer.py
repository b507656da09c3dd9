"""packed op -> its no-autograd, no-check *_infer twin   [inference graphs, after AOTAutograd]

Runs last on AOTAutograd's inference graph (both runners). Pattern and replacement, for
every packed-op call the earlier lowerings left:

    y = fairy2i.packed_linear(x, codes, scales, b, m, g, kernel)    -> fairy2i.packed_linear_infer(..., decided)
    y = fairy2i.ptq_packed_linear(x, A, b, slot, T, g, name, kernel) -> fairy2i.ptq_packed_linear_infer(..., decided)

where `decided` is the implementation codegen/lower.node_kernel chose for the node ("cpu",
"triton", "torch", ...), so the twin's hot path is one lookup. The fake implementations
checked shapes and dtypes when the graph was traced, and Dynamo's guards recompile when
they change: the twin skips the checks and the autograd formula.

Counter: lowered_infer. Negative cases (tested): a graph without packed ops, training
graphs (not run there: the backward needs the autograd formula).
"""

from __future__ import annotations

from ..codegen.lower import lower_packed_for_inference
from . import counted_pass

__all__ = ["PASS"]

PASS = counted_pass("lower_infer", "lowered_infer", lower_packed_for_inference)
