"""QAT through the compiled fairy2i graph on 2 CPU processes (gloo): DDP and FSDP2.

For each strategy, one launch of 2 processes trains a tiny Llama for N=3 steps
straight, then a fresh model for steps 1..2 with a checkpoint; a second launch
(new processes, a model built from another seed) resumes it for step 3. The
tests check
  * the straight run == `train.train_qat` on one process with the whole global
    batch (the same recipe: AdamW, warmup + cosine LR, grad clip), and
  * the resumed run == the straight run, bit for bit.

Tolerance of the first check: rtol = atol = 1e-5 (fp32). The two runs differ
only in summation order: each rank's gradient is a mean over half the batch,
then gloo averages the two halves, where one process sums the whole batch at
once (~1e-7 relative per step). AdamW divides by sqrt(v), which can grow such a
difference for parameters whose gradient is near 0, and the quantizer's codes
can only change if a weight sits within ~1e-7 of a decision border; after
3 steps at lr 1e-3 the observed differences are far below 1e-5. The resume
check is exact (atol = rtol = 0): the same processes' arithmetic in the same
order, and DCP stores fp32 tensors bit for bit.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairy2i_compile import Fairy2iBackend
from fairy2i_compile.training.train import TrainConfig, train_qat
from helpers import LLAMA_LINEARS, tiny_llama

WORLD = 2
STEPS, SAVE_AT = 3, 2
CFG = TrainConfig(steps=STEPS, lr=1e-3, warmup_steps=1, batch_size=4, grad_clip=0.5, seed=0)
OPTIONS = {"mode": "qat", "stages": 2}
LAUNCH_TIMEOUT_S = 240


def _windows() -> torch.Tensor:
    return torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_params(state, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def _load_params(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _build(strategy, seed):
    from fairy2i_compile.training.distributed import wrap

    model = tiny_llama(seed=seed)
    # Dynamo cuts the graph once per DDP gradient bucket. Its DDPOptimizer always uses torch's
    # 1 MiB first bucket and refuses smaller caps, and this whole model is ~60 kB: lowering the
    # default (read when DDP and Dynamo start) makes it cut the tiny model into several graphs.
    kwargs = {}
    if strategy == "ddp":
        dist._DEFAULT_FIRST_BUCKET_BYTES = 16 * 1024
        kwargs["bucket_cap_mb"] = 16 / 1024
    backend = Fairy2iBackend(OPTIONS)
    module = wrap(model, strategy, **kwargs)
    return model, torch.compile(module, backend=backend), backend


def _worker(rank, strategy, port, out, phase):
    from fairy2i_compile.training.distributed import full_state_dict, train_qat_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        windows = _windows()
        ckpt = os.path.join(out, "ckpt")
        if phase == "straight_then_save":
            model, compiled, backend = _build(strategy, seed=0)
            history = train_qat_distributed(model, compiled, windows, CFG, strategy=strategy)
            state = full_state_dict(model)
            if rank == 0:
                _save_params(state, os.path.join(out, "straight.safetensors"))
                layers = [(r.name, r.action) for g in backend.reports for r in g.layers]
                with open(os.path.join(out, "straight.json"), "w") as f:
                    json.dump({"graphs": len(backend.reports), "layers": layers, "loss": history["loss"],
                               "grad_norm": history["grad_norm"]}, f)
            model, compiled, _ = _build(strategy, seed=0)
            train_qat_distributed(model, compiled, windows, CFG, checkpoint_dir=ckpt, run_until=SAVE_AT,
                                  strategy=strategy)
        else:
            model, compiled, _ = _build(strategy, seed=123)  # other init: the checkpoint must overwrite it
            history = train_qat_distributed(model, compiled, windows, CFG, checkpoint_dir=ckpt, strategy=strategy)
            assert history["step"] == list(range(1, STEPS + 1)), history["step"]
            state = full_state_dict(model)
            if rank == 0:
                _save_params(state, os.path.join(out, "resumed.safetensors"))
    finally:
        dist.destroy_process_group()


def _launch(strategy, out, phase) -> None:
    ctx = mp.start_processes(_worker, args=(strategy, _free_port(), str(out), phase), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{strategy} {phase}: 2 processes did not finish in {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def runs(request, tmp_path_factory):
    strategy = request.param
    out = tmp_path_factory.mktemp(strategy)
    _launch(strategy, out, "straight_then_save")
    _launch(strategy, out, "resume")
    info = json.loads((out / "straight.json").read_text())
    return {
        "strategy": strategy,
        "out": out,
        "straight": _load_params(out / "straight.safetensors"),
        "resumed": _load_params(out / "resumed.safetensors"),
        **info,
    }


@pytest.fixture(scope="module")
def single_process():
    """`train.train_qat` on one process with the whole global batch: the reference."""
    model = tiny_llama(seed=0)
    compiled = torch.compile(model, backend=Fairy2iBackend(OPTIONS))
    history = train_qat(model, compiled, _windows(), CFG, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, history


def test_distributed_qat_matches_single_process_on_the_whole_batch(runs, single_process):
    want, history = single_process
    got = runs["straight"]
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    print(runs["strategy"], "max |distributed - single|:", max((got[n] - want[n]).abs().max().item() for n in want))
    # the logged loss is the mean over ranks == the single process's loss on the whole batch
    torch.testing.assert_close(torch.tensor(runs["loss"]), torch.tensor(history["loss"]), rtol=1e-5, atol=1e-6)
    # the clipped norm is the global one (FSDP2: over all DTensor shards), not a rank's share
    torch.testing.assert_close(torch.tensor(runs["grad_norm"]), torch.tensor(history["grad_norm"]),
                               rtol=1e-5, atol=1e-6)
    # Every linear is quantized, none kept real. DDP: Dynamo cut the graph at bucket borders,
    # each of the 15 linears sits in one piece. FSDP2: the graph breaks at the FSDP hooks and
    # both decoder layers run one compiled block graph (params are graph inputs), so its 7
    # linears appear once, plus lm_head in the root's graph.
    assert runs["layers"] and all(action == "quantized" for _, action in runs["layers"])
    names = [name for name, _ in runs["layers"]]
    assert "lm_head" in names
    for suffix in LLAMA_LINEARS:
        assert any(n.endswith(suffix) for n in names), (suffix, names)
    if runs["strategy"] == "ddp":
        assert runs["graphs"] > 1 and len(names) == 15
    else:
        assert len(names) == 8
    # clipping was active (the global norm exceeded grad_clip), and training moved the weights:
    # the test would pass vacuously otherwise
    assert max(history["grad_norm"]) > CFG.grad_clip
    assert not torch.equal(want["model.layers.0.mlp.up_proj.weight"], tiny_llama(seed=0).state_dict()
                           ["model.layers.0.mlp.up_proj.weight"])


def test_resume_in_new_processes_loses_no_step(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert set(straight) == set(resumed)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    ckpt = runs["out"] / "ckpt"
    # the resumed run saved its final step; no temp directory is left behind
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step_00000002", "step_00000003"]


def test_one_process_runs_train_qats_steps_bit_for_bit(single_process, tmp_path):
    """World size 1, in this process: the distributed loop is train_qat's loop (same optimizer,
    LambdaLR schedule and guarded step), so the parameters, losses, norms and LRs are the same
    numbers (atol = rtol = 0: the same arithmetic in the same order; the all-reduced loss of one
    rank is its own). Stopping at step 2 and resuming rebuilds the schedule at step 2: same again."""
    from fairy2i_compile.training.distributed import train_qat_distributed

    want, reference = single_process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        runs = {}
        for name, stops in (("straight", [None]), ("resumed", [SAVE_AT, None])):
            torch._dynamo.reset()
            model = tiny_llama(seed=0)
            compiled = torch.compile(model, backend=Fairy2iBackend(OPTIONS))
            for run_until in stops:
                history = train_qat_distributed(model, compiled, _windows(), CFG, run_until=run_until,
                                                checkpoint_dir=tmp_path / "ckpt" if name == "resumed" else None)
            runs[name] = model.state_dict(), history
    finally:
        dist.destroy_process_group()
    for got, history in runs.values():
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
        for key in ("step", "loss", "grad_norm", "lr"):
            assert history[key] == reference[key], key
    assert reference["lr"] == [1e-3, 1e-3, 1e-4]  # the cosine reaches lr * min_lr_ratio: the schedule is exercised


def test_a_non_finite_mean_loss_stops_the_distributed_loop_before_the_update():
    from fairy2i_compile.training.distributed import train_qat_distributed

    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_logits = lambda ids, **kwargs: model(ids, **kwargs).logits * float("nan")  # noqa: E731
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(FloatingPointError, match=r"step 1: the loss is nan; parameters are untouched since step 0"):
            train_qat_distributed(model, nan_logits, _windows(), CFG)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ bad input (no processes needed)
def test_batch_not_divisible_by_world_size_names_values_and_fix():
    from fairy2i_compile.training.distributed import local_batch

    with pytest.raises(ValueError, match=r"global batch 6 is not divisible by world size 4.*multiple of 4 \(e\.g\. 8\)"):
        local_batch(torch.zeros(6, 5, dtype=torch.long), 0, 4)
    assert local_batch(torch.arange(8).view(4, 2), 1, 2).tolist() == [[4, 5], [6, 7]]


def test_wrap_rejects_bad_arguments_and_a_missing_process_group():
    from fairy2i_compile.training.distributed import wrap

    model = tiny_llama()
    with pytest.raises(ValueError, match=r"strategy must be one of \('ddp', 'fsdp2'\), got 'fsdp'"):
        wrap(model, "fsdp")
    with pytest.raises(ValueError, match="bucket_cap_mb is a DDP setting"):
        wrap(model, "fsdp2", bucket_cap_mb=4)
    with pytest.raises(ValueError, match=r"below the 1 MiB first bucket.*bucket_cap_mb >= 1"):
        wrap(model, "ddp", bucket_cap_mb=0.25)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrap(model, "ddp")


def test_corrupt_latest_pointer_is_a_checkpoint_error(tmp_path):
    from fairy2i_compile.training.distributed import latest_checkpoint
    from fairy2i_compile.training.train import CheckpointError

    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a fairy2i distributed checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text("{trunc")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        latest_checkpoint(tmp_path)


# ------------------------------------------------------------------ the torchrun launcher
LAUNCHER = Path(__file__).resolve().parents[1] / "benchmarks" / "qat_distributed.py"


def _launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qat_distributed", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_rejects_a_batch_the_world_size_does_not_divide():
    launcher = _launcher()
    args = launcher.parse_args(["--batch-size", "6"])
    with pytest.raises(ValueError, match=r"--batch-size 6 is not divisible by the world size 4.*--batch-size 8"):
        launcher.check_args(args, 4)
    launcher.check_args(launcher.parse_args(["--batch-size", "8"]), 4)
    with pytest.raises(ValueError, match="--bucket-cap-mb is a DDP setting"):
        launcher.check_args(launcher.parse_args(["--strategy", "fsdp2", "--bucket-cap-mb", "2"]), 2)


def test_launcher_runs_under_torchrun_with_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(LAUNCHER),
           "--strategy", "fsdp2", "--steps", "2", "--seq-len", "16", "--hidden", "32", "--device", "cpu",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--json", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("s/step" in line and "loss" in line for line in steps), proc.stdout
    summary = json.loads((tmp_path / "run.json").read_text())["summary"]
    assert summary["world_size"] == WORLD and summary["steps_this_run"] == 2
    assert (tmp_path / "ckpt" / "step_00000002" / ".metadata").is_file()
