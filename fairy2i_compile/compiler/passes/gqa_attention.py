"""grouped-query attention: drop the key/value head copies before CPU attention   [inference graphs, after AOTAutograd]

Runs last on AOTAutograd's inference graph (both runners). A model with fewer key/value heads
than query heads (SmolLM2-135M: 3 and 9; Llama 3, Qwen, Mistral) repeats each key/value head
for the query heads that share it before attention. transformers does it with `repeat_kv`
whenever an attention mask is passed, which is every decode step through a StaticCache, and
AOTAutograd traces it as a copy of the whole cache:

    k9 = aten._unsafe_view(aten.clone(aten.expand(aten.unsqueeze(k3, 2), [B, Hkv, n, S, D])), [B, Hkv*n, S, D])
    v9 = (the same for v3)
    out = aten._scaled_dot_product_flash_attention_for_cpu(q, k9, v9, ...)
        ->  out = aten._scaled_dot_product_flash_attention_for_cpu(q, k3, v3, ...)

PyTorch's CPU flash-attention kernel reads the key/value head `h // n` for query head `h` when
the key/value tensors have fewer heads (what `scaled_dot_product_attention(..., enable_gqa=True)`
calls on CPU), which is the head `repeat_kv` puts at `h`: the same numbers without the copy.
Per decode step and layer the copy writes n·S·D·4 bytes twice (SmolLM2, a 2048-token cache:
9.4 MB a layer, 283 MB a token); at a 192-token cache it was 0.7 of 18.9 ms a step on a
2-core EPYC. The copies disappear from the graph when attention was their only reader.

Only the CPU flash op (the CUDA kernels take the GQA path only without a mask, and fall back
to the math kernel with one). Counter: gqa_attention (attention calls rewritten). Negative
cases (tested): equal head counts, a copy that repeats heads in another order (expand on
another dimension), a key not made by the pattern.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from . import counted_pass
from ._fx import fake_value

__all__ = ["PASS", "gqa_attention"]

_aten = torch.ops.aten
_FLASH_CPU = _aten._scaled_dot_product_flash_attention_for_cpu.default


def _repeated_heads(node: object) -> Optional[tuple]:
    """(the un-repeated [B, Hkv, S, D] node, n) when `node` is repeat_kv's copy of it, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (_aten._unsafe_view.default, _aten.view.default, _aten.reshape.default)):
        return None
    clone = node.args[0]
    if isinstance(clone, fx.Node) and clone.op == "call_function" and clone.target is _aten.clone.default:
        expand = clone.args[0]
    else:
        expand = clone
    if not (isinstance(expand, fx.Node) and expand.op == "call_function" and expand.target is _aten.expand.default):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.op == "call_function" and unsq.target is _aten.unsqueeze.default
            and unsq.args[1] == 2):
        return None
    src, out = fake_value(unsq.args[0]), fake_value(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() == 4 and out.dim() == 4):
        return None
    b, hkv, s, d = src.shape
    if out.shape[0] != b or out.shape[2:] != src.shape[2:] or out.shape[1] % hkv:
        return None
    n = out.shape[1] // hkv
    if list(expand.args[1]) != [b, hkv, n, s, d]:
        return None
    return unsq.args[0], n


def gqa_attention(gm: fx.GraphModule) -> int:
    """Point CPU flash attention at the un-repeated keys/values (in place); returns the calls rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _FLASH_CPU or len(node.args) < 3:
            continue
        q = fake_value(node.args[0])
        k, v = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] == 1 or not isinstance(q, torch.Tensor):
            continue
        if q.shape[1] != fake_value(node.args[1]).shape[1]:
            continue
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return rewritten


PASS = counted_pass("gqa_attention", "gqa_attention", gqa_attention)
