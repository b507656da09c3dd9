"""What the opt-in int8-table CPU path (lut8, FAIRY2I_CPU_LUT8=1) costs in quality, on a real model.

    .venv/bin/python benchmarks/lut8_quality.py --model runs/models/cal-w3-row-rot-c64-dist150.safetensors

lut8 serves decode-sized batches only (up to LUT8_MAX_TOKENS tokens), so an ordinary perplexity
pass (whole windows at once: the float32 GEMM path) never reaches it. Here the same windows are
also fed through a KV cache in chunks of --chunk tokens (<= LUT8_MAX_TOKENS), so that every
packed layer call is a decode-sized batch, once with the float32 fold path and once with lut8.
Rows, each in its own process (the switch is read once per process):

    full            metrics.perplexity: whole windows, the GEMM path (what calibrated.md reports)
    chunked-fp32    chunks through the KV cache, FAIRY2I_CPU_LUT8 unset: the float32 fold path;
                    equals `full` up to float rounding (the check that the chunking is exact)
    chunked-lut8    the same chunks with FAIRY2I_CPU_LUT8=1

The model is a packed checkpoint (`save_packed`, e.g. benchmarks/calibrated.py --save-models);
perplexity on the first --windows windows of --seq-len tokens of the enwiki sample (the windows
of calibrated.md). Results: benchmarks/results/lut8_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (REPO, BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_cpu import lut8_env  # noqa: E402
from results_io import cpu_description, publish  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "lut8_quality"
ROWS = ("full", "chunked-fp32", "chunked-lut8")


@torch.no_grad()
def chunked_nll(model, windows: torch.Tensor, chunk: int) -> float:
    """Sum of next-token NLL over `windows` [W, L], fed `chunk` tokens at a time through a KV cache."""
    from transformers import DynamicCache

    total = 0.0
    for w in windows:
        cache = DynamicCache()
        for s in range(0, w.numel(), chunk):
            ids = w[None, s:s + chunk]
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()
            targets = w[s + 1:s + 1 + ids.shape[1]]  # the window's last token has no target
            total += float(F.cross_entropy(logits[:targets.numel()], targets, reduction="sum"))
    return total


def run_row(name: str, args) -> dict:
    from fairy2i_compile.checkpoints.checkpoint import load_packed
    from fairy2i_compile.checkpoints.models import load_smollm2
    from fairy2i_compile.compiler.codegen import cpu_packed
    from fairy2i_compile.eval import metrics
    from peers import eval_windows

    torch.set_num_threads(args.threads)
    _, tok = load_smollm2(progress=False)
    model = load_packed(args.model).eval()
    windows = eval_windows(tok, args.seq_len, args.windows)
    t0 = time.perf_counter()
    if name == "full":
        ppl = metrics.perplexity(model, windows, progress=False)["ppl"]
    else:
        ppl = math.exp(chunked_nll(model, windows, args.chunk) / windows.shape[0] / (windows.shape[1] - 1))
    return {"row": name, "ppl": ppl, "seconds": time.perf_counter() - t0, "lut8": cpu_packed.cpu_lut8_status()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a packed checkpoint (save_packed)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--notes", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from fairy2i_compile.compiler.codegen.cpu_packed import LUT8_MAX_TOKENS

    if not 1 <= args.chunk <= LUT8_MAX_TOKENS:
        p.error(f"--chunk must be in 1..{LUT8_MAX_TOKENS} (the batches lut8 serves), got {args.chunk}")
    for flag in ("windows", "seq_len", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.model.is_file():
        p.error(f"--model {args.model}: no such file (a save_packed checkpoint)")
    if args.worker:
        print("RESULT " + json.dumps(run_row(args.worker, args)), flush=True)
        return 0
    rows = []
    for name in args.rows:
        env = lut8_env(dict(os.environ, HF_HUB_OFFLINE="1"), name == "chunked-lut8")
        cmd = [sys.executable, __file__, "--worker", name, "--model", str(args.model), "--windows", str(args.windows),
               "--seq-len", str(args.seq_len), "--chunk", str(args.chunk), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {name} failed (exit {proc.returncode})")
        rows.append(json.loads(line[len("RESULT "):]))
        expected = "on" if name == "chunked-lut8" else "off"
        if rows[-1]["lut8"] not in (expected, "absent") or (name == "chunked-lut8" and rows[-1]["lut8"] != "on"):
            raise SystemExit(f"row {name}: the lut8 path was {rows[-1]['lut8']!r} in its process, expected {expected!r}")
        print(f"{name:14s} ppl {rows[-1]['ppl']:.4f}  {rows[-1]['seconds']:.0f} s", flush=True)
    result = {"command": "python benchmarks/lut8_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": str(args.model), "machine": cpu_description(), "threads": args.threads, "torch": torch.__version__,
              "windows": args.windows, "seq_len": args.seq_len, "chunk": args.chunk, "rows": rows, "notes": args.notes}
    base = next((r["ppl"] for r in rows if r["row"] == "chunked-fp32"), None)
    md = ["# The lut8 CPU path's quality: perplexity through decode-sized batches", "",
          f"Command: `{result['command']}`  ",
          f"Model: `{Path(args.model).name}`. Machine: {result['machine']}, {args.threads} threads, torch "
          f"{result['torch']}. Perplexity on the first {args.windows} windows of {args.seq_len} tokens of the enwiki "
          f"sample; chunked rows feed {args.chunk} tokens per call through a KV cache. One run, each row in its own "
          "process.", "", "| row | wiki ppl | vs chunked-fp32 | seconds |", "|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / base - 1:+.3%}" if base else "–"
        md.append(f"| {r['row']} | {r['ppl']:.4f} | {rel} | {r['seconds']:.0f} |")
    publish(args.out, result, md, args.notes, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
