"""Input second moments of linear layers: the statistics calibration rounds with.

For a linear layer y = A x̃ + b with real input x̃ ∈ R^{2m}, the expected output
error of a quantized weight Â is (DESIGN of the rounding: ``rounding.py``)

    E ||(A - Â) x̃||² = tr((A - Â) H (A - Â)ᵀ),     H = E[x̃ x̃ᵀ]   (2m × 2m)

so H is all calibration needs from the data. :class:`HessianAccumulator` sums
x̃ x̃ᵀ over every token it is shown, in float64 (a bf16 or fp32 activation's
square summed over 10⁵ tokens would lose digits in fp32), and divides by the
token count at the end.

Two ways to feed it:

* the compiled graph: ``torch.compile(model, backend="fairy2i",
  options={"mode": "calibrate"})`` runs the ``observe`` pass, which puts
  ``fairy2i.observe(x, A, name)`` in front of every linear layer the other modes
  would convert; run the compiled model inside :func:`observing` and each call
  adds its activations to the accumulator of that layer (keyed by the layer's
  name in the compiled module). The model's outputs are the float ones.
* eager hooks (:func:`hook_inputs`), which the block-by-block driver uses on one
  decoder block at a time.

Both end in :meth:`HessianAccumulator.add`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ...compiler.ops.observe import collecting

__all__ = ["HessianAccumulator", "Observations", "observing", "hook_inputs"]


class HessianAccumulator:
    """Running sum of x̃ x̃ᵀ over tokens for one layer; ``hessian()`` is the mean.

    add(x [..., d]): every leading index is a token. float64 throughout.
    """

    def __init__(self, dim: int, name: str = "layer"):
        if dim < 1:
            raise ValueError(f"HessianAccumulator needs a positive input dim, got {dim=}")
        self.dim, self.name = int(dim), name
        self.sum = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: activation has {x.shape[-1]} features, expected {self.dim}")
        x2 = x.detach().reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)
        if x2.shape[0] == 0:
            return
        self.sum.addmm_(x2.t(), x2)
        self.tokens += int(x2.shape[0])

    def hessian(self) -> Tensor:
        """H = Σ x̃ x̃ᵀ / tokens [d, d] float64; raises ValueError if nothing was seen or it is not finite."""
        if self.tokens == 0:
            raise ValueError(
                f"{self.name}: no calibration activations reached this layer; check that the calibration "
                "batches run through it (a layer used only on some paths needs data that takes them)"
            )
        h = self.sum / self.tokens
        if not torch.isfinite(h).all():
            raise ValueError(
                f"{self.name}: calibration activations are not finite (NaN/Inf reached this layer's input); "
                "check the model's weights and the calibration token ids, or run it in float32"
            )
        return h


class Observations(Dict[str, HessianAccumulator]):
    """Layer name -> accumulator, filled while :func:`observing` is active."""

    def add(self, name: str, x: Tensor) -> None:
        acc = self.get(name)
        if acc is None:
            acc = self[name] = HessianAccumulator(int(x.shape[-1]), name)
        acc.add(x)


@contextlib.contextmanager
def observing(into: Optional[Observations] = None) -> Iterator[Observations]:
    """Collect what ``fairy2i.observe`` (``compiler/ops/observe.py``) sees in calibrate-mode compiled graphs."""
    obs = Observations() if into is None else into
    with collecting(obs.add):
        yield obs


@contextlib.contextmanager
def hook_inputs(modules: Dict[str, nn.Module], into: Observations) -> Iterator[Observations]:
    """Forward pre-hooks that add each module's first input to ``into[name]``."""
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(lambda _m, args, _n=name: into.add(_n, args[0])))
        yield into
    finally:
        for h in handles:
            h.remove()
