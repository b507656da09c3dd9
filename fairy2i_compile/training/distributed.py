"""QAT through the compiled fairy2i graph on several processes: DDP and FSDP2.

    dist.init_process_group("gloo")                 # or "nccl"; torchrun sets RANK/WORLD_SIZE
    module = wrap(model, "fsdp2")                   # or "ddp"
    compiled = torch.compile(module, backend="fairy2i", options={"mode": "qat", "stages": 2})
    history = train_qat_distributed(model, compiled, windows, TrainConfig(steps=100, batch_size=8),
                                    checkpoint_dir="runs/w2")

Why it works without backend changes (torch 2.13):

  DDP    Dynamo's DDPOptimizer cuts the captured graph at gradient-bucket borders
         (`bucket_cap_mb`) and calls the backend once per piece, so that each
         bucket's all-reduce can start while the backward of the earlier pieces
         still runs. Every piece is an ordinary graph to the passes: its linears
         are rewritten and quantized, and the STE backward of each piece hands
         the real-A gradients to DDP's hooks as eager autograd would.
  FSDP2  `fully_shard` keeps the master weights as DTensor shards; its pre-forward
         hooks (run outside the compiled code: Dynamo skips FSDP hooks) all-gather
         them into ordinary full parameters before the block runs. The compiled
         graph therefore quantizes the *full* weight (per-tensor scales are the
         same as on one device), and the gradient of A is reduce-scattered back to
         the shards. `clip_grad_norm_` sees DTensor grads and returns a DTensor norm.

The recipe is `train.train_qat`'s, and so is each update: the same optimizer
(`train.qat_optimizer`), LR schedule (`train.lr_schedule`) and guarded step
(`train.qat_step`), whose loss check reads the loss averaged over ranks, so every rank
stops at the same step. With B windows per step (global batch) on W processes, rank r trains on
windows [r*B/W, (r+1)*B/W) of the step's batch. Both strategies average gradients
over ranks, so with equal-length windows a step equals one single-process step on
the whole batch with the mean loss (tested against `train_qat`).

Checkpoints (torch.distributed.checkpoint, each rank writes its own shards; the
state is keyed by parameter names without wrapper prefixes, so a DDP checkpoint
loads into FSDP2, and into another world size with the same global batch):

    checkpoint_dir/latest.json              {"format", "format_version", "step", "path"}: written last
    checkpoint_dir/step_00000012/           DCP files (.metadata, __<rank>_0.distcp) + fairy2i.json
          fairy2i.json                      step, train_config, world_size, strategy, windows, history

A save writes into `.step_<k>.tmp`, then rank 0 renames it to `step_<k>` and
replaces latest.json (os.replace), so an interrupted save leaves the previous
checkpoint as the latest. Only tensors go through DCP (the optimizer's
param_groups hyper-parameters are rebuilt from the TrainConfig), so loading
unpickles nothing but DCP's own `.metadata` file; the rest is JSON.
The LR of step s is lr * lr_factor(s - 1), a function of s, so no scheduler state
is saved: a resumed run rebuilds the schedule at its step. No RNG state is saved: the Llama-style models trained here use no dropout.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..compiler.options import Strategy
from ..compiler.report import atomic_write_text
from .train import (
    RESUMABLE_CHANGES,
    CheckpointError,
    TrainConfig,
    batch_indices,
    check_token_windows,
    forward_kwargs,
    lm_loss,
    lr_schedule,
    model_logits,
    qat_optimizer,
    qat_step,
    windows_fingerprint,
)

__all__ = [
    "STRATEGIES",
    "CKPT_FORMAT",
    "CKPT_FORMAT_VERSION",
    "wrap",
    "local_batch",
    "train_qat_distributed",
    "save_distributed_checkpoint",
    "load_distributed_checkpoint",
    "latest_checkpoint",
    "full_state_dict",
]

STRATEGIES = tuple(Strategy)  # "ddp", "fsdp2"
CKPT_FORMAT = "fairy2i_compile.distributed_checkpoint"
CKPT_FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def _require_process_group(what: str) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs a process group: call torch.distributed.init_process_group('gloo' or 'nccl') first "
            f"(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for it)"
        )
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------ wrapping
def wrap(model: nn.Module, strategy: str, *, bucket_cap_mb: Optional[float] = None,
         shard_modules: Optional[Callable[[nn.Module], bool]] = None) -> nn.Module:
    """The module to hand to torch.compile, for `strategy` in ("ddp", "fsdp2").

    ddp:   DistributedDataParallel(model); `bucket_cap_mb` sets its gradient buckets and thereby
           where Dynamo cuts the graph (one compiled piece per bucket).
    fsdp2: fully_shard on every block (`shard_modules(m)`; default: the classes listed in a HF
           model's `_no_split_modules`, e.g. LlamaDecoderLayer), then on the root, which holds the
           embeddings, the final norm and lm_head (tied weights must share one FSDP group).
           `model` itself is sharded in place and returned. Build the optimizer afterwards: its
           parameters are the DTensor shards.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if bucket_cap_mb is not None:
        if strategy != "ddp":
            raise ValueError(f"bucket_cap_mb is a DDP setting; {strategy} communicates per fully_shard group, "
                             f"leave bucket_cap_mb=None")
        first = dist._DEFAULT_FIRST_BUCKET_BYTES
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        if torch._dynamo.config.optimize_ddp and bucket_cap_mb * 2**20 < first:
            # Dynamo's DDPOptimizer always starts with torch's default first bucket
            # (1 MiB) and refuses a smaller bucket cap (AssertionError in torch 2.13).
            raise ValueError(
                f"bucket_cap_mb={bucket_cap_mb} is below the {first / 2**20:g} MiB first bucket that Dynamo's "
                f"DDPOptimizer always uses; pass bucket_cap_mb >= {first / 2**20:g} (or None for DDP's 25 MiB)"
            )
    _require_process_group("wrap()")
    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)

    from torch.distributed.fsdp import fully_shard

    if shard_modules is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(
                f"{type(model).__name__} lists no _no_split_modules; pass shard_modules=lambda m: "
                f"isinstance(m, MyBlock) to say which modules get their own FSDP2 group"
            )
        shard_modules = lambda m: type(m).__name__ in names  # noqa: E731
    blocks = [m for m in model.modules() if m is not model and shard_modules(m)]
    if not blocks:
        raise ValueError(f"shard_modules matched no submodule of {type(model).__name__}")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def local_batch(ids: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of a global batch.  ids: [B, L] -> [B / world_size, L]"""
    batch = ids.shape[0]
    if batch % world_size != 0:
        up = -(-batch // world_size) * world_size
        raise ValueError(
            f"global batch {batch} is not divisible by world size {world_size}: every rank must train on the "
            f"same number of windows for the averaged gradient to equal the full batch's; use a batch size that "
            f"is a multiple of {world_size} (e.g. {up}) or launch a world size that divides {batch}"
        )
    share = batch // world_size
    return ids[rank * share:(rank + 1) * share]


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state as CPU tensors on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _require_process_group("full_state_dict()")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()} if dist.get_rank() == 0 else {}


# ------------------------------------------------------------------ training
def train_qat_distributed(
    model: nn.Module,
    compiled: Callable,
    windows: torch.Tensor,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Optional[PathLike] = None,
    run_until: Optional[int] = None,
    strategy: str = "",
    log: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Train `model` (already `wrap`ped; `compiled` calls it) on windows [W, L] -> history.

    cfg.batch_size is the global batch: each step, rank r takes its `local_batch` of
    `batch_indices(W, cfg.batch_size, cfg.seed, step)`. The same windows must be passed on
    every rank. With `checkpoint_dir`, resumes from its latest checkpoint (same config and
    windows) and saves every cfg.checkpoint_every steps and at the end. `run_until` stops
    (checkpointed) after that step. `log(record)` gets each step's record on every rank:
    {"step", "loss" (mean over ranks), "grad_norm", "lr", "time_s"}.
    history: {"step", "loss", "grad_norm", "lr", "time_s"} lists.
    """
    rank, world = _require_process_group("train_qat_distributed()")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    check_token_windows(windows)
    local_batch(torch.empty(cfg.batch_size, 0), rank, world)  # raises, with the fix, unless W divides B
    if run_until is not None and (isinstance(run_until, bool) or not isinstance(run_until, int) or run_until < 1):
        raise ValueError(f"run_until must be an int >= 1 or None, got {run_until!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True: nothing would train")
    optimizer = qat_optimizer(params, cfg)
    fingerprint = windows_fingerprint(windows)

    step, history = 0, {"step": [], "loss": [], "grad_norm": [], "lr": [], "time_s": []}
    if checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        step, info = load_distributed_checkpoint(checkpoint_dir, model, optimizer, config=cfg, windows=windows)
        history = info["history"]
    scheduler = lr_schedule(optimizer, cfg, completed=step)

    def save(at: int) -> None:
        save_distributed_checkpoint(checkpoint_dir, model, optimizer, at, config=cfg, history=history,
                                    extra={"windows": fingerprint, "strategy": strategy})

    device = params[0].device
    kwargs = forward_kwargs(model)
    last = cfg.steps if run_until is None else min(cfg.steps, run_until)
    saved = step
    model.train()
    for s in range(step + 1, last + 1):
        t0 = time.perf_counter()
        ids = windows[batch_indices(len(windows), cfg.batch_size, cfg.seed, s)]
        ids = local_batch(ids, rank, world).to(device, torch.long)
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = lm_loss(model_logits(compiled, ids, kwargs), ids)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
        mean_loss /= world
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = qat_step(loss, optimizer, params, cfg.grad_clip, scheduler=scheduler, checked_loss=mean_loss,
                             step=s, last_checkpoint=saved)
        record = {"step": s, "loss": mean_loss.item(), "grad_norm": grad_norm, "lr": lr,
                  "time_s": time.perf_counter() - t0}
        for key, value in record.items():
            history[key].append(value)
        if log is not None:
            log(record)
        step = s
        if checkpoint_dir is not None and s % cfg.checkpoint_every == 0:
            save(s)
            saved = s
    if checkpoint_dir is not None and saved != step:
        save(step)
    return history


# ------------------------------------------------------------------ checkpoints
def _step_dir(root: pathlib.Path, step: int) -> pathlib.Path:
    return root / f"step_{step:08d}"


def latest_checkpoint(checkpoint_dir: PathLike) -> Optional[Dict[str, Any]]:
    """latest.json of `checkpoint_dir` ({"step", "path", ...}), or None when there is none yet."""
    root = pathlib.Path(checkpoint_dir)
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    try:
        latest = json.loads(pointer.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{pointer}: not readable JSON: {err}") from err
    if not isinstance(latest, dict) or latest.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{pointer}: not a fairy2i distributed checkpoint pointer (format "
                              f"{latest.get('format') if isinstance(latest, dict) else None!r}, expected {CKPT_FORMAT!r})")
    if latest.get("format_version") != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{pointer}: format_version {latest.get('format_version')!r}, this fairy2i_compile "
                              f"reads {CKPT_FORMAT_VERSION}")
    if not isinstance(latest.get("step"), int) or not isinstance(latest.get("path"), str) \
            or "/" in latest["path"] or latest["path"].startswith("."):
        raise CheckpointError(f"{pointer}: expected an int 'step' and a directory name 'path', got {latest}")
    return latest


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """{"model": {fqn: tensor}, "optim": {fqn: {name: tensor}}}: what goes through DCP (tensors only)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": osd["state"]}
    for fqn, values in state["optim"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{name} is a {type(value).__name__}, not a tensor; "
                                f"only tensor optimizer state can be checkpointed")
    return state


def save_distributed_checkpoint(
    checkpoint_dir: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    config: Optional[TrainConfig] = None,
    history: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
    """Save model + optimizer state after `step` (collective: every rank calls it) -> the step dir.

    The directory must be on a filesystem every rank sees (one machine, or a shared mount).
    """
    import torch.distributed.checkpoint as dcp

    rank, world = _require_process_group("save_distributed_checkpoint()")
    root = pathlib.Path(checkpoint_dir)
    final = _step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a save of this step that was interrupted
        tmp.mkdir()
    dist.barrier()
    dcp.save(_tensor_state(model, optimizer), checkpoint_id=str(tmp))
    if rank == 0:
        meta = {
            "format": CKPT_FORMAT,
            "format_version": CKPT_FORMAT_VERSION,
            "step": int(step),
            "world_size": world,
            "torch_version": torch.__version__,
            "train_config": config.to_dict() if config is not None else None,
            "history": dict(history) if history is not None else {},
            "extra": dict(extra) if extra is not None else {},
        }
        atomic_write_text(str(tmp / "fairy2i.json"), json.dumps(meta))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (a rerun): the old copy goes only after the new one is whole
            old = root / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        pointer = {"format": CKPT_FORMAT, "format_version": CKPT_FORMAT_VERSION, "step": int(step),
                   "path": final.name}
        atomic_write_text(str(root / "latest.json"), json.dumps(pointer))
        _fsync_dir(root)
    dist.barrier()
    return final


def _fsync_dir(path: pathlib.Path) -> None:
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_distributed_checkpoint(
    checkpoint_dir: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: Optional[TrainConfig] = None,
    windows: Optional[torch.Tensor] = None,
) -> Tuple[int, Dict[str, Any]]:
    """Load the latest checkpoint of `checkpoint_dir` into the wrapped `model` and its `optimizer`
    (collective) -> (step, info with "history", "train_config", "extra", "world_size").

    With `config` / `windows`, refuses (ValueError) a checkpoint written by a run with another
    trajectory-changing TrainConfig field or other windows. The global batch, not the world
    size, fixes the trajectory: a checkpoint may resume on another world size.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _require_process_group("load_distributed_checkpoint()")
    root = pathlib.Path(checkpoint_dir)
    latest = latest_checkpoint(root)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {root} (no latest.json)")
    path = root / latest["path"]
    meta_path = path / "fairy2i.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: missing or not JSON ({err}); the checkpoint is incomplete") from err
    if meta.get("format") != CKPT_FORMAT or meta.get("format_version") != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                              f"expected {CKPT_FORMAT!r} version {CKPT_FORMAT_VERSION}")
    if meta.get("step") != latest["step"]:
        raise CheckpointError(f"{path}: holds step {meta.get('step')!r} but latest.json says {latest['step']}")
    if config is not None and meta.get("train_config") is not None:
        now, saved = config.to_dict(), meta["train_config"]
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
                if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if diff:
            raise ValueError(f"{path} was written by a run with another TrainConfig ({'; '.join(diff)}); resume "
                             f"with the same config, or pass a new checkpoint directory to start a new run")
    saved_windows = meta.get("extra", {}).get("windows")
    if windows is not None and saved_windows is not None and saved_windows != windows_fingerprint(windows):
        raise ValueError(f"{path} was trained on other windows (shape {saved_windows.get('shape')}, now "
                         f"{list(windows.shape)}); pass the same windows, or a new checkpoint directory")

    # torch fills in a fresh optimizer's state (the targets) only when no parameter holds a
    # gradient; gradients left by an earlier run in this process made it return no state, and
    # DCP then loaded none: AdamW restarted from zero moments. A resumed step recomputes them.
    optimizer.zero_grad(set_to_none=True)
    state = _tensor_state(model, optimizer)  # the targets DCP loads into, in place
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load into this model/optimizer: {err}") from err
    set_model_state_dict(model, state["model"])
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})
    return int(meta["step"]), meta
