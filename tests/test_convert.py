"""Streaming conversion of a Hugging Face folder (convert.py) against save_packed of the loaded model."""

import pytest
import torch

from fairy2i_compile.checkpoints.checkpoint import load_packed, save_packed
from fairy2i_compile.checkpoints.convert import ShardReader, convert_folder

from helpers import tiny_llama


def _folder(tmp_path, dtype=torch.float32, tie=True, shard="20KB"):
    model = tiny_llama(seed=3, dtype=dtype)
    if not tie:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    folder = tmp_path / f"hf-{dtype}-{tie}"
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _dense_path(folder, out, config, dense_dtype=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    save_packed(model, out, config, dense_dtype=dense_dtype, extra={"source": "x"})


@pytest.mark.parametrize("case", [
    dict(config={"stages": 2}),
    dict(config={"stages": 3, "scale_granularity": "row", "skip": ["lm_head"]}, dense_dtype=torch.float16),
    dict(config={"stages": 1, "scale_granularity": 8}, dtype=torch.bfloat16, tie=False),
])
def test_same_bytes_as_save_packed(tmp_path, case):
    folder = _folder(tmp_path, case.get("dtype", torch.float32), case.get("tie", True))
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded
    want, got = tmp_path / "dense.safetensors", tmp_path / "stream.safetensors"
    _dense_path(folder, want, case["config"], case.get("dense_dtype"))
    convert_folder(folder, got, case["config"], dense_dtype=case.get("dense_dtype"), extra={"source": "x"})
    assert got.read_bytes() == want.read_bytes()
    model = load_packed(got)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_codes_go_straight_to_the_file(tmp_path, monkeypatch):
    # no layer's codes are held in memory: the packer writes them into the output file (and
    # reads the earlier stages back from it); a tensor of a layer's codes is never made
    from fairy2i_compile.quantization import chunked

    def no_codes_tensor(*args, **kwargs):
        raise AssertionError("convert_folder made a tensor of a layer's codes")

    folder = _folder(tmp_path)
    want, got = tmp_path / "dense.safetensors", tmp_path / "stream.safetensors"
    _dense_path(folder, want, {"stages": 3})
    monkeypatch.setattr(chunked, "_TensorSink", no_codes_tensor)
    convert_folder(folder, got, {"stages": 3}, extra={"source": "x"})
    assert got.read_bytes() == want.read_bytes()


def test_shard_reader_rows(tmp_path):
    folder = _folder(tmp_path)
    from safetensors.torch import load_file

    reader = ShardReader(folder)
    full = {}
    for f in folder.glob("*.safetensors"):
        full.update(load_file(str(f)))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(reader.rows(key, 3, 9), full[key][3:9])
    assert torch.equal(reader.rows("model.norm.weight", 0, 32), full["model.norm.weight"])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        convert_folder(tmp_path, tmp_path / "x.safetensors", {"stages": 2})
    folder = _folder(tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        convert_folder(folder, tmp_path / "x.safetensors", {"stages": 2})


def test_cli_quantize_folder_streams(tmp_path, monkeypatch):
    from fairy2i_compile import cli

    folder = _folder(tmp_path)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the dense model was loaded"))
    out = tmp_path / "w2.safetensors"
    assert cli.main(["quantize", "--model", str(folder), "--stages", "2", "--out", str(out), "--no-progress"]) == 0
    want = tmp_path / "dense.safetensors"
    _dense_path(folder, want, {"stages": 2, "skip": []})
    from fairy2i_compile.checkpoints.checkpoint import packed_state_info

    info = packed_state_info(out)
    assert info["extra"]["source"] == str(folder.resolve())
    assert info["bytes"]["tensors"] == packed_state_info(want)["bytes"]["tensors"]
    a, b = load_packed(out), load_packed(want)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_tied_folder_that_also_stores_lm_head(tmp_path):
    # config ties lm_head to the embedding but the shards hold a (different) lm_head.weight too:
    # from_pretrained then unties them (each from its own key), and so does the streaming conversion
    from safetensors.torch import save_file

    folder = _folder(tmp_path, shard="10GB")
    (file,) = folder.glob("*.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(file), metadata={"format": "pt"})
    for config in ({"stages": 2}, {"stages": 2, "skip": ["lm_head"]}):
        want, got = tmp_path / "dense.safetensors", tmp_path / "stream.safetensors"
        _dense_path(folder, want, config)
        convert_folder(folder, got, config, extra={"source": "x"})
        assert got.read_bytes() == want.read_bytes()
