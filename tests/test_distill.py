"""End-to-end distillation of a packed model (calibration/distill.py)."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairy2i_compile import Fairy2iBackend, calibrate, distill, load_packed, pack_model, save_packed
from fairy2i_compile.quantization.calibration import packed_from_rounded, rounded_from_packed
from fairy2i_compile.quantization.packed_model import PackedLinear
from fairy2i_compile.training.train import cpu_autocast_warning

from helpers import tiny_llama


def _teacher(layers: int = 2) -> torch.nn.Module:
    """A tiny Llama with sharp next-token distributions (random init gives near-uniform ones)."""
    model = tiny_llama(seed=0, layers=layers).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)  # tied to lm_head: logits ~40x larger
    return model


def _ids(rows: int, cols: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 96, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def calibrated_w1():
    teacher = _teacher()
    return teacher, calibrate(teacher, _ids(8), stages=1, min_tokens=1, rotate=False, progress=False,
                                kernel="torch")


def test_distillation_lowers_the_holdout_kl_and_leaves_both_inputs_untouched(calibrated_w1):
    teacher, res = calibrated_w1
    teacher_before, packed_before = _state(teacher), _state(res.model)
    holdout = _ids(4, seed=11)
    d = distill(res.model, teacher, _ids(16), holdout=holdout, steps=40, lr=1e-2, progress=False)
    assert d.kept and d.loss_after < 0.5 * d.loss_before  # measured: 0.035 -> 0.002
    assert d.steps == 40 and len(d.history["loss"]) == 40
    assert _same_state(_state(teacher), teacher_before) and _same_state(_state(res.model), packed_before)
    assert teacher.training is False
    # the result is an ordinary packed model whose codes changed
    names = [n for n, m in d.model.named_modules() if isinstance(m, PackedLinear)]
    assert names == [n for n, m in res.model.named_modules() if isinstance(m, PackedLinear)]
    changed = sum(not torch.equal(d.model.get_submodule(n).codes, res.model.get_submodule(n).codes) for n in names)
    assert changed > 0
    assert not any(p.requires_grad for p in d.model.parameters())


def test_distilled_model_compiles_to_its_dense_reference_and_round_trips(calibrated_w1, tmp_path):
    teacher, res = calibrated_w1
    with torch.no_grad():  # distill trains also when called under no_grad
        d = distill(res.model, teacher, _ids(16), steps=10, lr=1e-2, progress=False)
    assert d.kept
    x = _ids(2, 16, seed=7)
    with torch.no_grad():
        eager = d.model(x).logits
        # the packed layers compute with exactly their dequantized weights
        dense = _teacher()
        for name, mod in d.model.named_modules():
            if isinstance(mod, PackedLinear):
                dense.get_submodule(name).weight = torch.nn.Parameter(mod.dequantized_weight())
        for (k, v) in d.model.state_dict().items():
            if k.endswith("norm.weight"):
                dense.state_dict()[k].copy_(v)
        torch.testing.assert_close(eager, dense(x).logits, rtol=1e-5, atol=1e-4)
        backend = Fairy2iBackend({"mode": "ptq", "stages": 1})
        compiled = torch.compile(d.model, backend=backend)
        torch.testing.assert_close(compiled(x).logits, eager, rtol=1e-5, atol=1e-4)
    assert backend.reports[0].counters.get("fuse_stages_prepacked", 0) > 0
    path = tmp_path / "distilled.safetensors"
    save_packed(d.model, path)
    loaded = load_packed(path)
    assert _same_state(_state(loaded), _state(d.model))  # codes, scales, corrections, norms
    with torch.no_grad():  # the loaded layers may pick another CPU kernel (summation order)
        torch.testing.assert_close(loaded(x).logits, eager, rtol=1e-5, atol=1e-4)


def test_a_distillation_that_does_not_help_gives_the_model_back(calibrated_w1):
    teacher, res = calibrated_w1
    # a vanishing step changes no code: the hold-out loss cannot go down, so nothing is kept
    d = distill(res.model, teacher, _ids(16), steps=2, lr=1e-12, progress=False)
    assert d.kept is False and d.model is res.model and d.loss_after >= d.loss_before


def test_distillation_resumes_from_its_checkpoint_bit_for_bit(calibrated_w1, tmp_path):
    teacher, res = calibrated_w1
    whole = distill(res.model, teacher, _ids(16), steps=6, lr=1e-2, progress=False)
    path = tmp_path / "run.safetensors"
    first = distill(res.model, teacher, _ids(16), steps=6, lr=1e-2, progress=False, checkpoint_path=path,
                    time_budget_s=1e-9)  # stops after the first step, checkpointed
    assert first.settings["steps_done"] == 1 and path.is_file()
    resumed = distill(res.model, teacher, _ids(16), steps=6, lr=1e-2, progress=False, checkpoint_path=path)
    assert resumed.settings["steps_done"] == 6
    assert _same_state(_state(resumed.model), _state(whole.model))


def test_bf16_autocast_distillation_lowers_the_float32_holdout_kl(calibrated_w1, monkeypatch):
    teacher, res = calibrated_w1
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # no slow-CPU warning here
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        d = distill(res.model, teacher, _ids(16), holdout=_ids(4, seed=11), steps=40, lr=1e-2, progress=False,
                    autocast="bfloat16")
    # the hold-out is measured in float32 before and after; bf16 forwards only steer the training
    assert d.kept and d.loss_after < 0.5 * d.loss_before
    assert d.settings["autocast"] == "bfloat16"
    assert not any(p.requires_grad for p in d.model.parameters())


def test_distill_starts_from_a_loaded_checkpoint_and_plain_round_to_nearest(tmp_path):
    teacher = _teacher(layers=1)
    packed = _teacher(layers=1)
    pack_model(packed, stages=2)
    path = tmp_path / "rtn.safetensors"
    save_packed(packed, path)
    d = distill(load_packed(path), teacher, _ids(16), steps=20, lr=1e-2, progress=False)
    assert d.kept and d.loss_after < d.loss_before


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 40), stages=st.integers(1, 4),
       gran=st.sampled_from(["tensor", "row", 4, 16]), outliers=st.integers(0, 3), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_packed_to_rounded_and_back_is_the_identity(n, m, stages, gran, outliers, bias, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(outliers, 2 * m)
    lin = torch.nn.Linear(2 * m, 2 * n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2 * n, 2 * m, generator=g))
    layer = PackedLinear.from_linear(lin, stages, gran)
    if k:
        layer = PackedLinear(2 * m, 2 * n, stages, gran, bias, outliers=k)
        layer.load_packed(PackedLinear.from_linear(lin, stages, gran).packed())
        layer.load_outliers(torch.randperm(2 * m, generator=g)[:k], torch.randn(2 * n, k, generator=g))
        if bias:
            layer.bias.data.copy_(lin.bias)
    r = rounded_from_packed(layer)
    torch.testing.assert_close(r.a_hat, layer.dequantized_weight(), rtol=0, atol=0)
    again = packed_from_rounded(r, layer, gran, "auto")
    assert _same_state(_state(again), _state(layer))


@pytest.mark.parametrize("call,match", [
    (lambda t, p: distill(t, t, _ids(4), steps=1), "holds no PackedLinear"),
    (lambda t, p: distill(p, t, _ids(4).float(), steps=1), "integer tensor"),
    (lambda t, p: distill(p, t, _ids(4) > 50, steps=1), "integer tensor"),  # bool is not token ids
    (lambda t, p: distill(p, t, _ids(4) + 200, steps=1), r"outside the model's vocabulary \[0, 96\)"),
    (lambda t, p: distill(p, t, _ids(1), steps=1), "at least 2 windows"),
    (lambda t, p: distill(p, t, _ids(4), steps=0), "steps must be a positive int"),
    (lambda t, p: distill(p, t, _ids(4), steps=2, lr=-1.0), "lr"),
    (lambda t, p: distill(p, t, _ids(4), steps=2, holdout=_ids(2, 1)), "holdout must be an integer tensor"),
    (lambda t, p: distill(p, "teacher", _ids(4), steps=2), "nn.Modules"),
    (lambda t, p: distill(p, t, _ids(4), steps=2, autocast="bf16"), r"autocast must be one of \['bfloat16', 'float16'\]"),
])
def test_bad_distill_input_is_named_and_nothing_changes(call, match):
    teacher = _teacher(layers=1)
    packed = _teacher(layers=1)
    pack_model(packed, stages=1)
    before_t, before_p = _state(teacher), _state(packed)
    with pytest.raises((ValueError, TypeError), match=match):
        call(teacher, packed)
    assert _same_state(_state(teacher), before_t) and _same_state(_state(packed), before_p)


# ------------------------------------------------------------------ the CLI
def _hf_llama_folder(tmp_path):
    """(a one-block Llama saved as a Hugging Face folder with its tokenizer, a calibration text file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import hf_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder)
    hf_tokenizer(add_bos_token=False).save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Which is the answer? " * 120, encoding="utf-8")
    return folder, text


@pytest.mark.parametrize("flag,said,rotated", [([], "rotated first: Hadamard", True),
                                               (["--no-rotate"], "not rotated: --no-rotate", False)])
def test_cli_quantize_calibrate_rotates_by_default_and_says_so(tmp_path, capsys, flag, said, rotated):
    import json

    from safetensors import safe_open

    from fairy2i_compile import cli

    folder, text = _hf_llama_folder(tmp_path)
    out = tmp_path / "w2.safetensors"
    rc = cli.main(["quantize", "--model", str(folder), "--calibrate", "--calib-text", str(text), "--calib-samples",
                   "8", "--calib-seq-len", "32", "--out", str(out), "--no-progress", *flag])
    assert rc == 0, capsys.readouterr().err
    assert said in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        calibration = json.loads(f.metadata()["extra"])["calibration"]
    assert (calibration["rotation"] is not None) is rotated and calibration["rotation_skipped"] is None


def test_cli_quantize_calibrate_and_distill_writes_how_it_was_made(tmp_path, capsys, monkeypatch):
    import json

    from fairy2i_compile import cli

    folder, text = _hf_llama_folder(tmp_path)
    out = tmp_path / "w2.safetensors"
    monkeypatch.setenv("FAIRY2I_CACHE", str(tmp_path / "cache"))  # the generated windows' cache
    rc = cli.main(["quantize", "--model", str(folder), "--calibrate", "--calib-text", str(text), "--calib-samples",
                   "8", "--calib-seq-len", "32", "--distill-steps", "3", "--distill-windows", "8", "--out", str(out),
                   "--distill-autocast", "bfloat16", "--distill-generated", "4", "--rotate", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "distilled 3 steps" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    calibration = json.loads(meta["extra"])["calibration"]
    # 7 real + 4 generated windows train; the held-out eighth of the real ones stays real text
    assert calibration["distill"]["steps"] == 3 and calibration["distill"]["train_windows"] == 11
    assert calibration["distill"]["holdout_windows"] == 1
    assert len(list((tmp_path / "cache" / "generated").iterdir())) == 1
    assert calibration["distill"]["autocast"] == "bfloat16"
    assert calibration["rotation"]["hidden"] == 32  # rotated first; the teacher is the unrotated float model
    assert sum(1 for m in load_packed(out).modules() if isinstance(m, PackedLinear)) == 8  # 7 + lm_head


@pytest.mark.parametrize("argv,match", [
    (["--distill-steps", "3"], "--distill-steps tune calibrated codes; add --calibrate"),
    (["--repair-steps", "3"], "--repair-steps tune calibrated codes; add --calibrate"),
    (["--rotate"], "--rotate chooses whether the model is rotated before calibration; add --calibrate"),
    (["--no-rotate"], "--no-rotate chooses whether the model is rotated before calibration; add --calibrate"),
    (["--calibrate", "--distill-steps", "3", "--distill-lr", "0"], "--distill-lr must be a positive number"),
    (["--calibrate", "--distill-generated", "4"], "--distill-generated 4 adds distillation text; add --distill-steps"),
])
def test_cli_distill_options_are_checked_before_any_work(tmp_path, capsys, argv, match):
    from fairy2i_compile import cli

    out = tmp_path / "x.safetensors"
    assert cli.main(["quantize", "--model", "tiny-llama", "--out", str(out), "--no-progress", *argv]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_split_holdout_keeps_the_last_eighth_and_names_too_few_windows():
    from fairy2i_compile.quantization.calibration import split_holdout

    for n, held in ((2, 1), (8, 1), (16, 2), (17, 2)):
        w = torch.arange(n * 3).reshape(n, 3)
        train, hold = split_holdout(w)
        assert hold.shape[0] == held and torch.equal(torch.cat([train, hold]), w)
    with pytest.raises(ValueError, match=r"at least 2 windows to hold one out \(got 1\)"):
        split_holdout(torch.zeros(1, 3, dtype=torch.long))


def test_half_precision_autocast_on_a_cpu_without_its_matmul_units_warns(calibrated_w1, monkeypatch):
    # emulated bf16 / fp16 matmuls were 28-30x float32 on an AVX2 EPYC: say so before the steps run
    teacher, res = calibrated_w1
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    with pytest.warns(RuntimeWarning, match=r"autocast='bfloat16' on a CPU without bfloat16 matmul units "
                                            r"\(AVX512_BF16 / AMX_TILE absent\).*pass autocast=None"):
        distill(res.model, teacher, _ids(4), steps=1, lr=1e-2, progress=False, autocast="bfloat16")
    assert "AMX_FP16 absent" in cpu_autocast_warning("float16", torch.device("cpu"))
    assert cpu_autocast_warning(None, torch.device("cpu")) is None
    assert cpu_autocast_warning("bfloat16", torch.device("meta")) is None  # not a CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_autocast_warning("bfloat16", torch.device("cpu")) is None
