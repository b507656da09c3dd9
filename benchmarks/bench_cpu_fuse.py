"""Sibling fusion (passes/fuse_siblings.py) off and on, in one process: W2 decode step of SmolLM2-135M.

    FAIRY2I_CPU_LUT8=1 .venv/bin/python benchmarks/bench_cpu_fuse.py [--granularity row]

The model is packed by round-to-nearest (pack_model, W2) and compiled twice with
torch.compile(backend=Fairy2iBackend(...), compiler="inductor"), once with FAIRY2I_CPU_FUSE=0 (211
packed calls a token) and once with it on (121); each under its own StaticCache, warmed up twice
(compiles). Then 4 rounds, alternating the two: greedy decoding of 64 tokens after a 128-token
prompt, the median step of each round. The greedy tokens must agree (the fusion is exact).
Results: benchmarks/results/bench_cpu_fuse.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "row"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "bench_cpu_fuse")
    args = p.parse_args(argv)

    from transformers import StaticCache

    from fairy2i_compile import Fairy2iBackend
    from fairy2i_compile.checkpoints.models import load_smollm2
    from fairy2i_compile.compiler.codegen.cpu_packed import cpu_lut8_status
    from fairy2i_compile.quantization.packed_model import pack_model

    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(progress=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :128]
    pack_model(model, stages=2, granularity=args.granularity)
    runs, warmup = {}, {}
    for fuse in ("0", "1"):  # the pass reads the switch when it compiles: during the warm-up
        os.environ["FAIRY2I_CPU_FUSE"] = fuse
        fwd = torch.compile(model, dynamic=False, backend=Fairy2iBackend({"mode": "ptq", "compiler": "inductor"}))
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 64)
        t0 = time.perf_counter()
        greedy(fwd, cache, ids, 64)
        greedy(fwd, cache, ids, 64)
        warmup[fuse] = time.perf_counter() - t0
        runs[fuse] = (fwd, cache)
    steps, tokens = {"0": [], "1": []}, {}
    for _ in range(args.rounds):
        for fuse, (fwd, cache) in runs.items():
            _, s, tokens[fuse] = greedy(fwd, cache, ids, 64)
            steps[fuse].append(1e3 * statistics.median(s))
    result = {
        "command": "python benchmarks/bench_cpu_fuse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "granularity": args.granularity, "lut8": cpu_lut8_status(), "warmup_s": warmup,
        "step_ms": steps, "same_tokens": tokens["0"] == tokens["1"],
    }
    med = {k: statistics.median(v) for k, v in steps.items()}
    md = (f"# Sibling fusion off / on: W2 decode step, SmolLM2-135M ({args.granularity} scales, lut8 {result['lut8']})\n\n"
          f"Command: `{result['command']}`, {args.threads} threads, torch {torch.__version__}. One process, "
          f"{args.rounds} alternating rounds of 64 greedy steps; median step per round.\n\n"
          "| fusion | packed calls a token | step ms (rounds) | median | tok/s |\n|---|---|---|---|---|\n"
          + "".join(f"| {'on' if k == '1' else 'off'} | {121 if k == '1' else 211} | "
                    f"{', '.join(f'{v:.2f}' for v in steps[k])} | {med[k]:.2f} | {1e3 / med[k]:.1f} |\n" for k in ("0", "1"))
          + f"\nSame greedy tokens: {result['same_tokens']}.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
