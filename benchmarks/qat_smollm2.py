"""QAT of SmolLM2-135M through the compiled fairy2i graph, on enwiki text, on CPU.

    .venv/bin/python benchmarks/qat_smollm2.py --tag w2-distill --steps 400 --time-budget-min 30

The student is `torch.compile(model, backend="fairy2i", options={"mode": "qat", ...})`;
its real master weights train with the paper's optimizer recipe (AdamW
beta=(0.9, 0.95), wd 0, grad clip 2.0; warmup + cosine LR). Optional logit
distillation from the FP model (the same checkpoint, eager) as teacher.

Data: the enwiki sample's token stream cut into non-overlapping windows; the
last `--eval-windows` windows are held out for perplexity and never trained on.
Perplexity is measured before (FP teacher, and the quantized student = PTQ) and
after training, on the same held-out windows, through the compiled graph.

Runs checkpoint atomically (safetensors) to `--checkpoint` and resume from it
when it exists: an interrupted run (Ctrl-C, a time budget, a crash) continues
where its last checkpoint left it, on exactly the data it would have seen.
Each run becomes one row (keyed by `--tag`) of benchmarks/results/qat_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fairy2i_compile import Fairy2iBackend  # noqa: E402
from fairy2i_compile import eval as ev  # noqa: E402
from fairy2i_compile.checkpoints.models import default_cache_dir, load_smollm2  # noqa: E402
from fairy2i_compile.compiler.report import atomic_write_text  # noqa: E402
from fairy2i_compile.training.train import TrainConfig, read_checkpoint_info, train_qat  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "qat_smollm2"


def split_windows(tokens: torch.Tensor, seq_len: int, eval_windows: int):
    """(train [W, L], held-out eval [E, L]): eval = the last E windows of the stream."""
    windows = ev.token_windows(tokens, seq_len)
    if len(windows) <= eval_windows:
        raise ValueError(f"only {len(windows)} windows of {seq_len} tokens; --eval-windows {eval_windows} leaves none to train on")
    return windows[:-eval_windows], windows[-eval_windows:]


def _granularity(text: str):
    return int(text) if text.isdigit() else text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="name of this run's row in the results table")
    p.add_argument("--steps", type=int, default=400, help="LR schedule length in optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop (checkpointed) after this many minutes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--distill-alpha", type=float, default=0.0, help="weight of KL to the FP teacher (0 = plain CE)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--granularity", type=_granularity, default="tensor")
    p.add_argument("--keep-lm-head-real", action="store_true", help="ablation: skip lm_head (the paper converts it)")
    p.add_argument("--generated", type=int, default=0, metavar="N",
                   help="add N training windows the FP model writes itself (training.generated.generate_windows: "
                        "LLM-QAT's recipe, first tokens drawn from the training split; cached); held-out windows "
                        "stay real text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="default: <cache>/runs/qat_<tag>.safetensors")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.generated < 0:
        p.error(f"--generated must be >= 0 (windows the FP model writes; 0 = none), got {args.generated}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_cache_dir() / "runs" / f"qat_{args.tag}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    model, tokenizer = load_smollm2(torch.float32, progress=progress)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    train_windows, eval_windows = split_windows(ev.wiki_tokens(tokenizer), args.seq_len, args.eval_windows)
    real_windows = len(train_windows)
    if args.generated:
        from fairy2i_compile.training.generated import generate_windows, mix_windows

        made = generate_windows(teacher, args.generated, args.seq_len, first_tokens=train_windows.flatten(),
                                batch_size=16, progress=progress)
        train_windows = mix_windows(train_windows, made)

    options = {"mode": "qat", "stages": args.stages, "scale_granularity": args.granularity}
    if args.keep_lm_head_real:
        options["skip"] = ["lm_head"]
    compiled = torch.compile(model, backend=Fairy2iBackend(options))

    def held_out_ppl(step: int) -> dict:
        r = ev.perplexity(compiled, eval_windows, progress=False)
        print(f"  step {step}: held-out ppl {r['ppl']:.4g}", flush=True)
        return {"ppl": r["ppl"], "nll": r["nll"]}

    fp_ppl = ev.perplexity(teacher, eval_windows, progress=False)["ppl"]
    print(f"FP held-out ppl {fp_ppl:.3f} ({len(eval_windows)} x {args.seq_len} tokens); "
          f"{len(train_windows)} training windows", flush=True)

    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, batch_size=args.batch_size,
                      distill_alpha=args.distill_alpha, distill_temperature=args.temperature,
                      checkpoint_every=10, log_every=5, seed=args.seed)
    resumed_from = read_checkpoint_info(ckpt)["step"] if ckpt.exists() else 0
    t0 = time.perf_counter()
    history = train_qat(model, compiled, train_windows, cfg,
                        teacher=teacher if args.distill_alpha > 0 else None,
                        checkpoint_path=ckpt, eval_fn=held_out_ppl, eval_every=args.eval_every,
                        progress=progress,
                        time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min)
    wall = time.perf_counter() - t0
    steps_done = history["step"][-1] if history["step"] else 0
    final = held_out_ppl(steps_done)["ppl"] if (not history["eval"] or history["eval"][-1]["step"] != steps_done) else history["eval"][-1]["ppl"]
    ptq = next((e["ppl"] for e in history["eval"] if e["step"] == 0), None)

    row = {
        "tag": args.tag,
        "command": "python benchmarks/qat_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "options": options,
        "train": {"lr": args.lr, "warmup": args.warmup, "schedule_steps": args.steps, "steps_done": steps_done,
                  "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "real_windows": real_windows, "generated_windows": args.generated,
                  "tokens_seen": steps_done * args.batch_size * args.seq_len,
                  "distill_alpha": args.distill_alpha, "temperature": args.temperature,
                  "train_seconds_this_call": wall, "resumed_from_step": resumed_from,
                  "train_seconds_total": sum(history["time_s"]),
                  "mean_step_s": sum(history["time_s"]) / max(1, len(history["time_s"]))},
        "eval": {"windows": len(eval_windows), "seq_len": args.seq_len, "fp_ppl": fp_ppl, "ptq_ppl": ptq,
                 "qat_ppl": final, "ratio_to_fp": final / fp_ppl, "curve": history["eval"]},
        "loss_first_last": [history["loss"][0], history["loss"][-1]] if history["loss"] else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    write_results(row)
    print(f"{args.tag}: FP {fp_ppl:.2f} | PTQ {ptq if ptq is None else f'{ptq:.3g}'} | after {steps_done} steps "
          f"({row['train']['tokens_seen']} tokens) {final:.2f} = {final / fp_ppl:.2f}x FP", flush=True)
    return 0


def write_results(row: dict) -> None:
    path = RESULTS.with_suffix(".json")
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[row["tag"]] = row
    atomic_write_text(str(path), json.dumps({"runs": runs}, indent=1) + "\n")
    head = ["run", "options", "lr", "distill", "steps", "tokens", "s/step", "FP ppl", "PTQ ppl", "QAT ppl", "QAT / FP"]
    lines = ["# QAT of SmolLM2-135M through the fairy2i backend (CPU)", "",
             "Held-out enwiki windows, same for every row. Commands in the JSON beside this file.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in runs.values():
        t, e = r["train"], r["eval"]
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "mode")
        ptq = "-" if e["ptq_ppl"] is None else f"{e['ptq_ppl']:.3g}"
        lines.append("| " + " | ".join([r["tag"], opts, f"{t['lr']:g}", f"{t['distill_alpha']:g}", str(t["steps_done"]),
                                        str(t["tokens_seen"]), f"{t['mean_step_s']:.1f}", f"{e['fp_ppl']:.2f}", ptq,
                                        f"{e['qat_ppl']:.4g}", f"{e['ratio_to_fp']:.3g}x"]) + " |")
        if r.get("note"):
            notes.append(f"- {r['tag']}: {r['note']}")
    lines += ["", *notes] if notes else []
    atomic_write_text(str(RESULTS.with_suffix(".md")), "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
