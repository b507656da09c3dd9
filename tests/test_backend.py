"""The fairy2i backend: options, entry point, exact rewrite through torch.compile, dumps."""

import copy
import importlib.metadata
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from fairy2i_compile import Fairy2iBackend, Fairy2iConfig
from fairy2i_compile.compiler.passes.widely_linear import WeightSite, should_rewrite
from conftest import rel_err
from helpers import GPT2_CONV1DS, LLAMA_LINEARS, tiny_gpt2, tiny_llama


# --------------------------------------------------------------------------- options
def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "fairy2i" in {ep.name for ep in eps}
    assert "fairy2i" in torch._dynamo.list_backends()


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown fairy2i option\(s\) \['stage'\].*allowed options are \[.*'stages'"):
        Fairy2iConfig.from_options({"stage": 2})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mode": "train"}, r"option 'mode' must be one of \['exact', 'ptq', 'qat', 'calibrate'\], got 'train'"),
        ({"stages": 0}, r"'stages' must be in 1..4, got 0"),
        ({"stages": 5}, r"'stages' must be in 1..4, got 5"),
        ({"stages": 2.0}, r"'stages' must be an int"),
        ({"stages": True}, r"'stages' must be an int"),
        ({"method": "int4"}, r"option 'method' must be one of \['phase', 'binary', 'ternary'\]"),
        ({"scale_granularity": "col"}, r"'scale_granularity' must be one of \('tensor', 'row'\) or a positive int"),
        ({"scale_granularity": 0}, r"'scale_granularity'.*got 0"),
        ({"scale_granularity": True}, r"'scale_granularity'.*got True"),
        ({"skip": [""]}, r"option 'skip' must be a list of non-empty"),
        ({"skip": 3}, r"option 'skip'"),
        ({"dump_dir": 3}, r"option 'dump_dir' must be a path"),
        ({"kernel": "cuda"}, r"option 'kernel' must be one of \['auto', 'triton', 'cpu', 'inductor', 'torch'\]"),
        ({"compiler": "tvm"}, r"option 'compiler' must be one of \['eager', 'inductor'\]"),
    ],
)
def test_bad_option_values(options, match):
    with pytest.raises(ValueError, match=match):
        Fairy2iConfig.from_options(options)


def test_config_normalises_and_is_frozen():
    cfg = Fairy2iConfig.from_options({"skip": "lm_head", "scale_granularity": 64})
    assert cfg.skip == ("lm_head",) and cfg.scale_granularity == 64
    with pytest.raises(Exception):
        cfg.mode = "qat"  # frozen


def test_exact_mode_warns_about_quant_options():
    with pytest.warns(UserWarning, match=r"\['stages'\] have no effect with mode='exact'"):
        Fairy2iConfig.from_options({"mode": "exact", "stages": 1})


def test_bad_option_through_torch_compile_string_backend():
    model = nn.Linear(4, 4)
    compiled = torch.compile(model, backend="fairy2i", options={"nope": 1})
    with pytest.raises(Exception, match=r"unknown fairy2i option\(s\) \['nope'\]"):
        compiled(torch.randn(2, 4))


def test_torch_compile_mode_is_rejected_with_a_fix():
    compiled = torch.compile(nn.Linear(4, 4), backend="fairy2i", mode="max-autotune")
    with pytest.raises(Exception, match=r"pass fairy2i's own mode as options=\{'mode': ...\}"):
        compiled(torch.randn(2, 4))


def test_triton_kernel_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = torch.compile(nn.Linear(4, 4), backend=Fairy2iBackend({"kernel": "triton"}))
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        with torch.no_grad():
            compiled(torch.randn(2, 4))


# --------------------------------------------------------------------------- exact rewrite
even = st.integers(1, 8).map(lambda k: 2 * k)


@settings(max_examples=12)
@given(out_f=even, in_f=even, batch=st.lists(st.integers(1, 3), max_size=2), bias=st.booleans(), seed=st.integers(0, 10**6))
def test_compiled_exact_equals_linear_float32(out_f, in_f, batch, bias, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*batch, in_f)
    backend = Fairy2iBackend({"mode": "exact"})
    y = torch.compile(layer, backend=backend)(x)
    assert rel_err(y, F.linear(x, layer.weight, layer.bias)) <= 1e-5
    assert backend.reports[0].converted() == ["<root>"]  # the compiled module itself
    assert backend.reports[0].counters == {"widely_linear_rewritten": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_mode_is_bit_exact_for_half_precision(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(32, 16).to(dtype)
    x = torch.randn(4, 32).to(dtype)
    with torch.no_grad():
        y = torch.compile(layer, backend=Fairy2iBackend({"mode": "exact"}))(x)
        torch.testing.assert_close(y, layer(x), atol=0, rtol=0)


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _check_model(model, inputs, expected_names, labels_in_graph=True):
    """labels_in_graph=False: GPT-2's transformers loss path graph-breaks by itself
    (`loss_type=None` in GPT2Config), so its loss is computed outside the compiled call."""
    eager = copy.deepcopy(model)
    backend = Fairy2iBackend({"mode": "exact"})
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    kwargs = {"labels": inputs} if labels_in_graph else {}
    out = compiled(inputs, **kwargs)
    ref = eager(inputs, **kwargs)
    loss, ref_loss = (out.loss, ref.loss) if labels_in_graph else (_lm_loss(out.logits, inputs), _lm_loss(ref.logits, inputs))
    # one graph, no breaks
    assert len(backend.reports) == 1
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-5)
    report = backend.reports[0]
    assert sorted(report.converted()) == sorted(expected_names)
    assert report.kept_real() == {}
    # gradients through the compiled (AOTAutograd) graph equal eager ones
    loss.backward()
    ref_loss.backward()
    eager_params = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, eager_params[name].grad) <= 1e-4, name
    return report


def test_llama_exact_end_to_end():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 96, (2, 12))
    names = [f"model.layers.{i}.{s}" for i in range(2) for s in LLAMA_LINEARS] + ["lm_head"]
    report = _check_model(model, ids, names)
    assert all(r.op == "linear" for r in report.layers)


def test_gpt2_conv1d_exact_end_to_end():
    model = tiny_gpt2(layers=2)
    ids = torch.randint(0, 96, (2, 12))
    names = [f"transformer.h.{i}.{s}" for i in range(2) for s in GPT2_CONV1DS] + ["lm_head"]
    report = _check_model(model, ids, names, labels_in_graph=False)
    assert sorted(r.op for r in report.layers) == ["addmm"] * 8 + ["linear"]
    c_attn = next(r for r in report.layers if r.name.endswith("h.0.attn.c_attn"))
    assert c_attn.shape == [96, 32]  # [out, in] although Conv1D stores [in, out]


# --------------------------------------------------------------------------- negatives
class OddAndSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 6)
        self.odd = nn.Linear(6, 5)
        self.lm_head = nn.Linear(5, 4)  # odd in-features
        self.keep = nn.Linear(4, 4)

    def forward(self, x):
        return self.keep(self.lm_head(self.odd(self.up(x))))


def test_odd_and_skipped_layers_stay_real_with_reasons():
    model = OddAndSkip()
    x = torch.randn(3, 8)
    backend = Fairy2iBackend({"mode": "exact", "skip": ["keep", "no_such_layer"]})
    y = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(y, model(x), atol=1e-6, rtol=1e-5)
    rep = backend.reports[0]
    assert rep.converted() == ["up"]
    kept = rep.kept_real()
    assert "odd dims: out_features=5, in_features=6" in kept["odd"]
    assert "odd dims: out_features=4, in_features=5" in kept["lm_head"]
    assert kept["keep"] == "matches skip pattern 'keep'"
    assert rep.counters == {"widely_linear_rewritten": 1, "widely_linear_kept_real": 3}


def test_skip_patterns_glob_and_suffix():
    model = tiny_llama(layers=2)
    backend = Fairy2iBackend({"mode": "exact", "skip": ["lm_head", "model.layers.1.*", "*.q_proj"]})
    torch.compile(model, backend=backend)(torch.randint(0, 96, (1, 5)))
    kept = backend.reports[0].kept_real()
    assert set(kept) == {"lm_head", "model.layers.0.self_attn.q_proj"} | {f"model.layers.1.{s}" for s in LLAMA_LINEARS}


class ActivationAddmm(nn.Module):
    """addmm of two activations is a matmul, not a layer: the Conv1D rule must not fire."""

    def forward(self, b, x, y):
        return torch.addmm(b, x, y)


def test_addmm_of_activations_is_not_rewritten():
    backend = Fairy2iBackend({"mode": "exact"})
    b, x, y = torch.randn(4), torch.randn(3, 6), torch.randn(6, 4)
    out = torch.compile(ActivationAddmm(), backend=backend)(b, x, y)
    torch.testing.assert_close(out, torch.addmm(b, x, y))
    assert backend.reports[0].layers == []


def test_non_floating_weight_stays_real():
    site = WeightSite(None, "linear", None, None, None, False, 4, 4, torch.int8)
    assert should_rewrite(site, "x", Fairy2iConfig()) == "weight dtype torch.int8 is not a real floating type"


# --------------------------------------------------------------------------- dumps
def test_dumps_and_report(tmp_path):
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 96, (1, 6))
    dump = tmp_path / "dumps"
    out = torch.compile(model, backend="fairy2i", options={"mode": "exact", "dump_dir": str(dump), "skip": ["lm_head"]})(ids, labels=ids)
    out.loss.backward()
    files = sorted(os.listdir(dump / "graph_0"))
    assert files == ["00_captured.py", "01_widely_linear.py", "02_aot_forward.py", "03_aot_backward.py"]
    captured = (dump / "graph_0" / "00_captured.py").read_text()
    rewritten = (dump / "graph_0" / "01_widely_linear.py").read_text()
    assert "torch._C._nn.linear" in captured and "fairy2i" not in captured.split("\n", 3)[3]
    assert rewritten.count("torch.ops.fairy2i.widely_linear.default(") == 7
    assert rewritten.count("torch._C._nn.linear(") == 1  # lm_head, skipped
    assert "torch.ops.fairy2i.real_to_widely.default" in (dump / "graph_0" / "03_aot_backward.py").read_text()

    report = json.loads((dump / "report.json").read_text())
    assert report["config"]["skip"] == ["lm_head"]
    assert report["summary"]["converted"] == 7 and report["summary"]["kept_real"] == 1
    q = next(l for l in report["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert q == {**q, "shape": [32, 32], "action": "widely_linear", "reason": None,
                 "bytes_before": 32 * 32 * 4, "bytes_after": 32 * 32 * 4, "op": "linear", "graph": 0}
    head = next(l for l in report["layers"] if l["name"] == "lm_head")
    assert head["action"] == "kept_real" and head["reason"] == "matches skip pattern 'lm_head'"


def test_report_lists_unmatched_skip_patterns(tmp_path):
    with pytest.warns(UserWarning, match="lm_haed"):
        torch.compile(nn.Linear(4, 4), backend="fairy2i", options={"dump_dir": str(tmp_path), "skip": ["lm_haed"]})(torch.randn(1, 4))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["unmatched_skip_patterns"] == ["lm_haed"]


def test_unmatched_skip_pattern_warns_without_dump_dir():
    # without dump_dir nothing else would tell the user the layer they meant to keep real was quantized
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    backend = Fairy2iBackend({"mode": "ptq", "skip": ["lm_haed", "2"]})
    with pytest.warns(UserWarning, match=r"skip pattern\(s\) \['lm_haed'\] matched no linear layer of the "
                                         r"graph\(s\) compiled so far \(2 layers, e\.g\. \['0', '2'\]\)") as caught:
        with torch.no_grad():
            torch.compile(model, backend=backend)(torch.randn(1, 4))
    assert sum("skip pattern" in str(w.message) for w in caught) == 1  # '2' matched: not named
    assert backend.reports[0].kept_real() == {"2": "matches skip pattern '2'"}


def test_inductor_compiler_option():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    backend = Fairy2iBackend({"mode": "exact", "compiler": "inductor"})
    y = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)
    assert backend.reports[0].counters == {"widely_linear_rewritten": 2}


def test_recompile_with_dynamic_shapes_still_rewrites():
    """A new sequence length makes Dynamo recompile with symbolic sizes; the pass must cope."""
    model = tiny_llama()
    backend = Fairy2iBackend({"mode": "exact"})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for length in (5, 7, 9):
            ids = torch.randint(0, 96, (1, length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-5)
    assert len(backend.reports) == 2  # static first graph, then one dynamic graph for both new lengths
    assert [len(r.converted()) for r in backend.reports] == [15, 15]


# ------------------------------------------------------------------ Dynamo's recompile limit
SWEEP = [{"stages": s, "scale_granularity": g} for s in (1, 2, 3, 4) for g in ("tensor", "row", 4)]  # 12 option sets


def test_option_sweep_past_the_recompile_limit_never_returns_fp_results():
    # Dynamo keeps 8 compiled versions of one function, then runs it uncompiled: outputs equal FP
    from fairy2i_compile.compiler.backend import compile as fairy2i_compile

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    fp = model(x)
    outcomes = []
    with torch.no_grad():
        for options in SWEEP:
            try:
                outcomes.append("fp" if torch.equal(fairy2i_compile(model, {"mode": "ptq", **options})(x), fp)
                                else "quantized")
            except RuntimeError as err:
                assert "recompile limit (8 compiled versions of one function) was reached" in str(err)
                assert "torch._dynamo.reset()" in str(err)
                outcomes.append("error")
    assert outcomes == ["quantized"] * 8 + ["error"] * 4
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # patched per call only
    torch._dynamo.reset()  # what the message says: quantized again
    with torch.no_grad():
        assert not torch.equal(fairy2i_compile(model, {"mode": "ptq", **SWEEP[-1]})(x), fp)


def test_plain_torch_compile_warns_when_a_compile_fills_the_last_slot():
    model, x = nn.Sequential(nn.Linear(8, 8)).eval(), torch.randn(2, 8)
    with torch.no_grad():
        for options in SWEEP[:7]:
            torch.compile(model, backend="fairy2i", options=options)(x)
        with pytest.warns(RuntimeWarning, match="this is compile 8 of the same function .* runs the plain "
                                                "full-precision model"):
            torch.compile(model, backend="fairy2i", options=SWEEP[7])(x)


# ------------------------------------------------------------------ generate
def test_generate_runs_the_compiled_forward():
    from fairy2i_compile.compiler.backend import compile as fairy2i_compile
    from fairy2i_compile.quantization.packed_model import pack_model

    model = tiny_llama().eval()
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    compiled = fairy2i_compile(model, {"mode": "ptq", "stages": 1, "kernel": "torch"})
    with torch.no_grad():
        got = compiled.generate(ids, **greedy)
    assert compiled.fairy2i_backend.reports, "generate never called the backend"
    assert not {"forward", "generate", "fairy2i_backend"} & set(model.__dict__)  # the user's model is as it was
    reference = tiny_llama().eval()
    pack_model(reference, stages=1, kernel="torch")  # the same codes, run eagerly
    with torch.no_grad():
        want = reference.generate(ids, **greedy)
    assert torch.equal(got, want)
