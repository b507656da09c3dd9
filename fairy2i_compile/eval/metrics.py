"""Perplexity over fixed windows and lm-eval-style zero-shot multiple-choice accuracy.

Perplexity. Each window x of length L is scored on its own (no carried-over context):

    nll = -1/(W (L-1)) * sum_w sum_{t=1}^{L-1} log p(x_w[t] | x_w[<t]),   ppl = exp(nll)

log-softmax runs in fp32 (whatever the logits' dtype); per-token terms are summed in fp64
so the mean does not depend on how windows are batched.

Multiple choice (as lm-evaluation-harness's ``loglikelihood``). Request (context, cont)
is encoded as ``prefix + encode(context) + encode(cont)``, after moving the context's
trailing spaces to the front of cont, so a BPE merge across the boundary cannot change
which tokens are scored (lm-eval 0.3 did this; 0.4 encodes the whole string and slices).
``prefix`` is what the tokenizer's template prepends (``special_prefix``: ``<bos>`` or
nothing), the same as opens every perplexity window. The model sees
``(ctx_ids + cont_ids)[-(max_length+1):][:-1]``, left-truncated after the prefix (which a
model expecting BOS needs at position 0; lm-eval would cut it off too), and

    ll = sum_j log p(cont_ids[j] | ctx_ids, cont_ids[<j]),
    acc = [argmax_i ll_i == gold],   acc_norm = [argmax_i ll_i / len(choice_i) == gold]

with len in characters of the choice text (lm-eval's ``acc_norm``). Requests are sorted
longest first and batched with right padding: under a causal mask real tokens never
attend to the padding after them, so no attention mask is passed, and only the
continuation positions are read from the logits.

Models: ``model(input_ids)`` with input_ids [B, L] int64 on the model's device, returning
logits [B, L, V] or an object with ``.logits`` (Hugging Face). Put the model in eval mode
first: these functions do not change its mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import (
    TASKS,
    MCExample,
    encode_text,
    load_task,
    prefix_text,
    require,
    special_prefix,
    token_windows,
    wiki_tokens,
)

__all__ = ["evaluate", "perplexity", "score_multiple_choice"]


def _tqdm(iterable: Iterable, total: int, desc: str, progress: bool):
    tqdm = require("tqdm.auto", "pip install tqdm").tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=False)


def _device(model: Any, fallback: torch.device) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a plain callable, or a module without weights
        return fallback


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            f"model(input_ids) must return logits [B, L, V] or an object with .logits, got {type(out).__name__}"
        )
    return logits


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` over ``windows`` [W, L] (see the module docstring).

    Returns {"ppl", "nll" (mean per token, nats), "tokens" (W*(L-1) scored), "windows", "seq_len"}.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [W, L] with L >= 2, got {tuple(windows.shape)=}; see token_windows")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size=}")
    n_windows, seq_len = windows.shape
    device = _device(model, windows.device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = range(0, n_windows, batch_size)
    for i in _tqdm(starts, len(starts), "perplexity", progress):
        x = windows[i : i + batch_size].to(device)  # [B, L]
        logits = _logits(model(x))  # [B, L, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
        total += nll.double().sum()
    n_tokens = n_windows * (seq_len - 1)
    mean = total.item() / n_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": n_tokens, "windows": n_windows, "seq_len": seq_len}


def _encode_pair(
    tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = [int(i) for i in prefix] + encode_text(tokenizer, context)
    if not ctx:  # lm-eval conditions an empty context on the end-of-text token (a prefix already does)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"empty context for {continuation!r} and the tokenizer has no eos_token_id to stand in")
        ctx = [eos]
    cont = encode_text(tokenizer, continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


@torch.no_grad()
def _loglikelihoods(
    model: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    max_length: int,
    progress: bool,
    keep: int = 0,
) -> list[float]:
    """Summed log p(cont | ctx) per (ctx_ids, cont_ids) request, in request order.

    Left truncation to ``max_length`` inputs keeps the first ``keep`` ids of every context
    (the prefix) and cuts the tokens after them.
    """
    inputs = []
    for ctx, cont in requests:
        if len(cont) > max_length + 1 - max(keep, 1):
            raise ValueError(
                f"a continuation of {len(cont)} tokens does not fit {max_length=} after a {keep}-token prefix; "
                f"raise max_length"
            )
        seq = ctx + cont
        if len(seq) > max_length + 1:
            seq = seq[:keep] + seq[len(seq) - (max_length + 1 - keep) :]
        inputs.append(seq[:-1])
    order = sorted(range(len(requests)), key=lambda r: -len(inputs[r]))  # longest first: less padding
    pad = 0  # any valid id: right padding is never attended to (see the module docstring)
    device = _device(model, torch.device("cpu"))
    out = [0.0] * len(requests)
    starts = range(0, len(order), batch_size)
    for s in _tqdm(starts, len(starts), "loglikelihood", progress):
        idx = order[s : s + batch_size]
        width = len(inputs[idx[0]])
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        for row, r in enumerate(idx):
            x[row, : len(inputs[r])] = torch.tensor(inputs[r])
        logits = _logits(model(x.to(device)))  # [B, width, V]
        for row, r in enumerate(idx):
            cont = requests[r][1]
            end = len(inputs[r])
            logp = F.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)  # [len(cont), V]
            target = torch.tensor(cont, device=logp.device).unsqueeze(-1)
            out[r] = logp.gather(-1, target).double().sum().item()
    return out


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    examples: Sequence[MCExample],
    batch_size: int = 8,
    progress: bool = True,
    max_length: int = 1024,
    prefix: Sequence[int] | None = None,
) -> dict:
    """Zero-shot accuracy of ``model`` on ``examples`` (see the module docstring).

    The tokenizer needs ``encode(text, add_special_tokens=...)`` (or ``__call__`` returning
    ``{"input_ids": ...}``) and, only for an empty context without a prefix, ``eos_token_id``.
    ``prefix`` (ids opening every context) defaults to ``special_prefix(tokenizer)``.
    Returns {"acc", "acc_norm", "n"}.
    """
    if not examples:
        raise ValueError("no examples to score")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size=}, {max_length=}")
    if prefix is None:
        prefix = special_prefix(tokenizer)
    requests, owner = [], []
    for i, ex in enumerate(examples):
        for ctx, cont in ex.requests():
            requests.append(_encode_pair(tokenizer, ctx, cont, prefix))
            owner.append(i)
    lls = _loglikelihoods(model, requests, batch_size, max_length, progress, keep=len(prefix))
    per_example: list[list[float]] = [[] for _ in examples]
    for i, ll in zip(owner, lls):
        per_example[i].append(ll)
    correct = correct_norm = 0
    for ex, ll in zip(examples, per_example):
        norm = [v / max(len(c), 1) for v, c in zip(ll, ex.choices)]
        correct += _argmax(ll) == ex.gold
        correct_norm += _argmax(norm) == ex.gold
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of ties, like np.argmax


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = ("arc_easy", "piqa"),
    limit: int | None = None,
    ppl_seq_len: int = 2048,
    ppl_windows: int | None = 4,
    batch_size: int = 8,
    progress: bool = True,
    prefix: Sequence[int] | None = None,
) -> dict:
    """Wiki perplexity on the first ``ppl_windows`` windows (all when None, skipped when 0)
    and zero-shot accuracy on the first ``limit`` records of each task.

    Every window and context opens with ``prefix``, by default what the tokenizer's template
    prepends (``special_prefix``). Returns JSON-able {"perplexity": {...} | None, "tasks":
    {name: {"acc", "acc_norm", "n"}}, "prepended": "<bos>" | None, "prepended_ids": [...]}.
    ``batch_size`` applies to the task requests; perplexity windows go one at a time (the
    result does not depend on it, and [B, 2048, V] fp32 logits are GBs for a 150k vocab).
    """
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    prefix = special_prefix(tokenizer) if prefix is None else [int(i) for i in prefix]
    result: dict[str, Any] = {
        "perplexity": None,
        "tasks": {},
        "prepended": prefix_text(tokenizer, prefix),
        "prepended_ids": prefix,
    }
    if ppl_windows != 0:
        windows = token_windows(wiki_tokens(tokenizer), ppl_seq_len, ppl_windows, prefix=prefix)
        result["perplexity"] = perplexity(model, windows, batch_size=1, progress=progress)
    for name in tasks:
        examples = load_task(name, limit)
        result["tasks"][name] = score_multiple_choice(
            model, tokenizer, examples, batch_size=batch_size, progress=progress, prefix=prefix
        )
    return result
