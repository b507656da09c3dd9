"""The packed CPU kernel's decode paths at batch 1: table lookups (LUT) against per-code selects.

    .venv/bin/python benchmarks/bench_cpu_lut.py                  # ~2 min on 2 cores

Per SmolLM2-135M layer shape, stage count T (1, 2) and thread count (1, 2): the time of one
call of each path (`cpu_packed.fold_path_forward`, forced to "select" or "lut"; the same
Python and ctypes overhead on both), the median of 7 repeats of a timed loop, with the layer's
codes hot in cache. Beside it the bytes floor: the layer's code bytes / the read bandwidth
measured in the same run (torch.sum over 256 MiB, same threads). Then a whole decode step's
worth of layers (SmolLM2's 211 linears, each its own codes, 32 MiB at T = 2: not all hot)
called in order, both paths interleaved, 12 passes each.

Results: benchmarks/results/bench_cpu_lut.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from results_io import write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_cpu_lut"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, k/v, gate/up, down, lm_head
MODEL = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def packed(out_f: int, in_f: int, stages: int, seed: int = 0):
    from fairy2i_compile.compiler.ops import real_to_widely_reference
    from fairy2i_compile.quantization.packing import pack_widely

    a = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return pack_widely(*real_to_widely_reference(a), stages, "tensor")


def bandwidth_gbs() -> float:
    big = torch.ones(64 * 2**20)  # 256 MiB of float32
    for _ in range(2):
        big.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        big.sum()
    return 5 * big.numel() * 4 / (time.perf_counter() - t0) / 1e9


def per_call_s(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def main(argv=None) -> int:
    from fairy2i_compile.compiler.codegen import cpu_packed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--notes", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if cpu_packed.cpu_lut_status() not in ("lut", "off"):
        raise SystemExit(f"the LUT path is not available here ({cpu_packed.cpu_lut_status()}): it needs AVX-512")
    fwd = cpu_packed.fold_path_forward
    rows, passes, bw = [], [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw[threads] = bandwidth_gbs()
        for out_f, in_f in SHAPES:
            for stages in (1, 2):
                pk = packed(out_f, in_f, stages)
                x = torch.randn(1, in_f)
                reps = 20 if out_f > 10000 else 300
                t = {path: per_call_s(lambda: fwd(x, pk.codes, pk.scales, None, pk.m, path), reps)
                     for path in ("select", "lut")}
                code_bytes = out_f * in_f * stages / 8  # 2 bits per complex code, 2T planes, n*m = out*in/4 codes
                floor = code_bytes / (bw[threads] * 1e9)
                rows.append({"threads": threads, "shape": [out_f, in_f], "stages": stages, "code_bytes": code_bytes,
                             "select_us": t["select"] * 1e6, "lut_us": t["lut"] * 1e6, "floor_us": floor * 1e6})
                print(rows[-1], flush=True)
        for stages in (1, 2):
            cache, layers = {}, []
            for s in MODEL:
                if s not in cache:
                    cache[s] = packed(*s, stages)
                pk = cache[s]
                layers.append((pk.codes.clone(), pk.scales.clone(), pk.m, s[1]))
            xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
            res = {"select": [], "lut": []}
            for i in range(14):
                for path in res:
                    t0 = time.perf_counter()
                    for codes, scales, m, in_f in layers:
                        fwd(xs[in_f], codes, scales, None, m, path)
                    if i >= 2:
                        res[path].append(time.perf_counter() - t0)
            nbytes = sum(c.numel() * 4 for c, *_ in layers)
            passes.append({"threads": threads, "stages": stages, "code_mib": nbytes / 2**20,
                           **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in res.items()},
                           "floor_ms": nbytes / (bw[threads] * 1e9) * 1e3})
            print(passes[-1], flush=True)
    result = {"command": "python benchmarks/bench_cpu_lut.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})",
              "torch": torch.__version__, "bandwidth_gbs": bw, "layers": rows, "passes": passes, "notes": args.notes}
    md = ["# Packed CPU kernel at batch 1: LUT against selects, SmolLM2-135M shapes", "",
          f"Command: `{result['command']}`  ", f"Machine: {result['machine']}, torch {result['torch']}. "
          "Read bandwidth (torch.sum over 256 MiB): " + ", ".join(f"{t} threads {g:.1f} GB/s" for t, g in bw.items())
          + ". One run; times are medians of 7 timed loops, one call each through the same Python/ctypes path.", "",
          "| threads | layer (out x in) | T | code KiB | select us | LUT us | LUT speed-up | bytes floor us | LUT / floor |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['threads']} | {r['shape'][0]} x {r['shape'][1]} | {r['stages']} | {r['code_bytes'] / 1024:.0f} | "
                  f"{r['select_us']:.1f} | {r['lut_us']:.1f} | {r['select_us'] / r['lut_us']:.2f}x | "
                  f"{r['floor_us']:.1f} | {r['lut_us'] / r['floor_us']:.1f}x |")
    md += ["", "## A decode step's layers (211 calls, each layer its own codes)", "",
           "| threads | T | codes | select ms | LUT ms | speed-up | bytes floor ms | LUT / floor |", "|---|---|---|---|---|---|---|---|"]
    for r in passes:
        md.append(f"| {r['threads']} | {r['stages']} | {r['code_mib']:.1f} MiB | {r['select_ms']:.2f} | {r['lut_ms']:.2f} | "
                  f"{r['select_ms'] / r['lut_ms']:.2f}x | {r['floor_ms']:.2f} | {r['lut_ms'] / r['floor_ms']:.1f}x |")
    if args.notes:
        md += ["", "## Notes", "", args.notes]
    write_results(args.out, result, "\n".join(md) + "\n", indent=2)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
