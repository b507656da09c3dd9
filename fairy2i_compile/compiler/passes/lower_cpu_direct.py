"""packed op on the C++ kernel -> a direct call of the kernel   [inference graphs, compiler="eager"]

Runs after `lower_cpu_op` on AOTAutograd's inference graph, in the eager runner only (an
Inductor graph must keep ops). Pattern and replacement, for a packed-op call that
`lower_cpu_op` left (the C++ op registration is unavailable) and whose `kernel` resolves
to the C++ kernel on CPU:

    y = fairy2i.packed_linear(x, codes, scales, b, m, g, k)      -> cpu_packed.packed_linear_direct(...)
    y = fairy2i.ptq_packed_linear(x, A, b, slot, T, g, name, k)  -> ops.ptq_packed.ptq_packed_linear_direct(...)

Python functions with the op's signature: no dispatcher at all (codegen/lower.py).

Counter: lowered_cpu_direct. Negative cases (tested): compiler="inductor" (disabled), calls
`lower_cpu_op` already lowered, kernels other than the C++ one.
"""

from __future__ import annotations

from ..codegen.lower import lower_packed_for_eager
from ..options import Compiler
from . import counted_pass

__all__ = ["PASS"]

PASS = counted_pass("lower_cpu_direct", "lowered_cpu_direct", lower_packed_for_eager,
                    enabled=lambda config: config.compiler == Compiler.EAGER)
