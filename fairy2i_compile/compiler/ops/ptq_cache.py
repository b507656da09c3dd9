"""The PTQ slot cache: a PTQ op quantizes a weight once per weight version.

A PTQ op is given a `slot` (an int the pass allocates per layer, :func:`new_ptq_slot`)
and keeps the quantized result for that slot keyed by the weight's
(data_ptr, _version, shape, dtype, device). In-place updates to a parameter
(optimizer steps, `load_state_dict`, `with torch.no_grad(): w.copy_(...)`) bump
`_version`, and rebinding `param.data` changes data_ptr, so either makes the
next call quantize again. (An update made through `param.data.copy_()` bypasses
the version counter and is NOT seen: PyTorch gives `.data` its own counter.)
A slot's entry is dropped when its parameter is garbage collected. Slot -1
means "do not cache" (a weight computed inside the graph).

What an entry holds: the dense quantized tuple (ptq_phase_quant, ptq_real_quant) or
the packed layer (packing.PackedWidely: 2-bit codes + scales, ptq_packed_linear),
never both. Counters: `ptq_cache_hit` and `ptq_quantize` under
`torch._dynamo.utils.counters["fairy2i"]`.

Its C++ mirror. The C++ CPU kernel of `fairy2i::ptq_packed_linear_cpu`
(codegen/cpu_packed_op.cpp) keeps, per slot, the same weight key (data_ptr, _version,
sizes, dtype) and *weak* references to this cache's codes and scales. While the
key matches and the tensors are alive it never calls back into Python; otherwise
it calls the op `fairy2i::ptq_pack_slot`, which goes through :func:`cached` here.
So this dict stays the owner: dropping or replacing an entry (a freed parameter,
:func:`replace_ptq_slot_value`) makes the C++ side ask again.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor

__all__ = [
    "cached",
    "cached_ptq_value",
    "new_ptq_slot",
    "prefill_ptq_slot",
    "ptq_cache_size",
    "replace_ptq_slot_value",
]


@dataclass
class _Entry:
    key: Tuple[Any, ...]
    value: Any


_CACHE: Dict[int, _Entry] = {}
_LOCK = threading.Lock()
_SLOTS = itertools.count()


def _weight_key(a: Tensor) -> Tuple[Any, ...]:
    return (a.data_ptr(), a._version, tuple(a.shape), a.dtype, a.device)


def new_ptq_slot(param: Optional[Tensor]) -> int:
    """A cache slot for one layer, freed with `param`; -1 (no cache) without a parameter."""
    if param is None:
        return -1
    slot = next(_SLOTS)
    weakref.finalize(param, _CACHE.pop, slot, None)
    return slot


def prefill_ptq_slot(slot: int, a: Tensor, value: Any) -> None:
    """Store a result computed outside the graph (at compile time) for weight `a`."""
    if slot >= 0:
        with _LOCK:
            _CACHE[slot] = _Entry(_weight_key(a), value)


def replace_ptq_slot_value(slot: int, value: Any) -> None:
    """Swap what a filled slot holds (same weight key), e.g. dense -> packed in fuse_stages."""
    with _LOCK:
        entry = _CACHE.get(slot)
        if entry is not None:
            entry.value = value


def ptq_cache_size() -> int:
    """How many slots hold a value."""
    return len(_CACHE)


def cached_ptq_value(slot: int) -> Any:
    """What the PTQ cache holds for `slot` (None if nothing): dense tuple or PackedWidely."""
    entry = _CACHE.get(slot)
    return None if entry is None else entry.value


def cached(slot: int, a: Tensor, compute: Callable[[], Any]) -> Any:
    """The value stored for `slot` if it was computed from this version of `a`, else `compute()`
    (stored unless slot is -1)."""
    from torch._dynamo.utils import counters

    key = _weight_key(a)
    entry = _CACHE.get(slot)
    if entry is not None and entry.key == key:
        counters["fairy2i"]["ptq_cache_hit"] += 1
        return entry.value
    value = compute()
    counters["fairy2i"]["ptq_quantize"] += 1
    if slot >= 0:
        with _LOCK:
            _CACHE[slot] = _Entry(key, value)
    return value
