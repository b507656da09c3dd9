"""fairy2i::observe(x, weight, name) -> (): hand a layer's input to whoever is collecting.

The ``observe`` pass (calibrate mode) puts this op in front of every linear layer
the other modes would convert. It returns nothing and is registered as
side-effecting, so FX and AOTAutograd keep it. Each call passes ``(name, x)`` to
the innermost active sink (:func:`collecting`); ``quantization/calibration/observer.py``'s
``observing()`` installs its accumulators as that sink. Calling it with no sink
active is an error that says how to run calibration.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

import torch
from torch import Tensor

__all__ = ["collecting"]

Sink = Callable[[str, Tensor], None]
_SINKS: List[Sink] = []


@contextlib.contextmanager
def collecting(sink: Sink) -> Iterator[None]:
    """While active, every ``fairy2i.observe`` call runs ``sink(name, x)`` (innermost sink wins)."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


_lib = torch.library.Library("fairy2i", "FRAGMENT")
_lib.define("observe(Tensor x, Tensor weight, str name) -> ()")


def _observe_impl(x: Tensor, weight: Tensor, name: str) -> None:
    if not _SINKS:
        raise RuntimeError(
            f"fairy2i.observe ({name}): a model compiled with options={{'mode': 'calibrate'}} ran outside "
            "`with fairy2i_compile.quantization.calibration.observing() as obs:`; run the calibration batches inside it"
        )
    _SINKS[-1](name, x)


def _observe_fake(x: Tensor, weight: Tensor, name: str) -> None:
    return None


for _key in ("CPU", "CUDA"):
    _lib.impl("observe", _observe_impl, _key)
torch.library.register_fake("fairy2i::observe", _observe_fake, lib=_lib)
# an op with no outputs and no mutated args would be dead code to FX/AOTAutograd
torch.fx.node.has_side_effect(torch.ops.fairy2i.observe.default)
