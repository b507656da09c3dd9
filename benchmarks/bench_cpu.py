"""CPU inference of SmolLM2-135M: fp32 eager, fp32 Inductor, and packed Fairy2i W1 / W2.

    .venv/bin/python benchmarks/bench_cpu.py                      # whole table (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_cpu.py --configs fp32-eager w2 --decode-tokens 16

Every configuration runs in its own subprocess (fresh Dynamo caches, its own peak RSS)
and does the same thing: load SmolLM2, [pack its linears], [compile], then greedy
decoding with a transformers StaticCache: one prefill of `--prompt-tokens` tokens and
`--decode-tokens` single-token steps, three times. The first two passes include compilation
(reported as `compile_s` = their time minus two steady passes); the third is timed: prefill tokens/s = prompt / prefill
time, decode tokens/s = 1 / median step time. Also recorded: packing time, peak RSS
(ru_maxrss), the bytes of the linear weights as the model holds them, and the greedy
tokens (fp32 eager vs Inductor must agree; the PTQ models need not: PTQ alone collapses
a 135M model, see DESIGN.md).

    fp32-eager      the float32 model, eager
    fp32-inductor   torch.compile(model) (Inductor), the same model
    w1, w2          pack_model(model, stages=T) (linears -> PackedLinear: 2-bit codes, the
                    dense weights freed), torch.compile(model, backend="fairy2i",
                    options={"compiler": --ours-compiler (default "inductor")}): Inductor
                    compiles the rest of the graph, the packed op runs the C++ kernel
    w1-decomposed,  as w1 / w2 with kernel="inductor": decode-sized packed layers become torch
    w2-decomposed   ops that Inductor fuses (codegen/inductor_packed.py), the engine tried
                    before a hand-written kernel; prefill keeps the C++ kernel
    w2-dense        no pack_model: the dense model straight into torch.compile(backend="fairy2i",
                    mode="ptq"), the headline usage; fuse_stages packs each layer at compile
                    time into the PTQ cache (the model keeps its dense weights, as the user's)
    w2-eager        as w2 with compiler="eager" (the backend's default: seconds to compile,
                    the rest of the graph op by op, packed ops called directly)
    w2-torch        (not in the default set) as w2 but kernel="torch", the reference that
                    rebuilds the dense weight per call: what the kernel is worth
    w1-lut8,        (not in the default set) as w1 / w2 with FAIRY2I_CPU_LUT8=1 in the worker's
    w2-lut8         environment: decode-sized batches run the int8-table path (activations
                    rounded to 8 bits per block of 32 columns; codegen/cpu_packed.cpp, "lut8")

`--kernels` adds a per-layer table at batch 1 (SmolLM2's shapes): fp32 F.linear, the
C++ kernel, and the best Inductor decomposition of the same op (the engine the issue
asked to try first), each at T = 1 and 2.

Results: benchmarks/results/bench_cpu.{json,md} (the baseline and ours from one run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from results_io import cpu_description, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_cpu"
CONFIGS = ("fp32-eager", "fp32-inductor", "w1", "w2", "w2-dense", "w1-decomposed", "w2-decomposed", "w2-eager",
           "w2-torch", "w1-lut8", "w2-lut8")
DEFAULT_CONFIGS = ("fp32-eager", "fp32-inductor", "w1", "w2", "w2-dense", "w1-decomposed", "w2-decomposed",
                   "w2-eager")
PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city "
          "to the fall of Constantinople. Historians usually divide it into")


def lut8_env(env: dict, on: bool) -> dict:
    """`env` for a worker process with the lut8 CPU path switched on (FAIRY2I_CPU_LUT8=1) or off
    (unset, whatever the caller's environment says); the kernel reads the switch once per process."""
    env = {k: v for k, v in env.items() if k != "FAIRY2I_CPU_LUT8"}
    return {**env, "FAIRY2I_CPU_LUT8": "1"} if on else env


# --------------------------------------------------------------------------- one configuration
def linear_bytes(model) -> int:
    from fairy2i_compile.quantization.packed_model import PackedLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, PackedLinear):
            total += mod.nbytes
    return total


def greedy(fwd, cache, ids, new_tokens):
    """(prefill_s, [step_s], tokens); `cache` is one StaticCache reused across passes (a new
    cache object would change what Dynamo guards on and recompile the graphs)."""
    L = ids.shape[1]
    cache.reset()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(L), use_cache=True)
        prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        tokens, steps = [int(nxt)], []
        for i in range(new_tokens - 1):
            t0 = time.perf_counter()
            out = fwd(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([L + i]), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
            tokens.append(int(nxt))
    return prefill, steps, tokens


def run_config(name: str, args) -> dict:
    from fairy2i_compile.checkpoints.models import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2(progress=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    row = {"config": name, "prompt_tokens": int(ids.shape[1]), "decode_tokens": args.decode_tokens}
    pack_s = 0.0
    if name.startswith("w"):
        from fairy2i_compile.quantization.packed_model import pack_model

        stages = int(name[1])
        kernel = {"torch": "torch", "decomposed": "inductor"}.get(name.split("-")[-1], "auto")
        if name.endswith("-lut8"):
            from fairy2i_compile.compiler.codegen.cpu_packed import cpu_lut8_status

            if cpu_lut8_status() != "on":
                raise SystemExit(f"{name}: the lut8 path is {cpu_lut8_status()!r} in this worker")
            row["cpu_path"] = "lut8"
        compiler = "eager" if name.endswith("-eager") else args.ours_compiler
        if not name.endswith("-dense"):  # -dense: packed by the backend at compile time instead
            t0 = time.perf_counter()
            pack_model(model, stages=stages, kernel=kernel)
            pack_s = time.perf_counter() - t0
        fwd = torch.compile(model, dynamic=False, backend="fairy2i",
                            options={"mode": "ptq", "stages": stages, "compiler": compiler, "kernel": kernel})
        row["compiler"] = f"fairy2i ({compiler})"
    elif name == "fp32-inductor":
        fwd = torch.compile(model, dynamic=False)
        row["compiler"] = "inductor"
    else:
        fwd = model
        row["compiler"] = "eager"
    row["pack_s"] = pack_s
    row["linear_bytes"] = linear_bytes(model)

    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.decode_tokens)
    # two warm-up passes: transformers' StaticCache allocates its tensors lazily in the first
    # prefill, so the second prefill sees an initialised cache and compiles once more
    t0 = time.perf_counter()
    greedy(fwd, cache, ids, args.decode_tokens)
    greedy(fwd, cache, ids, args.decode_tokens)
    row["warmup_s"] = time.perf_counter() - t0
    prefill, steps, tokens = greedy(fwd, cache, ids, args.decode_tokens)
    step = statistics.median(steps)
    row.update(
        prefill_s=prefill, prefill_tok_s=ids.shape[1] / prefill, decode_step_s=step, decode_tok_s=1.0 / step,
        steady_pass_s=prefill + sum(steps), tokens=tokens, text=tok.decode(tokens),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    # compile cost = the warm-up passes minus two steady passes (the same work, compiled already)
    row["compile_s"] = max(row["warmup_s"] - 2 * row["steady_pass_s"], 0.0)
    return row


# --------------------------------------------------------------------------- per-layer kernels
def inductor_decomposition(x, codes, scales, m):
    """The packed op (tensor scales, batch 1) written as torch ops for Inductor to fuse.

    The best of the four formulations tried (4-way select, xor sign via bitcast, sign
    multiply, row-vectorised layout): per code one select by the lo bit, one negation
    select by the hi bit, accumulated per output; scales folded into the activations.
    """
    P, n, kw = codes.shape
    mp = kw * 16
    shifts = torch.arange(16, dtype=torch.int32) * 2
    a = torch.nn.functional.pad(x[:, :m], (0, mp - m)).reshape(1, kw, 16)
    b = torch.nn.functional.pad(x[:, m:], (0, mp - m)).reshape(1, kw, 16)
    y_re = y_im = 0
    for p in range(P):
        s_re, s_im = scales[p, 0, 0, 0], scales[p, 1, 0, 0]
        bc = -b if p % 2 else b
        t = codes[p].unsqueeze(-1) >> shifts
        lo, hi = (t & 1) != 0, (t & 2) != 0
        r = torch.where(lo, -s_im * bc, s_re * a)
        i = torch.where(lo, s_im * a, s_re * bc)
        y_re = y_re + torch.where(hi, -r, r).sum((-1, -2))
        y_im = y_im + torch.where(hi, -i, i).sum((-1, -2))
    return torch.cat([y_re, y_im], -1).unsqueeze(0)


def time_ms(fn, *a, reps=30):
    for _ in range(3):
        fn(*a)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*a)
    return (time.perf_counter() - t0) / reps * 1e3


def kernel_table(args) -> list:
    from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely
    from fairy2i_compile.packed_ops import packed_linear, packed_linear_reference
    from fairy2i_compile.quantization.packing import pack_widely

    torch.set_num_threads(args.threads)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
    rows = []
    for out_f, in_f in shapes:
        a = torch.randn(out_f, in_f)
        x = torch.randn(1, in_f)
        row = {"shape": [out_f, in_f], "fp32_linear_ms": time_ms(torch.nn.functional.linear, x, a)}
        for stages in (1, 2):
            torch._dynamo.reset()  # a fresh graph per shape (Dynamo's recompile limit is 8)
            decomposed = torch.compile(inductor_decomposition, dynamic=False)
            pk = pack_widely(*_real_to_widely(a), stages, "tensor")
            ref = packed_linear_reference(x, pk.codes, pk.scales, None, pk.m, 0)
            got = decomposed(x, pk.codes, pk.scales, pk.m)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), "decomposition is wrong"
            row[f"cpp_T{stages}_ms"] = time_ms(packed_linear, x, pk.codes, pk.scales, None, pk.m, 0, "cpu")
            row[f"inductor_T{stages}_ms"] = time_ms(decomposed, x, pk.codes, pk.scales, pk.m)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- driver
def markdown(result: dict) -> str:
    rows = {r["config"]: r for r in result["configs"]}
    base = rows.get("fp32-eager")
    out = ["# CPU inference: SmolLM2-135M, fp32 vs packed Fairy2i", "",
           f"Command: `{result['command']}`  ", f"Machine: {result['machine']}, {result['threads']} threads, "
           f"torch {result['torch']}. Prompt {result['prompt_tokens']} tokens, {result['decode_tokens']} greedy "
           "decode steps, StaticCache; every row in its own process, timed on the third pass.", "",
           "| config | compiler | linear weights | decode tok/s | vs fp32 eager | prefill tok/s | vs fp32 eager "
           "| pack s | compile s | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        r = rows.get(name)
        if r is None:
            continue
        dec = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        pre = r["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
        out.append(f"| {name} | {r['compiler']} | {r['linear_bytes'] / 2**20:.1f} MiB | {r['decode_tok_s']:.1f} | "
                   f"{dec:.2f}x | {r['prefill_tok_s']:.0f} | {pre:.2f}x | {r['pack_s']:.1f} | {r['compile_s']:.1f} | "
                   f"{r['peak_rss_mb']:.0f} MB |")
    if result.get("kernels"):
        out += ["", "## Per-layer kernels, batch 1 (ms; same run)", "",
                "| shape (out x in) | fp32 F.linear | C++ T=1 | Inductor T=1 | C++ T=2 | Inductor T=2 |",
                "|---|---|---|---|---|---|"]
        for k in result["kernels"]:
            out.append(f"| {k['shape'][0]} x {k['shape'][1]} | {k['fp32_linear_ms']:.3f} | {k['cpp_T1_ms']:.3f} | "
                       f"{k['inductor_T1_ms']:.3f} | {k['cpp_T2_ms']:.3f} | {k['inductor_T2_ms']:.3f} |")
    if result.get("notes"):
        out += ["", "## Notes", "", result["notes"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ours-compiler", choices=("eager", "inductor"), default="inductor")
    p.add_argument("--kernels", action="store_true", help="add the per-layer kernel table")
    p.add_argument("--notes", default="", help="text for the Notes section of the .md")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_config(args.worker, args)), flush=True)
        return 0

    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--worker", name, "--prompt-tokens", str(args.prompt_tokens),
               "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads),
               "--ours-compiler", args.ours_compiler]
        # cold caches for every row: Inductor's (FX graph / kernel cache) and ours (the C++ kernel
        # build), so that compile_s is what a first compile costs
        cold = tempfile.mkdtemp(prefix=f"bench_cpu_{name}_")
        env = lut8_env(dict(os.environ, HF_HUB_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=os.path.join(cold, "inductor"),
                            FAIRY2I_KERNEL_CACHE=os.path.join(cold, "fairy2i")), name.endswith("-lut8"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        shutil.rmtree(cold, ignore_errors=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
        row = json.loads(line[len("RESULT "):])
        rows.append(row)
        print(f"{name:14s} decode {row['decode_tok_s']:6.1f} tok/s  prefill {row['prefill_tok_s']:7.1f} tok/s  "
              f"compile {row['compile_s']:5.1f} s  pack {row['pack_s']:4.1f} s  rss {row['peak_rss_mb']:5.0f} MB  "
              f"linear {row['linear_bytes'] / 2**20:6.1f} MiB  {row['text'][:40]!r}", flush=True)
    result = {
        "command": "python benchmarks/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": cpu_description(),
        "threads": args.threads, "torch": torch.__version__, "prompt_tokens": rows[0]["prompt_tokens"] if rows else 0,
        "decode_tokens": args.decode_tokens, "configs": rows, "notes": args.notes,
    }
    if args.kernels:
        result["kernels"] = kernel_table(args)
    write_results(args.out, result, markdown(result), indent=2)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
