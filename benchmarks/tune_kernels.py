"""Sweep the block sizes and launch configs of the packed Triton kernels on one GPU (GPU only).

    python benchmarks/tune_kernels.py                      # default sweep, stops after --budget-s (150 s)
    python benchmarks/tune_kernels.py --budget-s 120 --out /tmp/tune

`choose_spec` (fairy2i_compile/codegen/triton_packed.py) picks one KernelSpec per call from
(M, n, m, T, scales, dtype); its GPU block sizes were starting points until this sweep ran.
For each case (real layer shape OUTxIN, batch M, stages T; bf16 activations, tensor scales)
this script builds every candidate KernelSpec of the path that M takes, checks it against
`packed_linear_reference` (tolerance as bench_kernels.py) and times it with
`triton.testing.do_bench` (median) next to the current `choose_spec` pick and bf16 cuBLAS.

Each finished case is written at once (atomic .json + .md), so a run cut short by
`--budget-s` or a timeout keeps what it measured. Candidates that fail to compile or
differ from the reference are recorded with the reason, never timed.
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
# (out, in, M, T): the decode and prefill sizes of LLaMA-7B-class layers the issue names
CASES = [(4096, 11008, 1, 2), (4096, 11008, 256, 2), (11008, 4096, 1, 2), (4096, 4096, 64, 2),
         (4096, 11008, 1, 1), (4096, 11008, 16, 2), (4096, 11008, 256, 1), (4096, 4096, 1, 2), (11008, 4096, 256, 2)]
# small batches: the GEMV decodes the codes once per activation row, the GEMM once per 16-row tile;
# for 1 < M <= 16 both paths are timed (the GEMM candidates below) to place GEMV_MAX_M
SMALL_M_GEMM_GRID = dict(block_m=(16,), block_n=(32, 64, 128), block_k=(32, 64), num_warps=(4,), num_stages=(3,))
GEMV_GRID = dict(block_n=(4, 8, 16), block_k=(128, 256, 512), num_warps=(1, 2, 4), num_stages=(2,))
GEMM_GRID = dict(block_m=(32, 64, 128), block_n=(64, 128), block_k=(32, 64), num_warps=(4, 8), num_stages=(3,))


def candidates(base, M: int) -> List:
    grid = GEMV_GRID if base.path == "gemv" else GEMM_GRID
    out = []
    for values in itertools.product(*grid.values()):
        kw = dict(zip(grid.keys(), values))
        if base.path == "gemm" and kw["block_m"] > max(32, 2 * M):
            continue  # rows past M are masked work
        out.append(dataclasses.replace(base, **kw))
    return out


def run_case(out_f: int, in_f: int, M: int, T: int, bench, deadline: float, device: str = "cuda") -> Dict:
    from fairy2i_compile.codegen.triton_packed import choose_spec, launch_packed_linear
    from fairy2i_compile.packed_ops import packed_linear_reference
    from fairy2i_compile.packing import pack_widely

    n, m = out_f // 2, in_f // 2
    g = torch.Generator(device=device).manual_seed(0)
    pk = pack_widely(*(torch.randn(n, m, device=device, generator=g) / m**0.5 for _ in range(4)), T, "tensor")
    codes, scales = pk.codes, pk.scales.float().contiguous()
    x = torch.randn(M, in_f, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=g) / in_f**0.5
    ref = packed_linear_reference(x.float(), codes, scales, None, m, 0)
    scale = ref.abs().max().item()
    y = torch.empty(M, out_f, device=device, dtype=torch.bfloat16)
    current = choose_spec(M, n, m, T, 0, False, torch.bfloat16, False, device == "cpu")
    rows = []
    others = [s for s in candidates(current, M) if s != current]
    if 1 < M <= 16 and current.path == "gemv":
        gemm = dataclasses.replace(current, path="gemm", block_m=16, block_n=64, block_k=64, num_stages=3)
        others += [dataclasses.replace(gemm, **dict(zip(SMALL_M_GEMM_GRID, v)))
                   for v in itertools.product(*SMALL_M_GEMM_GRID.values())]
    for spec in [current] + others:
        if time.monotonic() > deadline:
            break
        row = {"spec": {k: getattr(spec, k) for k in ("block_m", "block_n", "block_k", "num_warps", "num_stages")},
               "path": spec.path, "current": spec == current}
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
    timed = [r for r in rows if "us" in r and r["path"] == current.path]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    cur = next((r for r in rows if r["current"] and "us" in r), None)
    other = [r for r in rows if "us" in r and r["path"] != current.path]
    alt = min(other, key=lambda r: r["us"]) if other else None
    return {"shape": f"{out_f}x{in_f}", "M": M, "stages": T, "path": current.path, "bf16_us": t_bf16,
            "current_us": cur["us"] if cur else None, "best_us": best["us"] if best else None,
            "best_spec": best["spec"] if best else None, "n_candidates": len(rows),
            "gemm_instead_us": alt["us"] if alt else None, "gemm_instead_spec": alt["spec"] if alt else None,
            "candidates": rows}


def to_markdown(meta: Dict, cases: List[Dict]) -> str:
    lines = [
        "# Packed Triton kernels: block-size sweep",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}. {meta['timer']}.",
        "bf16 activations, tensor scales; every timed candidate matched the reference within "
        f"{BF16_TOL} of the output scale first.",
        "",
        "gemm instead: for 1 < M <= 16 in GEMV territory, the fastest tensor-core GEMM candidate (one 16-row tile).",
        "",
        "| shape | M | T | path | bf16 us | current us | best us | best / current | best spec | tried | gemm instead us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        gain = f"{c['current_us'] / c['best_us']:.2f}x" if c["current_us"] and c["best_us"] else "-"
        spec = ", ".join(f"{k}={v}" for k, v in (c["best_spec"] or {}).items())
        cur = f"{c['current_us']:.2f}" if c["current_us"] else "-"
        best = f"{c['best_us']:.2f}" if c["best_us"] else "-"
        lines.append(f"| {c['shape']} | {c['M']} | {c['stages']} | {c['path']} | {c['bf16_us']:.2f} | {cur} | "
                     f"{best} | {gain} | {spec} | {c['n_candidates']} | "
                     f"{'-' if c['gemm_instead_us'] is None else format(c['gemm_instead_us'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output path without suffix")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting candidates after this (default 150)")
    p.add_argument("--rep", type=int, default=30, help="do_bench repetition time, ms (default 30)")
    p.add_argument("--write-configs", type=pathlib.Path, default=None, metavar="JSON",
                   help="also write each case's fastest config into this table (the format of "
                        "fairy2i_compile/codegen/triton_configs.json; entries of other devices are kept)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels: no CUDA device here; nothing written.", file=sys.stderr)
        return 1
    import triton
    from triton.testing import do_bench

    def bench(fn) -> float:
        return do_bench(fn, warmup=5, rep=args.rep, return_mode="median")

    deadline = time.monotonic() + args.budget_s
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "timer": f"triton.testing.do_bench median (warmup 5 ms, rep {args.rep} ms)"}
    cases: List[Dict] = []
    for out_f, in_f, M, T in CASES:
        if time.monotonic() > deadline:
            print(f"tune_kernels: budget spent, skipping {out_f}x{in_f} M={M} T={T}", flush=True)
            continue
        c = run_case(out_f, in_f, M, T, bench, deadline)
        cases.append(c)
        print(f"{c['shape']} M={M} T={T} {c['path']}: bf16 {c['bf16_us']:.2f} us, current {c['current_us']} us, "
              f"best {c['best_us']} us {c['best_spec']} ({c['n_candidates']} tried)", flush=True)
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
    table[device] = entries
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
