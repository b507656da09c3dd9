"""Sweep block sizes, launch configs and decode variants of the packed Triton kernels on one GPU.

    python benchmarks/tune_kernels.py --write-configs fairy2i_compile/compiler/codegen/triton_configs.json
    python benchmarks/tune_kernels.py --warm-only --shard 3 --shards 8     # compile shard 3 of 8, time nothing

For each case (real layer OUTxIN, batch M, stages T, path; bf16 activations, tensor scales) the
script builds the case's candidate KernelSpecs (the grid for that path below, plus the
current `choose_spec` pick), checks each against `packed_linear_reference` (tolerance as
bench_kernels.py) and times it with `triton.testing.do_bench` (median) next to cuBLAS bf16
of the same shape in the same run. Candidates that fail to compile or differ from the
reference are recorded with the reason, never timed. Each finished case is written at
once (atomic .json + .md), so a run cut short by `--budget-s` or a timeout keeps what it
measured; `--write-configs` merges the fastest candidate of every case into the table
`choose_spec` reads (entries of other devices are kept).

`--warm-only` launches each candidate of every `--shards`-th case once and times nothing: run
several such processes side by side first and the timed run finds every kernel in Triton's
on-disk cache (compiling is most of a sweep's time; the GPU is idle meanwhile).

Codes are random int32 words (every 2-bit code equally likely), scales random: timing does not
depend on the values, and the reference check uses the same tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from results_io import write_results

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "tune_kernels"
BF16_TOL = 2e-2  # relative to the output scale, as bench_kernels.py

# (out, in, M, T, path): the decode and prefill sizes of LLaMA-7B-class layers the issue names
# GPU_SESSION_CASES=mma: the batch-1..16 cases only (a short second call)
MMA_CASES = [
    (4096, 11008, 1, 2, "mma"), (11008, 4096, 1, 2, "mma"), (4096, 11008, 1, 1, "mma"), (11008, 4096, 1, 1, "mma"),
    (4096, 4096, 1, 2, "mma"), (8192, 8192, 1, 2, "mma"), (4096, 11008, 8, 2, "mma"), (4096, 4096, 1, 1, "mma"),
]
CASES = [
    (4096, 11008, 1, 2, "mma"), (11008, 4096, 1, 2, "mma"), (4096, 11008, 1, 1, "mma"), (11008, 4096, 1, 1, "mma"),
    (4096, 11008, 16, 2, "mma"), (4096, 11008, 16, 2, "dense"),
    (4096, 11008, 256, 2, "dense"), (11008, 4096, 256, 2, "dense"), (4096, 11008, 64, 2, "dense"),
    (11008, 4096, 64, 2, "dense"), (4096, 11008, 256, 1, "dense"),
    (4096, 4096, 1, 2, "mma"), (8192, 8192, 1, 2, "mma"),
]
GRIDS = {
    # M = 1..8: the N side of the dot is tiny; the knobs are rows per program (programs in flight),
    # K step (bytes per load), pipelining depth and the decode
    "mma": dict(block_n=(8, 16, 32), block_k=(256, 512), num_warps=(2, 4), num_stages=(3,), decode=("asm",),
                split_k=(1, 2, 4, 8)),
    # larger M: the activation block and the row block trade registers for reuse
    "mma_large": dict(block_m=(16, 32, 64), block_n=(8, 16), block_k=(64, 128), num_warps=(4, 8),
                      num_stages=(3,), decode=("asm",)),
    # dense: tiles of A_hat decoded once per BLOCK_M rows; BLOCK_N = 128 with 8 warps keeps one warpgroup per
    # 64 rows of A (no decode twice), BLOCK_M x BLOCK_N fp32 x 2 accumulators bound the registers
    "dense": dict(block_m=(64, 128), block_n=(64, 128), block_k=(32, 64), num_warps=(8,), num_stages=(2, 3),
                  decode=("asm",)),
    "gemm": dict(block_m=(64, 128), block_n=(64, 128), block_k=(32, 64), num_warps=(4, 8), num_stages=(3, 4)),
}
# the pure-Triton decode next to the PTX one, at a few configs per case (the comparison the notes report)
BITS_TOO = 3


if __import__("os").environ.get("GPU_SESSION_CASES") == "mma":
    CASES = MMA_CASES


def candidates(base, M: int) -> List:
    """`base` (choose_spec's pick) and the grid of its path, valid specs only, `base` first."""
    if base.path == "mma":
        grid = GRIDS["mma" if M <= 8 else "mma_large"]
    elif base.path == "dense":
        grid = dict(GRIDS["dense"], block_m=tuple(sorted({min(b, max(16, 1 << max(0, M - 1).bit_length()))
                                                           for b in GRIDS["dense"]["block_m"]})))
    else:
        grid = GRIDS[base.path]
    out, seen = [base], {base}
    for values in itertools.product(*grid.values()):
        kw = dict(zip(grid.keys(), values))
        if "block_m" in kw and kw["block_m"] > max(16, 2 * M):
            continue  # rows past M are masked work
        if base.path == "mma":
            kw.setdefault("block_m", min(base.block_m, 1 << max(0, M - 1).bit_length()))
        try:
            spec = dataclasses.replace(base, **kw)
        except ValueError:
            continue
        if spec not in seen:
            out.append(spec)
            seen.add(spec)
    if base.path in ("mma", "dense"):  # the same configs with the pure-Triton decode, for the side-by-side table
        asm = [s for s in out if s.decode == "asm"][:BITS_TOO]
        for s in asm:
            b = dataclasses.replace(s, decode="bits")
            if b not in seen:
                out.append(b)
                seen.add(b)
    return out


def make_case(out_f: int, in_f: int, M: int, T: int, device: str = "cuda", seed: int = 0):
    """x bf16 [M, in], random packed codes [2T, out/2, ceil(in/32)] and scales, dense bf16 W."""
    from fairy2i_compile.quantization.packing import words_per_row

    n, m = out_f // 2, in_f // 2
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-2**31, 2**31 - 1, (2 * T, n, words_per_row(m)), device=device, dtype=torch.int32,
                          generator=g)
    scales = (torch.rand(2 * T, 2, 1, 1, device=device, generator=g) + 0.5) / m**0.5
    x = torch.randn(M, in_f, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=g) / in_f**0.5
    return n, m, codes, scales, x, w


def case_specs(out_f: int, in_f: int, M: int, T: int, path: str) -> List:
    from fairy2i_compile.compiler.codegen.triton_packed import choose_spec

    current = choose_spec(M, out_f // 2, in_f // 2, T, 0, False, torch.bfloat16, False, False, path)
    return candidates(current, M)


def warm(shard: int, shards: int) -> int:
    """Launch candidates shard, shard + shards, ... (over all cases) once each: fills Triton's cache."""
    from fairy2i_compile.compiler.codegen.triton_packed import launch_packed_linear

    done = failed = 0
    index = 0
    for out_f, in_f, M, T, path in CASES:
        specs = case_specs(out_f, in_f, M, T, path)
        mine = [s for i, s in enumerate(specs, start=index) if i % shards == shard]
        index += len(specs)
        if not mine:
            continue
        n, m, codes, scales, x, _ = make_case(out_f, in_f, M, T)
        y = torch.empty(M, out_f, device="cuda", dtype=torch.bfloat16)
        for spec in mine:
            try:
                launch_packed_linear(spec, x, codes, scales, None, m, out=y)
                done += 1
            except Exception as e:  # recorded by the timed run
                failed += 1
                print(f"warm: {spec.name} {spec}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.synchronize()
        del codes, scales, x, y
    print(f"warm shard {shard}/{shards}: {done} compiled, {failed} failed", flush=True)
    return 0


def run_case(out_f: int, in_f: int, M: int, T: int, path: str, bench, deadline: float) -> Dict:
    from fairy2i_compile.compiler.codegen.triton_packed import launch_packed_linear
    from fairy2i_compile.packed_ops import packed_linear_reference

    n, m, codes, scales, x, w = make_case(out_f, in_f, M, T)
    ref = packed_linear_reference(x.float(), codes, scales, None, m, 0)
    scale = ref.abs().max().item()
    y = torch.empty(M, out_f, device="cuda", dtype=torch.bfloat16)
    specs = case_specs(out_f, in_f, M, T, path)
    rows = []
    for spec in specs:
        if time.monotonic() > deadline:
            break
        row = {"spec": {k: getattr(spec, k) for k in ("block_m", "block_n", "block_k", "num_warps", "num_stages",
                                                      "split_k")},
               "path": spec.path, "decode": spec.decode, "current": spec == specs[0]}
        try:
            launch_packed_linear(spec, x, codes, scales, None, m, out=y)
            err = (y.float() - ref).abs().max().item() / scale
        except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            continue
        row["err"] = err
        if not err <= BF16_TOL:
            row["error"] = f"differs from the reference: {err:.3g} > {BF16_TOL}"
        else:
            row["us"] = 1e3 * bench(lambda: launch_packed_linear(spec, x, codes, scales, None, m, out=y))
        rows.append(row)
    t_bf16 = 1e3 * bench(lambda: F.linear(x, w))
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    cur = next((r for r in rows if r["current"] and "us" in r), None)
    by_decode = {}
    for d in ("asm", "bits"):
        same = [r for r in timed if r["decode"] == d]
        by_decode[d] = min(r["us"] for r in same) if same else None
    # bits vs asm on identical block configs (the pairs the grid adds)
    pairs = []
    for r in timed:
        if r["decode"] == "bits":
            twin = next((q for q in timed if q["decode"] == "asm" and q["spec"] == r["spec"]), None)
            if twin:
                pairs.append({"spec": r["spec"], "bits_us": r["us"], "asm_us": twin["us"]})
    best_spec = (best or {}).get("spec")
    if best and path in ("mma", "dense"):
        best_spec = dict(best["spec"], decode=best["decode"])
    return {"shape": f"{out_f}x{in_f}", "M": M, "stages": T, "path": path, "bf16_us": t_bf16,
            "current_us": cur["us"] if cur else None, "best_us": best["us"] if best else None,
            "best_spec": best_spec, "n_candidates": len(rows), "best_by_decode_us": by_decode,
            "bits_vs_asm": pairs, "candidates": rows}


def to_markdown(meta: Dict, cases: List[Dict]) -> str:
    lines = [
        "# Packed Triton kernels: block-size and decode sweep",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}. {meta['timer']}.",
        "bf16 activations, tensor scales, random codes; every timed candidate matched the reference within "
        f"{BF16_TOL} of the output scale first. current = choose_spec's pick before this sweep's table.",
        "",
        "| shape | M | T | path | bf16 us | current us | best us | best vs bf16 | best asm us | best bits us | "
        "best spec | tried |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for c in cases:
        spec = ", ".join(f"{k}={v}" for k, v in (c["best_spec"] or {}).items())
        speed = f"{c['bf16_us'] / c['best_us']:.2f}x" if c["best_us"] else "-"
        lines.append(f"| {c['shape']} | {c['M']} | {c['stages']} | {c['path']} | {c['bf16_us']:.2f} | "
                     f"{f(c['current_us'])} | {f(c['best_us'])} | {speed} | {f(c['best_by_decode_us']['asm'])} | "
                     f"{f(c['best_by_decode_us']['bits'])} | {spec} | {c['n_candidates']} |")
    pairs = [(c, p) for c in cases for p in c["bits_vs_asm"]]
    if pairs:
        lines += ["", "Decode on identical block configs (mma): pure-Triton integer ops (bits) vs one PTX lop3 "
                      "per atom pair (asm).", "", "| shape | M | T | config | bits us | asm us | bits / asm |",
                  "|---|---|---|---|---|---|---|"]
        for c, p in pairs:
            spec = ", ".join(f"{k}={v}" for k, v in p["spec"].items())
            lines.append(f"| {c['shape']} | {c['M']} | {c['stages']} | {spec} | {p['bits_us']:.2f} | "
                         f"{p['asm_us']:.2f} | {p['bits_us'] / p['asm_us']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output path without suffix")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting candidates after this (default 150)")
    p.add_argument("--rep", type=int, default=30, help="do_bench repetition time, ms (default 30)")
    p.add_argument("--write-configs", type=pathlib.Path, default=None, metavar="JSON",
                   help="also write each case's fastest config into this table (the format of "
                        "fairy2i_compile/compiler/codegen/triton_configs.json; entries of other devices are kept)")
    p.add_argument("--warm-only", action="store_true", help="compile (launch once) and time nothing")
    p.add_argument("--shard", type=int, default=0, help="with --warm-only: this process's shard (0-based)")
    p.add_argument("--shards", type=int, default=1, help="with --warm-only: number of shards")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels: no CUDA device here; nothing written.", file=sys.stderr)
        return 1
    if args.warm_only:
        return warm(args.shard, args.shards)
    import triton
    from triton.testing import do_bench

    def bench(fn) -> float:
        return do_bench(fn, warmup=5, rep=args.rep, return_mode="median")

    deadline = time.monotonic() + args.budget_s
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "timer": f"triton.testing.do_bench median (warmup 5 ms, rep {args.rep} ms)"}
    cases: List[Dict] = []
    for out_f, in_f, M, T, path in CASES:
        if time.monotonic() > deadline:
            print(f"tune_kernels: budget spent, skipping {out_f}x{in_f} M={M} T={T} {path}", flush=True)
            continue
        c = run_case(out_f, in_f, M, T, path, bench, deadline)
        cases.append(c)
        print(f"{c['shape']} M={M} T={T} {path}: bf16 {c['bf16_us']:.2f} us, current {c['current_us']} us, "
              f"best {c['best_us']} us {c['best_spec']} ({c['n_candidates']} tried; by decode "
              f"{c['best_by_decode_us']})", flush=True)
        write_results(args.out, {"meta": meta, "cases": cases}, to_markdown(meta, cases), indent=1)
        if args.write_configs is not None:
            write_configs(args.write_configs, meta["device"], cases)
    return 0


def write_configs(path: pathlib.Path, device: str, cases: List[Dict]) -> None:
    """Merge the fastest config of each case into the table `choose_spec` reads (atomic write)."""
    import json

    from fairy2i_compile.cache import atomic_write_text

    table = json.loads(path.read_text()) if path.is_file() else {}
    entries = [{"path": c["path"], "stages": c["stages"], "M": c["M"], "n": int(c["shape"].split("x")[0]) // 2,
                "m": int(c["shape"].split("x")[1]) // 2, "config": c["best_spec"], "us": round(c["best_us"], 2),
                "bf16_us": round(c["bf16_us"], 2)} for c in cases if c["best_spec"]]
    key = ("path", "stages", "M", "n", "m")
    new = {tuple(e[k] for k in key) for e in entries}
    # keep this device's earlier entries for cases this sweep did not measure (e.g. the GEMV's)
    kept = [e for e in table.get(device, []) if tuple(e[k] for k in key) not in new]
    table[device] = kept + entries
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
