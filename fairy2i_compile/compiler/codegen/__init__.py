"""Lowering of the packed op (`fairy2i::packed_linear`) to generated kernels.

One kernel family per file:

    dispatch.py        which implementation a `kernel` value means on a device: the table of
                       kernels, resolve_kernel and the one memo (read this first)
    sign_table.py      the code -> (swap, sign) table, derived with sympy
    triton_spec.py     Triton (GPU; TRITON_INTERPRET=1 on CPU): kernel specs, path choice, tuned configs
    triton_source.py   its kernels generated from templates: multiplication-free GEMV, decode-to-tile GEMM
    triton_mma.py      its tensor-core templates: codes as +-1 sign-bit atoms summed by tl.dot
                       (small batches), or combined into dense tiles of A_hat (larger batches)
    triton_launch.py   writing, loading and launching the generated kernels
    triton_packed.py   the Triton family's public names in one place
    cpu_packed.py      the vectorised C++ kernel for CPU tensors, built once with the system
                       compiler and cached (cpu_packed.cpp; cpu_packed_op.cpp registers it as the
                       CPU kernel of fairy2i::packed_linear_cpu / ptq_packed_linear_cpu)
    inductor_packed.py the packed op as aten ops for Inductor (kernel="inductor")
    lower.py           inference-graph lowering of the packed ops to their twins

The ops themselves (schemas, fakes, autograd, pure-torch bodies) are in ops/.
"""

from __future__ import annotations

from .dispatch import resolve_kernel, runs_cpu_kernel, triton_interpreter_enabled

__all__ = ["resolve_kernel", "runs_cpu_kernel", "triton_interpreter_enabled"]
