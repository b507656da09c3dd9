"""Training text the float model writes itself (data-free distillation, as in LLM-QAT).

    from fairy2i_compile.training.generated import generate_windows, mix_windows
    gen = generate_windows(teacher, 256, 512, first_tokens=train_tokens)     # [256, 512] token ids, cached
    windows = mix_windows(enwiki_train_windows, gen)                          # what train_qat / distill take

A quantized student distilled to its float teacher learns the teacher's distribution best on
text that distribution produces: the teacher's own samples cover what it puts probability on,
where a fixed corpus (the 620k-token enwiki sample here) covers one domain and runs out. LLM-QAT
(Liu et al., 2023, "data-free" QAT) generates its training text this way:

  * the first token of each sequence is drawn at random (here uniformly from ``first_tokens``:
    the whole vocabulary by default, or a pool such as a real token stream, which makes the draw
    follow that text's token frequencies);
  * the next ``greedy_tokens`` (default 3) are the teacher's argmax, which gives each sequence a
    plausible opening;
  * the rest is sampled from the teacher's softmax at ``temperature`` (optionally top-k), so the
    text spreads over what the model can say instead of repeating its likeliest phrase.

Generation runs through transformers' ``generate`` (its KV cache, its logits processors) in
batches of ``batch_size``; the end-of-sequence token is masked until the window is full
(``min_new_tokens``), so every window has exactly ``seq_len`` tokens. Batch b draws its first
tokens and samples with its own generator seed (``seed`` + b), so the windows do not depend on
the batch order and a run is reproducible on the same device and software.

The result is cached as safetensors under ``cache_dir`` (default: the package cache,
``cache.default_cache_dir()/generated``), keyed by a SHA-256 of the model's parameters and
buffers and by every generation setting; a cache file that does not read back as the expected
tensor is regenerated, never trusted. Generated windows never contain the evaluation text (they
are the model's samples), and ``mix_windows`` joins them with real training windows of the same
length (those come from ``calibration_windows(..., avoid=...)``, which keeps the evaluation
windows out).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..quantization.calibration.driver import check_token_range, model_vocab_size
from .train import check_int, check_token_windows

__all__ = ["generate_windows", "mix_windows", "model_fingerprint"]

PathLike = Union[str, os.PathLike]
CACHE_FORMAT = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's class, parameter and buffer names, dtypes, shapes and bytes."""
    h = hashlib.sha256(type(model).__name__.encode())
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _vocab_size(model: nn.Module) -> int:
    vocab = model_vocab_size(model)
    if vocab is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input (get_input_embeddings): "
                         f"generate_windows needs a transformers causal LM")
    return vocab


def _special_ids(model: nn.Module) -> set:
    ids = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(cfg, key, None)
            for i in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(i, int):
                    ids.add(i)
    return ids


def _first_token_pool(model: nn.Module, first_tokens: Optional[Tensor], vocab: int) -> Tensor:
    if first_tokens is None:
        special = _special_ids(model)
        pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    else:
        if not isinstance(first_tokens, Tensor) or first_tokens.is_floating_point() or first_tokens.is_complex() \
                or first_tokens.dtype == torch.bool or first_tokens.dim() != 1 or first_tokens.numel() == 0:
            got = (f"{first_tokens.dtype} tensor of shape {tuple(first_tokens.shape)}"
                   if isinstance(first_tokens, Tensor) else type(first_tokens).__name__)
            raise ValueError(f"generate_windows: first_tokens must be a non-empty 1-D integer tensor of token ids "
                             f"(e.g. a training token stream), got {got}")
        pool = first_tokens.detach().cpu().long()
        check_token_range(pool, "generate_windows: first_tokens", vocab)
    if pool.numel() == 0:
        raise ValueError(f"generate_windows: every one of the {vocab} token ids is special; pass first_tokens")
    return pool


def _cache_path(cache_dir: Optional[PathLike], key: Dict[str, Any]) -> pathlib.Path:
    from ..cache import default_cache_dir

    base = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir() / "generated"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return base / f"windows-{key['n_windows']}x{key['seq_len']}-{digest}.safetensors"


def _read_cached(path: pathlib.Path, key: Dict[str, Any]) -> Optional[Tensor]:
    from safetensors import safe_open

    from ..cache import untrusted_reason

    if not path.exists():
        return None
    try:
        reason = untrusted_reason(path)
        if reason:
            raise ValueError(reason)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("settings", "null")) != key:
                raise ValueError("its settings differ from this call's")
            windows = f.get_tensor("windows")
        if windows.dtype != torch.long or tuple(windows.shape) != (key["n_windows"], key["seq_len"]) \
                or int(windows.min()) < 0 or int(windows.max()) >= key["vocab_size"]:
            raise ValueError(f"it holds a {windows.dtype} tensor of shape {tuple(windows.shape)}")
        return windows
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
        warnings.warn(f"generate_windows: ignoring the cached windows {path} ({e}); generating them again",
                      stacklevel=3)
        return None


@torch.no_grad()
def generate_windows(
    model: nn.Module,
    n_windows: int,
    seq_len: int,
    *,
    first_tokens: Optional[Tensor] = None,
    greedy_tokens: int = 3,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: bool = True,
) -> Tensor:
    """``n_windows`` windows of ``seq_len`` token ids sampled from ``model`` (module docstring), [n, L] int64.

    model:         a transformers causal LM (``generate``), in float (the teacher); left in its mode.
    first_tokens:  1-D pool of token ids the first token is drawn from uniformly (default: every
                   non-special id of the vocabulary).
    greedy_tokens: tokens after the first taken by argmax (LLM-QAT: 3-5), then sampling.
    temperature, top_k: the sampling's (top_k None: the whole softmax).
    batch_size, seed: windows generated together; batch b is seeded with seed + b.
    cache_dir, use_cache: where the result is cached (default: the package cache); False skips it.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"generate_windows needs a transformers causal LM with .generate(), got "
                        f"{type(model).__name__}; pass the float model (e.g. load_smollm2()[0])")
    check_int("n_windows", n_windows, 1, "e.g. 256", owner="generate_windows: ")
    check_int("seq_len", seq_len, 2, "e.g. 512", owner="generate_windows: ")
    check_int("greedy_tokens", greedy_tokens, 0, "e.g. 3", owner="generate_windows: ")
    check_int("batch_size", batch_size, 1, "e.g. 8", owner="generate_windows: ")
    check_int("seed", seed, 0, "e.g. 0", owner="generate_windows: ")
    if greedy_tokens > seq_len - 1:
        raise ValueError(f"generate_windows: greedy_tokens={greedy_tokens} leaves no sampled token in a window of "
                         f"{seq_len}; use greedy_tokens <= {seq_len - 1}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"generate_windows: temperature must be a finite number > 0 (e.g. 1.0), got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1, "e.g. 50, or None for the whole softmax", owner="generate_windows: ")
    vocab = _vocab_size(model)
    pool = _first_token_pool(model, first_tokens, vocab)
    key = {"format": CACHE_FORMAT, "model": model_fingerprint(model), "vocab_size": vocab, "n_windows": n_windows,
           "seq_len": seq_len, "greedy_tokens": greedy_tokens, "temperature": float(temperature), "top_k": top_k,
           "batch_size": batch_size, "seed": seed,
           "first_tokens": hashlib.sha256(pool.numpy().tobytes()).hexdigest()[:16]}
    path = _cache_path(cache_dir, key) if use_cache else None
    if path is not None:
        cached = _read_cached(path, key)
        if cached is not None:
            return cached

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = range(0, n_windows, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_windows, desc="generating", unit="window")
    out = []
    try:
        for b, start in enumerate(batches):
            rows = min(batch_size, n_windows - start)
            g = torch.Generator().manual_seed(seed + b)
            ids = pool[torch.randint(0, pool.numel(), (rows, 1), generator=g)].to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + b)  # generate() samples with the global generator
                if greedy_tokens:
                    ids = _generate(model, ids, greedy_tokens, do_sample=False)
                rest = seq_len - ids.shape[1]
                ids = _generate(model, ids, rest, do_sample=True, temperature=float(temperature), top_k=top_k or 0)
            if tuple(ids.shape) != (rows, seq_len):
                raise RuntimeError(f"generate_windows: {type(model).__name__}.generate returned shape "
                                   f"{tuple(ids.shape)}, expected {(rows, seq_len)}")
            out.append(ids.cpu().long())
            if bar is not None:
                bar.update(rows)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    windows = torch.cat(out)
    if path is not None:
        _write_cached(path, windows, key)
    return windows


def _generate(model: nn.Module, ids: Tensor, new: int, **sampling: Any) -> Tensor:
    """``new`` tokens after ``ids`` (end-of-sequence masked until then), through transformers' generate."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=pad if pad is not None else 0, top_p=1.0, **sampling)


def _write_cached(path: pathlib.Path, windows: Tensor, key: Dict[str, Any]) -> None:
    from safetensors.torch import save

    from ..cache import atomic_write_bytes, make_private_dirs

    make_private_dirs(path.parent)
    atomic_write_bytes(path, save({"windows": windows.contiguous()}, metadata={"settings": json.dumps(key)}))


def mix_windows(*sources: Tensor) -> Tensor:
    """Real and generated training windows joined into one [W, L] tensor (``train_qat`` shuffles them).

    Every source must be an integer [W_i, L] tensor (``train.check_token_windows``) of the same L; a
    mismatch names the lengths.
    """
    if not sources:
        raise ValueError("mix_windows needs at least one [W, L] tensor of token ids")
    for i, s in enumerate(sources):
        check_token_windows(s, f"mix_windows: source {i}")
    lengths = [int(s.shape[1]) for s in sources]
    if len(set(lengths)) != 1:
        raise ValueError(f"mix_windows: the sources have window lengths {lengths}; cut them to one length "
                         f"(e.g. calibration_windows(tokens, n, {min(lengths)}) and generate_windows(model, n, "
                         f"{min(lengths)}))")
    return torch.cat([s.detach().cpu().long() for s in sources])
