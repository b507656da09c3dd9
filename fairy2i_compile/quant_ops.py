"""The quantizers as `fairy2i` torch.library ops: what the compiled graph calls.

Every op body calls the pure-torch primitives in `quant.py` (the one source of
truth), so QAT's fake quant, PTQ and (later) packing agree bit for bit.

QAT (straight-through estimator: identity backward for the whole T-stage quantizer)
    phase_quant(u_re, u_im, w_re, w_im, stages, granularity, name) -> (uq_re, uq_im, wq_re, wq_im)
    real_quant(a, method, stages, granularity, name)                -> a_hat

PTQ (inference; quantized once per weight version, see below; no autograd)
    ptq_phase_quant(a, slot, stages, granularity, name)       == phase_quant(*real_to_widely(a), ...)
    ptq_real_quant(a, slot, method, stages, granularity, name) == real_quant(a, ...)

`granularity` travels as a string ("tensor", "row", or the group size in
digits, e.g. "64") because op schemas have no Union type; `name` is the layer's
module path, used in error messages (a NaN weight names its layer).

PTQ cache. A PTQ op is given a `slot` (an int the pass allocates per layer) and
keeps the quantized result for that slot keyed by the weight's
(data_ptr, _version, shape, dtype, device). In-place updates to a parameter
(optimizer steps, `load_state_dict`, `with torch.no_grad(): w.copy_(...)`) bump
`_version`, and rebinding `param.data` changes data_ptr, so either makes the
next call quantize again. (An update made through `param.data.copy_()` bypasses
the version counter and is NOT seen: PyTorch gives `.data` its own counter.)
A slot's entry is dropped when its parameter is garbage collected. Slot -1
means "do not cache" (a weight computed inside the graph).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import quant
from .ops import _real_to_widely

__all__ = [
    "encode_granularity",
    "decode_granularity",
    "new_ptq_slot",
    "prefill_ptq_slot",
    "ptq_cache_size",
    "phase_quant_reference",
]


def encode_granularity(g: Union[str, int]) -> str:
    return g if isinstance(g, str) else str(int(g))


def decode_granularity(g: str) -> Union[str, int]:
    return int(g) if g.isdigit() else g


def phase_quant_reference(a: Tensor, stages: int, granularity: Union[str, int], name: str = "weight"):
    """A [2n, 2m] -> quantized (uq_re, uq_im, wq_re, wq_im): the arithmetic every path shares."""
    return quant.quantize_widely(*_real_to_widely(a), stages, granularity, name=name)


# --------------------------------------------------------------------------- QAT ops
@torch.library.custom_op("fairy2i::phase_quant", mutates_args=())
def phase_quant(
    u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """T-stage PhaseQuant of U and W (each [n, m], independently) -> dequantized, input dtypes."""
    return quant.quantize_widely(u_re, u_im, w_re, w_im, stages, decode_granularity(granularity), name=name)


@phase_quant.register_fake
def _(u_re, u_im, w_re, w_im, stages, granularity, name):
    return tuple(torch.empty_like(t) for t in (u_re, u_im, w_re, w_im))


def _phase_quant_ste(ctx, g_ure, g_uim, g_wre, g_wim):
    return g_ure, g_uim, g_wre, g_wim, None, None, None


phase_quant.register_autograd(_phase_quant_ste)


@torch.library.custom_op("fairy2i::real_quant", mutates_args=())
def real_quant(a: Tensor, method: str, stages: int, granularity: str, name: str) -> Tensor:
    """Real binary / ternary baseline on A [out, in] -> dequantized A_hat, a's dtype."""
    return quant.real_quant(a, method, stages, decode_granularity(granularity), name=name).to(a.dtype)


@real_quant.register_fake
def _(a, method, stages, granularity, name):
    return torch.empty_like(a)


def _real_quant_ste(ctx, g):
    return g, None, None, None, None


real_quant.register_autograd(_real_quant_ste)


# --------------------------------------------------------------------------- PTQ cache
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


def ptq_cache_size() -> int:
    return len(_CACHE)


def _cached(slot: int, a: Tensor, compute: Callable[[], Any]) -> Any:
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


# --------------------------------------------------------------------------- PTQ ops
@torch.library.custom_op("fairy2i::ptq_phase_quant", mutates_args=())
def ptq_phase_quant(
    a: Tensor, slot: int, stages: int, granularity: str, name: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A [2n, 2m] -> quantized (uq_re, uq_im, wq_re, wq_im) [n, m], once per weight version."""
    return _cached(slot, a, lambda: phase_quant_reference(a, stages, decode_granularity(granularity), name))


@ptq_phase_quant.register_fake
def _(a, slot, stages, granularity, name):
    n, m = a.shape[0] // 2, a.shape[1] // 2
    return tuple(a.new_empty((n, m), dtype=quant.compute_dtype(a.dtype)) for _ in range(4))


@torch.library.custom_op("fairy2i::ptq_real_quant", mutates_args=())
def ptq_real_quant(a: Tensor, slot: int, method: str, stages: int, granularity: str, name: str) -> Tensor:
    """A [out, in] -> binary / ternary A_hat (a's dtype), once per weight version."""
    return _cached(
        slot, a, lambda: quant.real_quant(a, method, stages, decode_granularity(granularity), name=name).to(a.dtype)
    )


@ptq_real_quant.register_fake
def _(a, slot, method, stages, granularity, name):
    return torch.empty_like(a)
