"""Compatibility names for the quantizer ops and the PTQ cache, which live in compiler/ops/quantize.py,
compiler/ops/ptq_cache.py and compiler/ops/ptq_packed.py."""

from __future__ import annotations

from .compiler.ops.ptq_cache import (cached_ptq_value, new_ptq_slot, prefill_ptq_slot, ptq_cache_size,
                            replace_ptq_slot_value)
from .compiler.ops.ptq_packed import ptq_packed_linear_direct
from .compiler.ops.quantize import (decode_granularity, encode_granularity, pack_layer, phase_quant, phase_quant_layer,
                           phase_quant_reference, ptq_phase_quant, ptq_real_quant, real_quant)

__all__ = [
    "encode_granularity",
    "decode_granularity",
    "new_ptq_slot",
    "prefill_ptq_slot",
    "ptq_cache_size",
    "phase_quant_reference",
    "phase_quant_layer",
    "pack_layer",
    "cached_ptq_value",
    "replace_ptq_slot_value",
    "ptq_packed_linear_direct",
    "phase_quant",
    "ptq_phase_quant",
    "ptq_real_quant",
    "real_quant",
]
