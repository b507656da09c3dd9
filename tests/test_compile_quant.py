"""PTQ and QAT through the compiled graph: fake-quant == PTQ bit for bit, caching per
weight version, gradients vs an eager STE reference, training, report, bad input."""

import copy
import json
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fairy2i_compile import Fairy2iBackend, quant_ops
from fairy2i_compile.quantization import quant
from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely, widely_to_real_reference as _widely_to_real
from conftest import rel_err
from helpers import LLAMA_LINEARS, PhaseQuantSTE, tiny_gpt2, tiny_llama


def compiled(model, **options):
    backend = Fairy2iBackend(options)
    return torch.compile(model, backend=backend), backend


def logits(model, ids):
    return model(ids).logits


# ------------------------------------------------------------------ fake-quant == PTQ
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize(
    "method, stages, granularity",
    [("phase", 1, "tensor"), ("phase", 2, "tensor"), ("phase", 3, "row"), ("phase", 2, 6),
     ("binary", 1, "tensor"), ("ternary", 2, "row")],
)
def test_qat_fake_quant_and_ptq_are_bit_identical(make, method, stages, granularity):
    model = make()
    ids = torch.randint(0, 96, (2, 10))
    opts = dict(method=method, stages=stages, scale_granularity=granularity)
    # kernel="torch": the packed op's reference runs the fake-quant arithmetic in the same
    # order, so the packed PTQ graph must match QAT bit for bit (the C++ and Triton kernels
    # sum in another order: tests/test_packed.py compares them at an fp32 tolerance)
    ptq, ptq_backend = compiled(model, mode="ptq", kernel="torch", **opts)
    qat, _ = compiled(model, mode="qat", **opts)
    with torch.no_grad():
        y_ptq = logits(ptq, ids)
    y_qat = logits(qat, ids)
    torch.testing.assert_close(y_ptq, y_qat.detach(), atol=0, rtol=0)
    assert all(r.action == "quantized" for r in ptq_backend.reports[0].layers)


def _eager_quantized(model, method, stages, granularity):
    """An eager copy whose linear/Conv1D weights are replaced by the reference quantizer's output."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                a = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()
                if method == "phase":
                    a_hat = _widely_to_real(*quant_ops.phase_quant_reference(a, stages, granularity)).to(a.dtype)
                else:
                    a_hat = quant.real_quant(a, method, stages, granularity).to(a.dtype)
                new = a_hat if isinstance(mod, nn.Linear) else a_hat.t()
                if isinstance(mod, nn.Linear) and name == "lm_head":
                    # tied to the embedding: quantize only the projection
                    mod.weight = nn.Parameter(new.clone())
                else:
                    mod.weight.copy_(new)
    return ref


@pytest.mark.parametrize("method", ["phase", "binary", "ternary"])
def test_ptq_matches_eager_reference_model(method):
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 10))
    ptq, _ = compiled(model, mode="ptq", method=method, stages=2)
    with torch.no_grad():
        got = logits(ptq, ids)
        want = logits(_eager_quantized(model, method, 2, "tensor"), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ PTQ caching
def test_ptq_quantizes_once_per_weight_version():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    ptq, _ = compiled(model, mode="ptq", stages=2, kernel="torch")
    counters.clear()
    with torch.no_grad():
        y0 = logits(ptq, ids)
        logits(ptq, ids)
        logits(ptq, ids)
    # quantized at compile time only; every call hits the cache
    assert counters["fairy2i"]["ptq_quantize"] == 0
    assert counters["fairy2i"]["ptq_cache_hit"] == 3 * 15

    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)  # in-place: bumps _version
        y1 = logits(ptq, ids)
    assert counters["fairy2i"]["ptq_quantize"] == 1  # only the changed layer
    assert not torch.equal(y0, y1)
    qat, _ = compiled(model, mode="qat", stages=2)
    torch.testing.assert_close(y1, logits(qat, ids).detach(), atol=0, rtol=0)

    # load_state_dict copies in place too
    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        logits(ptq, ids)
    assert counters["fairy2i"]["ptq_quantize"] == 1 + 15


def test_ptq_cache_entry_freed_with_the_parameter():
    import gc

    gc.collect()  # entries of earlier tests' dead models go first
    model = nn.Linear(8, 8)
    before = quant_ops.ptq_cache_size()
    torch.compile(model, backend=Fairy2iBackend({"mode": "ptq"}))(torch.randn(2, 8))
    assert quant_ops.ptq_cache_size() == before + 1
    del model
    torch._dynamo.reset()
    gc.collect()
    assert quant_ops.ptq_cache_size() == before


def test_ptq_gives_no_gradient_to_quantized_weights():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 6))
    ptq, _ = compiled(model, mode="ptq")
    out = ptq(ids, labels=ids)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None
    assert model.model.norm.weight.grad is not None  # the rest of the graph still trains


# ------------------------------------------------------------------ QAT
def _ste_reference(model, stages, granularity):
    """Eager copy applying the same STE quantizer (helpers.PhaseQuantSTE, the eager reference) in every linear."""
    ref = copy.deepcopy(model)

    def forward(self, x):
        uq = PhaseQuantSTE.apply(*_real_to_widely(self.weight), stages, granularity)
        return F.linear(x, _widely_to_real(*uq).to(x.dtype), self.bias)

    for mod in ref.modules():
        if isinstance(mod, nn.Linear):
            mod.forward = types.MethodType(forward, mod)
    return ref


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_qat_gradients_match_eager_ste_reference(granularity):
    model = tiny_llama()
    ref = _ste_reference(model, 2, granularity)
    ids = torch.randint(0, 96, (2, 10))
    qat, backend = compiled(model, mode="qat", stages=2, scale_granularity=granularity)
    out, want = qat(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    want.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) <= 1e-4, name
    assert backend.reports[0].counters["phase_quant_qat"] == 15


def test_qat_training_lowers_loss_and_keeps_real_parameters():
    torch.manual_seed(0)
    model = tiny_llama()
    names_before = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (4, 16))
    qat, _ = compiled(model, mode="qat", stages=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = qat(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert {n: (p.shape, p.dtype) for n, p in model.named_parameters()} == names_before
    assert all(type(p) is nn.Parameter for p in model.parameters())
    # master weights are real and not themselves on the codebook
    a = model.model.layers[0].mlp.up_proj.weight.detach()
    a_hat = _widely_to_real(*quant_ops.phase_quant_reference(a, 2, "tensor"))
    assert not torch.equal(a, a_hat)


# ------------------------------------------------------------------ report
def test_report_has_quantization_fields(tmp_path):
    model = tiny_llama(layers=1)
    with torch.no_grad():
        torch.compile(model, backend="fairy2i", options={"mode": "ptq", "stages": 2, "dump_dir": str(tmp_path)})(
            torch.randint(0, 96, (1, 4))
        )
    report = json.loads((tmp_path / "report.json").read_text())
    q = next(l for l in report["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert q["method"] == "phase" and q["stages"] == 2 and q["granularity"] == "tensor"
    assert q["bits_per_weight"] == 2.0
    assert 0.2 < q["rel_fro"] < 0.5 and q["sqnr_db"] == pytest.approx(-20 * torch.log10(torch.tensor(q["rel_fro"])).item())
    # codes: 2 bits x 2 stages per real weight; scales: 2 stages x (U, W) x (re, im) float32
    assert q["bytes_after"] == 32 * 32 * 2 // 8 + 4 * 2 * 2 * 2
    assert q["bytes_before"] == 32 * 32 * 4
    assert q["dense_cache_bytes"] == 0 and q["packed"]  # the graph holds 2-bit codes + scales only
    files = sorted(p.name for p in (tmp_path / "graph_0").iterdir())
    assert files == ["00_captured.py", "01_widely_linear.py", "02_phase_quant.py", "03_fuse_stages.py",
                     "04_aot_inference.py", "05_lower_cpu_op.py", "06_fuse_siblings.py", "07_lower_cpu_direct.py", "08_lower_infer.py",
                     "09_gqa_attention.py"]
    assert "fairy2i.ptq_phase_quant.default" in (tmp_path / "graph_0" / "02_phase_quant.py").read_text()
    assert "fairy2i.ptq_packed_linear.default" in (tmp_path / "graph_0" / "03_fuse_stages.py").read_text()


def test_storage_bytes_formulas():
    assert quant.storage_bytes("phase", 1, 64, 128) == 64 * 128 // 8 + 4 * 4
    assert quant.storage_bytes("phase", 2, 64, 128, "row") == 2 * 64 * 128 // 8 + 4 * 2 * 4 * 32
    assert quant.storage_bytes("binary", 1, 64, 128, 32) == 64 * 128 // 8 + 4 * 64 * 4
    assert quant.storage_bytes("ternary", 1, 8, 8) == 13 + 4  # ceil(64 * log2(3) / 8) + one scale


# ------------------------------------------------------------------ negatives and bad input
def test_exact_mode_inserts_no_quantizer():
    _, backend = compiled(tiny_llama(), mode="exact")
    torch.compile(tiny_llama(), backend=backend)(torch.randint(0, 96, (1, 4)))
    assert set(backend.reports[0].counters) == {"widely_linear_rewritten"}


def test_skipped_layer_is_not_quantized():
    model = tiny_llama()
    ptq, backend = compiled(model, mode="ptq", skip=["lm_head"])
    with torch.no_grad():
        ptq(torch.randint(0, 96, (1, 4)))
    rep = {r.name: r for r in backend.reports[0].layers}
    assert rep["lm_head"].action == "kept_real" and "rel_fro" not in rep["lm_head"].extra
    assert backend.reports[0].counters["phase_quant_ptq"] == 14


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_nan_weight_names_the_layer_at_compile_time(mode):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3, 1] = float("nan")
    c, _ = compiled(model, mode=mode)
    with pytest.raises(Exception, match=r"model\.layers\.0\.self_attn\.k_proj \(U\).*1 NaN/Inf values"):
        c(torch.randint(0, 96, (1, 4)))


def test_nan_weight_after_compile_names_the_layer_at_run_time():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 4))
    qat, _ = compiled(model, mode="qat", method="binary")
    qat(ids)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj has 1 NaN/Inf"):
        qat(ids)


@pytest.mark.parametrize("method", ["phase", "binary", "ternary"])
def test_all_zero_weight_quantizes_to_zeros(method):
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(3, 8)
    c, _ = compiled(layer, mode="ptq", method=method)
    with torch.no_grad():
        y = c(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, layer.bias.expand(3, 6), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["ptq", "qat", "exact"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_activations_in_another_dtype_raise_as_in_eager(mode, dtype):
    # eager nn.Linear raises on int / float64 input to a float32 layer; PTQ used to cast to the
    # kernel's float32 and back, returning integer zeros (int) or a float64 result (float64)
    model = nn.Sequential(nn.Linear(8, 6)).eval()
    good, bad = torch.randn(2, 8), torch.randint(0, 5, (2, 8)).to(dtype)
    with pytest.raises(RuntimeError, match="same dtype"):
        model(bad)
    net, _ = compiled(model, mode=mode)
    with torch.no_grad():
        net(good)                                        # compiled for float32 first: the guard recompiles
        with pytest.raises(RuntimeError, match="same dtype"):
            net(bad)
