"""Every `fairy2i` torch.library op, one module per op family.

Each family module declares its ops once: schema, implementation, fake (meta)
implementation, autograd formula, the inference twins lowering swaps in
(codegen/lower.py), and `BODIES`, the pure-torch body of each op with the op's
signature (what mlir_export decomposes the ops into for torch-mlir).

    widely.py             real_to_widely, widely_to_real, widely_linear      the exact rewrite
    quantize.py           phase_quant, real_quant (QAT, straight-through);
                          ptq_phase_quant, ptq_real_quant (PTQ, cached)
    ptq_cache.py          the PTQ slot cache those ops and ptq_packed.py share (and its C++ mirror)
    packed_reference.py   the packed op's argument check and pure-torch body ("torch" kernel)
    packed.py             packed_linear, packed_linear_infer, packed_linear_cpu
    ptq_packed.py         ptq_packed_linear (+ _infer, _cpu), ptq_pack_slot, ptq_packed_dequant
    packed_triton.py      packed_linear_triton (+ _interpreted): the Triton kernels as ops; imported
                          on first use of kernel="triton" (Triton stays a lazy import)

    observe.py            observe (calibrate mode): hands a layer's input to the active sink

Not here: the C++ CPU kernels of packed_linear_cpu / ptq_packed_linear_cpu
(codegen/cpu_packed_op.cpp registers implementations of the schemas defined here).
Which kernel runs a packed op is codegen/dispatch.py's decision.
"""

from __future__ import annotations

from typing import Callable, Dict

from ...quantization.quant import compute_dtype
from . import observe, packed, ptq_cache, ptq_packed, quantize, widely
from .widely import (real_to_widely, real_to_widely_reference, widely_linear, widely_linear_reference,
                     widely_to_real, widely_to_real_reference)

__all__ = [
    "compute_dtype",
    "observe",
    "packed",
    "ptq_cache",
    "ptq_packed",
    "pure_torch_bodies",
    "quantize",
    "real_to_widely",
    "real_to_widely_reference",
    "widely",
    "widely_linear",
    "widely_linear_reference",
    "widely_to_real",
    "widely_to_real_reference",
]


def pure_torch_bodies() -> Dict[str, Callable]:
    """fairy2i op name (without namespace) -> pure-torch body with the op's signature."""
    return {**widely.BODIES, **quantize.BODIES, **packed.BODIES, **ptq_packed.BODIES}
