"""End-to-end distillation of a packed model: its codes and scales tuned to the float model's logits.

    result = calibrate(model, cal_windows, stages=2)                  # Hessian-aware codes
    tuned = distill(result.model, model, train_windows, steps=150)    # then the whole model, end to end
    tuned.model                                                       # PackedLinear layers, new codes

Calibration (``rounding.py``) and repair (``repair.py``) fix one layer or one block
at a time against that piece's own float outputs; what the user reads is the
model's next-token distribution, and the errors of 30 blocks add up on the way
there. Distillation trains the whole packed model at once to the float model
("teacher") on ordinary text:

    minimise  mean over tokens t of  KL( softmax(z_teacher,t / τ) ‖ softmax(z_student,t / τ) ) · τ²

(optionally mixed with next-token cross entropy, ``alpha < 1``), with the QAT
loop of ``train.train_qat`` (AdamW, warmup + cosine, gradient clipping, the
non-finite guards, checkpoints that resume). What trains, per converted layer,
is what repair trains (``repair.RepairLinear``): a latent real weight L
initialised to the layer's dequantized Â (so the phase rule at the layer's own
scales gives back its codes), through the straight-through estimator of the
T-stage phase rule ``Q(L)``, and the stage scales with their exact gradient;
outlier input columns follow L exactly. Besides those, the model's 1-D floating
parameters (RMSNorm / LayerNorm weights, biases) train; embeddings and every
other float matrix stay frozen, as they are stored float in the packed model
and the data is small next to their size.

At the end every layer is rounded once more at its tuned scales and packed: the
result is an ordinary packed model (same format, same kernels, ``save_packed``).
The loss on held-out windows is measured before and after with the final codes;
when distillation did not lower it, the packed model comes back as it was and
``kept`` is False. So distillation never makes a model worse on the hold-out.

Starting from a packed checkpoint (``load_packed``) works the same way: the codes,
scales and outlier corrections are all the layer needs.

Cost per step: a forward of the teacher, a forward and backward of the student,
and the T-stage rounding of every latent weight (one pass over the weights).
Memory: the latent weights in float32 and AdamW's two moments (about 12 bytes per
weight), the teacher, and one batch's activations and logits.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..packed_model import PackedLinear, set_submodule
from ...training.train import TrainConfig, check_token_windows, forward_kwargs, lm_loss, model_logits, train_qat
from .driver import check_token_range, model_vocab_size, packed_from_rounded
from .repair import RepairLinear
from .rounding import RoundedLayer

__all__ = ["distill", "DistillResult", "rounded_from_packed", "split_holdout"]


@dataclass
class DistillResult:
    """model: the packed model after distillation (or as it was when ``kept`` is False).

    loss_before / loss_after: mean KL(teacher ‖ student) per token (τ = 1) on the held-out
    windows, with the codes as packed; history: ``train_qat``'s per-step history.
    """

    model: nn.Module
    kept: bool
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    settings: Dict[str, Any]
    history: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        return {"kept": self.kept, "holdout_kl_before": self.loss_before, "holdout_kl_after": self.loss_after,
                "steps": self.steps, "seconds": round(self.seconds, 1), **self.settings}


def rounded_from_packed(layer: PackedLinear) -> RoundedLayer:
    """The RoundedLayer a PackedLinear holds: codes and scales of U and W, Â, outlier correction."""
    packed = layer.packed()
    qu, qw = packed.quantized("U"), packed.quantized("W")
    index = weight = None
    if layer.outliers:
        index, weight = layer.outlier_index.detach().clone(), layer.outlier_weight.detach().clone()
    return RoundedLayer(layer.dequantized_weight(), qu, qw, 0.0, {}, index, weight)


def split_holdout(windows: Tensor) -> tuple:
    """(training, held-out) windows: the last eighth (at least one window) is held out.

    ``distill``'s default split; callers that add training-only text (generated windows) split
    the real windows with it first, so the held-out part stays real text.
    """
    if windows.shape[0] < 2:
        raise ValueError(f"distill needs at least 2 windows to hold one out (got {windows.shape[0]}); "
                         f"pass more windows or holdout=...")
    cut = windows.shape[0] - max(1, windows.shape[0] // 8)
    return windows[:cut], windows[cut:]


def _check_windows(name: str, windows: Any, vocab: Optional[int]) -> Tensor:
    check_token_windows(windows, name)  # e.g. calibration_windows(tokens, 64, 512, avoid=...)
    check_token_range(windows, name, vocab)
    return windows.long()


@torch.no_grad()
def _holdout_kl(student: nn.Module, teacher: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean KL(teacher ‖ student) per predicted token over ``windows`` (τ = 1)."""
    total, count = 0.0, 0
    s_kwargs, t_kwargs = forward_kwargs(student), forward_kwargs(teacher)
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        _, _, kl = lm_loss(model_logits(student, ids, s_kwargs), ids, model_logits(teacher, ids, t_kwargs), 1.0)
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        total += float(kl) * tokens
        count += tokens
    return total / count


def distill(
    model: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    holdout: Optional[Tensor] = None,
    batch_size: int = 1,
    alpha: float = 1.0,
    temperature: float = 1.0,
    warmup_steps: Optional[int] = None,
    grad_clip: float = 2.0,
    seed: int = 0,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    time_budget_s: Optional[float] = None,
    progress: bool = True,
    autocast: Optional[str] = None,
) -> DistillResult:
    """Distil a packed model (PackedLinear layers) to ``teacher`` on ``windows`` (module docstring).

    model:    the packed model (``calibrate(...).model`` or ``load_packed(...)``); left untouched.
    teacher:  the float model it was converted from, in eval mode; never trained.
    windows:  training token ids [W, L]; keep them apart from the evaluation text.
    steps, lr, batch_size, warmup_steps (default 5% of steps), grad_clip, seed: ``TrainConfig``'s
              (lr 1e-3 measured better than 1e-4 on SmolLM2 W2: held-out KL 1.50 against 1.69 after
              30 steps).
    alpha, temperature: weight of the KL term against next-token cross entropy, and its τ.
    holdout:  token ids [W', L'] for the before/after loss (default: the last eighth of
              ``windows``, at least one window, which then do not train).
    checkpoint_path, time_budget_s, progress: ``train_qat``'s (resumable; a budget stops early).
    autocast: ``TrainConfig.autocast``: None (float32) or "bfloat16" / "float16" for the training
              forwards (the held-out loss before and after is always measured in float32).
    """
    t0 = time.perf_counter()
    if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        model = model._orig_mod  # a torch.compile wrapper: distil the module inside
    if not isinstance(model, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"distill needs nn.Modules for model and teacher, got {type(model).__name__} and "
                        f"{type(teacher).__name__}")
    names = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} holds no PackedLinear layer: distill tunes a packed model "
                         f"(calibrate(...).model, pack_model(...) or load_packed(...))")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill steps must be a positive int (e.g. steps=150), got {steps!r}")
    vocab = model_vocab_size(model)
    windows = _check_windows("windows", windows, vocab)
    if holdout is None:
        windows, holdout = split_holdout(windows)
    else:
        holdout = _check_windows("holdout", holdout, vocab)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, batch_size=batch_size, distill_alpha=alpha,
                      distill_temperature=temperature, grad_clip=grad_clip, seed=seed,
                      checkpoint_every=max(1, min(50, steps)), autocast=autocast)  # validates every hyper-parameter, names the fix
    device = next(model.parameters()).device
    windows, holdout = windows.to(device), holdout.to(device)

    student = copy.deepcopy(model).eval()
    layers: Dict[str, PackedLinear] = {n: student.get_submodule(n) for n in names}
    for p in student.parameters():
        p.requires_grad_(False)
    tuned: Dict[str, RepairLinear] = {}
    for name, layer in layers.items():
        tuned[name] = RepairLinear(layer, rounded_from_packed(layer))
        set_submodule(student, name, tuned[name])
    for p in student.parameters():  # norms and biases train with the latent weights and scales
        if p.is_floating_point() and p.dim() <= 1:
            p.requires_grad_(True)
    for t in tuned.values():
        for p in t.parameters():
            p.requires_grad_(True)
    was_training = teacher.training
    teacher.eval()
    try:
        before = _holdout_kl(model, teacher, holdout, batch_size)
        with torch.enable_grad():  # also when the caller runs under no_grad
            history = train_qat(student, student, windows, cfg, teacher=teacher, checkpoint_path=checkpoint_path,
                                progress=progress, time_budget_s=time_budget_s)
        for name, t in tuned.items():  # the final codes, measured as they will run
            set_submodule(student, name, packed_from_rounded(t.rounded(0.0, {}), layers[name],
                                                             layers[name].granularity, layers[name].kernel))
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()  # the new PackedLinear modules start in training mode
        after = _holdout_kl(student, teacher, holdout, batch_size)
    finally:
        teacher.train(was_training)
    done = history["step"][-1] if history["step"] else 0
    kept = math.isfinite(after) and after < before
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "alpha": alpha, "temperature": temperature,
                "warmup_steps": warmup, "grad_clip": grad_clip, "seed": seed, "autocast": autocast, "train_windows": int(windows.shape[0]),
                "train_tokens_per_step": int(batch_size * windows.shape[1]), "holdout_windows": int(holdout.shape[0]),
                "steps_done": done}
    return DistillResult(student if kept else model, kept, before, after, done, time.perf_counter() - t0,
                         settings, history)


