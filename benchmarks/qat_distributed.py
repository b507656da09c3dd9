"""Distributed QAT through the compiled fairy2i graph (DDP or FSDP2), launched by torchrun.

    # 2 CPU processes, gloo, a tiny random Llama (no downloads)
    torchrun --standalone --nproc-per-node 2 benchmarks/qat_distributed.py --strategy fsdp2 --steps 20

    # N GPUs, nccl, SmolLM2-135M on enwiki windows, resumable
    torchrun --standalone --nproc-per-node N benchmarks/qat_distributed.py --model smollm2 \
        --strategy fsdp2 --batch-size 8 --seq-len 512 --steps 1000 --checkpoint-dir runs/w2

Every rank builds the same model and windows; `fairy2i_compile.training.distributed.wrap` applies
DDP or FSDP2, and the wrapped module is compiled with backend="fairy2i" in QAT mode.
--batch-size is the global batch (windows per optimizer step, split evenly over ranks);
the recipe is train.train_qat's (AdamW beta=(0.9, 0.95), wd 0, warmup + cosine LR, grad
clip), so a run on N processes follows the single-process trajectory.

Rank 0 prints one line per step (loss averaged over ranks, grad norm, LR, s/step) and a
summary (mean s/step without the first, compiling, step; tokens/s). With --checkpoint-dir
the run resumes from the latest checkpoint there and saves every --checkpoint-every steps
and at the end (torch.distributed.checkpoint; see fairy2i_compile/training/distributed.py).
--json writes the summary and the per-step history (rank 0, atomically).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fairy2i_compile import Fairy2iBackend  # noqa: E402
from fairy2i_compile.training.distributed import STRATEGIES, latest_checkpoint, train_qat_distributed, wrap  # noqa: E402
from fairy2i_compile.compiler.report import atomic_write_text  # noqa: E402
from fairy2i_compile.training.train import TrainConfig  # noqa: E402


def _granularity(text: str):
    return int(text) if text.isdigit() else text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp2")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a random Llama built from a config; smollm2: SmolLM2-135M (fairy2i_compile.checkpoints.models)")
    p.add_argument("--layers", type=int, default=2, help="tiny model: decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="tiny model: hidden size (even)")
    p.add_argument("--data", choices=("auto", "random", "wiki"), default="auto",
                   help="random token windows, or the enwiki sample (needs make setup-eval); auto: wiki for smollm2")
    p.add_argument("--steps", type=int, default=10, help="LR schedule length in optimizer steps")
    p.add_argument("--run-until", type=int, default=None, help="stop (checkpointed) after this step")
    p.add_argument("--batch-size", type=int, default=4, help="global windows per step; a multiple of the world size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=2.0)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--granularity", type=_granularity, default="tensor")
    p.add_argument("--compiler", choices=("eager", "inductor"), default="eager")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket size (>= 1); Dynamo cuts the graph per bucket")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda (nccl) when GPUs are visible, else cpu (gloo)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary and history here (rank 0)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Mistakes that would otherwise surface later (or differently on each rank)."""
    if args.batch_size < 1 or args.batch_size % world_size != 0:
        up = max(1, -(-args.batch_size // world_size)) * world_size
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by the world size {world_size}: each rank trains on "
            f"batch/world windows; pass --batch-size {up} (a multiple of {world_size}) or run --nproc-per-node "
            f"that divides {args.batch_size}"
        )
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (next-token targets), got {args.seq_len}")
    if args.model == "tiny" and (args.hidden < 8 or args.hidden % 8 != 0):
        raise ValueError(f"--hidden must be a multiple of 8 (4 heads of even size), got {args.hidden}")
    if args.bucket_cap_mb is not None and args.strategy != "ddp":
        raise ValueError(f"--bucket-cap-mb is a DDP setting; drop it or use --strategy ddp")


def tiny_llama(layers: int, hidden: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=max(64, seq_len))
    return LlamaForCausalLM(cfg), None


def load_model(args, rank: int):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.model == "tiny":
        return tiny_llama(args.layers, args.hidden, args.seq_len)
    from fairy2i_compile.checkpoints.models import load_smollm2

    if rank != 0:
        dist.barrier()  # rank 0 converts the GGUF into the cache once; the others load it after
    model, tokenizer = load_smollm2(torch.float32, progress=rank == 0)
    if rank == 0:
        dist.barrier()
    return model, tokenizer


def load_windows(args, tokenizer, vocab_size: int) -> torch.Tensor:
    data = args.data if args.data != "auto" else ("wiki" if args.model == "smollm2" else "random")
    if data == "random":
        g = torch.Generator().manual_seed(args.seed + 1)
        return torch.randint(0, vocab_size, (max(64, 4 * args.batch_size), args.seq_len), generator=g)
    if tokenizer is None:
        raise ValueError("--data wiki needs a tokenizer: use it with --model smollm2")
    from fairy2i_compile import eval as ev

    return ev.token_windows(ev.wiki_tokens(tokenizer), args.seq_len)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("run this under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
                         "benchmarks/qat_distributed.py --strategy fsdp2")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    check_args(args, world)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no GPU is visible; use --device cpu (gloo)")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # each process gets its share of the cores instead of all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    try:
        return _run(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> int:
    model, tokenizer = load_model(args, rank)
    model.to(device)
    windows = load_windows(args, tokenizer, model.config.vocab_size)
    options = {"mode": "qat", "stages": args.stages, "scale_granularity": args.granularity,
               "compiler": args.compiler}
    module = wrap(model, args.strategy, bucket_cap_mb=args.bucket_cap_mb)
    compiled = torch.compile(module, backend=Fairy2iBackend(options))
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, grad_clip=args.grad_clip,
                      batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, seed=args.seed)
    resumed = 0
    if args.checkpoint_dir is not None:
        latest = latest_checkpoint(args.checkpoint_dir)
        resumed = latest["step"] if latest is not None else 0
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.strategy} x{world} on {device.type} ({dist.get_backend()}): {args.model} ({n / 1e6:.2f}M params), "
              f"global batch {args.batch_size} x {args.seq_len} tokens, {len(windows)} windows, "
              f"W{args.stages} {args.granularity}" + (f", resuming after step {resumed}" if resumed else ""),
              flush=True)

    def log(r):
        if rank == 0:
            print(f"step {r['step']:>5}/{cfg.steps}  loss {r['loss']:.4f}  gnorm {r['grad_norm']:.3g}  "
                  f"lr {r['lr']:.3g}  {r['time_s']:.3f} s/step", flush=True)

    t0 = time.perf_counter()
    history = train_qat_distributed(model, compiled, windows, cfg, checkpoint_dir=args.checkpoint_dir,
                                    run_until=args.run_until, strategy=args.strategy, log=log)
    wall = time.perf_counter() - t0
    new = [t for s, t in zip(history["step"], history["time_s"]) if s > resumed]
    steady = new[1:] if len(new) > 1 else new  # the first step of a process compiles
    step_s = sum(steady) / len(steady) if steady else float("nan")
    summary = {
        "strategy": args.strategy, "world_size": world, "device": device.type, "model": args.model,
        "global_batch": args.batch_size, "seq_len": args.seq_len, "stages": args.stages,
        "granularity": args.granularity, "compiler": args.compiler, "steps_this_run": len(new),
        "resumed_from": resumed, "first_step_s": new[0] if new else None, "mean_step_s": step_s,
        "tokens_per_s": args.batch_size * args.seq_len / step_s if steady else None, "wall_s": wall,
        "final_loss": history["loss"][-1] if history["loss"] else None, "torch": torch.__version__,
        "threads_per_rank": torch.get_num_threads(),
    }
    if rank == 0:
        print(f"{len(new)} steps in {wall:.1f} s: first {summary['first_step_s'] or 0:.2f} s (compile), then "
              f"{step_s:.3f} s/step, {summary['tokens_per_s'] or 0:.0f} tokens/s; final loss "
              f"{summary['final_loss']}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps({"summary": summary, "history": history}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
