"""C++ CPU kernel at decode batch sizes: the fold path vs the row-decode path, per scale granularity.

    .venv/bin/python benchmarks/bench_cpu_scales.py            # SmolLM2 shapes, T = 2, batch 1 (~1 min)

Batches of at most FOLD_MAX_TOKENS (4) take the multiplication-free fold path; before it
handled row scales and groups, those layers decoded 4 rows at a time and took dot products.
Both paths are still in the kernel (the decode path serves 5..63 tokens and groups that
are not whole code words), so this script times the same packed layer through each in one
process, alternating, best of three, after checking both against the torch reference.

Results: benchmarks/results/bench_cpu_scales.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from results_io import write_results  # noqa: E402

SHAPES = ((1536, 576), (576, 1536), (1152, 576))  # SmolLM2: MLP up/gate, down, fused-ish attention
GRANULARITIES = ("tensor", "row", 128, 64, 32)


def best_us(fn, calls: int, repeats: int = 3) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1, help="activation rows, at most 4 (the fold path's range)")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_cpu_scales")
    p.add_argument("--notes", default="")
    args = p.parse_args(argv)
    from fairy2i_compile.compiler.codegen import cpu_packed
    from fairy2i_compile.packed_ops import packed_linear_reference
    from fairy2i_compile.quantization.packing import pack_widely

    if not 1 <= args.tokens <= cpu_packed.FOLD_MAX_TOKENS:
        p.error(f"--tokens must be 1..{cpu_packed.FOLD_MAX_TOKENS} (the fold path's range), got {args.tokens}")
    if not cpu_packed.cpu_kernel_available():
        print("bench_cpu_scales: the C++ kernel is unavailable here; nothing written", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows = []
    fold_max = cpu_packed.FOLD_MAX_TOKENS
    try:
        for out_f, in_f in SHAPES:
            n, m = out_f // 2, in_f // 2
            for g in GRANULARITIES:
                pk = pack_widely(*(torch.randn(n, m) for _ in range(4)), args.stages, g)
                gs = g if isinstance(g, int) else 0
                x = torch.randn(args.tokens, in_f)
                ref = packed_linear_reference(x, pk.codes, pk.scales, None, m, gs)

                def run():
                    return cpu_packed.cpu_forward(x, pk.codes, pk.scales, None, m, gs)

                row = {"shape": f"{out_f}x{in_f}", "granularity": str(g)}
                for path, limit in (("decode", 0), ("fold", fold_max)):
                    cpu_packed.FOLD_MAX_TOKENS = limit  # read per call by cpu_forward
                    err = ((run() - ref).abs().max() / ref.abs().max()).item()
                    if not err <= 1e-5:
                        raise SystemExit(f"{path} path differs from the reference at {row}: {err:.3g}")
                    row[f"{path}_us"], row[f"{path}_err"] = best_us(run, args.calls), err
                row["speedup"] = row["decode_us"] / row["fold_us"]
                rows.append(row)
                print(f"{row['shape']:>9} {row['granularity']:>6}: decode {row['decode_us']:7.1f} us  "
                      f"fold {row['fold_us']:7.1f} us  {row['speedup']:.2f}x", flush=True)
    finally:
        cpu_packed.FOLD_MAX_TOKENS = fold_max
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "stages": args.stages, "tokens": args.tokens, "calls": args.calls, "notes": args.notes}
    lines = [
        "# C++ CPU kernel: fold path vs row-decode path per scale granularity",
        "",
        f"Machine: {meta['machine']}, torch {meta['torch']}. T = {args.stages}, {args.tokens} token(s), "
        f"best of 3 x {args.calls} calls, both paths in one process; both matched the torch reference "
        "(max error / output scale in the json).",
        "",
        "| layer (out x in) | scales | decode path us | fold path us | speedup |",
        "|---|---|---|---|---|",
    ] + [f"| {r['shape']} | {r['granularity']} | {r['decode_us']:.1f} | {r['fold_us']:.1f} | {r['speedup']:.2f}x |"
         for r in rows]
    if args.notes:
        lines += ["", "## Notes", "", args.notes]
    write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
