"""What the framework-side changes of a decode step are worth, in one process: W2 SmolLM2-135M.

    FAIRY2I_CPU_LUT8=1 .venv/bin/python benchmarks/bench_cpu_overhead.py [--granularity row]
        [--variants +gqa +cppwrap] [--dense]

The model is packed by round-to-nearest (pack_model, W2; with --dense it stays dense and the
backend's PTQ path packs each weight on first use, ptq_packed_linear_cpu) and compiled once per
variant with torch.compile(backend=Fairy2iBackend(...), compiler="inductor"); each variant adds
one change to the one before it (--variants runs a subset, each still with everything above it):

    base        no sibling fusion (FAIRY2I_CPU_FUSE=0: 211 packed calls a token), Inductor's
                per-call size/alignment asserts on, no gqa_attention pass: the backend as of
                the first lut8 measurements
    +fuse       passes/fuse_siblings.py (121 packed calls a token)
    +noasserts  backend.INFERENCE_INDUCTOR_CONFIG (no assert_size_stride in the wrapper)
    +gqa        passes/gqa_attention.py (attention reads the 3 key/value heads, no copies to 9)
    +cppwrap    option cpp_wrapper=True (Inductor's C++ wrapper for the inference graphs; the
                multi ops return plain tensors so the wrapper calls them through the dispatcher)

Each under its own StaticCache, warmed up twice (compiles). Then --rounds rounds, alternating the
variants: greedy decoding of 64 tokens after a 128-token prompt, the median step of each round.
Every change is exact, so the greedy tokens must agree. Results:
benchmarks/results/bench_cpu_overhead[_row].{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (REPO, BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_cpu import PROMPT, greedy  # noqa: E402
from results_io import cpu_description  # noqa: E402

VARIANTS = ("base", "+fuse", "+noasserts", "+gqa", "+cppwrap")


def _compile_variant(model, name: str, inductor_config: dict, pipeline: list, granularity: str):
    """torch.compile of `model` with the changes up to `name` (the backend reads them while it
    compiles, i.e. during the first calls; the caller restores the backend's settings)."""
    from fairy2i_compile import Fairy2iBackend
    from fairy2i_compile.compiler import backend as backend_mod

    level = VARIANTS.index(name)
    os.environ["FAIRY2I_CPU_FUSE"] = "1" if level >= 1 else "0"
    backend_mod.INFERENCE_INDUCTOR_CONFIG = dict(inductor_config) if level >= 2 else {}
    backend_mod.INFERENCE_PIPELINE = [p for p in pipeline if level >= 3 or p.name != "gqa_attention"]
    options = {"mode": "ptq", "stages": 2, "scale_granularity": granularity,  # (the PTQ path's; packed layers carry theirs)
               "compiler": "inductor", "cpp_wrapper": level >= 4}
    return torch.compile(model, dynamic=False, backend=Fairy2iBackend(options))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "row"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dense", action="store_true", help="dense weights: the PTQ path (no pack_model)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    variants = [v for v in VARIANTS if v in args.variants]
    out = args.out or BENCH / "results" / ("bench_cpu_overhead" + ("_row" if args.granularity == "row" else "")
                                           + ("_dense" if args.dense else ""))

    from transformers import StaticCache

    from fairy2i_compile.checkpoints.models import load_smollm2
    from fairy2i_compile.compiler import backend as backend_mod
    from fairy2i_compile.compiler.codegen.cpu_packed import cpu_lut8_status
    from fairy2i_compile.quantization.packed_model import pack_model

    inductor_config, pipeline = dict(backend_mod.INFERENCE_INDUCTOR_CONFIG), backend_mod.INFERENCE_PIPELINE
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one model, up to 5 variants x (prefill, decode) graphs
    model, tok = load_smollm2(progress=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :128]
    if not args.dense:
        pack_model(model, stages=2, granularity=args.granularity)
    runs, warmup = {}, {}
    try:
        for name in variants:
            fwd = _compile_variant(model, name, inductor_config, pipeline, args.granularity)
            cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 64)
            t0 = time.perf_counter()
            greedy(fwd, cache, ids, 64)
            greedy(fwd, cache, ids, 64)
            warmup[name] = time.perf_counter() - t0
            runs[name] = (fwd, cache)
    finally:
        backend_mod.INFERENCE_INDUCTOR_CONFIG, backend_mod.INFERENCE_PIPELINE = inductor_config, pipeline
        os.environ.pop("FAIRY2I_CPU_FUSE", None)
    steps, tokens = {k: [] for k in variants}, {}
    for _ in range(args.rounds):
        for name, (fwd, cache) in runs.items():
            _, s, tokens[name] = greedy(fwd, cache, ids, 64)
            steps[name].append(1e3 * statistics.median(s))
    same = all(tokens[k] == tokens[variants[0]] for k in variants)
    result = {
        "command": "python benchmarks/bench_cpu_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": cpu_description(), "threads": args.threads, "torch": torch.__version__,
        "granularity": args.granularity, "dense": args.dense, "lut8": cpu_lut8_status(), "warmup_s": warmup,
        "step_ms": steps, "same_tokens": same,
    }
    med = {k: statistics.median(v) for k, v in steps.items()}
    path = "dense weights, the PTQ path" if args.dense else "packed"
    md = (f"# Decode-step overhead, cumulative changes: W2 SmolLM2-135M ({path}, {args.granularity} scales, "
          f"lut8 {result['lut8']})\n\n"
          f"Command: `{result['command']}`, {args.threads} threads, torch {torch.__version__}. One process, "
          f"{args.rounds} alternating rounds of 64 greedy steps after a 128-token prompt; median step per round. "
          "Each row has every change up to its name (the script's docstring).\n\n"
          "| variant | compile + 2 warm-up runs, s | step ms (rounds) | median | tok/s |\n|---|---|---|---|---|\n"
          + "".join(f"| {k} | {warmup[k]:.0f} | {', '.join(f'{v:.2f}' for v in steps[k])} | {med[k]:.2f} | "
                    f"{1e3 / med[k]:.1f} |\n"
                    for k in variants)
          + f"\nSame greedy tokens in every variant: {same}.\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
