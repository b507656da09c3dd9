"""packed op on the C++ kernel -> its C++ op   [inference graphs, after AOTAutograd]

Runs first on AOTAutograd's inference graph (both runners). Pattern and replacement, for
a packed-op call whose `kernel` resolves to the C++ kernel on CPU (codegen/lower.node_kernel)
when the C++ op registration builds and loads (cpu_packed.cpu_op_available):

    y = fairy2i.packed_linear(x, codes, scales, b, m, g, kernel)    -> fairy2i.packed_linear_cpu(x, codes, scales, b, m, g)
    y = fairy2i.ptq_packed_linear(x, A, b, slot, T, g, name, kernel) -> fairy2i.ptq_packed_linear_cpu(x, A, b, slot, T, g, name)

The C++ op's CPU kernel is C++ (cpu_packed_op.cpp): the dispatcher never calls back into
Python (codegen/lower.py says why that matters at decode sizes).

Counter: lowered_cpu_op. Negative cases (tested): a kernel that does not resolve to the C++
kernel ("torch", "triton"), a graph without packed ops, training graphs (not run there).
"""

from __future__ import annotations

from ..codegen.lower import lower_packed_for_cpu_op
from . import counted_pass

__all__ = ["PASS"]

PASS = counted_pass("lower_cpu_op", "lowered_cpu_op", lower_packed_for_cpu_op)
