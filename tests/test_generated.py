"""Self-generated training text (training/generated.py): LLM-QAT's sampling recipe, its cache, mixing."""

import pytest
import torch

from fairy2i_compile.training import generated as gen
from fairy2i_compile.training.generated import generate_windows, mix_windows
from helpers import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=4).eval()


def run(model, tmp_path, n=6, L=12, **kw):
    return generate_windows(model, n, L, cache_dir=tmp_path, progress=False, **kw)


def test_windows_have_the_shape_range_and_no_end_of_sequence(model, tmp_path):
    w = run(model, tmp_path, n=7, L=12, batch_size=3)
    assert w.dtype == torch.long and w.shape == (7, 12)
    assert int(w.min()) >= 0 and int(w.max()) < 96
    special = {model.config.bos_token_id, model.config.eos_token_id}
    assert not any(int(t) in special for t in w.flatten())  # first tokens skip them, min_new_tokens masks eos


def test_seeded_and_independent_of_the_batch_order(model, tmp_path):
    a = run(model, tmp_path / "a", n=6, batch_size=2, seed=5)
    b = run(model, tmp_path / "b", n=2, batch_size=2, seed=5)  # batch 0 alone
    c = run(model, tmp_path / "c", n=6, batch_size=2, seed=6)
    assert torch.equal(a[:2], b)
    assert not torch.equal(a, c)


def test_first_tokens_come_from_the_pool_and_the_opening_is_greedy(model, tmp_path):
    pool = torch.tensor([5, 7, 7, 7])
    w = run(model, tmp_path, n=8, L=10, first_tokens=pool, greedy_tokens=3)
    assert set(w[:, 0].tolist()) <= {5, 7}
    with torch.no_grad():
        for k in range(1, 4):  # tokens 1..3: the model's argmax after the prefix
            want = model(w[:, :k]).logits[:, -1].argmax(-1)
            assert torch.equal(w[:, k], want), k


def test_top_k_one_sampling_is_the_models_greedy_decode(model, tmp_path):
    w = run(model, tmp_path, n=4, L=9, greedy_tokens=0, top_k=1)
    want = model.generate(w[:, :1], attention_mask=torch.ones_like(w[:, :1]), do_sample=False, max_new_tokens=8,
                          min_new_tokens=8, pad_token_id=0)
    assert torch.equal(w, want)


def test_sampling_follows_the_temperature(model, tmp_path):
    """A low temperature concentrates the samples on the argmax: the share of sampled tokens equal
    to the model's argmax rises as the temperature falls (a law of softmax sampling, on 64 windows)."""
    def greedy_share(t):
        w = run(model, tmp_path / str(t), n=64, L=8, greedy_tokens=0, temperature=t, batch_size=64)
        with torch.no_grad():
            arg = model(w).logits[:, :-1].argmax(-1)
        return (arg == w[:, 1:]).float().mean().item()

    hot, cold = greedy_share(3.0), greedy_share(0.05)
    assert cold > 0.9 and hot < cold - 0.3, (hot, cold)


def test_cache_reads_back_and_is_keyed_by_every_setting(model, tmp_path, monkeypatch):
    first = run(model, tmp_path, seed=1)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1

    def no_generation(*a, **k):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(type(model), "generate", no_generation)
    assert torch.equal(run(model, tmp_path, seed=1), first)
    monkeypatch.undo()
    run(model, tmp_path, seed=2)
    run(model, tmp_path, seed=1, temperature=0.5)
    assert len(list(tmp_path.iterdir())) == 3
    other = tiny_llama(seed=5).eval()  # other weights: another key
    run(other, tmp_path, seed=1)
    assert len(list(tmp_path.iterdir())) == 4
    assert gen.model_fingerprint(other) != gen.model_fingerprint(model)


def test_a_broken_cache_entry_is_regenerated_not_trusted(model, tmp_path, monkeypatch):
    first = run(model, tmp_path, seed=3)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(UserWarning, match="ignoring the cached windows"):
        again = run(model, tmp_path, seed=3)
    assert torch.equal(again, first)
    def no_generation(*a, **k):
        raise AssertionError("the entry was rewritten whole: it must be read, not generated")

    monkeypatch.setattr(type(model), "generate", no_generation)
    assert torch.equal(run(model, tmp_path, seed=3), first)


def test_use_cache_false_writes_nothing(model, tmp_path):
    run(model, tmp_path, use_cache=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"n_windows": 0}, r"n_windows must be an int >= 1"),
    ({"seq_len": 1}, r"seq_len must be an int >= 2"),
    ({"greedy_tokens": 12}, r"greedy_tokens=12 leaves no sampled token in a window of 12"),
    ({"temperature": 0.0}, r"temperature must be a finite number > 0"),
    ({"top_k": 0}, r"top_k must be an int >= 1"),
    ({"batch_size": 2.5}, r"batch_size must be an int >= 1"),
    ({"first_tokens": torch.tensor([3, 96])}, r"first_tokens has token ids in \[3, 96\], outside the model's "
                                               r"vocabulary \[0, 96\)"),
    ({"first_tokens": torch.tensor([[3]])}, r"first_tokens must be a non-empty 1-D integer tensor"),
    ({"first_tokens": torch.tensor([1.0])}, r"first_tokens must be a non-empty 1-D integer tensor"),
])
def test_bad_arguments_name_the_value_and_the_fix(model, tmp_path, kwargs, match):
    args = {"n_windows": 2, "seq_len": 12, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_windows(model, args.pop("n_windows"), args.pop("seq_len"), cache_dir=tmp_path, progress=False,
                         **args)
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_generate_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"needs a transformers causal LM with \.generate\(\), got Linear"):
        generate_windows(torch.nn.Linear(2, 2), 1, 4, cache_dir=tmp_path)


def test_mix_windows_joins_same_length_sources_and_names_a_mismatch():
    a, b = torch.randint(0, 9, (3, 5)), torch.randint(0, 9, (2, 5), dtype=torch.int32)
    mixed = mix_windows(a, b)
    assert mixed.dtype == torch.long and torch.equal(mixed, torch.cat([a, b.long()]))
    with pytest.raises(ValueError, match=r"window lengths \[5, 4\]; cut them to one length"):
        mix_windows(a, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"source 1 must be an integer tensor \[W, L\] of token ids"):
        mix_windows(a, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least one"):
        mix_windows()
