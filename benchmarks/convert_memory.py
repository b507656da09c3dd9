"""Peak memory (RSS) of converting a model to packed Fairy2i form, before and after issue 21.

Each measurement runs in a fresh Python process (`--worker CASE`), with the package
imported from a git worktree of the baseline commit ("before", default: the last commit
before the issue-21 work) or of `--after-rev` ("after"; without it, this checkout as it is,
uncommitted edits included). The worker imports
torch / transformers / fairy2i_compile, records its RSS (the import baseline), loads or
builds the model, records the RSS and resets the peak (`/proc/self/clear_refs` 5), runs
the conversion, and reports the peak (VmHWM) of the conversion alone. The lifetime peak
(ru_maxrss, loading included) is reported too.

Cases (the model bytes are what the user's model holds: unique parameters + buffers):

  head_*        one random 262144 x 640 float32 linear (the issue's lm_head), quantized and
                packed with ops.quantize.pack_layer: W2 (T=2, per-tensor) and T=4 per-row scales;
                head_compile_w2: a 1-block Llama with that lm_head (and an embedding of the same
                size) through torch.compile(backend="fairy2i", mode ptq, W2) and one forward
  smollm2_*     SmolLM2-135M (float32, lm_head tied to the embedding): pack_model W2 and
                T=4 rows; save_packed W2 with float16 dense tensors
  llama1b_*     a 1B-class Llama (Llama-3.2-1B's shapes, random bfloat16 weights, written
                as a safetensors folder under /tmp, not committed): `fairy2i quantize
                --model FOLDER --stages 2` (before: the dense model loaded in float32 and
                save_packed; after: the streaming conversion of convert.py)

Targets (issue 21): peak conversion RSS <= model bytes + 1.5 x the largest layer (float32),
counted above the import baseline; streaming conversion of the 1B folder with peak RSS <=
25% of its dense size.

    .venv/bin/python benchmarks/convert_memory.py [--cases ...] [--baseline-rev REV]
        [--out benchmarks/results/convert_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "85df09e"  # the last commit before issue 21's memory work
LLAMA1B_DIR = Path("/tmp/fairy2i_llama1b_random")
LLAMA1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
CASES = ("head_w2", "head_t4_row", "head_compile_w2", "smollm2_pack_w2", "smollm2_pack_t4_row", "smollm2_save_w2_fp16",
         "llama1b_quantize_w2")
MB = 2**20
# hand-written: what each change was predicted to do before its run, and what the run measured
NOTES = REPO / "benchmarks" / "results" / "convert_memory_notes.md"
SMOKE_CASES = ("head_small_w2",)  # a 4096 x 640 head: checks the plumbing in seconds


# ------------------------------------------------------------------ worker (one process per case)
def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _model_bytes(model) -> tuple:
    import torch

    seen, total, largest = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            largest = max(largest, mod.weight.numel() * 4)
    return total, largest


def worker(case: str, tmp: Path) -> dict:
    import resource

    import torch
    import transformers  # noqa: F401  (part of the import baseline in every case)

    import fairy2i_compile  # noqa: F401

    base = _status()["VmRSS"]
    rec: dict = {"case": case, "import_rss": base, "threads": torch.get_num_threads()}
    # `import transformers` is lazy: its modeling code (which imports torch.distributed.tensor,
    # sympy, torch._dynamo: about 200 MiB) arrives with the first model or config, inside the
    # measured conversion in some cases and not in others; imported here, it is part of no case
    import transformers.modeling_utils  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    rec["modeling_import_rss"] = _status()["VmRSS"]
    if case.startswith("head_"):
        from fairy2i_compile import quant_ops

        rows = 4096 if case == "head_small_w2" else 262144
        a = torch.randn(rows, 640, generator=torch.Generator().manual_seed(0))
        rec["model_bytes"] = rec["largest_layer_bytes"] = a.numel() * 4
        stages, gran = (4, "row") if case == "head_t4_row" else (2, "tensor")
        run = lambda: quant_ops.pack_layer(a, stages, gran, "lm_head")  # noqa: E731
    elif case == "head_compile_w2":
        # the setting: a 1-block Llama whose lm_head is 262144 x 640, compiled in PTQ mode
        # (W2); the quantization happens at compile time, in the phase_quant and fuse_stages passes
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=262144, hidden_size=640, intermediate_size=1280, num_hidden_layers=1,
                          num_attention_heads=10, num_key_value_heads=2, tie_word_embeddings=False,
                          max_position_embeddings=64)
        model = LlamaForCausalLM(cfg).eval()
        rec["model_bytes"], rec["largest_layer_bytes"] = _model_bytes(model)
        ids = torch.tensor([[1, 2, 3, 4]])

        def run():
            with torch.no_grad():
                return torch.compile(model, backend="fairy2i", options={"mode": "ptq", "stages": 2})(ids)
    elif case.startswith("smollm2_"):
        from fairy2i_compile.checkpoints.models import load_smollm2

        model, _ = load_smollm2(torch.float32, progress=False)
        rec["model_bytes"], rec["largest_layer_bytes"] = _model_bytes(model)
        if case == "smollm2_save_w2_fp16":
            from fairy2i_compile.checkpoints.checkpoint import save_packed

            run = lambda: save_packed(model, tmp / "smollm2-w2.safetensors", {"stages": 2},  # noqa: E731
                                      dense_dtype=torch.float16)
        else:
            from fairy2i_compile.quantization.packed_model import pack_model

            stages, gran = (2, "tensor") if case == "smollm2_pack_w2" else (4, "row")
            run = lambda: pack_model(model, stages, gran)  # noqa: E731
    elif case == "llama1b_quantize_w2":
        from fairy2i_compile import cli

        rec["model_bytes"] = sum(p.stat().st_size for p in LLAMA1B_DIR.glob("*.safetensors"))
        rec["model_bytes_float32"], rec["largest_layer_bytes"] = _llama1b_sizes()
        argv = ["quantize", "--model", str(LLAMA1B_DIR), "--stages", "2", "--out", str(tmp / "llama1b-w2.safetensors"),
                "--no-progress"]
        run = lambda: cli.main(argv)  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case!r}; one of {CASES}")
    rec["loaded_rss"] = _status()["VmRSS"]
    _reset_peak()
    t0 = time.perf_counter()
    result = run()
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss"] = _status()["VmHWM"]
    rec["lifetime_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del result
    return rec


def _llama1b_sizes() -> tuple:
    d, f, v, L = LLAMA1B["hidden_size"], LLAMA1B["intermediate_size"], LLAMA1B["vocab_size"], LLAMA1B["num_hidden_layers"]
    kv = LLAMA1B["num_key_value_heads"] * LLAMA1B["head_dim"]
    params = v * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    return params * 4, v * d * 4


# ------------------------------------------------------------------ driver
def make_llama1b_folder() -> None:
    """Random bfloat16 weights with Llama-3.2-1B's shapes, saved as HF shards (skipped if present)."""
    if (LLAMA1B_DIR / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"writing the random 1B-class Llama folder to {LLAMA1B_DIR} ...", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA1B)
    torch.set_default_dtype(torch.bfloat16)  # storage made in bfloat16 directly (2.5 GB, not 5 GB + 2.5 GB)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gave lm_head storage of its own
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    tmp = LLAMA1B_DIR.with_name(LLAMA1B_DIR.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="1GB")
    os.replace(tmp, LLAMA1B_DIR)


def baseline_tree(rev: str) -> Path:
    """A detached git worktree of `rev` under /tmp (made once)."""
    path = Path(f"/tmp/fairy2i_baseline_{rev}")
    if not (path / "fairy2i_compile").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def run_case(case: str, code: Path) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        env = dict(os.environ, PYTHONPATH=str(code),
                   FAIRY2I_CACHE=os.environ.get("FAIRY2I_CACHE", str(REPO / ".cache" / "fairy2i_compile")))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", case, "--tmp", tmp,
                               "--code", str(code)], env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        raise RuntimeError(f"case {case} ({code}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rec: dict) -> dict:
    over = rec["peak_rss"] - rec["import_rss"]
    rec["conversion_rss_above_imports"] = over
    if "modeling_import_rss" in rec:
        rec["conversion_rss_above_modeling_imports"] = rec["peak_rss"] - rec["modeling_import_rss"]
    rec["bound_model_plus_1p5_layer"] = rec["model_bytes"] + 1.5 * rec["largest_layer_bytes"]
    if rec["case"].startswith("llama1b"):
        rec["peak_over_dense_bf16"] = rec["peak_rss"] / rec["model_bytes"]
        rec["peak_over_dense_fp32"] = rec["peak_rss"] / rec["model_bytes_float32"]
    return rec


def markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Conversion memory (issue 21)",
        "",
        f"Peak RSS of one conversion per fresh process; before = commit {meta['baseline_rev']}, after = the "
        f"commit in the code column (\"tree\": that commit plus the checkout's uncommitted edits). "
        f"torch {meta['torch']}, {meta['machine']}; threads per row (RSS does not depend on them; the seconds "
        f"do, and were measured on a machine shared with other CPU-heavy jobs: read them as rough).",
        "Peak = VmHWM from just before the conversion to its end (the model already loaded); "
        "\"above imports\" subtracts the RSS of the process after importing torch, transformers (lazily: "
        "nothing of its modeling code) and fairy2i_compile; \"above modeling imports\" subtracts the RSS once "
        "transformers' modeling code is imported as well (rows measured before that column existed show -; "
        "it is about 205 MiB more). Bound = model bytes + 1.5 x largest layer (float32), checked against the "
        "latter where measured. MiB throughout.",
        "",
        "| case | code | threads | model | largest layer | import RSS | modeling import RSS | loaded RSS | peak RSS | "
        "peak above imports | peak above modeling imports | bound | within bound | lifetime peak | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda r, k: f"{r[k] / MB:,.0f}" if k in r else "-"  # noqa: E731
    order = {c: i for i, c in enumerate(CASES + SMOKE_CASES)}
    # by case, before first; a stable sort keeps the runs of one case in the order they were made
    rows = sorted(rows, key=lambda r: (order.get(r["case"], len(order)), r["code"] != "before"))
    for r in rows:
        over = r.get("conversion_rss_above_modeling_imports", r["conversion_rss_above_imports"])
        ok = over <= r["bound_model_plus_1p5_layer"]
        lines.append(
            f"| {r['case']} | {_code(r)} | {r.get('threads', '?')} | {mib(r, 'model_bytes')} | "
            f"{mib(r, 'largest_layer_bytes')} | {mib(r, 'import_rss')} | {mib(r, 'modeling_import_rss')} | "
            f"{mib(r, 'loaded_rss')} | {mib(r, 'peak_rss')} | {mib(r, 'conversion_rss_above_imports')} | "
            f"{mib(r, 'conversion_rss_above_modeling_imports')} | {mib(r, 'bound_model_plus_1p5_layer')} | "
            f"{'yes' if ok else 'no'} | {mib(r, 'lifetime_peak_rss')} | {r['seconds']:.1f} |")
    big = [r for r in rows if r["case"].startswith("llama1b")]
    if big:
        lines += ["", "1B-class Llama folder (random bfloat16 weights, Llama-3.2-1B shapes, tied embedding): "
                      "peak RSS as a share of the dense model (target <= 25%):", "",
                  "| code | peak RSS | / folder bytes (bfloat16) | / float32 model |", "|---|---|---|---|"]
        for r in big:
            lines.append(f"| {_code(r)} | {r['peak_rss'] / MB:,.0f} | {100 * r['peak_over_dense_bf16']:.1f}% | "
                         f"{100 * r['peak_over_dense_fp32']:.1f}% |")
    notes = NOTES.read_text().strip() if NOTES.is_file() else ""
    return "\n".join(lines + (["", notes] if notes else [])) + "\n"


def _code(r: dict) -> str:
    return f"{r['code']} {r['rev']}" if r.get("rev") else r["code"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES + SMOKE_CASES)
    p.add_argument("--which", nargs="*", default=["before", "after"], choices=("before", "after"))
    p.add_argument("--baseline-rev", default=BASELINE_REV)
    p.add_argument("--after-rev", help="measure 'after' in a worktree of this commit (default: this checkout as it is)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing results file, except those of the same case, code and commit")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_memory"))
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, args.code)
        print(json.dumps(worker(args.worker, Path(args.tmp))))
        return

    sys.path.insert(0, str(REPO))
    import torch

    from results_io import write_results

    if any(c.startswith("llama1b") for c in args.cases):
        make_llama1b_folder()
    after_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.after_rev or "HEAD"],
                               capture_output=True, text=True, check=True).stdout.strip()
    trees = {"before": baseline_tree(args.baseline_rev), "after": baseline_tree(after_rev) if args.after_rev else REPO}
    if not args.after_rev and subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                             capture_output=True, text=True, check=True).stdout.strip():
        after_rev += " tree"  # uncommitted edits measured too
    meta = {"baseline_rev": args.baseline_rev, "after_rev": after_rev, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    rows = []
    revs = {"before": args.baseline_rev, "after": after_rev}
    if args.merge and Path(args.out + ".json").is_file():  # keep the rows of an earlier run not measured again now
        again = {(c, w, revs[w]) for c in args.cases for w in args.which}
        rows = [r for r in json.loads(Path(args.out + ".json").read_text())["rows"]
                if (r["case"], r["code"], r.get("rev")) not in again]
    for case in args.cases:
        for which in args.which:
            rec = summarize(run_case(case, trees[which]))
            rec["code"] = which
            rows.append(rec)
            rec["rev"] = revs[which]
            print(f"{case:24s} {which:6s} peak {rec['peak_rss'] / MB:8.0f} MiB (above modeling imports "
                  f"{rec['conversion_rss_above_modeling_imports'] / MB:8.0f}, bound "
                  f"{rec['bound_model_plus_1p5_layer'] / MB:8.0f})  {rec['seconds']:.1f} s", flush=True)
            write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))  # after every case


if __name__ == "__main__":
    main()
