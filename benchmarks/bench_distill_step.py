"""Step time of distillation (training a packed model through the straight-through quantizer)
against a plain training step of the float model, on CPU, in one run.

    .venv/bin/python benchmarks/bench_distill_step.py            # SmolLM2-135M, calibrated W2 from the demo cache
    .venv/bin/python benchmarks/bench_distill_step.py --steps 3 --seq 256

Every configuration trains the same model on the same batches (``--batch`` windows of
``--seq`` tokens from the end of the enwiki sample) with ``train_qat``'s loop and the
same loss (KL to the float model's logits):

    plain-fp32      the float model itself trains (no quantizer): the baseline
    plain-bf16      the same under bf16 autocast
    distill-fp32-eager     the packed W2 model, straight-through quantizer run op by op (before)
    distill-fp32-fused     the same with the quantizer compiled into fused loops (fused.fused_impl)
    distill-bf16-fused     fused quantizer and bf16 autocast (what ``distill(autocast="bfloat16")`` runs)
    qat-fp32-eager  QAT through the compiled graph (``mode="qat"``, W2, per-tensor scales recomputed from
                    the float weights every step; ``fairy2i::phase_quant``'s body run op by op,
                    FAIRY2I_STE_COMPILE=0)
    qat-fp32-fused  the same body compiled (``quant.quantize_widely(fused=True)``)
    qat-bf16-fused  and bf16 autocast

Each row is the median over ``--steps`` timed steps after one untimed warm-up step (which
compiles). Writes benchmarks/results/bench_distill_step.{json,md}. Timings assume nothing
else runs on the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from fairy2i_compile import eval as ev  # noqa: E402
from fairy2i_compile import load_packed  # noqa: E402
from fairy2i_compile.calibration import calibration_windows, distill  # noqa: E402
from fairy2i_compile.checkpoints.models import load_smollm2  # noqa: E402
from fairy2i_compile.compiler.report import atomic_write_text  # noqa: E402
from fairy2i_compile.quantization.fused import fused_impl  # noqa: E402
from fairy2i_compile.training.train import TrainConfig, train_qat  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_distill_step"
CONFIGS = ("plain-fp32", "plain-bf16", "distill-fp32-eager", "distill-fp32-fused", "distill-bf16-fused",
           "qat-fp32-eager", "qat-fp32-fused", "qat-bf16-fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packed", default=None, help="packed checkpoint to distil (default: the demo's cached "
                                                  "calibrated W2, made if missing)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--batch", type=int, default=2, help="windows per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per window")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def demo_w2(model, tok):
    """The demo's calibrated W2 (cached by what produced it; calibrates once if missing), calibrated
    on calibrated.py's text: 16 x 512 tokens after the 8 x 2048 evaluation windows."""
    from fairy2i_compile.demo import calibrated_model  # the demo's own cache and settings
    from peers import eval_windows

    cal = calibration_windows(ev.wiki_tokens(tok), 16, 512, avoid=int(eval_windows(tok, 2048, 8).numel()))
    return calibrated_model(model, tok, {"method": "phase", "stages": 2}, cal, progress=False)[0]


def trainable_copy(model):
    """A copy of the float model with every parameter trainable (the plain and QAT students)."""
    student = copy.deepcopy(model).train()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def time_plain(model, windows, steps, batch, autocast):
    student = trainable_copy(model)
    cfg = TrainConfig(steps=steps + 1, lr=1e-5, batch_size=batch, distill_alpha=1.0, autocast=autocast)
    h = train_qat(student, student, windows, cfg, teacher=model, progress=False)
    return h["time_s"][1:], "no quantizer"


def time_qat(model, windows, steps, batch, autocast, fused):
    from fairy2i_compile import Fairy2iBackend

    os.environ["FAIRY2I_STE_COMPILE"] = "1" if fused else "0"
    torch._dynamo.reset()
    student = trainable_copy(model)
    compiled = torch.compile(student, backend=Fairy2iBackend({"mode": "qat", "stages": 2}))
    cfg = TrainConfig(steps=steps + 1, lr=1e-5, batch_size=batch, distill_alpha=1.0, autocast=autocast)
    h = train_qat(student, compiled, windows, cfg, teacher=model, progress=False)
    return h["time_s"][1:], fused_impl()


def time_distill(packed, model, windows, steps, batch, autocast, fused):
    os.environ["FAIRY2I_STE_COMPILE"] = "1" if fused else "0"
    d = distill(packed, model, windows, holdout=windows[:1, :64], steps=steps + 1, batch_size=batch,
                autocast=autocast, progress=False)
    return d.history["time_s"][1:], fused_impl()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2(torch.float32, progress=False)
    model.eval()
    tokens = ev.wiki_tokens(tok)
    windows = calibration_windows(tokens, max(8, args.batch * (args.steps + 1)), args.seq, avoid=8 * 2048)
    packed = load_packed(args.packed) if args.packed else demo_w2(model, tok)
    rows = []
    for name in args.configs:
        t0 = time.perf_counter()
        kind, dtype, *impl = name.split("-")
        autocast = None if dtype == "fp32" else "bfloat16"
        if kind == "plain":
            times, how = time_plain(model, windows, args.steps, args.batch, autocast)
        elif kind == "qat":
            times, how = time_qat(model, windows, args.steps, args.batch, autocast, impl[0] == "fused")
        else:
            times, how = time_distill(packed, model, windows, args.steps, args.batch, autocast, impl[0] == "fused")
        rows.append({"config": name, "step_s": statistics.median(times), "steps_s": times, "quantizer": how,
                     "wall_s": time.perf_counter() - t0})
        print(f"{name}: median step {rows[-1]['step_s']:.2f} s ({how})", flush=True)
    base = next((r["step_s"] for r in rows if r["config"] == "plain-fp32"), None)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "tokens_per_step": args.batch * args.seq,
            "timed_steps": args.steps, "model": "SmolLM2-135M", "packed": args.packed or "demo calibrated W2"}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Distillation step vs a plain training step, SmolLM2-135M ({meta['threads']} threads, "
             f"torch {meta['torch']})", "",
             f"{meta['tokens_per_step']} tokens per step (KL to the float model's logits), median of "
             f"{args.steps} steps after one warm-up; one run.", "",
             "| configuration | step s | × plain fp32 | quantizer |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['step_s'] / base:.2f}" if base else "–"
        lines.append(f"| {r['config']} | {r['step_s']:.2f} | {ratio} | {r['quantizer']} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
