"""Packed Fairy2i Triton kernels vs cuBLAS bf16 on LLaMA-7B-class linear shapes (GPU only).

    python benchmarks/bench_kernels.py                       # all shapes, M in 1 2 4 8 16 64 256, T = 1 2
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batches 1,16 --stages 2
    python benchmarks/bench_kernels.py --warm-only --shard 0 --shards 8   # compile only (see tune_kernels.py)
    python benchmarks/bench_kernels.py --decode --out benchmarks/results/gpu_decode_h200
    python benchmarks/bench_kernels.py --sass --out benchmarks/results/bench_kernels_sass_sm90   # no GPU needed

For each shape (out x in of the real layer: U, W are [out/2, in/2] complex) and batch M:

* builds T-stage packed weights (tensor scales; random codes: the time does not depend on
  the values) and checks the kernel against `packed_linear_reference` (bf16 activations, fp32
  oracle, tolerance 2e-2 of the output scale, as tests/test_triton_kernels.py) before timing;
* times, in the same run, with `triton.testing.do_bench` medians:
    bf16      torch.nn.functional.linear(x, W) with a dense bf16 W (cuBLAS)
    ours      the kernel `choose_spec` picks, launched directly (output preallocated)
    ours+op   the public wrapper `packed_linear_triton` (validation + spec lookup + launch)
    variants  (--variants) the other paths / decodes at this size, launched the same way:
              gemv (the multiplication-free CUDA-core kernel, M <= 2), mma-bits / mma-asm
              (the tensor-core atom kernel with either decode, M <= 64), dense-bits / dense-asm
              (dense tiles of A_hat, M >= 8), gemm (decode-to-tile with selects, M >= 64)
* measures HBM bandwidth with a 1 GiB device-to-device copy (read + write bytes / time)
  and reports the floor = packed weight bytes (codes + scales) / bandwidth and ours' % of it
  (activations are not counted: at M >= 64 they are no longer small, and the kernel is
  compute-bound there anyway).

--decode times greedy decoding of a Llama-architecture model (random weights, LLaMA-7B layer
sizes, --layers blocks) compiled with torch.compile: bf16 with Inductor vs the same model
packed (pack_model, T = 1 and 2) compiled with the fairy2i backend (Inductor for the rest of
the graph, the Triton kernels for the packed layers); with --cudagraphs Inductor's cudagraph trees
are tried first; tokens/s = 1 / median step time, from one run.

--sass is the profile that needs no GPU: it compiles the kernels' "before" and "after" specs
for sm_90 (Triton's own compiler and ptxas, GPUTarget("cuda", 90, 32)), disassembles them with
the cuobjdump Triton ships, finds the main loop (the longest backward branch) and counts its
SASS instructions by opcode: lane-ops per code = instructions x 32 lanes x warps / codes per
step. With the H200's issue rate (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz) that gives the
time one layer takes at perfect issue, a lower bound to set beside a measurement.

Writes <out>.json and <out>.md (default benchmarks/results/bench_kernels) with the device
name and torch / triton versions. Without CUDA it prints why and exits 1, writing nothing
(except --sass, which needs triton only).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from results_io import write_results

DEFAULT_SHAPES = "4096x11008,11008x4096,4096x4096,8192x8192"
DEFAULT_BATCHES = "1,2,4,8,16,64,256"
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
                   help=f"activation rows M (default {DEFAULT_BATCHES})")
    p.add_argument("--stages", type=lambda s: _ints(s, "stages"), default=_ints(DEFAULT_STAGES, "stages"),
                   help=f"residual stages T (default {DEFAULT_STAGES})")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help="output path without suffix: writes OUT.json and OUT.md "
                        "(default benchmarks/results/bench_kernels)")
    p.add_argument("--variants", action="store_true",
                   help="also time the other paths / decodes at each size (gemv, mma-bits, mma-asm, gemm)")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warmup, ms (default 10)")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time, ms (default 40)")
    p.add_argument("--warm-only", action="store_true", help="compile (launch once) the kernels, time nothing")
    p.add_argument("--shard", type=int, default=0, help="with --warm-only: this process's shard (0-based)")
    p.add_argument("--shards", type=int, default=1, help="with --warm-only: number of shards")
    p.add_argument("--decode", action="store_true", help="end-to-end greedy decoding instead of the kernel table")
    p.add_argument("--layers", type=int, default=4, help="--decode: Llama blocks (default 4, LLaMA-7B sizes)")
    p.add_argument("--decode-tokens", type=int, default=64, help="--decode: tokens per pass (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="--decode: prompt length (default 32)")
    p.add_argument("--decode-configs", default="bf16,w2,w1",
                   help="--decode: comma-separated subset of bf16, w1, w2 (default all, bf16 first)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="--decode: try Inductor's CUDA graphs first (H200 run 1: the process crashed with them)")
    p.add_argument("--sass", action="store_true",
                   help="offline sm_90 SASS instruction counts of the kernels' main loops (needs no GPU)")
    return p.parse_args(argv)


def hbm_copy_bandwidth(bench: Callable, device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (it reads and writes nbytes each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def variant_specs(M: int, n: int, m: int, stages: int) -> Dict[str, object]:
    """{label: KernelSpec}: choose_spec's pick ("ours") and, for --variants, the other paths at this size."""
    from fairy2i_compile.compiler.codegen.triton_packed import choose_spec

    def pick(path=None):
        return choose_spec(M, n, m, stages, 0, False, torch.bfloat16, False, False, path)

    ours = pick()
    out = {"ours": ours}
    if M <= 64:
        mma = pick("mma")
        for decode in ("bits", "asm"):
            out[f"mma-{decode}"] = dataclasses.replace(mma, decode=decode)
    if M >= 8:
        dense = pick("dense")
        for decode in ("bits", "asm"):
            out[f"dense-{decode}"] = dataclasses.replace(dense, decode=decode)
    if M <= 2:
        out["gemv"] = pick("gemv")
    if M >= 64:
        out["gemm"] = pick("gemm")
    return out


def _weights(out_f: int, in_f: int, stages: int, device: str, seed: int = 0):
    from fairy2i_compile.quantization.packing import words_per_row

    n, m = out_f // 2, in_f // 2
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-2**31, 2**31 - 1, (2 * stages, n, words_per_row(m)), device=device, dtype=torch.int32,
                          generator=g)
    scales = (torch.rand(2 * stages, 2, 1, 1, device=device, generator=g) + 0.5) / m**0.5
    w_dense = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=g) / in_f**0.5
    return n, m, codes, scales, w_dense, g


def warm(args) -> None:
    """Launch the kernels (shape, T, M, variant) number shard, shard + shards, ... once: fills Triton's cache."""
    from fairy2i_compile.compiler.codegen.triton_packed import launch_packed_linear

    index = 0
    for out_f, in_f in args.shapes:
        for stages in args.stages:
            n, m, codes, scales, w_dense, g = _weights(out_f, in_f, stages, "cuda")
            for M in args.batches:
                specs = variant_specs(M, n, m, stages)
                if not args.variants:
                    specs = {"ours": specs["ours"]}
                for label, spec in specs.items():
                    index += 1
                    if (index - 1) % args.shards != args.shard:
                        continue
                    x = torch.randn(M, in_f, device="cuda", dtype=torch.bfloat16)
                    try:
                        launch_packed_linear(spec, x, codes, scales, None, m)
                    except Exception as e:
                        print(f"warm: {out_f}x{in_f} M={M} T={stages} {label}: {type(e).__name__}: {str(e)[:160]}")
            del codes, scales, w_dense
    torch.cuda.synchronize()


def bench_shape(out_f: int, in_f: int, batches: List[int], stages: int, bench: Callable, device: str,
                bandwidth: float, variants: bool) -> List[Dict]:
    from fairy2i_compile.compiler.codegen.triton_packed import launch_packed_linear, packed_linear_triton
    from fairy2i_compile.packed_ops import packed_linear_reference
    from fairy2i_compile.quantization.packing import packed_nbytes

    n, m, codes, scales, w_dense, g = _weights(out_f, in_f, stages, device)
    packed_bytes = packed_nbytes(n, m, stages, "tensor")
    floor_s = packed_bytes / bandwidth if bandwidth else float("nan")
    rows = []
    for M in batches:
        x = torch.randn(M, in_f, device=device, dtype=torch.bfloat16, generator=g)
        y = torch.empty(M, out_f, device=device, dtype=torch.bfloat16)
        specs = variant_specs(M, n, m, stages)
        if not variants:
            specs = {"ours": specs["ours"]}
        ref = packed_linear_reference(x.float(), codes, scales, None, m, 0)
        scale = ref.abs().max().item()
        spec = specs["ours"]

        # correctness first: a wrong (or failing) kernel gets no timing, and the row says why
        t_bf16 = bench(lambda: F.linear(x, w_dense))
        try:
            ours = packed_linear_triton(x, codes, scales, None, m, 0)
            direct = launch_packed_linear(spec, x, codes, scales, None, m, out=y)
            err = max((ours.float() - ref).abs().max().item(), (direct.float() - ref).abs().max().item()) / scale
            failure = None if err <= BF16_TOL else f"differs from the reference: {err:.3g} > {BF16_TOL}"
        except Exception as e:
            err, failure = float("nan"), f"{type(e).__name__}: {str(e)[:200]}"
        if failure:
            print(f"bench_kernels: {out_f}x{in_f} M={M} T={stages} {spec}: {failure}; not timed", flush=True)
            rows.append({"shape": f"{out_f}x{in_f}", "M": M, "stages": stages, "path": spec.path,
                         "decode": spec.decode, "bf16_us": t_bf16 * 1e3, "error": failure})
            continue
        t_ours = bench(lambda: launch_packed_linear(spec, x, codes, scales, None, m, out=y))
        t_op = bench(lambda: packed_linear_triton(x, codes, scales, None, m, 0))
        var_us: Dict[str, object] = {}
        for label, vspec in specs.items():
            if label == "ours":
                continue
            try:
                out = launch_packed_linear(vspec, x, codes, scales, None, m, out=y)
                verr = (out.float() - ref).abs().max().item() / scale
                if not verr <= BF16_TOL:
                    var_us[label] = f"wrong: {verr:.3g}"
                    continue
                var_us[label] = 1e3 * bench(lambda: launch_packed_linear(vspec, x, codes, scales, None, m, out=y))
            except Exception as e:
                var_us[label] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append({
            "shape": f"{out_f}x{in_f}", "out_features": out_f, "in_features": in_f, "M": M, "stages": stages,
            "scale": "tensor", "path": spec.path, "decode": spec.decode, "spec": spec.name,
            "blocks": {"block_m": spec.block_m, "block_n": spec.block_n, "block_k": spec.block_k,
                       "num_warps": spec.num_warps, "num_stages": spec.num_stages},
            "packed_bytes": packed_bytes, "bf16_weight_bytes": 2 * out_f * in_f,
            "bf16_us": t_bf16 * 1e3, "ours_us": t_ours * 1e3, "ours_op_us": t_op * 1e3,
            "speedup_vs_bf16": t_bf16 / t_ours, "speedup_op_vs_bf16": t_bf16 / t_op,
            "floor_us": floor_s * 1e6, "pct_of_floor": 100.0 * floor_s / (t_ours * 1e-3),
            "max_err_rel_to_output_scale": err, "variants_us": var_us,
        })
        print(_row_line(rows[-1]), flush=True)
    return rows


_COLUMNS = ("shape", "M", "T", "path", "bf16 us", "ours us", "ours+op us", "speedup", "speedup (op)",
            "floor us", "% floor", "err", "variants us")


def _fmt_variants(v: Dict) -> str:
    return " ".join(f"{k}={x:.2f}" if isinstance(x, float) else f"{k}=({x})" for k, x in v.items()) or "-"


def _row_cells(r: Dict) -> List[str]:
    path = r["path"] + ("-asm" if r.get("decode") == "asm" else "")
    if "error" in r:
        return [r["shape"], str(r["M"]), str(r["stages"]), path, f"{r['bf16_us']:.2f}"] + ["-"] * 7 + [r["error"]]
    return [r["shape"], str(r["M"]), str(r["stages"]), path, f"{r['bf16_us']:.2f}", f"{r['ours_us']:.2f}",
            f"{r['ours_op_us']:.2f}", f"{r['speedup_vs_bf16']:.2f}x", f"{r['speedup_op_vs_bf16']:.2f}x",
            f"{r['floor_us']:.2f}", f"{r['pct_of_floor']:.1f}", f"{r['max_err_rel_to_output_scale']:.1e}",
            _fmt_variants(r.get("variants_us", {}))]


_WIDTHS = (11, 4, 2, 8, 9, 9, 11, 8, 13, 9, 8, 8, 0)


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
        f"Timer: {meta['timer']}. Activations bf16, tensor scales, random codes (shapes matter, not values).",
        f"Config table: {meta.get('configs', 'the shipped one')}.",
        "",
        "ours = the kernel choose_spec picks, launched directly; ours+op = the public wrapper `packed_linear_triton`.",
        "path: mma = +-1 atoms on the tensor cores, dense = atoms summed into dense tiles of A_hat + tl.dot "
        "(-asm: the PTX decode), gemv = multiplication-free CUDA-core kernel, gemm = decode-to-tile with selects + "
        "tl.dot.",
        "floor = packed weight bytes (2-bit codes + fp32 scales) / HBM bandwidth; % floor = floor / ours.",
        "speedup = bf16 time / ours time. err = max |ours - reference| / max |reference| (checked before timing).",
        "variants: the other paths / decodes at the same size, same run (us).",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- end-to-end decode
def _llama(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def _greedy(fwd, cache, ids, new_tokens):
    """(prefill_s, [step_s], tokens) with one StaticCache reused across passes; steps timed with CUDA sync."""
    L = ids.shape[1]
    cache.reset()
    dev = ids.device
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(L, device=dev), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        tokens, steps = [int(nxt)], []
        for i in range(new_tokens - 1):
            t0 = time.perf_counter()
            out = fwd(input_ids=nxt.clone(), past_key_values=cache,
                      cache_position=torch.tensor([L + i], device=dev), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - t0)
            tokens.append(int(nxt))
    return prefill, steps, tokens


def decode_config(name: str, args) -> Dict:
    """One configuration in this process: build, [pack], compile, two warm-up passes, one timed pass."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from transformers import StaticCache

    torch._dynamo.reset()
    model = _llama(args.layers, "cuda")
    row: Dict[str, object] = {"config": name, "layers": args.layers}
    t0 = time.perf_counter()
    if name == "bf16":
        compile_kw = dict(dynamic=False)
    else:
        from fairy2i_compile.compiler.backend import Fairy2iBackend
        from fairy2i_compile.quantization.packed_model import pack_model

        stages = int(name[1])
        pack_model(model, stages=stages)
        # the backend object, not backend="fairy2i": that name is registered by the package's entry point,
        # i.e. only where it is pip-installed (H200 run 2: "Invalid backend: 'fairy2i'" from a checkout)
        compile_kw = dict(dynamic=False, backend=Fairy2iBackend(
            {"mode": "ptq", "stages": stages, "compiler": "inductor", "kernel": "auto"}))
    row["pack_s"] = time.perf_counter() - t0
    row["weight_bytes"] = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    torch.cuda.empty_cache()
    ids = torch.randint(0, 32000, (1, args.prompt_tokens), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_tokens + args.decode_tokens)
    result = None
    for cudagraphs in ((True, False) if args.cudagraphs else (False,)):
        try:
            with inductor_config.patch({"triton.cudagraphs": cudagraphs}):
                torch._dynamo.reset()
                fwd = torch.compile(model, **compile_kw)
                t0 = time.perf_counter()
                _greedy(fwd, cache, ids, args.decode_tokens)
                _greedy(fwd, cache, ids, args.decode_tokens)
                warm = time.perf_counter() - t0
                prefill, steps, tokens = _greedy(fwd, cache, ids, args.decode_tokens)
            result = dict(cudagraphs=cudagraphs, warmup_s=warm, prefill_s=prefill,
                          decode_step_ms=1e3 * statistics.median(steps), decode_tok_s=1.0 / statistics.median(steps),
                          tokens=tokens[:16])
            break
        except Exception as e:  # record why CUDA graphs did not work, then try without
            row[f"error_cudagraphs_{cudagraphs}"] = f"{type(e).__name__}: {str(e)[:300]}"
    if result:
        row.update(result)
    row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def decode_main(args, meta: Dict) -> int:
    rows = []
    for name in [c.strip() for c in args.decode_configs.split(",") if c.strip()]:
        if name not in ("bf16", "w1", "w2"):
            raise SystemExit(f"bench_kernels --decode: unknown config {name!r} (bf16, w1, w2)")
        row = decode_config(name, args)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
        base = next((r for r in rows if r["config"] == "bf16" and "decode_tok_s" in r), None)
        for r in rows:
            if base and "decode_tok_s" in r:
                r["speedup_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
        md = ["# End-to-end greedy decoding: compiled Llama-architecture model, bf16 vs packed Fairy2i",
              "", f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}.",
              f"Model: LlamaForCausalLM, random weights, {args.layers} blocks of LLaMA-7B size (hidden 4096, "
              f"MLP 11008, 32 heads), vocab 32000, bf16; batch 1, prompt {args.prompt_tokens} tokens, "
              f"{args.decode_tokens} decode steps with a StaticCache; two warm-up passes, then one timed pass.",
              "bf16: torch.compile (Inductor). wT: pack_model(stages=T) (every linear incl. lm_head), "
              "torch.compile(backend='fairy2i', mode ptq, compiler inductor): Triton kernels for the packed layers.",
              "tokens/s = 1 / median decode step (CUDA-synchronised wall time).", "",
              "| config | CUDA graphs | decode ms/token | tokens/s | vs bf16 | prefill s | weights GB | error |",
              "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            err = "; ".join(str(v)[:80] for k, v in r.items() if k.startswith("error"))
            md.append(f"| {r['config']} | {r.get('cudagraphs', '-')} | "
                      f"{r.get('decode_step_ms', float('nan')):.3f} | {r.get('decode_tok_s', float('nan')):.1f} | "
                      f"{r.get('speedup_vs_bf16', float('nan')):.2f}x | {r.get('prefill_s', float('nan')):.3f} | "
                      f"{r['weight_bytes'] / 1e9:.2f} | {err or '-'} |")
        write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(md) + "\n", indent=2)
    return 0


# --------------------------------------------------------------------------- offline SASS profile
H200_LANE_OPS_PER_S = 132 * 4 * 32 * 1.98e9  # SMs x schedulers x lanes x boost clock: one warp instruction per cycle
# (label, KernelSpec fields, M it serves): the configs the shipped table / choose_spec use for 4096x11008
SASS_SPECS = [
    ("gemv, before (table: M=1)", dict(path="gemv", stages=2, block_m=1, block_n=4, block_k=512, num_warps=4,
                                       num_stages=2), 1),
    ("gemm, before (table: M=256)", dict(path="gemm", stages=2, block_m=64, block_n=64, block_k=32, num_warps=4,
                                         num_stages=3), 256),
    ("mma bits, M=1", dict(path="mma", stages=2, block_m=1, block_n=16, block_k=256, num_warps=4, num_stages=3), 1),
    ("mma asm, M=1", dict(path="mma", stages=2, block_m=1, block_n=16, block_k=256, num_warps=4, num_stages=3,
                          decode="asm"), 1),
    ("mma bits, M=1, T=1, BLOCK_N=16", dict(path="mma", stages=1, block_m=1, block_n=16, block_k=256,
                                            num_warps=4, num_stages=3), 1),
    ("mma bits, M=1, T=1", dict(path="mma", stages=1, block_m=1, block_n=32, block_k=256, num_warps=4,
                                num_stages=3), 1),
    ("mma asm, M=1, T=1", dict(path="mma", stages=1, block_m=1, block_n=32, block_k=256, num_warps=4,
                               num_stages=3, decode="asm"), 1),
    ("mma asm, M=8", dict(path="mma", stages=2, block_m=8, block_n=16, block_k=256, num_warps=4, num_stages=3,
                          decode="asm"), 8),
    ("mma asm, M=16", dict(path="mma", stages=2, block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=3,
                           decode="asm"), 16),
    ("dense bits, M=64", dict(path="dense", stages=2, block_m=64, block_n=128, block_k=32, num_warps=8,
                              num_stages=3), 64),
    ("dense asm, M=64", dict(path="dense", stages=2, block_m=64, block_n=128, block_k=32, num_warps=8,
                             num_stages=3, decode="asm"), 64),
    ("dense bits, M=256", dict(path="dense", stages=2, block_m=128, block_n=128, block_k=32, num_warps=8,
                               num_stages=3), 256),
    ("dense asm, M=256", dict(path="dense", stages=2, block_m=128, block_n=128, block_k=32, num_warps=8,
                              num_stages=3, decode="asm"), 256),
]


def _sass_loop(sass: str) -> Dict:
    """Opcode histogram of the longest backward branch's body (the kernel's main K loop)."""
    import collections
    import re

    ins = []
    for line in sass.splitlines():
        mt = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if mt:
            ins.append((int(mt.group(1), 16), mt.group(3), line))
    loops = []
    for addr, op, line in ins:
        tgt = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line) if op == "BRA" else None
        if tgt and tgt.group(1) and int(tgt.group(1), 16) < addr:
            loops.append((int(tgt.group(1), 16), addr))
    lo, hi = max(loops, key=lambda p: p[1] - p[0])
    body = collections.Counter(op.split(".")[0] for a, op, _ in ins if lo <= a <= hi)
    spills = sum(1 for _, op, _ in ins if op.startswith(("STL", "LDL")))
    return {"instructions": sum(body.values()), "opcodes": dict(body.most_common()), "local_mem_ops": spills}


def sass_profile(args) -> int:
    import glob
    import os
    import subprocess

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fairy2i_compile.compiler.codegen.triton_packed import KernelSpec, load_kernel

    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tools:
        print("bench_kernels --sass: triton's bundled cuobjdump was not found; nothing written.", file=sys.stderr)
        return 1
    ty = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
    n, m, shape = 2048, 5504, "4096x11008"  # divisible by 16 as on the device; KW = 344 is not
    rows = []
    for label, fields, M in SASS_SPECS:
        spec = KernelSpec(scale="tensor", act_dtype="bfloat16", **fields)
        fn = load_kernel(spec)
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        sig = {"x_ptr": ty[spec.act_dtype], "codes_ptr": "*i32", "scales_ptr": "*fp32", "y_ptr": ty[spec.act_dtype]}
        if spec.path != "gemv":
            sig["M"] = "i32"
        sig.update(n="i32", m="i32", KW="i32", G="i32")
        consts = {"BLOCK_N": spec.block_n, "BLOCK_K": spec.block_k}
        if spec.path != "gemv":
            consts["BLOCK_M"] = spec.block_m
        sig.update({c: "constexpr" for c in consts})
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a in ("x_ptr", "codes_ptr", "scales_ptr", "y_ptr", "n", "m")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        with open("/tmp/fairy2i_sass.cubin", "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([tools[0], "-sass", "/tmp/fairy2i_sass.cubin"], capture_output=True, text=True).stdout
        res = subprocess.run([tools[0], "-res-usage", "/tmp/fairy2i_sass.cubin"], capture_output=True, text=True).stdout
        loop = _sass_loop(sass)
        codes_per_step = spec.planes * spec.block_n * spec.block_k
        lane_ops = loop["instructions"] * 32 * spec.num_warps / codes_per_step
        passes = -(-M // spec.block_m)  # the codes are decoded once per BLOCK_M activation rows
        total_codes = spec.planes * n * m
        regs = int(res.split("REG:")[1].split()[0]) if "REG:" in res else None
        rows.append({"label": label, "spec": dataclasses.asdict(spec), "M": M, "shape": shape,
                     "registers": regs, "loop": loop, "codes_per_step": codes_per_step,
                     "lane_ops_per_code": lane_ops, "decode_passes": passes,
                     "perfect_issue_us": 1e6 * total_codes * lane_ops * passes / H200_LANE_OPS_PER_S})
        r = rows[-1]
        print(f"{label:28s} {loop['instructions']:5d} instr/step/warp  {lane_ops:6.2f} lane-ops/code  "
              f"x{passes} passes  {r['perfect_issue_us']:7.2f} us at perfect issue  regs {regs}", flush=True)
    meta = {"target": "sm_90 (GPUTarget('cuda', 90, 32)), compiled offline, no GPU", "triton": triton.__version__,
            "torch": torch.__version__, "shape": shape, "issue_rate_lane_ops_per_s": H200_LANE_OPS_PER_S}
    md = ["# Static SASS profile of the packed kernels' main loops (sm_90, compiled offline)", "",
          f"Triton {meta['triton']} compiled each kernel for sm_90 on a machine without a GPU; its bundled cuobjdump "
          "disassembled it. Counts are of the main K loop's body (the longest backward branch), per warp and step.",
          f"Layer {shape} (n = {n}, m = {m} complex), bf16 activations, tensor scales, T = 2 unless the label says.",
          "lane-ops per code = loop instructions x 32 x warps / codes per step (planes x BLOCK_N x BLOCK_K); "
          "passes = how often each code is decoded (ceil(M / BLOCK_M)); perfect-issue time = all codes x lane-ops x "
          "passes / (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz): a lower bound, not a measurement.", "",
          "| kernel | instr / step / warp | lane-ops / code | passes | perfect-issue us | registers | top opcodes |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{o} {c}" for o, c in list(r["loop"]["opcodes"].items())[:8])
        md.append(f"| {r['label']} | {r['loop']['instructions']} | {r['lane_ops_per_code']:.2f} | "
                  f"{r['decode_passes']} | {r['perfect_issue_us']:.2f} | {r['registers']} | {top} |")
    write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(md) + "\n", indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.sass:
        return sass_profile(args)
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
    from fairy2i_compile.compiler.codegen import triton_interpreter_enabled

    if triton_interpreter_enabled():
        print("bench_kernels: TRITON_INTERPRET is set; unset it to time compiled kernels. Nothing written.",
              file=sys.stderr)
        return 1

    import os

    device = "cuda"
    meta = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "configs": os.environ.get("FAIRY2I_TRITON_CONFIGS") or "fairy2i_compile/compiler/codegen/triton_configs.json",
    }
    if args.decode:
        return decode_main(args, meta)

    def bench(fn: Callable) -> float:  # median ms
        return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    if args.warm_only:
        warm(args)
        print(f"bench_kernels warm shard {args.shard}/{args.shards} done", flush=True)
        return 0

    bandwidth = hbm_copy_bandwidth(bench, device)
    meta.update({
        "hbm_copy_GBps": bandwidth / 1e9,
        "timer": f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)",
        "shapes": [f"{o}x{i}" for o, i in args.shapes], "batches": args.batches, "stages": args.stages,
    })
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"HBM copy {meta['hbm_copy_GBps']:.0f} GB/s")
    print(_header_line())
    rows: List[Dict] = []
    for out_f, in_f in args.shapes:
        for stages in args.stages:
            rows += bench_shape(out_f, in_f, args.batches, stages, bench, device, bandwidth, args.variants)
            write_results(args.out, {"meta": meta, "rows": rows}, to_markdown(meta, rows), indent=2)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
