"""QAT training through the compiled graph, with checkpoints that resume without losing a step.

    compiled = torch.compile(model, backend=Fairy2iBackend({"mode": "qat", "stages": 2}))
    history = train_qat(model, compiled, windows, TrainConfig(steps=1000), checkpoint_path="run.safetensors")

The recipe is the Fairy2i paper's (arXiv 2512.02901): the real master weights of `model`
train with AdamW, betas (0.9, 0.95), weight decay 0, grad clip 2.0, peak LR 3e-5;
every forward re-quantizes them inside the compiled graph (straight-through
backward). Here the LR warms up linearly and decays by a cosine to lr*min_lr_ratio.

Loss for next-token targets y = ids[:, 1:] and logits z = f(ids)[:, :-1]:

    CE  = mean_t  -log softmax(z_t)[y_t]
    KL  = mean_t  sum_v p_t(v) (log p_t(v) - log q_t(v)),   p = softmax(z_teacher/T), q = softmax(z/T)
    loss = (1 - alpha) CE + alpha T^2 KL                     (Hinton et al.; T^2 keeps gradient scale)

Step numbers are 1-based: step s is the s-th optimizer update and the scheduler's
`last_epoch` equals the number of completed steps. The batch of step s is a pure
function of (seed, s): window indices come from a seeded permutation per epoch,
read as one stream, so a resumed run sees exactly the data it would have seen.

Checkpoint format (one safetensors file, written to a temp file and renamed with
`os.replace`, so an interrupted save leaves the previous checkpoint intact):

    tensors   model/<state_dict key>       one per storage; a tied key (lm_head.weight
                                           = model.embed_tokens.weight) is stored once
                                           and listed in metadata["model"]["aliases"]
              optim/state/<i>/<name>       AdamW's exp_avg, exp_avg_sq, step per param i
              rng/cpu, rng/cuda/<d>        RNG states (dropout after resume)
    metadata  format, format_version, step, history, train_config, extra, torch_version,
              model {keys, aliases}, optimizer, scheduler, rng: JSON, where a tensor
              inside a structure is {"__tensor__": "<tensor key>"} and a tuple
              {"__tuple__": [...]}, dict keys that are ints {"__intkeys__": {...}}

Loading never unpickles, validates everything (format, version, keys, shapes,
dtypes, ties, optimizer groups) before it copies anything, and raises
`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.safetensors_io import ST_DTYPES, dedupe_state, first_few, key_difference, standalone_tensor

__all__ = [
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "forward_kwargs",
    "model_logits",
    "windows_fingerprint",
    "CheckpointError",
    "train_qat",
    "qat_step",
    "qat_optimizer",
    "lr_schedule",
    "lm_loss",
    "check_token_windows",
    "batch_indices",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "fairy2i_compile.train_checkpoint"
FORMAT_VERSION = 1
# Fields that change nothing about the trajectory: a resumed run may change them.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")  # TrainConfig fields a resumed run may change
PathLike = Union[str, os.PathLike]
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # TrainConfig.autocast


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one QAT run (defaults: the Fairy2i paper's recipe).

    steps:               optimizer updates in the whole run (the LR schedule spans them).
    lr:                  peak learning rate.
    warmup_steps:        linear warmup from lr/warmup_steps to lr over this many steps.
    min_lr_ratio:        the cosine decays to lr * min_lr_ratio at the last step.
    betas, weight_decay: AdamW's.
    grad_clip:           max global grad norm (clip_grad_norm_); math.inf disables clipping.
    batch_size:          windows per step.
    distill_alpha:       weight of KL(teacher || student) against next-token CE (needs a teacher).
    distill_temperature: T of the distillation softmaxes; the KL term is scaled by T^2.
    checkpoint_every:    save every this many steps (and at the end).
    log_every:           progress-bar update period in steps (history records every step).
    seed:                data order.
    autocast:            None (float32 throughout) or "bfloat16" / "float16": the student's and the
                         teacher's forward run under torch.autocast of that dtype on the parameters'
                         device (matmuls in that dtype; master weights, optimizer and loss stay
                         float32). On a CPU with AMX, bf16 matmuls run 4-14x faster than float32
                         (SmolLM2's shapes at 1024 tokens, measured).
    """

    steps: int
    lr: float = 3e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    batch_size: int = 1
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    autocast: Optional[str] = None

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1, "the number of optimizer updates, e.g. steps=1000")
        _check_float("lr", self.lr, 0.0, math.inf, "the peak learning rate, e.g. lr=3e-5", open_low=True)
        check_int("warmup_steps", self.warmup_steps, 0, "0 for no warmup")
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                f"use warmup_steps <= steps (typically a few percent of steps)"
            )
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, "a ratio in [0, 1], e.g. 0.1")
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"TrainConfig.betas must be two floats in [0, 1), got {betas!r}; e.g. betas=(0.9, 0.95)")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf, "weight_decay >= 0 (the paper uses 0)")
        _check_float("grad_clip", self.grad_clip, 0.0, math.inf, "a max norm > 0 (2.0), or math.inf for none",
                     open_low=True, allow_inf=True)
        check_int("batch_size", self.batch_size, 1, "windows per step, e.g. batch_size=1")
        _check_float("distill_alpha", self.distill_alpha, 0.0, 1.0, "0 (CE only) .. 1 (KL only)")
        _check_float("distill_temperature", self.distill_temperature, 0.0, math.inf, "T > 0, e.g. 1.0",
                     open_low=True)
        check_int("checkpoint_every", self.checkpoint_every, 1, "save period in steps, e.g. 50")
        check_int("log_every", self.log_every, 1, "log period in steps, e.g. 10")
        check_int("seed", self.seed, 0, "a non-negative int")
        if not (self.autocast is None or (isinstance(self.autocast, str) and self.autocast in AUTOCAST_DTYPES)):
            raise ValueError(f"TrainConfig.autocast must be one of {sorted(k for k in AUTOCAST_DTYPES if k)} or None "
                             f"(float32), got {self.autocast!r}")

    def lr_factor(self, completed: int) -> float:
        """LR multiplier for the update that follows `completed` earlier updates (LambdaLR's argument)."""
        if completed < self.warmup_steps:
            return (completed + 1) / self.warmup_steps
        progress = min(1.0, (completed - self.warmup_steps) / max(1, self.steps - self.warmup_steps - 1))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


def check_int(name: str, value: Any, minimum: int, fix: str, owner: str = "TrainConfig.") -> None:
    """Raise ValueError naming ``owner + name``, the value and ``fix`` unless value is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}{name} must be an int >= {minimum}, got {value!r}; {fix}")


def _check_float(name: str, value: Any, low: float, high: float, fix: str, open_low: bool = False,
                 allow_inf: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value <= high)
        ok = ok and (allow_inf or math.isfinite(value))
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"TrainConfig.{name} must be a number in {interval}, got {value!r}; {fix}")


# ------------------------------------------------------------------ data order and loss
@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_windows, generator=g)


def batch_indices(num_windows: int, batch_size: int, seed: int, step: int) -> torch.LongTensor:
    """Window indices of (1-based) `step`: positions (step-1)*B .. step*B-1 of the stream of
    per-epoch seeded permutations. A pure function of its arguments.  -> [batch_size]"""
    if step < 1:
        raise ValueError(f"steps are numbered from 1, got step={step}")
    start = (step - 1) * batch_size
    positions = range(start, start + batch_size)
    return torch.stack([_epoch_permutation(num_windows, seed, p // num_windows)[p % num_windows] for p in positions])


def lm_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss, ce, kl) for next-token prediction; kl is None without a teacher.

    logits, teacher_logits: [B, L, V] in any floating dtype (bf16 under autocast); the
    arithmetic is float32. ``loss`` carries the gradient to ``logits``; ``ce`` and ``kl`` are
    detached values for the record (``loss`` is ``ce`` when alpha == 0 and ``T^2 kl`` when
    alpha == 1, as the module docstring's formula says).

    Computed in row chunks of about 4M logits (:class:`_ChunkedLMLoss`): the gradient
    (softmax(z) - onehot) / N and T (q - p) / N of each chunk is formed in the same pass as the
    loss, so no [B·L, V] float32 temporaries are made (at SmolLM2's 49k vocabulary and 1024
    tokens each such temporary is 200 MB and the unchunked formula made six of them: 3.7 s of
    a 17 s distillation step on 2 cores, measured).
    """
    if teacher_logits is None and alpha != 0.0:
        raise ValueError(f"lm_loss alpha={alpha} weights a KL term that needs teacher_logits; pass them, or alpha=0")
    n = ids.shape[0] * (ids.shape[1] - 1)
    student = logits[:, :-1].reshape(n, logits.shape[-1])
    targets = ids[:, 1:].reshape(n)
    teacher = None if teacher_logits is None else teacher_logits[:, :-1].reshape(n, teacher_logits.shape[-1])
    loss, ce, kl = _ChunkedLMLoss.apply(student, targets, teacher, float(alpha), float(temperature))
    return loss, ce, (None if teacher is None else kl)


LOSS_CHUNK_LOGITS = 1 << 22  # logits per chunk of rows in lm_loss (16 MB of float32)


class _ChunkedLMLoss(torch.autograd.Function):
    """(1 - alpha) CE + alpha T^2 KL of logits [N, V] against targets [N] and teacher [N, V], chunked.

    Per chunk of rows, in float32: log q_1 = log_softmax(z), CE rows -log q_1[y];
    with a teacher, log q = log_softmax(z / T), log p = log_softmax(z_t / T), KL rows
    sum p (log p - log q). Gradient w.r.t. z (saved in z's dtype for the backward):
    (1 - alpha) (q_1 - onehot(y)) / N + alpha T (q - p) / N. ``kl`` is a zero tensor
    without a teacher.
    """

    @staticmethod
    def forward(ctx, z, targets, teacher, alpha, temperature):
        n, v = z.shape
        rows = max(1, LOSS_CHUNK_LOGITS // max(1, v))
        grad = torch.empty_like(z) if z.requires_grad else None
        ce_sum = torch.zeros((), dtype=torch.float64, device=z.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=z.device)
        t = temperature
        with torch.no_grad():
            for i in range(0, n, rows):
                s = z[i:i + rows].float()
                y = targets[i:i + rows]
                log_q1 = torch.log_softmax(s, -1)
                ce_sum += -log_q1.gather(1, y[:, None]).sum(dtype=torch.float64)
                g = None
                if grad is not None and alpha < 1.0:
                    g = log_q1.exp_()
                    g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
                    g *= (1.0 - alpha) / n
                if teacher is not None:
                    log_q = log_q1 if t == 1.0 and g is None else torch.log_softmax(s / t, -1)
                    log_p = torch.log_softmax(teacher[i:i + rows].float() / t, -1)
                    p = log_p.exp()
                    kl_sum += (p * (log_p - log_q)).sum(dtype=torch.float64)
                    if grad is not None and alpha > 0.0:
                        d = (log_q.exp() - p) * (alpha * t / n)
                        g = d if g is None else g.add_(d)
                if grad is not None:
                    grad[i:i + rows] = g if g is not None else 0.0
        ce = (ce_sum / n).float()
        kl = (kl_sum / n).float()
        loss = ce if alpha == 0.0 else (kl * (t * t) if alpha == 1.0 else (1.0 - alpha) * ce + alpha * (t * t) * kl)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss.clone(), ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        (grad,) = ctx.saved_tensors
        return grad * g_loss.to(grad.dtype), None, None, None, None


def model_logits(fn: Callable, ids: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """fn(ids, **kwargs)'s logits [B, L, V] (a tensor, or an output object's .logits)."""
    out = fn(ids, **kwargs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return logits or an object with .logits, got {type(out).__name__}")
    return logits


def cpu_autocast_warning(dtype_name: Optional[str], device: torch.device) -> Optional[str]:
    """Why autocast of ``dtype_name`` would be slow on this CPU, or None.

    Without AVX512-BF16 or AMX (bf16) or AMX-FP16 (fp16) the CPU has no half-precision matmul
    units and oneDNN emulates them: on an AVX2 AMD EPYC a [1024, 576] @ [576, 1536] matmul took
    1649 ms in bf16 against 54 ms in float32 (one thread; fp16 28x likewise), so a bf16 training step
    is many times a float32 one there, while on a Xeon with AMX it was 0.4x."""
    if dtype_name is None or device.type != "cpu":
        return None
    cpu = torch.cpu
    checks = {"bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              "float16": ("_is_amx_fp16_supported",)}[dtype_name]
    if any(getattr(cpu, name, lambda: True)() for name in checks):
        return None
    units = " / ".join(c[4:-10].upper() for c in checks)
    return (f"autocast={dtype_name!r} on a CPU without {dtype_name} matmul units ({units} absent): its matmuls are "
            f"emulated, many times slower than float32 (measured 28-30x on an AVX2 EPYC); pass autocast=None "
            f"(--distill-autocast none) on this machine")


def autocast_context(dtype_name: Optional[str], device: torch.device):
    """torch.autocast for TrainConfig.autocast on ``device`` (a no-op context for None)."""
    if dtype_name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype_name])


def forward_kwargs(module: Any) -> Dict[str, Any]:
    """Keyword arguments for a training forward pass of `module` (no KV cache for HF models)."""
    # HF causal LMs build a KV cache by default; training never reads it.
    return {"use_cache": False} if hasattr(getattr(module, "config", None), "use_cache") else {}


# ------------------------------------------------------------------ training
def train_qat(
    model: nn.Module,
    compiled: Callable,
    windows: torch.Tensor,
    cfg: TrainConfig,
    *,
    teacher: Optional[Callable] = None,
    checkpoint_path: Optional[PathLike] = None,
    eval_fn: Optional[Callable[[int], Any]] = None,
    eval_every: Optional[int] = None,
    progress: bool = True,
    run_until: Optional[int] = None,
    time_budget_s: Optional[float] = None,
) -> Dict[str, Any]:
    """Train `model`'s parameters through `compiled` on `windows` [W, L]; returns the history.

    model:           the nn.Module whose requires_grad parameters train (real master weights).
    compiled:        what the forward calls, e.g. torch.compile(model, backend=Fairy2iBackend(...)).
    teacher:         a frozen model (in eval mode) called under no_grad; its KL is logged even
                     with distill_alpha=0, and distill_alpha > 0 needs one.
    checkpoint_path: resume from it when it exists (same config, same windows), save to it
                     every cfg.checkpoint_every steps, at the end, and on KeyboardInterrupt
                     (then re-raise).
    eval_fn(step):   run under no_grad with the model in eval mode at step 0 (fresh runs), every
                     eval_every steps, and at the end; returns a number or a dict of numbers.
    run_until:       stop (and checkpoint) after this step although the schedule spans cfg.steps;
                     a later call with the same checkpoint_path continues.
    time_budget_s:   stop (and checkpoint) after the first step that ends past this many seconds.

    history: {"step", "loss", "ce", "kl" (None without teacher), "grad_norm", "lr", "time_s"}:
    one entry per step; "eval": [{"step": s, ...}]. JSON-able.
    """
    _check_train_args(model, windows, cfg, teacher, eval_fn, eval_every, run_until, time_budget_s)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = qat_optimizer(params, cfg)
    scheduler = lr_schedule(optimizer, cfg)
    fingerprint = windows_fingerprint(windows)
    path = pathlib.Path(checkpoint_path) if checkpoint_path is not None else None

    step, history = 0, _new_history()
    if path is not None and path.exists():
        _check_resumable(path, cfg, fingerprint)
        step, history = load_checkpoint(path, model, optimizer, scheduler)

    def checkpoint(at: int) -> None:
        save_checkpoint(path, model, optimizer, scheduler, at, history, config=cfg, extra={"windows": fingerprint})

    def evaluate(at: int) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = eval_fn(at)
        finally:
            model.train(was_training)
        result = result if isinstance(result, Mapping) else {"value": result}
        history["eval"].append({"step": at, **{k: _jsonable_number(v) for k, v in result.items()}})

    last = cfg.steps if run_until is None else min(cfg.steps, run_until)
    device = params[0].device
    slow = cpu_autocast_warning(cfg.autocast, device)
    if slow:
        warnings.warn(slow, RuntimeWarning, stacklevel=2)
    student_kwargs, teacher_kwargs = forward_kwargs(model), forward_kwargs(teacher)
    saved = step
    was_training = model.training
    model.train()
    started = time.perf_counter()
    bar = _progress_bar(progress, cfg.steps, step)
    try:
        if eval_fn is not None and step == 0:
            evaluate(0)
        for s in range(step + 1, last + 1):
            t0 = time.perf_counter()
            ids = windows[batch_indices(len(windows), cfg.batch_size, cfg.seed, s)].to(device, torch.long)
            optimizer.zero_grad(set_to_none=True)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad(), autocast_context(cfg.autocast, device):
                    teacher_logits = model_logits(teacher, ids, teacher_kwargs)
            with autocast_context(cfg.autocast, device):
                logits = model_logits(compiled, ids, student_kwargs)
            loss, ce, kl = lm_loss(logits, ids, teacher_logits, cfg.distill_alpha, cfg.distill_temperature)
            del logits, teacher_logits
            lr = optimizer.param_groups[0]["lr"]
            with _sigint_deferred():  # the update and its record are applied whole or not at all
                grad_norm = qat_step(loss, optimizer, params, cfg.grad_clip, scheduler=scheduler, step=s,
                                     last_checkpoint=saved)
                step = s
                _append(history, step=s, loss=loss.item(), ce=ce.item(), kl=None if kl is None else kl.item(),
                        grad_norm=grad_norm, lr=lr, time_s=time.perf_counter() - t0)
            _show(bar, history, cfg.log_every)
            if eval_fn is not None and ((eval_every is not None and s % eval_every == 0) or s == cfg.steps):
                evaluate(s)
            if path is not None and s % cfg.checkpoint_every == 0:
                checkpoint(s)
                saved = s
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                break
        if path is not None and saved != step:
            checkpoint(step)
            saved = step
    except KeyboardInterrupt:
        if path is not None and saved != step:
            checkpoint(step)
        raise
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return history


def qat_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
             grad_clip: Optional[float] = 2.0, *, scheduler: Optional[Any] = None,
             checked_loss: Optional[torch.Tensor] = None, step: Optional[int] = None,
             last_checkpoint: Optional[int] = None) -> float:
    """One QAT update with the guards: backward, clip, optimizer step, scheduler step; returns the
    gradient norm. `train_qat` and `distributed.train_qat_distributed` run every step through it.

        loss = compiled(ids, labels=ids).loss
        opt.zero_grad()
        qat_step(loss, opt, model.parameters())     # backward, clip to 2.0, step

    A non-finite loss, or a non-finite gradient norm after backward (one NaN gradient would
    spread to every weight through clipping and the optimizer), raises FloatingPointError
    before `optimizer.step()`: no parameter changes and the gradients are cleared, so the
    error names the step that went wrong instead of the next forward blaming the weights.
    A Ctrl-C during `optimizer.step()` is delivered after it (a step is applied whole).

    grad_clip:       max global norm; None: no clipping (the norm is still checked).
    scheduler:       stepped after the optimizer (train_qat's LambdaLR, see lr_schedule).
    checked_loss:    the value the loss check reads instead of `loss`. Several processes pass
                     the same value (the mean over ranks), so that all raise at the same step:
                     a rank raising alone would leave the others waiting in backward's
                     collectives. The gradient norm is global already (DDP averages the
                     gradients; an FSDP2 DTensor norm is gathered here).
    step, last_checkpoint: a loop's step number and its last checkpoint, named in the error.
    """
    params = [p for p in parameters if p.requires_grad]
    value = (loss if checked_loss is None else torch.as_tensor(checked_loss)).detach()
    where = "qat_step" if step is None else f"step {step}"
    kept = "no parameter was changed" if step is None else f"parameters are untouched since step {step - 1}"
    if step is None:
        fix = "Lower the learning rate or check the batch"
    else:
        fix = "Lower TrainConfig.lr or check the data"
        if last_checkpoint is not None:
            fix += f"; the last checkpoint is at step {last_checkpoint}"
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{where}: the loss is {value.flatten()[0].item()}; {kept}. {fix}")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
        norm = norm.full_tensor()
    if not torch.isfinite(norm):  # clipping by a NaN norm would make every gradient NaN
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{where}: gradient norm is {norm.item()} (a NaN/Inf gradient) with loss "
                                 f"{value.flatten()[0].item()}; {kept} and the gradients were cleared. {fix}")
    with _sigint_deferred():
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return norm.item()


def qat_optimizer(params: Iterable[torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    """The recipe's optimizer: AdamW with cfg's peak lr, betas and weight decay.

    Its fused implementation (one kernel over all parameters) when every parameter is a plain
    floating tensor on the CPU or a CUDA device: on SmolLM2-135M's 211 weights on 2 CPU cores a
    step (with the clipping) took 0.22 s against 0.65 s for the default per-parameter loop. Same
    update rule and state (checkpoints resume either way); the rounding of the last bit may differ
    between the two. Tensor subclasses (FSDP2's DTensor shards) keep the default implementation.
    """
    params = list(params)
    fused = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                completed: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """cfg's warmup + cosine as a LambdaLR on `optimizer`, positioned after `completed` updates:
    the next update runs at cfg.lr * cfg.lr_factor(completed), and `scheduler.last_epoch` counts
    the updates. A loop that keeps no scheduler state (the distributed checkpoints) rebuilds it
    from the step it resumes at."""
    if isinstance(completed, bool) or not isinstance(completed, int) or completed < 0:
        raise ValueError(f"completed must be the number of updates done, an int >= 0, got {completed!r}")
    if completed:  # what LambdaLR would have recorded when it was built at step 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", cfg.lr)
    # a lambda, not the bound method: LambdaLR.state_dict stores callable objects' attributes
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: cfg.lr_factor(done), last_epoch=completed - 1)


def check_token_windows(windows: Any, name: str = "windows") -> None:
    """ValueError naming ``name`` unless it is an integer (not bool) tensor [W, L] of token ids, W >= 1, L >= 2."""
    if not isinstance(windows, torch.Tensor) or windows.dtype.is_floating_point or windows.dtype.is_complex \
            or windows.dtype == torch.bool or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        got = f"{windows.dtype} {tuple(windows.shape)}" if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"{name} must be an integer tensor [W, L] of token ids with W >= 1, L >= 2, got {got}")


def _check_train_args(model, windows, cfg, teacher, eval_fn, eval_every, run_until, time_budget_s) -> None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the nn.Module whose parameters train, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameter with requires_grad=True: nothing would train")
    check_token_windows(windows)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        low, high = int(windows.min()), int(windows.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"windows hold token ids in [{low}, {high}], outside the model's vocab [0, {vocab})")
    if cfg.distill_alpha > 0 and teacher is None:
        raise ValueError(f"TrainConfig.distill_alpha={cfg.distill_alpha} needs a teacher; pass teacher=... "
                         f"or set distill_alpha=0")
    if eval_every is not None:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every must be an int >= 1 or None, got {eval_every!r}")
        if eval_fn is None:
            raise ValueError("eval_every is set but eval_fn is None; pass eval_fn=lambda step: {...}")
    if run_until is not None and (isinstance(run_until, bool) or not isinstance(run_until, int) or run_until < 1):
        raise ValueError(f"run_until must be an int >= 1 or None, got {run_until!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 seconds or None, got {time_budget_s!r}")


def _new_history() -> Dict[str, Any]:
    return {"step": [], "loss": [], "ce": [], "kl": [], "grad_norm": [], "lr": [], "time_s": [], "eval": []}


def _append(history: Dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        history[key].append(value)


def _jsonable_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def windows_fingerprint(windows: torch.Tensor) -> Dict[str, Any]:
    """Shape and SHA-256 of the training windows, so a resumed run can check it trains on the same data."""
    data = windows.detach().to("cpu", torch.long).contiguous()
    return {"shape": list(data.shape), "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()}


def _check_resumable(path: pathlib.Path, cfg: TrainConfig, fingerprint: Mapping[str, Any]) -> None:
    info = read_checkpoint_info(path)
    saved = info["train_config"]
    if saved is not None:
        now = cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
                if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if diff:
            raise ValueError(
                f"{path} was written by a run with another TrainConfig ({'; '.join(diff)}); resume with the "
                f"same config, or pass a new checkpoint_path to start a new run"
            )
    windows = info["extra"].get("windows") if isinstance(info["extra"], Mapping) else None
    if windows is not None and dict(windows) != dict(fingerprint):
        raise ValueError(
            f"{path} was trained on other windows (shape {windows.get('shape')}, sha256 "
            f"{str(windows.get('sha256'))[:12]}…; now shape {fingerprint['shape']}, sha256 "
            f"{fingerprint['sha256'][:12]}…); pass the same windows, or a new checkpoint_path"
        )


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="qat", unit="step", dynamic_ncols=True)


def _show(bar, history: Mapping[str, Any], every: int) -> None:
    if bar is None:
        return
    bar.update(1)
    if history["step"][-1] % every == 0 or len(history["step"]) == 1:
        window = slice(-every, None)
        post = {"loss": f"{_mean(history['loss'][window]):.4f}", "ce": f"{_mean(history['ce'][window]):.4f}"}
        if history["kl"][-1] is not None:
            post["kl"] = f"{_mean(history['kl'][window]):.4f}"
        post["gnorm"] = f"{history['grad_norm'][-1]:.3g}"
        post["lr"] = f"{history['lr'][-1]:.3g}"
        bar.set_postfix(post, refresh=False)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------ checkpoints
class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into this model / optimizer: truncated,
    corrupt, another format version, or keys and shapes that do not match."""


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler: Optional[Any],
    step: int,
    history: Mapping[str, Any],
    *,
    config: Optional[TrainConfig] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
    """Write model + optimizer + scheduler + RNG state as one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    model_tensors, aliases = dedupe_state(model.state_dict())
    for name, t in model_tensors.items():
        tensors[f"model/{name}"] = t
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "step": str(int(step)),
        "torch_version": torch.__version__,
        "model": json.dumps({"keys": list(model.state_dict().keys()), "aliases": aliases}),
        "optimizer": _dumps(_to_tree(optimizer.state_dict() if optimizer is not None else None, "optim", tensors)),
        "scheduler": _dumps(_to_tree(scheduler.state_dict() if scheduler is not None else None, "sched", tensors)),
        "rng": _dumps(_to_tree(rng, "rng", tensors)),
        "history": _dumps(history, "history"),
        "train_config": _dumps(config.to_dict() if config is not None else None, "config"),
        "extra": _dumps(dict(extra) if extra is not None else {}, "extra"),
    }
    tensors = {k: standalone_tensor(t) for k, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """Metadata only (no tensors): format_version, step, history, train_config, extra, torch_version."""
    path = pathlib.Path(path)
    meta, _ = _read_header(path)
    return {
        "format_version": int(meta["format_version"]),
        "step": int(meta["step"]),
        "history": _loads(meta, "history", path),
        "train_config": _loads(meta, "train_config", path),
        "extra": _loads(meta, "extra", path),
        "torch_version": meta.get("torch_version"),
    }


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    *,
    restore_rng: bool = True,
) -> Tuple[int, Dict[str, Any]]:
    """Load into `model` (and `optimizer`, `scheduler` when given) -> (step, history).

    Validates the whole file against the targets first; on any mismatch raises
    CheckpointError and leaves them untouched. Ties must match (lm_head tied in
    the file <=> tied in the model); values are copied into the existing tensors.
    """
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    meta, header = _read_header(path)
    model_meta = _loads(meta, "model", path)
    aliases = model_meta.get("aliases", {})

    # ---- model: keys, ties, shapes, dtypes
    state = model.state_dict()
    _, model_aliases = dedupe_state(state)
    stored = {k[len("model/"):] for k in header if k.startswith("model/")}
    missing, unexpected = key_difference(state, stored, aliases)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: model keys differ: in the model but not the file {first_few(missing)}, in the file but not "
            f"the model {first_few(unexpected)} (is it a checkpoint of another model?)"
        )
    if aliases != model_aliases:
        raise CheckpointError(
            f"{path}: tied weights differ: the file ties {aliases}, the model ties {model_aliases}; "
            f"tie the model the same way (e.g. model.tie_weights()) before loading"
        )
    for name in sorted(stored):
        shape, dtype = header[f"model/{name}"]
        want_dtype = _st_dtype(state[name].dtype)
        if shape != list(state[name].shape) or (want_dtype is not None and dtype != want_dtype):
            raise CheckpointError(
                f"{path}: key 'model/{name}' is {dtype}{shape} in the file but {_st_dtype(state[name].dtype)}"
                f"{list(state[name].shape)} in the model; load it into a model built with the same config and dtype"
            )
    if optimizer is not None and meta.get("optimizer", "null") == "null":
        raise CheckpointError(f"{path}: holds no optimizer state; call load_checkpoint without an optimizer")

    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the tensors (truncated or corrupt file?): {err}") from err

    # ---- optimizer and scheduler: rebuild, validate against the targets
    opt_state = _from_tree(_loads(meta, "optimizer", path), tensors, path) if optimizer is not None else None
    if opt_state is not None:
        _check_optimizer_state(path, optimizer, opt_state)
    sched_state = _from_tree(_loads(meta, "scheduler", path), tensors, path) if scheduler is not None else None
    if scheduler is not None and not isinstance(sched_state, dict):
        raise CheckpointError(f"{path}: holds no scheduler state; call load_checkpoint without a scheduler")
    rng = _from_tree(_loads(meta, "rng", path), tensors, path) if restore_rng else None
    history = _loads(meta, "history", path)
    step = int(meta["step"])

    # ---- everything checked: copy
    with torch.no_grad():
        for name in stored:
            state[name].copy_(tensors[f"model/{name}"])
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if rng:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return step, history


def _check_optimizer_state(path: pathlib.Path, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    groups = optimizer.param_groups
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError(f"{path}: 'optimizer' metadata is not an optimizer state_dict")
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(
            f"{path}: optimizer has {len(saved['param_groups'])} param groups in the file, {len(groups)} now"
        )
    index_to_param = {}
    for i, (g_saved, g_now) in enumerate(zip(saved["param_groups"], groups)):
        if len(g_saved["params"]) != len(g_now["params"]):
            raise CheckpointError(
                f"{path}: optimizer param group {i} has {len(g_saved['params'])} parameters in the file, "
                f"{len(g_now['params'])} now (were other parameters frozen or added?)"
            )
        index_to_param.update(zip(g_saved["params"], g_now["params"]))
    for index, values in saved["state"].items():
        if index not in index_to_param:
            raise CheckpointError(f"{path}: optimizer state for parameter {index}, which no group holds")
        param = index_to_param[index]
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"{path}: key 'optim/state/{index}/{name}' has shape {list(value.shape)} but its parameter "
                    f"has {list(param.shape)}"
                )


def _read_header(path: pathlib.Path):
    """(metadata, {key: (shape, dtype)}) of a checkpoint, after format and version checks."""
    from ..checkpoints.safetensors_io import read_header

    meta, header = read_header(path, FORMAT, str(FORMAT_VERSION), "training checkpoint",
                               "write one with fairy2i_compile.training.train.train_qat", error=CheckpointError)
    if not meta.get("step", "").isdigit():
        raise CheckpointError(f"{path}: metadata 'step' is {meta.get('step')!r}, expected a non-negative int")
    return meta, header


def _st_dtype(dtype: torch.dtype) -> Optional[str]:
    """safetensors' name of a dtype; None for one this table does not know (not checked)."""
    return ST_DTYPES.get(dtype)


def _to_tree(obj: Any, key: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """JSON-able tree; tensors go to `tensors` under `key`-derived names."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"checkpoint key collision at {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_tree(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_tree(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_tree(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__intkeys__": {str(k): _to_tree(v, f"{key}/{k}", tensors) for k, v in obj.items()}}
        raise TypeError(f"cannot store {key!r}: dict keys must be all str or all int, got {list(obj)[:5]}")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {key!r} of type {type(obj).__name__} in a checkpoint")


def _from_tree(obj: Any, tensors: Mapping[str, torch.Tensor], path: pathlib.Path) -> Any:
    if isinstance(obj, list):
        return [_from_tree(v, tensors, path) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise CheckpointError(f"{path}: metadata refers to tensor {obj['__tensor__']!r}, which the file lacks")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_from_tree(v, tensors, path) for v in obj["__tuple__"])
        if set(obj) == {"__intkeys__"}:
            return {int(k): _from_tree(v, tensors, path) for k, v in obj["__intkeys__"].items()}
        return {k: _from_tree(v, tensors, path) for k, v in obj.items()}
    return obj


def _dumps(obj: Any, what: str = "value") -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint {what} must be JSON-able: {err}") from err


def _loads(meta: Mapping[str, str], key: str, path: pathlib.Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata key {key!r} is not valid JSON: {err}") from err
