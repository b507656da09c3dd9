"""Calibrated conversion of a whole model: statistics, rounding, packing.

    result = calibrate(model, batches, stages=2)         # the user's model is not touched
    result.model                                          # PackedLinear layers, calibrated codes
    torch.compile(result.model, backend="fairy2i")        # runs the packed kernels
    result.save("w2.safetensors")                         # save_packed, calibration recorded

Sequential (default, GPTQ's choice): the model's stack of decoder blocks (the
``nn.ModuleList`` holding the most convertible layers, e.g. ``model.layers``)
is walked block by block. The inputs of block 0 are captured once; for block k,
the calibration batches run through block k to gather each of its layers' input
second moment H (forward pre-hooks, ``observer.hook_inputs``), every layer of
the block is rounded with ``rounding.gptq_round``, and the batches run through
the now-quantized block again to give block k+1 its inputs. So each block is
calibrated on what the already-quantized blocks before it produce. Layers
outside the blocks (``lm_head``) get their H from one more forward pass of the
model with all blocks quantized. Cost: about two forward passes of the model
over the calibration tokens plus the rounding.

Parallel (``sequential=False``): every layer's H from the float model in one
run of the model compiled with ``options={"mode": "calibrate"}`` (the
``observe`` pass), then every layer rounded independently: cheaper, and the
ablation for the sequential walk.

Memory: a deep copy of the model is calibrated (the user's model is never
changed, also when calibration fails half way), the captured block inputs
(batches × tokens × hidden, float32) and one block's H matrices are held.
"""

from __future__ import annotations

import copy
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import quant
from ...compiler.config import Fairy2iConfig
from ..packed_model import PackedLinear, select_layers, set_submodule
from ..packing import pack_phase
from .observer import Observations, hook_inputs, observing
from .repair import block_output, repair_block
from .rotation import rotate_decoder
from .rounding import (MAX_OUTLIERS, OUTLIER_RATIO, RoundedLayer, check_outlier_options, gptq_round, output_error,
                       rtn_round, select_outliers)

__all__ = ["calibrate", "CalibrationResult", "LayerCalibration", "calibration_windows", "find_blocks",
           "packed_from_rounded", "check_token_range", "model_vocab_size"]


@dataclass
class LayerCalibration:
    """What calibration did to one layer (errors relative, H-weighted: tr(E H Eᵀ)/tr(A H Aᵀ))."""

    name: str
    shape: Tuple[int, int]
    tokens: int
    rtn_error: float          # round-to-nearest (the PTQ quantizer) under this layer's H
    calibrated_error: float   # after Hessian-aware rounding
    seconds: float
    first_scale: float = 1.0  # stage-1 scale multiplier the scale search chose
    outliers: int = 0         # input columns kept exactly (float16 correction)


@dataclass
class CalibrationResult:
    model: nn.Module
    layers: Dict[str, LayerCalibration]
    settings: Dict[str, Any]
    kept_real: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    repair: List[Dict[str, float]] = field(default_factory=list)  # per block: loss before/after repair

    def save(self, path, *, dense_dtype: Optional[torch.dtype] = None, progress: bool = False) -> Dict[str, Any]:
        """``save_packed`` of the calibrated (packed) model; the settings go into the metadata."""
        from ...checkpoints.checkpoint import save_packed

        if not any(isinstance(m, PackedLinear) for m in self.model.modules()):
            raise ValueError("CalibrationResult.save needs a packed result: calibrate(..., method='phase', pack=True)")
        return save_packed(self.model, path, dense_dtype=dense_dtype, extra={"calibration": self.settings},
                           progress=progress)

    def table(self) -> str:
        """Per-layer markdown table."""
        lines = ["| layer | shape | tokens | RTN error | calibrated | ratio |", "|---|---|---|---|---|---|"]
        for lc in self.layers.values():
            ratio = lc.calibrated_error / lc.rtn_error if lc.rtn_error > 0 else float("nan")
            lines.append(f"| {lc.name} | {lc.shape[0]}x{lc.shape[1]} | {lc.tokens} | {lc.rtn_error:.4f} | "
                         f"{lc.calibrated_error:.4f} | {ratio:.3f} |")
        return "\n".join(lines)

    def summary(self) -> Dict[str, Any]:
        errs = [(lc.rtn_error, lc.calibrated_error) for lc in self.layers.values()]
        return {
            "layers": len(errs),
            "mean_rtn_error": sum(e[0] for e in errs) / len(errs),
            "mean_calibrated_error": sum(e[1] for e in errs) / len(errs),
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            **self.settings,
        }


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args_, self.kwargs_ = args, kwargs


def calibration_windows(tokens: Tensor, count: int, seq_len: int, *, avoid: int) -> Tensor:
    """``count`` windows of ``seq_len`` tokens from the END of ``tokens`` [N] -> [count, seq_len].

    ``avoid``: the evaluation text is ``tokens[:avoid]`` (e.g. 8 * 2048 for 8 windows of
    2048 from the start); a ValueError names the overlap if the calibration text would reach it.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if count < 1 or seq_len < 2:
        raise ValueError(f"need count >= 1 and seq_len >= 2, got {count=}, {seq_len=}")
    start = tokens.numel() - count * seq_len
    if start < avoid:
        raise ValueError(
            f"{count} calibration windows of {seq_len} tokens from the end start at token {start}, inside the "
            f"evaluation text [0, {avoid}); use fewer or shorter windows (the text has {tokens.numel()} tokens)"
        )
    return tokens[start:].reshape(count, seq_len)


def _as_batches(batches: Any, vocab: Optional[int], min_tokens: int) -> List[Tensor]:
    if isinstance(batches, Tensor):
        items = [batches]
    elif isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        items = list(batches)
    else:
        raise TypeError(f"calibration batches must be a token-id tensor [B, S] or a list of them, got "
                        f"{type(batches).__name__}")
    out: List[Tensor] = []
    for i, b in enumerate(items):
        if not isinstance(b, Tensor):
            raise TypeError(f"calibration batch {i} is a {type(b).__name__}, expected a token-id tensor")
        if b.dtype in (torch.bool,) or b.is_floating_point() or b.is_complex():
            raise TypeError(f"calibration batch {i} has dtype {b.dtype}; token ids must be an integer tensor "
                            "(e.g. tokenizer(...)['input_ids'] or .long())")
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.dim() != 2 or b.numel() == 0:
            raise ValueError(f"calibration batch {i} must be [batch, seq] with at least one token, "
                             f"got shape {tuple(b.shape)}")
        check_token_range(b, f"calibration batch {i}", vocab)
        out.append(b.long())
    if not out:
        raise ValueError("no calibration batches: pass token ids, e.g. calibration_windows(tokens, 32, 512, avoid=...)")
    total = sum(b.numel() for b in out)
    if total < min_tokens:
        raise ValueError(f"calibration got {total} tokens, fewer than min_tokens={min_tokens}: the statistics "
                         "would be noise; pass more text (tens of thousands of tokens; 8k at the very least "
                         "for useful results) or lower min_tokens")
    return out


def check_token_range(ids: Tensor, what: str, vocab: Optional[int]) -> None:
    """ValueError naming ``what`` when token ids fall outside [0, vocab) (vocab None: only >= 0)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"{what} has token ids in [{lo}, {hi}], outside the model's vocabulary [0, {vocab}); "
                         f"tokenize with the model's own tokenizer")


def model_vocab_size(model: nn.Module) -> Optional[int]:
    """The input embedding's row count, or None for a model without an nn.Embedding input."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def _targets(model: nn.Module, config: Fairy2iConfig) -> Tuple[Dict[str, nn.Linear], Dict[str, str], set]:
    """Layers calibration converts (the same choice as the graph passes and pack_model)."""
    # the real baselines quantize any real layer, odd dims too
    names, kept, matched = select_layers(model, config.skip, odd_dims_ok=config.method != "phase")
    return {name: model.get_submodule(name) for name in names}, kept, matched


def find_blocks(model: nn.Module, targets: Mapping[str, nn.Module]) -> Optional[Tuple[str, nn.ModuleList]]:
    """The ModuleList of repeated blocks holding the most target layers: (name, list), or None."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for t in targets if t.startswith(prefix))
        if count > best_count:
            best, best_count = (name, mod), count
    return best


def _call(model: nn.Module, ids: Tensor) -> Any:
    try:
        return model(ids, use_cache=False)
    except TypeError as exc:
        if "use_cache" not in str(exc):
            raise
        return model(ids)


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> Tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Any,
    *,
    stages: int = 2,
    scale_granularity: Union[str, int] = "tensor",
    method: str = "phase",
    skip: Sequence[str] = (),
    sequential: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    refit_scales: bool = False,
    decision: str = "phase",
    true_sequential: bool = True,
    scale_search: bool = True,
    max_outliers: int = MAX_OUTLIERS,
    outlier_ratio: float = OUTLIER_RATIO,
    repair_steps: int = 0,
    repair_lr: float = 1e-3,
    pack: Optional[bool] = None,
    rotate: Union[bool, str] = "auto",
    rotation_seed: int = 0,
    kernel: str = "auto",
    min_tokens: int = 256,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrated conversion (module docstring); returns a new model, ``model`` is left as it was.

    batches:  token ids [B, S] or a list of [b, S] / [S] tensors (calibration text; keep it
              apart from evaluation text, e.g. with :func:`calibration_windows`).
    stages, scale_granularity, method, skip, kernel: as the backend options.
    damp, block_size, act_order, refit_scales, decision, scale_search: the rounding's
              (``rounding.gptq_round``; scale_search applies to method "phase").
    true_sequential: within a block, round the layers group by group in call order (q/k/v, then
              o, then gate/up, then down), each group's H gathered with the groups before it
              already quantized (GPTQ's "true sequential"); False: one H per layer from the
              block's input.
    max_outliers, outlier_ratio: per layer, up to ``max_outliers`` real input columns whose
              H[c, c] is at least ``outlier_ratio`` times the median get an exact float16
              correction of their rounding residual (``rounding.select_outliers``; massive
              activations); ``max_outliers=0`` turns it off.
    repair_steps, repair_lr: after a block is rounded, tune it for ``repair_steps`` Adam steps
              (one calibration window each, cosine learning rate from ``repair_lr``) to reproduce the
              float block's outputs: latent weights through the straight-through estimator, stage
              scales, norms (``repair.py``); 0 (default) = no repair. Sequential, method "phase" only.
    pack:     replace each layer by a PackedLinear holding the calibrated codes (default for
              "phase"); False keeps nn.Linear layers holding the dequantized weights (the
              real baselines always do: the packed kernels hold phase codes only).
    rotate, rotation_seed: first rotate the copy's residual stream and value heads by random
              Hadamard matrices folded into the weights (``rotation.rotate_decoder``: the same
              function, checked on random tokens), so every layer the rounding sees has no outlier
              input channel of the residual stream. "auto" (default): rotate a Llama-style decoder,
              calibrate any other model unrotated with a warning (``settings["rotation_skipped"]``
              says why); True: rotate or raise; False: never. On SmolLM2-135M (8 × 2048 enwiki
              windows, FP 21.25) rotation took W2 per-row from 381 to 251 and W4 per-row from 32.1
              to 26.8 perplexity.
    """
    from ...compiler.backend import Fairy2iBackend

    t0 = time.perf_counter()
    if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        model = model._orig_mod  # a torch.compile wrapper: calibrate the module inside
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate needs an nn.Module, got {type(model).__name__}")
    config = Fairy2iConfig(mode="ptq", stages=stages, method=method, scale_granularity=scale_granularity,
                           skip=tuple(skip), kernel=kernel)  # validates, names the option on error
    if pack is None:
        pack = config.method == "phase"
    if pack and config.method != "phase":
        raise ValueError(f"pack=True needs method='phase' (the packed kernels hold phase codes); "
                         f"use pack=False for method={config.method!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive int, got {min_tokens!r}")
    if decision not in ("phase", "hessian"):
        raise ValueError(f"decision must be 'phase' or 'hessian', got {decision!r}")
    if refit_scales and max_outliers:
        raise ValueError(f"refit_scales cannot be combined with outlier columns (max_outliers={max_outliers!r}); "
                         "pass max_outliers=0 with refit_scales=True")
    if refit_scales and not isinstance(config.scale_granularity, str):
        raise ValueError(f"refit_scales supports scale_granularity 'tensor' or 'row', got {config.scale_granularity!r}")
    check_outlier_options(outlier_ratio, max_outliers)
    if isinstance(repair_steps, bool) or not isinstance(repair_steps, int) or repair_steps < 0:
        raise ValueError(f"repair_steps must be an int >= 0 (0 = no repair), got {repair_steps!r}")
    if repair_steps and (config.method != "phase" or not sequential):
        raise ValueError(f"repair_steps={repair_steps} needs method='phase' and sequential=True "
                         f"(got method={config.method!r}, sequential={sequential!r}); pass repair_steps=0")
    if not (isinstance(repair_lr, (int, float)) and not isinstance(repair_lr, bool) and math.isfinite(repair_lr)
            and repair_lr > 0):
        raise ValueError(f"repair_lr must be a positive float (e.g. 1e-3), got {repair_lr!r}")
    if not (isinstance(rotate, bool) or rotate == "auto"):
        raise ValueError(f"rotate must be True, False or 'auto', got {rotate!r}")
    if isinstance(rotation_seed, bool) or not isinstance(rotation_seed, int):
        raise ValueError(f"rotation_seed must be an int, got {rotation_seed!r}")
    data = _as_batches(batches, model_vocab_size(model), min_tokens)
    targets, kept, matched = _targets(model, config)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no layer to calibrate: no nn.Linear with even in/out features and a "
            f"real floating weight outside skip={list(config.skip)} ({len(kept)} kept real: "
            f"{dict(list(kept.items())[:3])})"
        )
    for b in data:
        if any(p.device != b.device for p in model.parameters()):
            data = [d.to(next(model.parameters()).device) for d in data]
            break

    work = copy.deepcopy(model).eval()
    rotation, rotation_skipped = None, None
    if rotate:  # True or "auto"
        try:
            rotation = rotate_decoder(work, seed=rotation_seed)
        except ValueError as err:  # not a Llama-style decoder: its copy may be half rotated, start again
            if rotate is True:
                raise
            rotation_skipped = str(err)
            work = copy.deepcopy(model).eval()
            warnings.warn(f"calibrate(rotate='auto') calibrates {type(model).__name__} without rotation: "
                          f"{err} (rotate=False silences this)", stacklevel=2)
    # the repair's targets: the float model in the basis the work model computes in
    fp = copy.deepcopy(work) if (rotation is not None and repair_steps) else model
    work_targets, _, _ = _targets(work, config)
    rounded: Dict[str, RoundedLayer] = {}
    report: Dict[str, LayerCalibration] = {}
    repair_log: List[Dict[str, float]] = []

    def round_layer(name: str, h: Tensor, tokens: int) -> None:
        mod = work_targets[name]
        t = time.perf_counter()
        a = mod.weight.detach()
        outliers = select_outliers(h, outlier_ratio, max_outliers)
        r = gptq_round(a, h, config.stages, config.scale_granularity, method=config.method, damp=damp,
                       block_size=block_size, act_order=act_order, refit_scales=refit_scales, decision=decision,
                       scale_search=scale_search and config.method == "phase", outliers=outliers)
        rtn = rtn_round(a, config.stages, config.scale_granularity, method=config.method)
        report[name] = LayerCalibration(name, tuple(a.shape), tokens, output_error(a, rtn, h),
                                        output_error(a, r.a_hat, h), time.perf_counter() - t,
                                        float(r.info.get("first_scale", 1.0)), int(outliers.numel()))
        # a new Parameter: a weight tied to another module (lm_head ~ embedding) is untied, not overwritten
        mod.weight = nn.Parameter(r.a_hat.to(a.dtype), requires_grad=False)
        rounded[name] = r

    blocks = find_blocks(work, work_targets) if sequential else None
    if sequential and blocks is None:
        raise ValueError(f"sequential calibration found no nn.ModuleList of blocks in {type(model).__name__}; "
                         "pass sequential=False to calibrate every layer from the float model's activations")
    if blocks is None:
        backend = Fairy2iBackend({"mode": "calibrate", "skip": list(config.skip)})
        compiled = torch.compile(work, backend=backend)
        with observing() as obs:
            for b in _bar(data, progress, "observing"):
                _call(compiled, b)
        missing = [n for n in work_targets if n not in obs]
        if missing:
            raise RuntimeError(f"the calibrate-mode graph observed no input for {missing[:5]} "
                               f"(observed: {sorted(obs)[:5]}...); use sequential=True")
        for name in _bar(list(work_targets), progress, "rounding"):
            round_layer(name, obs[name].hessian(), obs[name].tokens)
    else:
        block_name, block_list = blocks
        prefix = f"{block_name}." if block_name else ""
        inputs = _capture_block_inputs(work, block_list[0], data)
        if repair_steps:  # the float model's blocks and their inputs give the repair its targets
            fp_blocks = find_blocks(fp, _targets(fp, config)[0])[1]
            inputs_fp = list(inputs)
        done = set()
        for k in _bar(range(len(block_list)), progress, "calibrating blocks"):
            block = block_list[k]
            here = {n: m for n, m in work_targets.items() if n.startswith(f"{prefix}{k}.")}
            groups = _input_groups(block, here, inputs[0]) if (here and true_sequential) else [list(here)]
            for group in groups:
                if not group:
                    continue
                obs = Observations()
                with hook_inputs({n: here[n] for n in group}, obs):
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                for name in group:
                    if name not in obs:
                        raise RuntimeError(f"no calibration activations reached {name}")
                    round_layer(name, obs[name].hessian(), obs[name].tokens)
                    done.add(name)
            if repair_steps and here:
                targets = [block_output(fp_blocks[k](*args, **kwargs)) for args, kwargs in inputs_fp]
                layers = {}
                for name in here:
                    parent, _, attr = name.rpartition(".")
                    layers[name] = (work.get_submodule(parent) if parent else work, work_targets[name], attr,
                                    rounded[name])
                new, info = repair_block(block, layers, inputs, targets, steps=repair_steps, lr=repair_lr, seed=k)
                rounded.update(new)
                repair_log.append({"block": k, **info})
                inputs_fp = [_with_hidden(args, kwargs, t) for (args, kwargs), t in zip(inputs_fp, targets)]
                del targets
            inputs = [_with_hidden(args, kwargs, block_output(block(*args, **kwargs))) for args, kwargs in inputs]
        del inputs
        rest = {n: m for n, m in work_targets.items() if n not in done}
        if rest:
            obs = Observations()
            with hook_inputs(rest, obs):
                for b in data:
                    _call(work, b)
            for name in rest:
                if name not in obs:
                    raise RuntimeError(f"no calibration activations reached {name} (it is outside the blocks "
                                       f"and the model's forward never called it)")
                round_layer(name, obs[name].hessian(), obs[name].tokens)

    if pack:
        for name, r in rounded.items():
            set_submodule(work, name, packed_from_rounded(r, work_targets[name], config.scale_granularity,
                                                          config.kernel))
    settings = {
        "method": config.method, "stages": config.stages, "granularity": config.scale_granularity,
        "skip": list(config.skip), "sequential": bool(sequential and blocks is not None), "damp": damp,
        "block_size": block_size, "act_order": bool(act_order), "refit_scales": bool(refit_scales),
        "decision": decision, "true_sequential": bool(true_sequential and sequential),
        "scale_search": bool(scale_search and config.method == "phase"),
        "max_outliers": max_outliers, "outlier_ratio": outlier_ratio,
        "outlier_columns": sum(lc.outliers for lc in report.values()),
        "repair_steps": repair_steps, "repair_lr": repair_lr if repair_steps else None,
        "rotation": None if rotation is None else rotation.summary(), "rotation_skipped": rotation_skipped,
        "calibration_tokens": int(sum(b.numel() for b in data)), "batches": len(data),
        "bits_per_weight": quant.bits_per_real_weight(config.method, config.stages),
    }
    return CalibrationResult(
        model=work, layers=report, settings=settings, kept_real=kept, repair=repair_log,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    )


@torch.no_grad()
def packed_from_rounded(r: RoundedLayer, like: nn.Module, granularity: Any, kernel: str) -> PackedLinear:
    """A PackedLinear holding a phase-rounded layer's codes, scales and outlier correction.

    ``like`` (the nn.Linear or PackedLinear the layer replaces) gives the features, the
    device and the bias, which is copied; the stage count is the rounding's.
    """
    if r.qu is None or r.qw is None:
        raise ValueError("only phase-rounded layers (method='phase') pack; the real baselines stay nn.Linear")
    bias = like.bias
    k = 0 if r.outlier_index is None else int(r.outlier_index.numel())
    layer = PackedLinear(like.in_features, like.out_features, int(r.qu.codes.shape[0]), granularity,
                         bias is not None, kernel, device=r.a_hat.device,
                         bias_dtype=bias.dtype if bias is not None else torch.float32, outliers=k)
    layer.load_packed(pack_phase(r.qu, r.qw))
    if k:
        layer.load_outliers(r.outlier_index, r.outlier_weight)
    if bias is not None:
        layer.bias.copy_(bias.detach())
    return layer


def _input_groups(block: nn.Module, layers: Dict[str, nn.Module], sample: Tuple[tuple, dict]) -> List[List[str]]:
    """The block's layers in call order, grouped by the activation they read (q/k/v, o, gate/up, down).

    One call of the block on one batch, with hooks noting each layer's input tensor.
    """
    order: List[Tuple[str, int]] = []
    handles = [mod.register_forward_pre_hook(lambda _m, a, _n=name: order.append((_n, id(a[0]))))
               for name, mod in layers.items()]
    try:
        keep = []  # keep the inputs alive so their ids stay unique during the call
        handles += [mod.register_forward_pre_hook(lambda _m, a: keep.append(a[0])) for mod in layers.values()]
        block(*sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    last = None
    seen = set()
    for name, ident in order:
        if name in seen:
            continue
        seen.add(name)
        if ident != last or not groups:
            groups.append([])
        groups[-1].append(name)
        last = ident
    missing = [n for n in layers if n not in seen]
    return groups + ([missing] if missing else [])


def _capture_block_inputs(model: nn.Module, first: nn.Module, data: List[Tensor]) -> List[Tuple[tuple, dict]]:
    """(args, kwargs) the model passes block 0, per calibration batch (the rest of the model is not run)."""

    def stop(_m, args, kwargs):
        raise _Captured(args, kwargs)

    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    captured = []
    try:
        for b in data:
            try:
                _call(model, b)
            except _Captured as c:
                captured.append((c.args_, c.kwargs_))
            else:
                raise RuntimeError("the model's forward finished without calling its first block")
    finally:
        handle.remove()
    return captured


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="step" if desc != "calibrating blocks" else "block")
