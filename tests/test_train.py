"""QAT training loop: loss falls, resume == straight run bit for bit, atomic and validated
checkpoints, distillation, config validation. A tiny Llama (vocab 96, hidden 32, 2 layers,
tied embeddings) compiled with the fairy2i backend in qat mode, on random token windows."""

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fairy2i_compile import Fairy2iBackend
from fairy2i_compile.training import train as train_mod
from fairy2i_compile.training.train import (
    CheckpointError, TrainConfig, batch_indices, load_checkpoint, lm_loss, read_checkpoint_info,
    save_checkpoint, train_qat,
)
from conftest import rel_err
from helpers import tiny_llama

WINDOWS = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(1))  # [W, L]
QAT = {"mode": "qat", "stages": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: a second OpenMP thread buys nothing, and on a shared 2-core machine
    # its spin-waits made each step 10-40x slower whenever another process was busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qat_model(seed=0):
    model = tiny_llama(seed)
    return model, torch.compile(model, backend=Fairy2iBackend(QAT))


def optimizer_and_scheduler(model, cfg):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)


class InterruptAt:
    """A compiled-model stand-in that raises KeyboardInterrupt on its n-th call (Ctrl-C mid-step)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def without_time(history):
    return {k: v for k, v in history.items() if k != "time_s"}


# ------------------------------------------------------------------ (a) training
def test_loss_falls_and_history_is_complete(tmp_path):
    model, compiled = qat_model()
    cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=3, batch_size=4, log_every=5)
    evals = []

    def eval_fn(step):
        evals.append((step, model.training, torch.is_grad_enabled()))
        return {"ppl": 1.0 + step}

    was_training = model.training
    history = train_qat(model, compiled, WINDOWS, cfg, eval_fn=eval_fn, eval_every=10, progress=False)
    first, last = sum(history["loss"][:5]) / 5, sum(history["loss"][-5:]) / 5
    assert last < 0.75 * first, history["loss"][::5]
    assert history["step"] == list(range(1, 31))
    assert all(len(history[k]) == 30 for k in ("loss", "ce", "kl", "grad_norm", "lr", "time_s"))
    assert history["ce"] == history["loss"] and history["kl"] == [None] * 30
    assert history["lr"] == pytest.approx([1e-2 * cfg.lr_factor(k) for k in range(30)], rel=1e-12)
    assert history["lr"][2] == pytest.approx(1e-2) and history["lr"][-1] == pytest.approx(1e-3)
    assert [e["step"] for e in history["eval"]] == [0, 10, 20, 30]
    assert evals == [(s, False, False) for s in (0, 10, 20, 30)]  # eval mode, no grad
    assert model.training is was_training  # restored
    json.dumps(history)
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_batches_are_a_function_of_seed_and_step():
    epoch = torch.cat([batch_indices(8, 4, 0, s) for s in (1, 2)])
    assert sorted(epoch.tolist()) == list(range(8))  # one epoch = a permutation
    assert torch.equal(batch_indices(8, 4, 0, 3), batch_indices(8, 4, 0, 3))
    assert not torch.equal(torch.cat([batch_indices(8, 4, 1, s) for s in (1, 2)]), epoch)
    # a batch spanning an epoch boundary reads the stream across it
    assert torch.equal(batch_indices(8, 3, 0, 3), torch.cat([batch_indices(8, 1, 0, s) for s in (7, 8, 9)]))


# ------------------------------------------------------------------ (b) resume
@pytest.mark.parametrize("stop", ["ctrl_c", "run_until"])
def test_resume_is_bit_identical_to_a_straight_run(tmp_path, stop):
    cfg = TrainConfig(steps=8, lr=1e-2, warmup_steps=2, batch_size=3, checkpoint_every=3)
    straight_model, straight = qat_model()
    h_straight = train_qat(straight_model, straight, WINDOWS, cfg, checkpoint_path=tmp_path / "a.st", progress=False)

    path = tmp_path / "b.st"
    model, compiled = qat_model()
    if stop == "ctrl_c":  # the 5th forward is step 5: steps 1..4 are complete
        with pytest.raises(KeyboardInterrupt):
            train_qat(model, InterruptAt(compiled, 5), WINDOWS, cfg, checkpoint_path=path, progress=False)
    else:
        train_qat(model, compiled, WINDOWS, cfg, checkpoint_path=path, progress=False, run_until=4)
    assert read_checkpoint_info(path)["step"] == 4

    # a fresh process in all but name: other initial weights, new optimizer, new compile
    torch._dynamo.reset()
    model, compiled = qat_model(seed=7)
    h_resumed = train_qat(model, compiled, WINDOWS, cfg, checkpoint_path=path, progress=False)

    assert h_resumed["step"] == list(range(1, 9))
    assert without_time(h_resumed) == without_time(h_straight)  # losses, grad norms, lrs: exact
    for (name, p), q in zip(straight_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=name)
    # CPU kernels are deterministic: every tensor of the final checkpoints matches exactly,
    # AdamW's exp_avg / exp_avg_sq / step included
    a, b = load_file(tmp_path / "a.st"), load_file(path)
    assert a.keys() == b.keys() and any(k.startswith("optim/state/") for k in a)
    for key in a:
        if not key.startswith("rng/"):
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    info_a, info_b = read_checkpoint_info(tmp_path / "a.st"), read_checkpoint_info(path)
    assert info_a["step"] == info_b["step"] == 8


def test_resume_refuses_another_config_or_other_windows(tmp_path):
    path = tmp_path / "c.st"
    cfg = TrainConfig(steps=4, lr=1e-2)
    model, compiled = qat_model()
    train_qat(model, compiled, WINDOWS, cfg, checkpoint_path=path, progress=False, run_until=1)
    with pytest.raises(ValueError, match=r"another TrainConfig \(lr: checkpoint 0\.01, now 0\.02\)"):
        train_qat(model, compiled, WINDOWS, TrainConfig(steps=4, lr=2e-2), checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match="trained on other windows"):
        train_qat(model, compiled, WINDOWS.flip(0), cfg, checkpoint_path=path, progress=False)
    # log/checkpoint periods do not change the trajectory: allowed
    h = train_qat(model, compiled, WINDOWS, TrainConfig(steps=4, lr=1e-2, log_every=1), checkpoint_path=path,
                  progress=False, time_budget_s=1e-9)
    assert h["step"] == [1, 2] and read_checkpoint_info(path)["step"] == 2  # budget: one more step


@pytest.fixture
def default_sigint():
    """Ctrl-C as an interactive run has it: a shell starts background jobs with SIGINT ignored
    (`pytest ... &` in a script), and an ignored signal is rightly never delivered."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_sigint_during_a_step_is_delivered_after_it(default_sigint):
    # signal.raise_signal runs the Python handler before it returns. os.kill(os.getpid(), ...)
    # did not: the kernel may hand a process-directed signal to any thread (torch has several),
    # and under load the handler ran only after pytest.raises had ended ("DID NOT RAISE").
    done = []
    with pytest.raises(KeyboardInterrupt):
        with train_mod._sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX threads")
def test_sigint_sent_from_another_thread_is_deferred_too(default_sigint):
    # Ctrl-C while a step runs: the signal comes from outside the main thread. Waiting for the
    # sender with join() makes the delivery explicit: the main thread's blocked wait is where
    # the handler runs, before join() returns.
    import threading

    done = []
    with pytest.raises(KeyboardInterrupt):
        with train_mod._sigint_deferred():
            sender = threading.Thread(target=signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
            sender.start()
            sender.join()
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ (c) atomic save
@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ck.safetensors"
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2)
    model, compiled = qat_model()
    train_qat(model, compiled, WINDOWS, cfg, checkpoint_path=path, progress=False, run_until=2)
    return path, model, cfg


@pytest.fixture
def saved(saved_once, tmp_path):
    """A checkpoint at step 2 of 4 (a private copy), and a copy of the model that wrote it."""
    path, model, cfg = saved_once
    copy_path = tmp_path / path.name
    copy_path.write_bytes(path.read_bytes())
    return copy_path, copy.deepcopy(model), cfg


def _break_replace(monkeypatch):
    def fail(*args):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", fail)


def _break_writer(monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)


@pytest.mark.parametrize("breaker", [_break_replace, _break_writer], ids=["rename", "writer"])
def test_interrupted_save_keeps_the_previous_checkpoint(saved, monkeypatch, breaker):
    path, model, cfg = saved
    before = path.read_bytes()
    opt, sched = optimizer_and_scheduler(model, cfg)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    breaker(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, model, opt, sched, 3, {"step": [1, 2, 3]})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    fresh = tiny_llama(seed=3)
    opt, sched = optimizer_and_scheduler(fresh, cfg)
    step, history = load_checkpoint(path, fresh, opt, sched)
    assert step == 2 and history["step"] == [1, 2] and sched.last_epoch == 2
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert not torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_tied_weights_are_stored_once_and_stay_tied(saved):
    path, model, _ = saved
    tensors = load_file(path)
    assert "model/model.embed_tokens.weight" in tensors and "model/lm_head.weight" not in tensors
    meta = read_checkpoint_info(path)
    assert meta["format_version"] == train_mod.FORMAT_VERSION and meta["train_config"]["steps"] == 4
    fresh = tiny_llama(seed=3)
    load_checkpoint(path, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(fresh.lm_head.weight, tensors["model/model.embed_tokens.weight"], atol=0, rtol=0)


# ------------------------------------------------------------------ (d) bad files
def _rewrite(src, dst, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(src), str(dst), metadata={**meta, **meta_changes})


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} was modified by a failed load"


@pytest.mark.parametrize("keep", [0.5, 0.999, 100], ids=["half", "last_byte", "in_header"])
def test_truncated_file_is_named(saved, keep):
    path, _, _ = saved
    data = path.read_bytes()
    bad = path.with_name("bad.safetensors")
    bad.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    model = tiny_llama(seed=3)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable safetensors file \(truncated"):
        load_checkpoint(bad, model)
    _assert_untouched(model, snap)


def test_wrong_format_version_is_named(saved, tmp_path):
    path, _, _ = saved
    _rewrite(path, tmp_path / "v99.st", format_version="99")
    with pytest.raises(CheckpointError, match=r"v99\.st: training checkpoint format_version is '99'.*reads version '1'"):
        load_checkpoint(tmp_path / "v99.st", tiny_llama())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.st"))
    with pytest.raises(CheckpointError, match="not a fairy2i training checkpoint"):
        load_checkpoint(tmp_path / "plain.st", tiny_llama())
    with pytest.raises(FileNotFoundError, match="no training checkpoint at"):
        load_checkpoint(tmp_path / "missing.st", tiny_llama())


def test_shape_mismatch_is_named_and_nothing_is_loaded(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    path, _, cfg = saved
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64))
    snap = _snapshot(other)
    with pytest.raises(CheckpointError, match=r"'model/model\.layers\.0\.mlp\.down_proj\.weight' is F32\[32, 64\] "
                                              r"in the file but F32\[32, 48\] in the model"):
        load_checkpoint(path, other)
    _assert_untouched(other, snap)

    with pytest.raises(CheckpointError, match=r"in the file but not the model \['model\.layers\.1\..* and 4 more"):
        load_checkpoint(path, tiny_llama(layers=1))


def test_optimizer_or_tie_mismatch_loads_nothing(saved):
    path, _, cfg = saved
    model = tiny_llama(seed=3)
    snap = _snapshot(model)
    opt = torch.optim.AdamW(list(model.parameters())[:-1], lr=cfg.lr)  # one parameter fewer
    with pytest.raises(CheckpointError, match=r"param group 0 has 20 parameters in the file, 19 now"):
        load_checkpoint(path, model, opt)
    _assert_untouched(model, snap)  # the model comes before the optimizer, and still nothing was copied
    assert opt.state_dict()["state"] == {}

    untied = tiny_llama(seed=3)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(CheckpointError, match=r"tied weights differ.*'lm_head\.weight': 'model\.embed_tokens"):
        load_checkpoint(path, untied)


# ------------------------------------------------------------------ (e) distillation
def test_distillation_from_itself_has_zero_kl():
    model, compiled = qat_model()
    # teacher == student: the same weights through the same quantized graph
    teacher = torch.compile(copy.deepcopy(model).eval(), backend=Fairy2iBackend(QAT))
    cfg = TrainConfig(steps=2, lr=1e-2, batch_size=2, distill_alpha=1.0, distill_temperature=2.0)
    history = train_qat(model, compiled, WINDOWS, cfg, teacher=teacher, progress=False)
    assert history["kl"][0] < 1e-6 and history["loss"][0] < 4e-6  # loss = T^2 KL
    assert history["grad_norm"][0] < 1e-3
    assert history["ce"][0] > 4.0  # CE is still measured: ~ln(96) at init


def test_distillation_from_a_float_teacher_mixes_ce_and_kl():
    model, compiled = qat_model()
    teacher = copy.deepcopy(model).eval()  # float weights: the quantized student differs
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=2, distill_alpha=0.25, distill_temperature=2.0)
    h = train_qat(model, compiled, WINDOWS, cfg, teacher=teacher, progress=False)
    assert all(math.isfinite(v) and v > 0 for v in h["kl"])
    for loss, ce, kl in zip(h["loss"], h["ce"], h["kl"]):
        assert loss == pytest.approx(0.75 * ce + 0.25 * 4.0 * kl, rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())


def test_lm_loss_formula():
    torch.manual_seed(0)
    s, t, ids = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    loss, ce, kl = lm_loss(s, ids, t, alpha=0.5, temperature=2.0)
    p, log_q = torch.softmax(t[:, :-1] / 2, -1), torch.log_softmax(s[:, :-1] / 2, -1)
    want_kl = (p * (p.log() - log_q)).sum(-1).mean()
    want_ce = -torch.log_softmax(s[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(kl, want_kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce, want_ce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * 4 * kl)
    assert lm_loss(s, ids, s.clone(), alpha=1.0)[2].item() == 0.0


def _lm_loss_reference(s, ids, t, alpha, temperature):
    """The unchunked formula of the module docstring, through autograd."""
    z = s[:, :-1].float().flatten(0, 1)
    ce = torch.nn.functional.cross_entropy(z, ids[:, 1:].flatten())
    if t is None:
        return ce, ce, None
    zt = t[:, :-1].float().flatten(0, 1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1),
                                    log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl, ce, kl


@pytest.mark.parametrize("alpha, temperature, teacher, dtype, chunk", [
    (0.0, 1.0, False, torch.float32, 1 << 22), (0.0, 1.0, True, torch.float32, 16), (1.0, 1.0, True, torch.float32, 16),
    (0.3, 2.0, True, torch.float32, 21), (1.0, 0.5, True, torch.float32, 7), (0.5, 1.0, True, torch.bfloat16, 16),
])
def test_lm_loss_chunks_equal_the_unchunked_formula_and_its_gradient(monkeypatch, alpha, temperature, teacher, dtype,
                                                                     chunk):
    """Values and gradient against autograd through the plain formula, chunk boundaries inside the batch."""
    import fairy2i_compile.training.train as train_mod
    monkeypatch.setattr(train_mod, "LOSS_CHUNK_LOGITS", chunk)  # 16 logits of a 7-word vocabulary: 2 rows a chunk
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 6, 7, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 6, 7, generator=g) * 3).to(dtype) if teacher else None
    ids = torch.randint(0, 7, (3, 6), generator=g)
    mine_s = s.clone().requires_grad_(True)
    loss, ce, kl = lm_loss(mine_s, ids, t, alpha, temperature)
    loss.backward()
    ref_s = s.clone().requires_grad_(True)
    r_loss, r_ce, r_kl = _lm_loss_reference(ref_s, ids, t, alpha, temperature)
    r_loss.backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, r_loss.float(), **tol)
    torch.testing.assert_close(ce, r_ce.detach(), **tol)
    assert (kl is None) == (not teacher)
    if teacher:
        torch.testing.assert_close(kl, r_kl.detach(), **tol)
    assert mine_s.grad.dtype == dtype
    # bf16 gradients: both sides round the same float32 values to bf16 (8 significand bits)
    gtol = tol if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(mine_s.grad.float(), ref_s.grad.float(), **gtol)


def test_lm_loss_with_a_kl_weight_and_no_teacher_is_named():
    with pytest.raises(ValueError, match="alpha=0.5 weights a KL term that needs teacher_logits"):
        lm_loss(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), None, 0.5)


# ------------------------------------------------------------------ (f) validation
@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 2.0), ("steps", True), ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")),
    ("lr", float("inf")), ("warmup_steps", -1), ("warmup_steps", 11), ("min_lr_ratio", 1.5),
    ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("betas", "0.9"), ("weight_decay", -0.1), ("grad_clip", 0.0),
    ("batch_size", 0), ("distill_alpha", 1.5), ("distill_temperature", 0.0), ("checkpoint_every", 0),
    ("log_every", 0), ("seed", -1), ("autocast", "bf16"), ("autocast", torch.bfloat16),
])
def test_train_config_validation_names_the_field(field, value):
    kwargs = {"steps": 10, field: value}
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}[ =]"):
        TrainConfig(**kwargs)


def test_train_config_round_trip_and_schedule():
    cfg = TrainConfig(steps=10, betas=[0.8, 0.9], warmup_steps=2, grad_clip=math.inf)
    assert cfg.betas == (0.8, 0.9) and TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert [cfg.lr_factor(k) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cfg.lr_factor(9) == pytest.approx(0.1) and cfg.lr_factor(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['step'\]"):
        TrainConfig.from_dict({"step": 3})


def test_lr_schedule_resumed_at_a_step_continues_the_schedule():
    """The schedule a resumed loop rebuilds at step k runs the update k+1 at lr * lr_factor(k), as
    the one stepped k times does (the distributed loop keeps no scheduler state)."""
    cfg = TrainConfig(steps=6, lr=1e-2, warmup_steps=2)
    param = torch.nn.Parameter(torch.zeros(1))
    stepped = train_mod.lr_schedule(train_mod.qat_optimizer([param], cfg), cfg)
    for k in range(cfg.steps):
        opt = train_mod.qat_optimizer([param], cfg)
        rebuilt = train_mod.lr_schedule(opt, cfg, completed=k)
        assert opt.param_groups[0]["lr"] == stepped.optimizer.param_groups[0]["lr"] == cfg.lr * cfg.lr_factor(k)
        assert rebuilt.last_epoch == stepped.last_epoch == k
        stepped.optimizer.step()
        stepped.step()
    with pytest.raises(ValueError, match=r"completed must be the number of updates done, an int >= 0, got -1"):
        train_mod.lr_schedule(train_mod.qat_optimizer([param], cfg), cfg, completed=-1)


def test_qat_optimizer_is_fused_adamw_and_matches_the_default_update():
    """Plain tensors get the fused AdamW kernel; ten of its steps match torch's default (per-parameter
    loop) AdamW within 1e-6 relative; a tensor subclass keeps the default implementation."""
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=1, betas=(0.9, 0.95), weight_decay=0.1)
    torch.manual_seed(0)
    start = [torch.randn(33, 17), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(10)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt = train_mod.qat_optimizer(ours, cfg)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(ref, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    for g in grads:
        for p, q, gi in zip(ours, ref, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert not torch.equal(p, torch.zeros_like(p)) and rel_err(p.detach(), q.detach()) <= 1e-6

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(3).as_subclass(Sub).requires_grad_()
    assert not train_mod.qat_optimizer([sub], cfg).defaults.get("fused")


def test_train_qat_argument_errors():
    model, compiled = qat_model()
    with pytest.raises(ValueError, match="distill_alpha=0.5 needs a teacher"):
        train_qat(model, compiled, WINDOWS, TrainConfig(steps=1, distill_alpha=0.5), progress=False)
    with pytest.raises(ValueError, match=r"integer tensor \[W, L\]"):
        train_qat(model, compiled, WINDOWS.float(), TrainConfig(steps=1), progress=False)
    bad = WINDOWS.clone()
    bad[3, 4] = 96
    with pytest.raises(ValueError, match=r"token ids in \[\d+, 96\], outside the model's vocab \[0, 96\)"):
        train_qat(model, compiled, bad, TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="eval_every is set but eval_fn is None"):
        train_qat(model, compiled, WINDOWS, TrainConfig(steps=1), eval_every=2, progress=False)


# ------------------------------------------------------------------ NaN steps
def _poison_grads(model, when):
    """A hook that turns one parameter's gradient into NaN while when() holds (loss stays finite)."""
    p = model.model.layers[0].mlp.up_proj.weight
    p.register_hook(lambda g: g * float("nan") if when() else g)


def test_manual_qat_loop_with_qat_step_keeps_the_weights_on_a_nan_step():
    model, compiled = qat_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    ids = WINDOWS[:2]
    poisoned = []
    _poison_grads(model, lambda: bool(poisoned))
    opt.zero_grad()
    assert math.isfinite(train_mod.qat_step(compiled(ids, labels=ids).loss, opt, model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned.append(True)
    opt.zero_grad()
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan .*no parameter was changed"):
        train_mod.qat_step(compiled(ids, labels=ids).loss, opt, model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        train_mod.qat_step(compiled(ids, labels=ids).loss * float("nan"), opt, model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_qat_stops_on_a_nan_gradient_with_a_finite_loss():
    model, compiled = qat_model()
    calls = []
    counting = lambda *a, **k: (calls.append(1), compiled(*a, **k))[1]  # noqa: E731
    _poison_grads(model, lambda: len(calls) == 2)
    with pytest.raises(FloatingPointError, match=r"step 2: gradient norm is nan .*untouched since step 1"):
        train_qat(model, counting, WINDOWS, TrainConfig(steps=3, lr=1e-2, batch_size=2), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
