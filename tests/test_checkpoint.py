"""Packed checkpoints: save -> load round trips bit for bit (eager and compiled), atomic saves,
and a clear error naming the tensor / field / path for every kind of bad file."""

import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from fairy2i_compile.compiler.backend import Fairy2iBackend
from fairy2i_compile.checkpoints.checkpoint import (FORMAT, FORMAT_VERSION, is_packed_checkpoint, load_packed,
                                        packed_state_info, save_packed)
from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model

from helpers import tiny_llama

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _compiled_logits(model, kernel):
    torch._dynamo.reset()
    backend = Fairy2iBackend({"mode": "ptq", "kernel": kernel})
    out = _logits(torch.compile(model, backend=backend))
    return out, backend.reports[0]


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, tensors=None, meta=None):
    """Save `src`'s tensors and metadata again, edited: a file that only differs where the test says."""
    m, t = _read(src)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, str(dst), metadata=m)
    return dst


@pytest.fixture(scope="module")
def w2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-w2.safetensors"
    save_packed(tiny_llama().eval(), path, {"stages": 2})
    return path


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_packed_model_round_trip_eager_and_compiled_bit_for_bit(kernel, tmp_path):
    model = tiny_llama().eval()
    pack_model(model, stages=2, kernel=kernel)
    path = tmp_path / "w2.safetensors"
    info = save_packed(model, path)
    assert info["fairy2i"]["stages"] == 2 and len(info["layers"]) == 15 and not info["aliases"]

    loaded = load_packed(path, kernel=kernel)
    assert not loaded.training and type(loaded) is type(model)
    assert not any(isinstance(m, nn.Linear) for m in loaded.modules())
    assert all(m.kernel == kernel for m in loaded.modules() if isinstance(m, PackedLinear))
    _assert_same_state(loaded, model)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)

    want, _ = _compiled_logits(model, kernel)
    got, report = _compiled_logits(loaded, kernel)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # same codes, same kernel: same bits
    assert report.counters["fuse_stages_prepacked"] == 15


@pytest.mark.parametrize("options", [
    {"stages": 2},
    {"stages": 1, "scale_granularity": "row", "skip": ["*.down_proj"]},
    {"stages": 2, "scale_granularity": 8},
])
def test_float_model_with_config_equals_pack_model_of_a_copy(options, tmp_path):
    model = tiny_llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_packed(torch.compile(model), path, options)  # the compile wrapper is unwrapped, nothing compiles

    # the user's model is untouched: still nn.Linear, same values
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    ref = copy.deepcopy(model)
    pack_model(ref, options["stages"], options.get("scale_granularity", "tensor"), options.get("skip", ()),
               kernel="torch")
    loaded = load_packed(path, kernel="torch")
    _assert_same_state(loaded, ref)
    torch.testing.assert_close(_logits(loaded), _logits(ref), atol=0, rtol=0)
    info = packed_state_info(path)
    kept = {f"model.layers.{i}.mlp.down_proj" for i in range(2)} if "skip" in options else set()
    assert set(info["fairy2i"]["kept_real"]) == kept and len(info["layers"]) == 15 - len(kept)


def test_kept_real_tied_lm_head_is_stored_once_and_retied_with_dense_dtype(tmp_path):
    model = tiny_llama().eval()
    path = tmp_path / "w1-fp16.safetensors"
    info = save_packed(model, path, {"stages": 1, "skip": ["lm_head"]}, dense_dtype=torch.float16)
    assert info["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"} and info["dense_dtype"] == "float16"
    _, tensors = _read(path)
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.up_proj.scales"].dtype == torch.float32  # scales stay float32

    loaded = load_packed(path, kernel="torch")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    pack_model(ref, stages=1, skip=["lm_head"], kernel="torch")
    want = ref.state_dict()
    for key, t in loaded.state_dict().items():
        expected = want[key] if key.endswith((".codes", ".scales")) else want[key].to(torch.float16)
        assert t.dtype == expected.dtype and torch.equal(t, expected), key
    assert _logits(loaded).dtype == torch.float16


def test_interrupted_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    from fairy2i_compile.checkpoints import safetensors_io

    path = tmp_path / "w2.safetensors"
    save_packed(tiny_llama().eval(), path, {"stages": 2})
    good = path.read_bytes()
    real_write = safetensors_io.write_safetensors

    def write_half_then_fail(tensors, f, metadata):
        real_write(tensors, f, metadata)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors_io, "write_safetensors", write_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_packed(tiny_llama(seed=1).eval(), path, {"stages": 1})
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["w2.safetensors"]  # no temp file left
    monkeypatch.undo()
    assert packed_state_info(path)["fairy2i"]["stages"] == 2


KILLED_SAVE = """
import os, signal, sys
import safetensors.torch, torch
from fairy2i_compile.checkpoints import safetensors_io
from fairy2i_compile.checkpoints.checkpoint import save_packed

def die(*args, **kwargs):  # the writer is killed after the temp file exists, before it is renamed
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = safetensors_io.write_safetensors = die
torch.manual_seed(0)
save_packed(torch.nn.Sequential(torch.nn.Linear(8, 6)), sys.argv[1], {"stages": 1})
"""


def test_a_killed_save_leaves_no_partial_file_after_the_next_save(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "seq.safetensors"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(os.listdir(tmp_path)) == 1 and not path.exists()  # the killed writer's partial file
    save_packed(nn.Sequential(nn.Linear(8, 6)), path, {"stages": 1})
    assert os.listdir(tmp_path) == ["seq.safetensors"]


def test_save_is_byte_deterministic(tmp_path):
    # safetensors' save_file orders the metadata through a Rust HashMap: other bytes on every call
    model = tiny_llama().eval()
    save_packed(model, tmp_path / "a.safetensors", {"stages": 2})
    save_packed(model, tmp_path / "b.safetensors", {"stages": 2})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    header = json.loads((tmp_path / "a.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "a.safetensors").read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_load_never_quantizes_and_never_materialises_dense_linear_weights(w2_file, monkeypatch):
    from fairy2i_compile.quantization import packed_model
    from fairy2i_compile.compiler.ops import quantize

    def fail(*args, **kwargs):
        raise AssertionError("load_packed must not quantize")

    monkeypatch.setattr(quantize, "pack_layer", fail)
    monkeypatch.setattr(packed_model, "pack_layer", fail)
    created = []
    real_init = nn.Linear.reset_parameters

    def watch(self):  # runs inside nn.Linear.__init__, after the weight is registered
        created.append(self.weight.device.type)
        real_init(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", watch)
    loaded = load_packed(w2_file)
    assert created and set(created) == {"meta"}  # the skeleton's linear weights are initialised on meta only
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_packed_state_info_reads_the_header_only(w2_file):
    info = packed_state_info(w2_file)
    model = load_packed(w2_file)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert info["bytes"]["codes"] == sum(m.codes.numel() * 4 for m in packed)
    assert info["bytes"]["scales"] == sum(m.scales.numel() * 4 for m in packed)
    dense = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                if not k.endswith((".codes", ".scales")))
    assert info["bytes"]["dense"] == dense
    assert info["file_bytes"] == info["bytes"]["tensors"] + info["bytes"]["header"] == os.path.getsize(w2_file)
    assert info["model_class"] == "LlamaForCausalLM" and info["model_config"]["hidden_size"] == 32
    assert info["layers"]["lm_head"] == {"in_features": 32, "out_features": 96, "stages": 2,
                                         "granularity": "tensor", "bias": False,
                                         "dtypes": {"codes": "int32", "scales": "float32", "bias": None}}
    assert is_packed_checkpoint(w2_file)


def test_biased_layers_round_trip(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = True  # q/k/v/o with biases
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / "bias.safetensors"
    info = save_packed(model, path, {"stages": 2}, dense_dtype=torch.bfloat16)
    assert info["layers"]["model.layers.0.self_attn.q_proj"]["dtypes"]["bias"] == "bfloat16"
    loaded = load_packed(path, kernel="torch")
    assert loaded.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert _logits(loaded).dtype == torch.bfloat16


# ------------------------------------------------------------------ bad files
def test_truncated_file_names_the_path(w2_file, tmp_path):
    bad = tmp_path / "half.safetensors"
    data = w2_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_packed(bad)
    assert str(bad) in str(err.value)
    assert not is_packed_checkpoint(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no packed checkpoint at {tmp_path / 'nope.safetensors'}"):
        load_packed(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("field, value, message", [
    ("format_version", "2", "format_version is '2', this fairy2i_compile reads version '1'"),
    ("format", "fairy2i-train", "not a fairy2i packed checkpoint (metadata 'format' is 'fairy2i-train'"),
    ("layers", "{not json", "metadata field 'layers' is not valid JSON"),
])
def test_bad_metadata(w2_file, tmp_path, field, value, message):
    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=lambda m: m.__setitem__(field, value))
    with pytest.raises(ValueError) as err:
        load_packed(bad)
    assert message in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize("key, edit, message", [
    ("model.norm.weight", lambda t: t[:16].clone(),
     "'model.norm.weight' is float32 [16] in the file, expected float32 [32]"),
    ("model.norm.weight", lambda t: t.double(),
     "'model.norm.weight' is float64 [32] in the file, expected float32 [32]"),
    ("lm_head.codes", lambda t: t.long(), "'lm_head.codes' is int64 [4, 48, 1] in the file, expected int32 [4, 48, 1]"),
    ("lm_head.scales", lambda t: t[:2].clone(), "'lm_head.scales' is float32 [2, 2, 1, 1] in the file, "
                                                "expected float32 [4, 2, 1, 1]"),
])
def test_wrong_tensor_shape_or_dtype_names_the_tensor(w2_file, tmp_path, key, edit, message):
    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", tensors=lambda t: t.__setitem__(key, edit(t[key])))
    with pytest.raises(ValueError) as err:
        load_packed(bad)
    assert message in str(err.value), err.value


def test_missing_and_unexpected_tensors_are_named(w2_file, tmp_path):
    def drop(m):
        rec = json.loads(m["tensors"])
        del rec["model.norm.weight"]
        rec["stray.weight"] = "float32"
        m["tensors"] = json.dumps(rec)

    def edit(t):
        del t["model.norm.weight"]
        t["stray.weight"] = torch.zeros(3)

    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", tensors=edit, meta=drop)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['stray.weight'\]"):
        load_packed(bad)
    # a tensor the metadata does not list (an edited file) is caught before the model is built
    bad = _rewrite(w2_file, tmp_path / "bad2.safetensors", tensors=lambda t: t.__setitem__("x", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"does not list the file's tensors: not listed \['x'\]"):
        load_packed(bad)


def test_expected_config_mismatch_lists_the_fields(w2_file):
    from transformers import LlamaConfig

    other = tiny_llama(layers=3).config
    other.hidden_size = 64
    with pytest.raises(ValueError) as err:
        load_packed(w2_file, expected_config=other)
    msg = str(err.value)
    assert "hidden_size: checkpoint 32, expected 64" in msg and "num_hidden_layers: checkpoint 2, expected 3" in msg
    assert "vocab_size" not in msg and str(w2_file) in msg
    with pytest.raises(ValueError, match="vocab_size: checkpoint 96, expected 100"):
        load_packed(w2_file, expected_config={"vocab_size": 100})
    with pytest.raises(ValueError, match="model_type: checkpoint 'llama', expected 'gpt2'"):
        load_packed(w2_file, expected_config={"model_type": "gpt2"})
    assert isinstance(load_packed(w2_file, expected_config=tiny_llama().config), nn.Module)
    assert isinstance(load_packed(w2_file, expected_config=LlamaConfig(**tiny_llama().config.to_dict())), nn.Module)


def test_layer_that_does_not_fit_the_config(w2_file, tmp_path):
    def grow(m):
        layers = json.loads(m["layers"])
        layers["lm_head"]["in_features"] = 64
        m["layers"] = json.dumps(layers)

    # layer metadata that does not fit its own codes: caught from the header, before any model is built
    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=grow)
    with pytest.raises(ValueError, match=r"tensor 'lm_head.codes' is int32 \[4, 48, 1\] in the file, expected int32 "
                                         r"\[4, 48, 2\] for layer 'lm_head' \(in=64, out=96, stages=2, "
                                         r"granularity='tensor'\)"):
        load_packed(bad)
    # metadata and codes agree with each other but not with the model the config builds
    bad = _rewrite(w2_file, tmp_path / "bad2.safetensors", meta=grow,
                   tensors=lambda t: t.__setitem__("lm_head.codes", torch.zeros(4, 48, 2, dtype=torch.int32)))
    with pytest.raises(ValueError, match="packed layer 'lm_head' is in=64, out=96, bias=False in the checkpoint "
                                         "but in=32, out=96, bias=False in LlamaForCausalLM"):
        load_packed(bad)


# ------------------------------------------------------------------ forged files
def _forge_config(**fields):
    """Edit the stored config and record a matching digest: only the checks against the tensors can object."""
    def edit(m):
        config = json.loads(m["model_config"])
        config.update(fields)
        m["model_config"] = json.dumps(config)
        _resign(m)
    return edit


def _resign(m):
    import hashlib

    m["config_sha256"] = hashlib.sha256(f"{m['model_class']}\n{m['model_config']}".encode()).hexdigest()


@pytest.fixture
def no_model_built(monkeypatch):
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("load_packed built a model from a config the header contradicts")

    monkeypatch.setattr(PreTrainedModel, "_from_config", classmethod(refuse))


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 10**9}, "claims vocab_size=1000000000, hidden_size=32, but the file holds no [1000000000, 32] "
                            "embedding"),
    ({"hidden_size": 4096}, "claims vocab_size=96, hidden_size=4096, but the file holds no [96, 4096] embedding"),
    ({"num_hidden_layers": 2000}, "claims num_hidden_layers=2000, but the file's tensors hold 2 blocks"),
])
def test_forged_config_is_refused_before_any_model_is_built(w2_file, tmp_path, no_model_built, fields, message):
    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=_forge_config(**fields))
    with pytest.raises(ValueError) as err:
        load_packed(bad)
    assert message in str(err.value) and str(bad) in str(err.value)


def test_forged_size_the_header_cannot_show_is_refused_before_allocating(w2_file, tmp_path):
    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=_forge_config(intermediate_size=10**9))
    with pytest.raises(ValueError, match=r"asks for a tensor of 32,000,000,000 elements \(\[1000000000, 32\]\), "
                                         r"more than any tensor the file can fill"):
        load_packed(bad)


@pytest.mark.parametrize("model_class, message", [
    ("GPT2LMHeadModel", "model_class 'GPT2LMHeadModel' is not a transformers model class for model_type 'llama'"),
    ("AutoModel", "model_class 'AutoModel' is not a transformers model class for model_type 'llama'"),
    ("os", "model_class 'os' is not a transformers model class"),
])
def test_model_class_must_be_registered_for_the_config(w2_file, tmp_path, model_class, message):
    def edit(m):
        m["model_class"] = model_class
        _resign(m)

    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_packed(bad)


def test_config_fields_that_only_change_arithmetic_are_covered_by_the_digest(w2_file, tmp_path):
    def eps(m):
        config = json.loads(m["model_config"])
        config["rms_norm_eps"] = 0.5
        m["model_config"] = json.dumps(config)

    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", meta=eps)
    with pytest.raises(ValueError, match="do not match their recorded digest 'config_sha256'"):
        load_packed(bad)
    bad = _rewrite(w2_file, tmp_path / "bad2.safetensors", meta=lambda m: m.pop("config_sha256"))
    with pytest.raises(ValueError, match="'config_sha256' is missing"):
        load_packed(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_refused_by_name(w2_file, tmp_path, value):
    def poison(t):
        t["model.layers.1.mlp.up_proj.scales"][0, 0, 0, 0] = value

    bad = _rewrite(w2_file, tmp_path / "bad.safetensors", tensors=poison)
    with pytest.raises(ValueError, match=r"tensors \['model.layers.1.mlp.up_proj.scales'\] hold non-finite scales"):
        load_packed(bad)


# ------------------------------------------------------------------ bad arguments
def test_save_argument_errors(tmp_path):
    model = tiny_llama().eval()
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="no PackedLinear layers and no config"):
        save_packed(model, path)
    with pytest.raises(ValueError, match="option 'stages' must be in 1..4"):
        save_packed(model, path, {"stages": 7})
    with pytest.raises(ValueError, match="mode='exact'"):
        save_packed(model, path, {"mode": "exact"})
    with pytest.raises(ValueError, match="method='binary'"):
        save_packed(model, path, {"method": "binary"})
    with pytest.raises(TypeError, match="dense_dtype must be a floating torch.dtype"):
        save_packed(model, path, {"stages": 2}, dense_dtype=torch.int8)
    with pytest.raises(TypeError, match="needs an nn.Module"):
        save_packed("model", path, {"stages": 2})
    with pytest.raises(ValueError, match="is a folder"):
        save_packed(model, tmp_path, {"stages": 2})
    pack_model(model, stages=1)
    with pytest.raises(ValueError, match="already packed"):
        save_packed(model, path, {"stages": 1})
    assert not path.exists()


def test_load_argument_errors_and_non_transformers_models(w2_file, tmp_path):
    with pytest.raises(ValueError, match="option 'kernel' must be one of"):
        load_packed(w2_file, kernel="fast")
    seq = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    path = tmp_path / "seq.safetensors"
    info = save_packed(seq, path, {"stages": 1})
    assert list(info["layers"]) == ["0", "2"] and info["model_class"] is None
    with pytest.raises(ValueError, match="holds no transformers config"):
        load_packed(path)
    assert FORMAT == "fairy2i-packed" and FORMAT_VERSION == "1"
