"""The packed CPU kernel's decode paths at batch 1: table lookups (LUT) against per-code selects.

    .venv/bin/python benchmarks/bench_cpu_lut.py                  # ~2 min on 2 cores

Per SmolLM2-135M layer shape, stage count T (1, 2) and thread count (1, 2): the time of one
call of each path the CPU has (`cpu_packed.fold_path_forward` forced to "select" or, with
AVX-512, "lut"; with AVX2, `cpu_packed.lut8_forward` on its prebuilt transposed codes, "lut8":
int8 tables, activations rounded to 8 bits; the same Python and ctypes overhead on all), the
median of 7 repeats of a timed loop, with the layer's codes hot in cache. The lut8 column's
error: its relative rms deviation from the select path on that layer's random activations.
Beside it the bytes floor: the layer's code bytes / the read bandwidth
measured in the same run (torch.sum over 256 MiB, same threads). Then a whole decode step's
worth of layers (SmolLM2's 211 linears, each its own codes, 32 MiB at T = 2: not all hot)
called in order, both paths interleaved, 12 passes each.

Results: benchmarks/results/bench_cpu_lut.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from results_io import cpu_description, publish  # noqa: E402

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
    paths = ["select"] + (["lut"] if cpu_packed.cpu_lut_status() in ("lut", "off") else []) \
        + (["lut8"] if cpu_packed.cpu_lut8_status() in ("on", "off") else [])
    if len(paths) == 1:
        raise SystemExit(f"no table-lookup path here (lut: {cpu_packed.cpu_lut_status()}, "
                         f"lut8: {cpu_packed.cpu_lut8_status()}): they need AVX-512 / AVX2")

    def caller(path, x, codes, scales, m):
        if path == "lut8":
            layout = cpu_packed.lut8_layout(codes)
            return lambda: cpu_packed.lut8_forward(x, codes, scales, None, m, layout)
        return lambda: cpu_packed.fold_path_forward(x, codes, scales, None, m, path)

    rows, passes, bw = [], [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw[threads] = bandwidth_gbs()
        for out_f, in_f in SHAPES:
            for stages in (1, 2):
                pk = packed(out_f, in_f, stages)
                x = torch.randn(1, in_f)
                reps = 20 if out_f > 10000 else 300
                calls = {path: caller(path, x, pk.codes, pk.scales, pk.m) for path in paths}
                t = {path: per_call_s(call, reps) for path, call in calls.items()}
                code_bytes = out_f * in_f * stages / 8  # 2 bits per complex code, 2T planes, n*m = out*in/4 codes
                floor = code_bytes / (bw[threads] * 1e9)
                rows.append({"threads": threads, "shape": [out_f, in_f], "stages": stages, "code_bytes": code_bytes,
                             **{f"{path}_us": t[path] * 1e6 for path in paths}, "floor_us": floor * 1e6})
                if "lut8" in paths:
                    want = calls["select"]()
                    rows[-1]["lut8_rel_rms"] = float((calls["lut8"]() - want).norm() / want.norm())
                print(rows[-1], flush=True)
        for stages in (1, 2):
            cache, layers = {}, []
            for s in MODEL:
                if s not in cache:
                    cache[s] = packed(*s, stages)
                pk = cache[s]
                layers.append((pk.codes.clone(), pk.scales.clone(), pk.m, s[1]))
            xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
            calls = {path: [caller(path, xs[in_f], codes, scales, m) for codes, scales, m, in_f in layers]
                     for path in paths}
            res = {path: [] for path in paths}
            for i in range(14):
                for path in res:
                    t0 = time.perf_counter()
                    for call in calls[path]:
                        call()
                    if i >= 2:
                        res[path].append(time.perf_counter() - t0)
            nbytes = sum(c.numel() * 4 for c, *_ in layers)
            passes.append({"threads": threads, "stages": stages, "code_mib": nbytes / 2**20,
                           **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in res.items()},
                           "floor_ms": nbytes / (bw[threads] * 1e9) * 1e3})
            print(passes[-1], flush=True)
    result = {"command": "python benchmarks/bench_cpu_lut.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": cpu_description(),
              "torch": torch.__version__, "bandwidth_gbs": bw, "layers": rows, "passes": passes, "notes": args.notes}
    fast = paths[1:]
    md = ["# Packed CPU kernel at batch 1: table lookups against selects, SmolLM2-135M shapes", "",
          f"Command: `{result['command']}`  ", f"Machine: {result['machine']}, torch {result['torch']}. "
          "Read bandwidth (torch.sum over 256 MiB): " + ", ".join(f"{t} threads {g:.1f} GB/s" for t, g in bw.items())
          + ". One run; times are medians of 7 timed loops, one call each through the same Python/ctypes path.", "",
          "| threads | layer (out x in) | T | code KiB | select us | "
          + " | ".join(f"{p} us | {p} speed-up" for p in fast) + " | bytes floor us | "
          + " | ".join(f"{p} / floor" for p in fast) + (" | lut8 rel. rms error" if "lut8" in fast else "") + " |",
          "|---|---|---|---|---|" + "---|---|" * len(fast) + "---|" + "---|" * len(fast) + ("---|" if "lut8" in fast else "")]
    for r in rows:
        md.append(f"| {r['threads']} | {r['shape'][0]} x {r['shape'][1]} | {r['stages']} | {r['code_bytes'] / 1024:.0f} | "
                  f"{r['select_us']:.1f} | "
                  + " | ".join(f"{r[p + '_us']:.1f} | {r['select_us'] / r[p + '_us']:.2f}x" for p in fast)
                  + f" | {r['floor_us']:.1f} | " + " | ".join(f"{r[p + '_us'] / r['floor_us']:.1f}x" for p in fast)
                  + (f" | {r['lut8_rel_rms']:.2e}" if "lut8" in fast else "") + " |")
    md += ["", "## A decode step's layers (211 calls, each layer its own codes)", "",
           "| threads | T | codes | select ms | " + " | ".join(f"{p} ms | speed-up" for p in fast)
           + " | bytes floor ms | " + " | ".join(f"{p} / floor" for p in fast) + " |",
           "|---|---|---|---|" + "---|---|" * len(fast) + "---|" + "---|" * len(fast)]
    for r in passes:
        md.append(f"| {r['threads']} | {r['stages']} | {r['code_mib']:.1f} MiB | {r['select_ms']:.2f} | "
                  + " | ".join(f"{r[p + '_ms']:.2f} | {r['select_ms'] / r[p + '_ms']:.2f}x" for p in fast)
                  + f" | {r['floor_ms']:.2f} | " + " | ".join(f"{r[p + '_ms'] / r['floor_ms']:.1f}x" for p in fast) + " |")
    publish(args.out, result, md, args.notes, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
