"""Packed Fairy2i Triton kernels vs cuBLAS bf16 on LLaMA-7B-class linear shapes (GPU only).

    python benchmarks/bench_kernels.py                       # all shapes, M in 1 4 16 64 256, T = 1 2
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batches 1,16 --stages 2

For each shape (out x in of the real layer: U, W are [out/2, in/2] complex) and batch M:

* builds T-stage packed weights (tensor scales) from random U, W and checks the kernel
  against `packed_linear_reference` (bf16 activations, fp32 oracle, tolerance 2e-2 of the
  output scale, as tests/test_triton_kernels.py) before timing anything;
* times, in the same run, with `triton.testing.do_bench` medians:
    bf16      torch.nn.functional.linear(x, W) with a dense bf16 W (cuBLAS)
    ours      the generated kernel launched directly (spec chosen once, output preallocated)
    ours+op   the public wrapper `packed_linear_triton` (validation + spec lookup + launch)
* measures HBM bandwidth with a 1 GiB device-to-device copy (read + write bytes / time)
  and reports the floor = packed weight bytes (codes + scales) / bandwidth and ours' % of it
  (activations are not counted: at M >= 64 they are no longer small, and the kernel is
  compute-bound there anyway).

Writes <out>.json and <out>.md (default benchmarks/results/bench_kernels) with the device
name and torch / triton versions. Without CUDA it prints why and exits 1, writing nothing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from results_io import write_results

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"
DEFAULT_BATCHES = "1,4,16,64,256"
DEFAULT_STAGES = "1,2"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_kernels"
BF16_TOL = 2e-2  # relative to the output scale; see tests/test_triton_kernels.py


def _ints(text: str, what: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"positive integers expected, got {text!r}")
    return vals


def _shapes(text: str) -> List[tuple]:
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"OUTxIN pairs like 4096x11008 expected, got {item!r}")
        o, i = int(parts[0]), int(parts[1])
        if o % 2 or i % 2 or o < 2 or i < 2:
            raise argparse.ArgumentTypeError(
                f"out and in must be even and >= 2 (the widely-linear form pairs halves), got {item!r}")
        out.append((o, i))
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=_shapes(DEFAULT_SHAPES),
                   help=f"real layer shapes OUTxIN, comma-separated (default {DEFAULT_SHAPES})")
    p.add_argument("--batches", type=lambda s: _ints(s, "batches"), default=_ints(DEFAULT_BATCHES, "batches"),
                   help=f"activation rows M (default {DEFAULT_BATCHES}); M <= 2 runs the GEMV")
    p.add_argument("--stages", type=lambda s: _ints(s, "stages"), default=_ints(DEFAULT_STAGES, "stages"),
                   help=f"residual stages T (default {DEFAULT_STAGES})")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help="output path without suffix: writes OUT.json and OUT.md "
                        "(default benchmarks/results/bench_kernels)")
    p.add_argument("--gemv-max-m", type=int, default=None, metavar="M",
                   help="route only batches <= M to the GEMV (default: the library's GEMV_MAX_M); "
                        "e.g. 1 times the tensor-core GEMM at small batches")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    return p.parse_args(argv)


def hbm_copy_bandwidth(bench: Callable, device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (it reads and writes nbytes each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def bench_shape(out_f: int, in_f: int, batches: List[int], stages: int, bench: Callable, device: str,
                bandwidth: float, seed: int = 0) -> List[Dict]:
    from fairy2i_compile.codegen import triton_interpreter_enabled
    from fairy2i_compile.codegen.triton_packed import choose_spec, launch_packed_linear, packed_linear_triton
    from fairy2i_compile.packed_ops import packed_linear_reference
    from fairy2i_compile.packing import pack_widely, packed_nbytes

    n, m = out_f // 2, in_f // 2
    g = torch.Generator(device=device).manual_seed(seed)
    u_re, u_im, w_re, w_im = (torch.randn(n, m, device=device, generator=g) / m**0.5 for _ in range(4))
    pk = pack_widely(u_re, u_im, w_re, w_im, stages, "tensor")
    codes, scales = pk.codes, pk.scales.float().contiguous()
    del u_re, u_im, w_re, w_im
    w_dense = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=g) / in_f**0.5
    packed_bytes = packed_nbytes(n, m, stages, "tensor")
    floor_s = packed_bytes / bandwidth
    rows = []
    for M in batches:
        x = torch.randn(M, in_f, device=device, dtype=torch.bfloat16, generator=g)
        spec = choose_spec(M, n, m, stages, 0, False, torch.bfloat16, False, triton_interpreter_enabled())
        y = torch.empty(M, out_f, device=device, dtype=torch.bfloat16)

        # correctness first: a wrong kernel gets no timing
        ours = packed_linear_triton(x, codes, scales, None, m, 0)
        direct = launch_packed_linear(spec, x, codes, scales, None, m, out=y)
        ref = packed_linear_reference(x.float(), codes, scales, None, m, 0)
        scale = ref.abs().max().item()
        err = max((ours.float() - ref).abs().max().item(), (direct.float() - ref).abs().max().item()) / scale
        if not err <= BF16_TOL:
            raise SystemExit(
                f"bench_kernels: {out_f}x{in_f} M={M} T={stages} ({spec.path}) differs from the reference: "
                f"max error {err:.3g} of the output scale > {BF16_TOL}; not timing a wrong kernel, nothing written"
            )

        t_bf16 = bench(lambda: F.linear(x, w_dense))
        t_ours = bench(lambda: launch_packed_linear(spec, x, codes, scales, None, m, out=y))
        t_op = bench(lambda: packed_linear_triton(x, codes, scales, None, m, 0))
        rows.append({
            "shape": f"{out_f}x{in_f}", "out_features": out_f, "in_features": in_f, "M": M, "stages": stages,
            "scale": "tensor", "path": spec.path, "spec": spec.name,
            "blocks": {"block_m": spec.block_m, "block_n": spec.block_n, "block_k": spec.block_k,
                       "num_warps": spec.num_warps, "num_stages": spec.num_stages},
            "packed_bytes": packed_bytes, "bf16_weight_bytes": 2 * out_f * in_f,
            "bf16_us": t_bf16 * 1e3, "ours_us": t_ours * 1e3, "ours_op_us": t_op * 1e3,
            "speedup_vs_bf16": t_bf16 / t_ours, "speedup_op_vs_bf16": t_bf16 / t_op,
            "floor_us": floor_s * 1e6, "pct_of_floor": 100.0 * floor_s / (t_ours * 1e-3),
            "max_err_rel_to_output_scale": err,
        })
        print(_row_line(rows[-1]), flush=True)
    return rows


_COLUMNS = ("shape", "M", "T", "path", "bf16 us", "ours us", "ours+op us", "speedup", "speedup (op)",
            "floor us", "% floor", "err")


def _row_cells(r: Dict) -> List[str]:
    return [r["shape"], str(r["M"]), str(r["stages"]), r["path"], f"{r['bf16_us']:.2f}", f"{r['ours_us']:.2f}",
            f"{r['ours_op_us']:.2f}", f"{r['speedup_vs_bf16']:.2f}x", f"{r['speedup_op_vs_bf16']:.2f}x",
            f"{r['floor_us']:.2f}", f"{r['pct_of_floor']:.1f}", f"{r['max_err_rel_to_output_scale']:.1e}"]


_WIDTHS = (11, 4, 2, 5, 9, 9, 11, 8, 13, 9, 8, 8)


def _row_line(r: Dict) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(_row_cells(r), _WIDTHS))


def _header_line() -> str:
    return "  ".join(c.rjust(w) for c, w in zip(_COLUMNS, _WIDTHS))


def to_markdown(meta: Dict, rows: List[Dict]) -> str:
    lines = [
        "# Packed Fairy2i Triton kernels vs cuBLAS bf16",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}.",
        f"HBM copy bandwidth (1 GiB device-to-device copy, read + write): {meta['hbm_copy_GBps']:.0f} GB/s.",
        f"Timer: {meta['timer']}. Activations bf16, tensor scales, weights random (shapes matter, not values).",
        "",
        "ours = the generated kernel launched directly; ours+op = the public wrapper `packed_linear_triton`.",
        "floor = packed weight bytes (2-bit codes + fp32 scales) / HBM bandwidth; % floor = floor / ours.",
        "speedup = bf16 time / ours time. err = max |ours - reference| / max |reference| (checked before timing).",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; this benchmark times GPU kernels against cuBLAS and "
              "writes nothing without one (run it on a GPU machine).", file=sys.stderr)
        return 1
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        print("bench_kernels: triton is not installed (pip install 'triton>=3.6'); nothing written.", file=sys.stderr)
        return 1
    from fairy2i_compile.codegen import triton_interpreter_enabled

    if triton_interpreter_enabled():
        print("bench_kernels: TRITON_INTERPRET is set; unset it to time compiled kernels. Nothing written.",
              file=sys.stderr)
        return 1

    device = "cuda"
    from fairy2i_compile.codegen import triton_packed

    if args.gemv_max_m is not None:
        triton_packed.GEMV_MAX_M = args.gemv_max_m

    def bench(fn: Callable) -> float:  # median ms
        return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    bandwidth = hbm_copy_bandwidth(bench, device)
    meta = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "hbm_copy_GBps": bandwidth / 1e9,
        "timer": f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)",
        "shapes": [f"{o}x{i}" for o, i in args.shapes], "batches": args.batches, "stages": args.stages,
        "gemv_max_m": triton_packed.GEMV_MAX_M,
    }
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"HBM copy {meta['hbm_copy_GBps']:.0f} GB/s")
    print(_header_line())
    rows: List[Dict] = []
    for out_f, in_f in args.shapes:
        for stages in args.stages:
            rows += bench_shape(out_f, in_f, args.batches, stages, bench, device, bandwidth)
            torch.cuda.empty_cache()

    write_results(args.out, {"meta": meta, "rows": rows}, to_markdown(meta, rows), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
