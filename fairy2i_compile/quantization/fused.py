"""Fused straight-through quantizers: the pure-torch quantizer bodies, compiled by Inductor.

Training re-quantizes every weight at every step: QAT (``compiler/ops/quantize.py``,
``fairy2i::phase_quant``: scales from the weight itself) and repair / distillation
(``calibration/repair.py``: the phase rule at trained scales). Run op by op, a T-stage
quantizer makes dozens of passes over each weight; compiled, it is one or two fused loops
per weight shape. Measured on the 2-core CPU, a 1536 x 576 weight at T = 2 with fixed scales:
forward 20 ms eager -> 1.5 ms, scale gradients 13 ms -> 1.9 ms.

What runs (:func:`fused_impl`, the one switch): "inductor" unless ``FAIRY2I_STE_COMPILE=0``
(``off``, ``false``, ``no``; any case) or a compile failed once in this process (no C++
compiler, an Inductor error: then one warning, and every later call runs the same body
eagerly). Weights under ``MIN_NUMEL`` entries always run eagerly: compiling (seconds) would
not pay off. Each body is compiled once per input shape (``dynamic=False``) under a
recompile limit of 64, and always outside autocast (its arithmetic is float32/float64 and
Dynamo guards on the autocast state).

Exactness: the bodies are comparisons, selects, adds, subtracts, multiplies by 0.5 and sums.
The elementwise part is reproduced bit for bit (tested); sums (scales, scale gradients) may be
reduced in another order, so they agree with the eager body to float rounding (tested at 1e-6
relative), and a later stage's code can differ only where a residual ties a decision boundary.
Group scales are expanded to columns by an index gather (``quant.expand_scales``): compiled,
``repeat_interleave`` + slice gave garbage in a ragged last group (an Inductor CPU miscompile,
torch 2.13; tested).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from ..compiler.options import env_switch

__all__ = ["fused_impl", "run_fused", "MIN_NUMEL"]

MIN_NUMEL = 1 << 16  # weights with fewer entries run eagerly
_COMPILED: Dict[Callable, Callable] = {}
_COMPILE_ERROR: Optional[str] = None


def fused_impl() -> str:
    """Which quantizer bodies run: "inductor" (fused, compiled) or "eager (why)"."""
    if not env_switch("FAIRY2I_STE_COMPILE"):
        return "eager (FAIRY2I_STE_COMPILE=0)"
    if _COMPILE_ERROR is not None:
        return f"eager (compiling failed: {_COMPILE_ERROR})"
    return "inductor"


def run_fused(fn: Callable, size: int, *args: Any) -> Any:
    """``fn(*args)``, compiled when :func:`fused_impl` says so and the weight has ``size`` >= MIN_NUMEL
    entries (module docstring); tensors on devices other than CPU / CUDA run eagerly."""
    global _COMPILE_ERROR
    if size < MIN_NUMEL or fused_impl() != "inductor" or any(
            isinstance(a, Tensor) and a.device.type not in ("cpu", "cuda") for a in args):
        return fn(*args)
    device = next(a.device.type for a in args if isinstance(a, Tensor))
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    try:
        with torch.autocast(device, enabled=False), \
                torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            return _COMPILED[fn](*args)
    except Exception as e:  # no C++ compiler, an Inductor bug: the eager body is the same arithmetic
        _COMPILE_ERROR = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        warnings.warn(f"fairy2i: compiling a straight-through quantizer failed ({_COMPILE_ERROR}); training runs "
                      f"it eagerly (correct, slower). Set FAIRY2I_STE_COMPILE=0 to skip the attempt.",
                      RuntimeWarning, stacklevel=3)
        return fn(*args)
