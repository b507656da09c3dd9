"""Per-block reconstruction ("repair") after calibrated rounding.

GPTQ-style rounding (``rounding.py``) fixes one layer at a time against that
layer's own input statistics; what the model feels is each decoder block's
output. Repair tunes a rounded block, end to end, to reproduce the float
block:

    minimise  mean over tokens t of ‖block_q(x_q)_t - block_fp(x_fp)_t‖² / ‖block_fp(x_fp)_t‖²

over the calibration windows, where x_fp is what the float model feeds block k
and x_q what the already-quantized blocks before it produce (so the block also
learns to undo the error that reaches it). The error is relative per token
because the next block reads RMSNorm(hidden), blind to a token's scale; a plain
MSE was ruled by the first token of each window, whose massive activations are
10³ times the others (measured: the plain MSE repair moved W2 only 490 -> 421).
What is trained, per block:

* every rounded layer's **latent weight** L (initialised to its calibrated Â),
  through the straight-through estimator: the forward pass uses
  ``Q(L) = Σ_t stage_t`` — the T-stage residual phase rule of PhaseQuant at the
  layer's stage scales (``rounding.round_at_scales``) — and the backward pass
  treats Q as the identity for L. Codes change only where a latent weight crosses
  a decision boundary;
* the **stage scales** themselves (Q is linear in them for fixed codes, so they
  get the exact gradient);
* the block's other floating parameters (RMSNorm weights, biases), which stay
  float in the packed model;
* outlier input columns (``rounding`` module docstring) follow L exactly.

Starting from the calibrated codes, the phase rule applied to Â at the same
scales gives back the same codes in all but a few tie cases (a stage's value
dominates the later, smaller stages), so the first step starts where
calibration left off; the loss on the calibration windows is reported before
and after. At the end each layer is rounded once more at its tuned scales; the
result is an ordinary ``RoundedLayer``, packed like any other.

Cost per block and step: one forward and backward of the block on one
calibration window plus the T-stage rounding of its weights.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import quant
from ..fused import run_fused
from ...compiler.ops.widely import real_to_widely_reference as _real_to_widely, widely_to_real_reference as _widely_to_real
from .rounding import RoundedLayer, round_at_scales, stages_at_scales

__all__ = ["repair_block", "RepairLinear", "block_output"]


class RepairLinear(nn.Module):
    """A rounded layer with trainable latent weight and stage scales (module docstring)."""

    def __init__(self, linear: nn.Linear, rounded: RoundedLayer):
        super().__init__()
        if rounded.qu is None or rounded.qw is None:
            raise ValueError("repair needs phase-rounded layers (method='phase')")
        self.latent = nn.Parameter(rounded.a_hat.detach().float().clone())
        self.group_size = rounded.qu.group_size
        self.s = nn.ParameterList([nn.Parameter(t.detach().float().clone())
                                   for t in (rounded.qu.s_re, rounded.qu.s_im, rounded.qw.s_re, rounded.qw.s_im)])
        self.bias = linear.bias
        self.register_buffer("outlier_index", rounded.outlier_index if rounded.outlier_index is not None
                             else torch.zeros(0, dtype=torch.int64))

    def quantized(self) -> Tensor:
        """Q(L) with straight-through gradient for L and exact gradient for the scales, [out, in]."""
        a_q = _PhaseSTE.apply(self.latent, self.s[0], self.s[1], self.s[2], self.s[3], self.group_size)
        if self.outlier_index.numel():
            a_q = a_q.index_copy(1, self.outlier_index, self.latent.index_select(1, self.outlier_index))
        return a_q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized().to(x.dtype), self.bias)

    @torch.no_grad()
    def rounded(self, loss: float, info: Mapping[str, Any]) -> RoundedLayer:
        """The tuned layer rounded once more at its scales: codes, scales, Â (+ outlier correction)."""
        u_re, u_im, w_re, w_im = _real_to_widely(self.latent.detach())
        m = u_re.shape[1]
        s = [t.detach().clamp_min(quant.SCALE_EPS) for t in self.s]
        qu = quant.PhaseQuantized(*_codes_and_values(u_re, u_im, s[0], s[1], m, self.group_size), self.group_size)
        qw = quant.PhaseQuantized(*_codes_and_values(w_re, w_im, s[2], s[3], m, self.group_size), self.group_size)
        a_hat = _widely_to_real(qu.re, qu.im, qw.re, qw.im)
        idx, corr = None, None
        if self.outlier_index.numel():
            idx = self.outlier_index.clone()
            corr = (self.latent.detach()[:, idx] - a_hat[:, idx]).to(torch.float16)
            a_hat[:, idx] += corr.to(a_hat.dtype)
        return RoundedLayer(a_hat, qu, qw, loss, dict(info), idx, corr)


def _reduce_to(x: Tensor, like: Tensor, group_size: Optional[int]) -> Tensor:
    """Sum a per-entry [n, m] gradient over each scale's members -> the scale's shape [n_s, G]."""
    n_s, groups = like.shape
    if groups == 1:
        x = x.sum(1, keepdim=True)
    else:
        n, m = x.shape
        x = F.pad(x, (0, groups * group_size - m)).reshape(n, groups, group_size).sum(-1)
    return x.sum(0, keepdim=True) if n_s == 1 else x


def _ste_forward(latent: Tensor, su_re: Tensor, su_im: Tensor, sw_re: Tensor, sw_im: Tensor,
                 group_size: Optional[int]) -> Tensor:
    """Â [2n, 2m] of the latent weight at the stage scales (the codes are not kept: the backward
    makes them again from the same latent, which costs less than storing and reading them)."""
    u_re, u_im, w_re, w_im = _real_to_widely(latent)
    m = u_re.shape[1]
    _, qu_re, qu_im = round_at_scales(u_re, u_im, su_re, su_im, m, group_size)
    _, qw_re, qw_im = round_at_scales(w_re, w_im, sw_re, sw_im, m, group_size)
    return _widely_to_real(qu_re, qu_im, qw_re, qw_im)


def _ste_scale_grads(g: Tensor, latent: Tensor, su_re: Tensor, su_im: Tensor, sw_re: Tensor, sw_im: Tensor,
                     group_size: Optional[int]):
    """The four stage-scale gradients [T, n_s, G] for the incoming gradient g [2n, 2m] of Â:
    per stage, the sum of g's U (or W) component over the entries coded on that scale's axis,
    signed (+1 / +i: +, -1 / -i: -)."""
    u_re, u_im, w_re, w_im = _real_to_widely(latent)
    n, m = u_re.shape
    g11, g12, g21, g22 = g[:n, :m], g[:n, m:], g[n:, :m], g[n:, m:]
    grads = []
    for re, im, s_re, s_im, d_re, d_im in ((u_re, u_im, su_re, su_im, g11 + g22, g21 - g12),
                                           (w_re, w_im, sw_re, sw_im, g11 - g22, g12 + g21)):
        g_re, g_im = [], []
        for t, (c1, c2, c3, _) in enumerate(stages_at_scales(re, im, s_re, s_im, m, group_size)):
            on_re = (~(c1 | c2 | c3)).to(g.dtype) - c2.to(g.dtype)  # +1 / -1 coded: ±1, else 0
            on_im = c1.to(g.dtype) - c3.to(g.dtype)
            g_re.append(_reduce_to(d_re * on_re, s_re[t], group_size))
            g_im.append(_reduce_to(d_im * on_im, s_re[t], group_size))
        grads += [torch.stack(g_re), torch.stack(g_im)]
    return tuple(grads)


class _PhaseSTE(torch.autograd.Function):
    """Â = widely_to_real(Q(U), Q(W)) of a latent real weight at stage scales [T, n_s, G].

    Forward: the T-stage phase rule at those scales, without autograd bookkeeping.
    Backward: identity for the latent weight (straight-through), and for each stage scale the
    sum of the incoming gradient over the entries whose stage-t code lies on that scale's axis,
    with its sign: Q is linear in the scales for fixed codes, and the codes are piecewise constant.
    Both run as fused compiled loops per weight shape where Inductor is available (``fused.run_fused``).
    """

    @staticmethod
    def forward(ctx, latent, su_re, su_im, sw_re, sw_im, group_size):
        with torch.no_grad():
            out = run_fused(_ste_forward, latent.numel(), latent, su_re, su_im, sw_re, sw_im, group_size)
        ctx.save_for_backward(latent, su_re, su_im, sw_re, sw_im)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            grads = run_fused(_ste_scale_grads, g.numel(), g.contiguous(), *ctx.saved_tensors, ctx.group_size)
        return (g, *grads, None)


def _codes_and_values(re: Tensor, im: Tensor, s_re: Tensor, s_im: Tensor, m: int, group_size: Optional[int]):
    """(codes, s_re, s_im, re, im) in PhaseQuantized's field order; round_at_scales sums the
    stages in ``quant.dequant_phase``'s order, so these values are the kernels' Â bit for bit."""
    codes, q_re, q_im = round_at_scales(re, im, s_re, s_im, m, group_size)
    return codes, s_re, s_im, q_re, q_im


def _batch_of(args: tuple, kwargs: dict, rows: slice, batch: int) -> Tuple[tuple, dict]:
    """Slice every tensor whose first dimension is the calibration batch (others broadcast)."""
    def cut(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch and batch > 1:
            return v[rows]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def block_output(out: Any) -> Tensor:
    """The hidden states a decoder block returns (the first element if it returns a tuple)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"a decoder block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def repair_block(
    block: nn.Module,
    layers: Mapping[str, Tuple[nn.Module, nn.Module, str, RoundedLayer]],
    inputs_q: Sequence[Tuple[tuple, dict]],
    targets: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    rows_per_step: int = 1,
    seed: int = 0,
) -> Tuple[Dict[str, RoundedLayer], Dict[str, float]]:
    """Tune one rounded block to its float outputs (module docstring).

    layers:   {name: (parent module, current nn.Linear, attribute name, RoundedLayer)} of the block
    inputs_q: the block's (args, kwargs) per calibration batch, hidden states from the quantized model
    targets:  the float block's outputs on the float model's hidden states, one per batch
    Returns ({name: re-rounded RoundedLayer}, {"loss_before", "loss_after", "steps", "kept"}), losses
    as the mean over tokens of ‖out - target‖² / ‖target‖² (what the next block's RMSNorm sees),
    "after" measured with the final codes. If repair did not lower the loss the block is put back
    as calibration left it (its layers and norms) and "kept" is False. The block's own float parameters
    (norms) are tuned in place; the layers are put back as nn.Linear with the new Â.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"repair steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"repair lr must be a positive float, got {lr!r}")
    tuned = {name: RepairLinear(lin, r) for name, (_, lin, _, r) in layers.items()}
    for name, (parent, _, attr, _) in layers.items():
        setattr(parent, attr, tuned[name])
    tuned_ids = {id(p) for t in tuned.values() for p in t.parameters()}
    own = [p for p in block.parameters() if id(p) not in tuned_ids and p.is_floating_point()]
    flags = [p.requires_grad for p in own]
    saved = [p.detach().clone() for p in own]
    # (index of the batch, rows) pieces of at most rows_per_step windows each
    pieces = [(i, slice(r, min(r + rows_per_step, t.shape[0])))
              for i, t in enumerate(targets) for r in range(0, t.shape[0], rows_per_step)]
    def loss_on(i: int, rows: slice) -> Tensor:
        args, kwargs = _batch_of(*inputs_q[i], rows, targets[i].shape[0])
        out = block_output(block(*args, **kwargs)).float()
        target = targets[i][rows].float()
        # per token, relative: the next block reads RMSNorm(hidden), which is blind to a token's scale,
        # and a plain MSE would be ruled by the few tokens whose massive activations dwarf the rest
        err = (out - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-12)
        return err.mean()

    def full_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_on(i, rows)) * (rows.stop - rows.start) for i, rows in pieces) / \
                sum(rows.stop - rows.start for _, rows in pieces)

    try:
        for p in own:
            p.requires_grad_(True)
        before = full_loss()
        params = [p for t in tuned.values() for p in t.parameters()] + own
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        rng = random.Random(seed)
        order: List[Tuple[int, slice]] = []
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = list(pieces)
                    rng.shuffle(order)
                i, rows = order.pop()
                opt.zero_grad(set_to_none=True)
                loss = loss_on(i, rows)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p, f in zip(own, flags):
            p.requires_grad_(f)
        for name, (parent, lin, attr, r) in layers.items():
            setattr(parent, attr, lin)
    out: Dict[str, RoundedLayer] = {}
    for name, (parent, lin, attr, r) in layers.items():  # the final codes, measured as they will run
        out[name] = tuned[name].rounded(r.loss, r.info)
        lin.weight = nn.Parameter(out[name].a_hat.to(lin.weight.dtype), requires_grad=False)
    after = full_loss()
    kept = after < before
    if not kept:  # repair never leaves a block worse than calibration did: undo it
        with torch.no_grad():
            for p, v in zip(own, saved):
                p.copy_(v)
        for name, (parent, lin, attr, r) in layers.items():
            lin.weight = nn.Parameter(r.a_hat.to(lin.weight.dtype), requires_grad=False)
            out[name] = r
    info = {"loss_before": before, "loss_after": after, "steps": steps, "kept": kept}
    for name in out:
        out[name].info = {**out[name].info, "repair": info}
    return out, info
