"""passes/gqa_attention.py: CPU flash attention reads the un-repeated key/value heads.

The law (Hypothesis, over batch, key/value heads, group size, lengths, head dim, float32 and
bfloat16, with and without a mask): the rewritten graph's output equals the original's (atol = 0, the same
kernel reading the same numbers), and the head copies are gone. Negative cases: equal head
counts, heads repeated in the other order (not what GQA means), a key not made by the
pattern. In the backend: a decode step through a StaticCache (transformers' repeat_kv path)
is rewritten in both runners and gives the same logits as without the pass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from fairy2i_compile import Fairy2iBackend
from fairy2i_compile.compiler import backend as backend_mod
from fairy2i_compile.compiler.passes import INFERENCE_PIPELINE
from fairy2i_compile.compiler.passes.gqa_attention import gqa_attention

from helpers import tiny_llama

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _attention(n: int, order: str = "gqa", masked: bool = True):
    """q [B, Hkv*n, L, D], k/v [B, Hkv, S, D] -> repeat_kv (dim 2: GQA order) or the other order, flash."""
    def f(q, k, v, mask):
        b, hkv, s, d = k.shape
        if order == "gqa":
            k9 = k[:, :, None].expand(b, hkv, n, s, d).reshape(b, hkv * n, s, d)
            v9 = v[:, :, None].expand(b, hkv, n, s, d).reshape(b, hkv * n, s, d)
        else:  # head r*Hkv + kv: repeat, not repeat_interleave
            k9 = k[:, None].expand(b, n, hkv, s, d).reshape(b, hkv * n, s, d)
            v9 = v[:, None].expand(b, n, hkv, s, d).reshape(b, hkv * n, s, d)
        return FLASH(q, k9, v9, attn_mask=mask if masked else None, scale=0.25)[0]
    return f


def _inputs(b, hkv, n, length, s, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * n, length, d, generator=g)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    mask = torch.randn(b, 1, length, s, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, mask))


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), n=st.integers(2, 4), length=st.integers(1, 5),
       s=st.integers(1, 19), d=st.sampled_from([4, 8, 16]), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_rewritten_attention_equals_the_copying_one(b, hkv, n, length, s, d, masked, dtype):
    args = _inputs(b, hkv, n, length, s, d, dtype=dtype)
    gm = make_fx(_attention(n, masked=masked), tracing_mode="fake")(*args)
    want = gm(*args)
    assert torch.ops.aten.expand.default in _ops(gm)
    assert gqa_attention(gm) == 1
    assert torch.ops.aten.expand.default not in _ops(gm) and torch.ops.aten.clone.default not in _ops(gm)
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["equal_heads", "other_order", "plain_keys"])
def test_what_is_left_alone(case):
    if case == "plain_keys":
        def f(q, k, v, mask):
            return FLASH(q, k, v, attn_mask=mask, scale=0.25)[0]
        args = _inputs(1, 4, 1, 3, 7, 8)
    else:
        n = 1 if case == "equal_heads" else 2
        f = _attention(n, order="gqa" if case == "equal_heads" else "other")
        args = _inputs(1, 2, n, 3, 7, 8)
    gm = make_fx(f, tracing_mode="fake")(*args)
    before = gm.code
    assert gqa_attention(gm) == 0
    assert gm.code == before


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_decode_step_through_a_static_cache(monkeypatch, compiler):
    """tiny Llama (4 query, 2 key/value heads), PTQ W2: the decode step's attention (masked:
    transformers repeats the heads) is rewritten in each block; logits equal those without the pass."""
    from transformers import StaticCache

    model = tiny_llama(layers=2).eval()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))

    def run(pipeline):
        monkeypatch.setattr(backend_mod, "INFERENCE_PIPELINE", pipeline)
        torch._dynamo.reset()
        backend = Fairy2iBackend({"compiler": compiler})
        fwd = torch.compile(model, backend=backend)
        cache = StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(5), use_cache=True)
            out = fwd(input_ids=ids[:, :1], past_key_values=cache, cache_position=torch.tensor([5]), use_cache=True)
        return out.logits, backend.reports

    want, _ = run([p for p in INFERENCE_PIPELINE if p.name != "gqa_attention"])
    got, reports = run(INFERENCE_PIPELINE)
    assert reports[-1].counters.get("gqa_attention") == 2  # the decode graph: one per block
    torch.testing.assert_close(got, want, rtol=0, atol=0)
