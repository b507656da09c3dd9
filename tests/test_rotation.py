"""Function-preserving rotations before calibration (calibration/rotation.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fairy2i_compile.checkpoints.checkpoint import load_packed
from fairy2i_compile.quantization.calibration import calibrate
from fairy2i_compile.quantization.calibration.rotation import (RTOL, hadamard_order, random_hadamard,
                                                               rotate_decoder)
from fairy2i_compile.quantization.packed_model import PackedLinear

from helpers import LLAMA_LINEARS, tiny_gpt2, tiny_llama

# orders with a construction: 2^k times 1, q + 1 (q ≡ 3 mod 4 prime) or 2(q + 1) (q ≡ 1 mod 4 prime)
HADAMARD = [1, 2, 4, 8, 12, 20, 24, 28, 32, 36, 40, 44, 48, 60, 64, 72, 76, 96, 108, 576, 1536]
NO_CONSTRUCTION = [3, 6, 10, 14, 18, 22, 100]


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from(HADAMARD), seed=st.integers(0, 2**31 - 1))
def test_random_hadamard_is_orthogonal_with_flat_entries(n, seed):
    q, kind = random_hadamard(n, torch.Generator().manual_seed(seed))
    assert kind.startswith("Hadamard")
    p, m = hadamard_order(n)
    assert p * m == n and p & (p - 1) == 0
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # every entry ±1/√n: no input channel keeps more than its share of any output
    torch.testing.assert_close(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", NO_CONSTRUCTION)
def test_sizes_without_a_hadamard_construction_get_a_random_orthogonal_matrix(n):
    assert hadamard_order(n) is None
    q, kind = random_hadamard(n, torch.Generator().manual_seed(0))
    assert kind == "random orthogonal"
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hadamard_order_prefers_sylvester_and_names_bad_sizes():
    assert hadamard_order(64) == (64, 1)
    assert hadamard_order(576) == (16, 36)  # Paley II, q = 17
    assert hadamard_order(1536) == (128, 12)  # Paley I, q = 11
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            hadamard_order(bad)


def _norms(model):
    return [m for m in model.modules() if "RMSNorm" in type(m).__name__]


def _small_norm_weights(model, seed):
    """Norm weights like SmolLM2's (0.02–0.6), not the ones of a fresh init, so folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    norms = _norms(model)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(0.02 + 0.58 * torch.rand(m.weight.shape, generator=gen))
    return norms


@pytest.mark.parametrize("heads", [True, False])
def test_rotated_llama_computes_the_same_function(heads):
    model = tiny_llama(seed=3, layers=2)
    norms = _small_norm_weights(model, seed=4)
    rms = [float(m.weight.detach().double().pow(2).mean().sqrt()) for m in norms]
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    emb_before = model.get_input_embeddings().weight.clone()
    info = rotate_decoder(model, seed=7, heads=heads)
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert info.logit_rel_error < 1e-5
    assert (info.head_dim == 8) is heads
    # the weights did change: each norm keeps only the constant rms(γ), lm_head untied from the rotated embedding
    assert not torch.allclose(model.get_input_embeddings().weight, emb_before)
    for m, c in zip(norms, rms):
        torch.testing.assert_close(m.weight, torch.full((32,), c), rtol=1e-6, atol=0)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False


def test_rotation_keeps_the_magnitude_of_the_weights_it_folds_a_norm_into():
    # with a constant γ = c the folded readers are W Q: every row keeps its norm exactly, however
    # small c is (folding all of γ would scale them by c, and Adam's steps would grow relative to them)
    model = tiny_llama(seed=5, layers=2)
    with torch.no_grad():
        for m in _norms(model):
            m.weight.fill_(0.05)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")] + ["lm_head"]
    before = {n: model.get_submodule(n).weight.detach().norm(dim=1).clone() for n in names}
    rotate_decoder(model, seed=1)
    for n in names:
        torch.testing.assert_close(model.get_submodule(n).weight.norm(dim=1), before[n], rtol=1e-5, atol=0)
    assert torch.equal(model.model.norm.weight, torch.full((32,), 0.05))


def test_rotation_spreads_a_massive_residual_channel():
    model = tiny_llama(seed=0, layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50.0  # one channel of the residual stream 50x the rest
    q = model.model.layers[0].self_attn.q_proj
    seen = {}
    hook = q.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach()))
    x = torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        ratio_before = float(model.model.embed_tokens.weight.abs().amax(0).max()
                             / model.model.embed_tokens.weight.abs().amax(0).median())
        rotate_decoder(model)
        ratio_after = float(model.model.embed_tokens.weight.abs().amax(0).max()
                            / model.model.embed_tokens.weight.abs().amax(0).median())
    hook.remove()
    assert ratio_before > 20 and ratio_after < 3


def _layernorm_llama() -> nn.Module:
    """A two-block Llama with a LayerNorm (it has a mean): rotation refuses it before any weight changes."""
    model = tiny_llama(seed=0, layers=2)
    model.model.layers[1].input_layernorm = nn.LayerNorm(32)
    return model


def test_architectures_it_does_not_fit_are_refused_by_name():
    with pytest.raises(ValueError, match="rotate=False"):
        rotate_decoder(tiny_gpt2())  # LayerNorm with a mean, Conv1D, no embed_tokens
    model = _layernorm_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs RMSNorm layers.*LayerNorm.*rotate=False"):
        rotate_decoder(model)
    # refused before any weight changed, block 0 included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _offset_norm_llama() -> nn.Module:
    """A one-block Llama whose second norm scales by 1 + weight (Gemma-style): rotation does not fold it."""
    model = tiny_llama(seed=0, layers=1)

    class OffsetRMSNorm(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.weight, self.eps = inner.weight, inner.variance_epsilon

        def forward(self, h):
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return h * (1.0 + self.weight)

    model.model.layers[0].post_attention_layernorm = OffsetRMSNorm(model.model.layers[0].post_attention_layernorm)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.normal_()
    return model


def test_a_norm_that_does_not_fold_is_caught_by_the_logit_check():
    model = _offset_norm_llama()
    with pytest.raises(ValueError, match=rf"changed its logits by .* below {RTOL:g}.*rotate=False"):
        rotate_decoder(model)
    with pytest.raises(ValueError, match="seed must be an int"):
        rotate_decoder(tiny_llama(), seed="0")


def test_calibrate_with_rotation_packs_saves_and_leaves_the_model_alone(tmp_path):
    model = tiny_llama(seed=0, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (5, 64), generator=torch.Generator().manual_seed(0))
    res = calibrate(model, ids, stages=2, rotate=True, progress=False, kernel="torch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.tie_word_embeddings is True  # the user's config too
    assert res.settings["rotation"]["hidden"] == 32 and res.settings["rotation"]["logit_rel_error"] < 1e-5
    names = {f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LINEARS} | {"lm_head"}
    assert all(isinstance(res.model.get_submodule(n), PackedLinear) for n in names)
    dense = calibrate(model, ids, stages=2, rotate=True, progress=False, pack=False)
    for n in names:  # packed == fake-quant, exactly, with the rotation too
        torch.testing.assert_close(res.model.get_submodule(n).dequantized_weight(),
                                   dense.model.get_submodule(n).weight, rtol=0, atol=0)
    x = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = res.model(x).logits
    path = tmp_path / "rot.safetensors"
    info = res.save(path)
    assert info["extra"]["calibration"]["rotation"]["hidden_kind"].startswith("Hadamard")
    loaded = load_packed(path)
    with torch.no_grad():  # the rotated embedding and the constant norms travel with the checkpoint
        torch.testing.assert_close(loaded(x).logits, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rotate must be True, False or 'auto', got 'yes'"):
        calibrate(model, ids, rotate="yes", progress=False)
    with pytest.raises(ValueError, match="rotation_seed must be an int, got '1'"):  # not swallowed by "auto"
        calibrate(model, ids, rotation_seed="1", progress=False)


def test_rotation_is_on_by_default_where_the_model_fits():
    model = tiny_llama(seed=1, layers=1)
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(2))
    auto = calibrate(model, ids, stages=2, progress=False, pack=False)
    on = calibrate(model, ids, stages=2, rotate=True, progress=False, pack=False)
    off = calibrate(model, ids, stages=2, rotate=False, progress=False, pack=False)
    assert auto.settings["rotation"] == on.settings["rotation"] and auto.settings["rotation_skipped"] is None
    assert off.settings["rotation"] is None and off.settings["rotation_skipped"] is None
    for name in auto.layers:  # the default is rotate=True, code for code
        torch.testing.assert_close(auto.model.get_submodule(name).weight, on.model.get_submodule(name).weight,
                                   rtol=0, atol=0)
    assert not torch.equal(auto.model.model.layers[0].mlp.up_proj.weight, off.model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("make", [_layernorm_llama, _offset_norm_llama], ids=["refused-before", "logit-check-after"])
def test_auto_rotation_falls_back_to_the_unrotated_model_with_a_warning(make):
    # refused before any weight changes (a LayerNorm) or only after the copy was rotated (the logit check):
    # either way the result is exactly the unrotated calibration, and the user's model is untouched
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match=r"calibrates .* without rotation: .*rotate=False silences this"):
        auto = calibrate(model, ids, stages=2, progress=False, pack=False)
    assert auto.settings["rotation"] is None and "rotate=False" in auto.settings["rotation_skipped"]
    off = calibrate(model, ids, stages=2, rotate=False, progress=False, pack=False)
    for name in off.layers:
        torch.testing.assert_close(auto.model.get_submodule(name).weight, off.model.get_submodule(name).weight,
                                   rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="rotate=False"):  # rotate=True keeps refusing
        calibrate(model, ids, stages=2, rotate=True, progress=False, pack=False)


def test_rotated_repair_targets_the_rotated_float_blocks():
    # the repair matches each quantized block to the float block; in the rotated basis the targets
    # must come from a rotated float copy, else the loss would start far above the unrotated one
    model = tiny_llama(seed=2, layers=1)
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(3))
    plain = calibrate(model, ids, stages=2, repair_steps=3, rotate=False, progress=False, pack=False)
    rot = calibrate(model, ids, stages=2, repair_steps=3, rotate=True, progress=False, pack=False)
    lb_plain, lb_rot = plain.repair[0]["loss_before"], rot.repair[0]["loss_before"]
    assert lb_rot < 4 * lb_plain, (lb_plain, lb_rot)
