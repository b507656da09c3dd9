"""Packed checkpoints: a whole model with 2-bit Fairy2i linear layers in one safetensors file.

    save_packed(model, "smollm2-w2.safetensors", {"stages": 2}, dense_dtype=torch.float16)
    model = load_packed("smollm2-w2.safetensors")            # eval mode, PackedLinear layers
    compiled = torch.compile(model, backend="fairy2i")

`save_packed` takes a model already packed by `packed_model.pack_model` (saved as it
is), or a float model (or its `torch.compile` wrapper) plus a config: then every
eligible `nn.Linear` weight is quantized with `ops.quantize.pack_layer`, one layer at a
time, into new codes/scales tensors; the user's model is not modified and no dense
copy of it is made. The packed codes are the ones `pack_model` would give
(same quantizer, same selection rules), so the two paths load to bit-identical models.
A Hugging Face folder too large to load is converted from its shards by
`convert.convert_folder` (`fairy2i quantize --model FOLDER`), which writes this same file.

`load_packed` never unpickles (safetensors + JSON only) and never materialises a
dense quantized weight. In order, each step before the next, each failure a ValueError
naming the file and the field or tensor:
  1. the header (format, version, metadata JSON) and the config digest;
  2. the config against the header, without building anything: the packed layers'
     codes/scales shapes follow from their metadata, the input embedding is a
     [vocab_size, hidden_size] tensor of the file, the file holds num_hidden_layers
     blocks; model_class must be one transformers registers for the config's model_type;
  3. the transformers model built from the config with its parameters on the meta
     device (an allocation larger than any tensor the file can fill is refused), the
     recorded layers swapped for `PackedLinear`, every tensor of the file checked against
     that skeleton (names, shapes, dtypes);
  4. the tensors read, every scale checked finite, and only then assigned
     (`load_state_dict(..., assign=True)`).

File format (one safetensors file; its tensors are the packed model's `state_dict`)
--------------------------------------------------------------------------------
tensors
    <layer>.codes    int32   [2T, out/2, ceil(in/32)]   one per packed layer (packing.py layout)
    <layer>.scales   float32 [2T, 2, n_s, G]
    <layer>.bias     [out]                              when the layer has one
    <key>            every other state_dict tensor (embeddings, norms, kept-real linears,
                     persistent buffers), in its own dtype or `dense_dtype`
    A tensor shared by several keys (lm_head tied to the embedding and kept real) is
    stored once under its first key; the others are listed in metadata "aliases".
metadata (all values are strings; JSON where noted)
    format          "fairy2i-packed"
    format_version  "1"
    model_class     transformers class name, e.g. "LlamaForCausalLM" ("" for other models)
    model_config    the transformers config, `config.to_json_string()` ("" for other models)
    fairy2i         JSON {"method": "phase", "stages": T, "scale_granularity": "tensor" | "row" | g,
                          "skip": [patterns], "kept_real": {linear name: reason}}
    layers          JSON {layer: {"in_features", "out_features", "stages", "granularity",
                                  "bias": bool, "dtypes": {"codes", "scales", "bias"}}}
    tensors         JSON {key: dtype name} of every stored tensor (checked against the header)
    aliases         JSON {alias key: stored key}
    dense_dtype     JSON dtype name the dense tensors were cast to, or null
    extra           JSON, anything the writer adds (the CLI records where the model came from)
    torch_version   the writer's torch
    config_sha256   SHA-256 of model_class + "\n" + model_config (transformers models): fields that
                    change the arithmetic without changing a shape (rms_norm_eps, hidden_act,
                    rope_theta) are part of what the file claims, and load_packed verifies them

Example (tiny Llama, W2, lm_head packed, embedding tied to nothing any more):

    model.embed_tokens.weight                     F32 [96, 32]
    model.layers.0.self_attn.q_proj.codes         I32 [4, 16, 1]
    model.layers.0.self_attn.q_proj.scales        F32 [4, 2, 1, 1]
    ...
    lm_head.codes                                 I32 [4, 48, 1]
    layers = {"lm_head": {"in_features": 32, "out_features": 96, "stages": 2, "granularity": "tensor",
                          "bias": false, "dtypes": {"codes": "int32", "scales": "float32", "bias": null}}, ...}

Writes are atomic: the file is written under a temporary name in the target folder
(`.<name>.<pid>.<random>.partial`), fsync'ed and renamed over `path` with `os.replace`,
so a failed or interrupted save leaves an existing checkpoint at `path` untouched; a
partial file left by a process that was killed is removed by the next save to `path`.
The bytes are deterministic (safetensors_io.write_safetensors): the same model and
settings give the same file, so it can be content-hashed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..cache import process_alive
from ..compiler.config import Fairy2iConfig
from ..quantization.packed_model import PackedLinear, check_outliers, packable_reason, select_layers, set_submodule, with_progress
from ..quantization.packing import scale_shape, words_per_row
from .safetensors_io import ST_DTYPES, dedupe_state, first_few, key_difference, standalone_tensor

__all__ = ["FORMAT", "FORMAT_VERSION", "ARCH_FIELDS", "save_packed", "load_packed", "packed_state_info", "parameters_on_meta",
           "is_packed_checkpoint"]

FORMAT = "fairy2i-packed"
FORMAT_VERSION = "1"

# Config fields that change the model's tensors or its arithmetic: a checkpoint whose config
# differs in one of these from `expected_config` is another model.
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
               "rope_parameters", "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias")

PathLike = Union[str, os.PathLike]
_DTYPES = {str(d).replace("torch.", ""): d for d in ST_DTYPES}


# ------------------------------------------------------------------ save
def save_packed(
    model_or_compiled: nn.Module,
    path: PathLike,
    config: Union[Fairy2iConfig, Mapping[str, Any], None] = None,
    *,
    dense_dtype: Optional[torch.dtype] = None,
    extra: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Write a packed checkpoint of `model_or_compiled` to `path` (one safetensors file, atomically).

    config:      None for a model already packed by `pack_model`; for a float model the
                 Fairy2i settings (a Fairy2iConfig or an options dict: stages,
                 scale_granularity, skip); the model itself is left unchanged.
    dense_dtype: cast the floating tensors that are not codes/scales (embeddings, norms,
                 biases, kept-real linears) to this dtype, e.g. torch.float16.
    extra:       JSON-able dict stored as metadata "extra".
    progress:    a tqdm bar over the layers being quantized.
    Returns `packed_state_info(path)`.
    """
    model = _unwrap(model_or_compiled)
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"save_packed: {path} is a folder; give a file path such as {path / 'model.safetensors'}")
    if dense_dtype is not None and (not isinstance(dense_dtype, torch.dtype) or not dense_dtype.is_floating_point
                                    or dense_dtype not in ST_DTYPES):
        raise TypeError(f"dense_dtype must be a floating torch.dtype such as torch.float16, got {dense_dtype!r}")
    extra_json = _dumps(dict(extra) if extra is not None else {}, "extra")
    already = any(isinstance(m, PackedLinear) for m in model.modules())
    if already:
        if config is not None:
            raise ValueError(
                "save_packed: the model is already packed (it has PackedLinear layers) and is saved as it is; "
                "pass config=None, or pass the float model to quantize it with a config"
            )
        tensors, layers, settings = _already_packed(model)
    else:
        if config is None:
            raise ValueError(
                "save_packed: the model has no PackedLinear layers and no config was given; pass the settings "
                "to quantize it, e.g. save_packed(model, path, {'stages': 2}), or call pack_model(model) first"
            )
        tensors, layers, settings = _pack_float(model, _settings(config), progress)

    # Dedupe on the model's own tensors (before any cast makes tied ones distinct copies).
    tensors, aliases = dedupe_state(tensors)
    packed_keys = {f"{name}.{part}" for name in layers for part in ("codes", "scales")}
    # the dtype each tensor is written in; the cast copy is made as the tensor is written,
    # one tensor at a time, never a cast copy of the whole model at once
    out_dtype: Dict[str, torch.dtype] = {}
    for key, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"save_packed: tensor {key!r} is on the meta device (it has no data); "
                             "load the model's weights before saving it")
        cast = dense_dtype is not None and key not in packed_keys and t.is_floating_point()
        out_dtype[key] = dense_dtype if cast else t.dtype
    for name, spec in layers.items():
        if spec["bias"]:
            spec["dtypes"]["bias"] = _dtype_name(out_dtype[f"{name}.bias"])

    hf_config = _hf_config(model)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__ if hf_config is not None else "",
        "model_config": hf_config.to_json_string() if hf_config is not None else "",
        "fairy2i": _dumps(settings, "fairy2i settings"),
        "layers": _dumps(layers, "layers"),
        "tensors": _dumps({k: _dtype_name(d) for k, d in out_dtype.items()}, "tensors"),
        "aliases": _dumps(aliases, "aliases"),
        "dense_dtype": _dumps(_dtype_name(dense_dtype) if dense_dtype is not None else None, "dense_dtype"),
        "extra": extra_json,
        "torch_version": torch.__version__,
    }
    if hf_config is not None:
        metadata["config_sha256"] = _config_digest(metadata["model_class"], metadata["model_config"])
    _atomic_save_file(tensors, out_dtype, path, metadata)
    return packed_state_info(path)


def _unwrap(model: Any) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_packed needs an nn.Module (or its torch.compile wrapper), got {type(model).__name__}")
    return model


def _hf_config(model: nn.Module) -> Any:
    """The transformers config of a PreTrainedModel, else None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return model.config if isinstance(model, PreTrainedModel) else None


def _settings(config: Union[Fairy2iConfig, Mapping[str, Any]]) -> Fairy2iConfig:
    if not isinstance(config, (Fairy2iConfig, Mapping)):
        raise TypeError(
            f"save_packed: config must be a Fairy2iConfig or an options dict such as {{'stages': 2}}, "
            f"got {type(config).__name__}"
        )
    settings = Fairy2iConfig.from_options(config)  # validates names and values
    if settings.mode != "ptq" or settings.method != "phase":
        raise ValueError(
            f"save_packed writes Fairy2i PhaseQuant codes (mode 'ptq', method 'phase'); got "
            f"mode={settings.mode!r}, method={settings.method!r}: drop those options"
        )
    return settings


def _layer_spec(in_features: int, out_features: int, stages: int, granularity: Any, bias: bool,
                outliers: int = 0) -> Dict[str, Any]:
    spec = {"in_features": int(in_features), "out_features": int(out_features), "stages": int(stages),
            "granularity": granularity, "bias": bool(bias),
            "dtypes": {"codes": "int32", "scales": "float32", "bias": None}}
    if outliers:  # calibrated layers with corrected input columns (PackedLinear docstring); absent = 0
        spec["outliers"] = int(outliers)
    return spec


def _already_packed(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Any], Dict[str, Any]]:
    """A pack_model'ed model: its state_dict as it is; settings read off its layers."""
    layers: Dict[str, Any] = {}
    kept_real: Dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedLinear):
            layers[name] = _layer_spec(mod.in_features, mod.out_features, mod.stages, mod.granularity,
                                       mod.bias is not None, mod.outliers)
        elif isinstance(mod, nn.Linear):
            kept_real[name] = packable_reason(mod) or "left real when the model was packed"
    stages = {spec["stages"] for spec in layers.values()}
    grans = {json.dumps(spec["granularity"]) for spec in layers.values()}
    settings = {"method": "phase",
                "stages": stages.pop() if len(stages) == 1 else None,             # None: mixed
                "scale_granularity": json.loads(grans.pop()) if len(grans) == 1 else None,
                "skip": None,                                                        # not known after pack_model
                "kept_real": kept_real}
    return dict(model.state_dict()), layers, settings


def _pack_float(model: nn.Module, settings: Fairy2iConfig,
                progress: bool) -> Tuple[Dict[str, Tensor], Dict[str, Any], Dict[str, Any]]:
    """Quantize a copy of every eligible nn.Linear weight, layer by layer; the model is not touched.

    Same selection as pack_model (packable_reason, then skip patterns) and the same quantizer
    (ops.quantize.pack_layer via the identical steps of PackedLinear.from_linear).
    """
    from ..compiler.ops import quantize
    names, kept_real, _ = select_layers(model, settings.skip)
    if "" in names:
        raise ValueError("save_packed: the model is a bare nn.Linear; wrap it in a container (nn.Sequential)")
    targets: List[Tuple[str, nn.Module]] = [(name, model.get_submodule(name)) for name in names]

    state = dict(model.state_dict())
    tensors: Dict[str, Tensor] = {}
    layers: Dict[str, Any] = {}
    weight_keys = {f"{name}.weight" for name, _ in targets}
    for key, t in state.items():
        if key not in weight_keys:  # the dense weights of packed layers are not stored
            tensors[key] = t
    with torch.no_grad():
        for name, mod in with_progress(targets, progress):
            packed = quantize.pack_layer(mod.weight.detach(), settings.stages, settings.scale_granularity, name)
            tensors[f"{name}.codes"] = packed.codes.contiguous()
            # PackedLinear keeps float32 scales (load_packed copies them the same way)
            tensors[f"{name}.scales"] = packed.scales.to(torch.float32).contiguous()
            layers[name] = _layer_spec(mod.in_features, mod.out_features, settings.stages,
                                       settings.scale_granularity, mod.bias is not None)
    info = {"method": "phase", "stages": settings.stages, "scale_granularity": settings.scale_granularity,
            "skip": list(settings.skip), "kept_real": kept_real}
    return tensors, layers, info


def _atomic_save_file(tensors: Dict[str, Tensor], out_dtype: Dict[str, torch.dtype], path: pathlib.Path,
                      metadata: Dict[str, str]) -> None:
    """write_safetensors into a temp file beside `path`, fsync, os.replace; each tensor is cast
    to `out_dtype[key]` only when the writer reads it (_CastOnRead).

    The cache.atomic_write_bytes pattern, streaming (safetensors' `save` would first build
    the whole file as one bytes object, twice the checkpoint in memory). The temp name
    carries the writer's pid, so partial files of killed writers can be told apart from a
    save in progress and removed.
    """
    from . import safetensors_io

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            safetensors_io.write_safetensors(_CastOnRead(tensors, out_dtype), f, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is shared like any model file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _CastOnRead(Mapping):
    """{key: tensor cast to its output dtype}, the cast made on each read and not kept.

    write_safetensors reads every tensor a few times (header, then data) and keeps none:
    so a dense_dtype save holds one cast copy at a time, never a cast copy of the model.
    """

    def __init__(self, tensors: Mapping[str, Tensor], dtypes: Mapping[str, torch.dtype]):
        self._tensors, self._dtypes = tensors, dtypes

    def __getitem__(self, key: str) -> Tensor:
        return standalone_tensor(self._tensors[key].detach().to(self._dtypes[key]))

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _remove_stale_partials(path: pathlib.Path) -> None:
    """Remove `.<name>.<pid>.*.partial` files beside `path` whose writer is no longer running."""
    prefix = f".{path.name}."
    for entry in path.parent.glob(f"{glob.escape(prefix)}*.partial"):
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if not hasattr(os, "getuid") or entry.lstat().st_uid == os.getuid():
                entry.unlink()


# ------------------------------------------------------------------ read the header
def _read_header(path: pathlib.Path) -> Tuple[Dict[str, str], Dict[str, Tuple[List[int], str]]]:
    """(metadata, {key: (shape, safetensors dtype)}) without reading tensor data; format checked."""
    from .safetensors_io import read_header

    return read_header(path, FORMAT, FORMAT_VERSION, "packed checkpoint",
                       "write one with fairy2i_compile.save_packed or `fairy2i quantize`")


def _loads(meta: Mapping[str, str], key: str, path: pathlib.Path, kind: type) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: metadata field {key!r} is missing")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field {key!r} is not valid JSON: {err}") from err
    if not isinstance(value, kind):
        raise ValueError(f"{path}: metadata field {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_packed: {what} must be JSON-able: {err}") from err


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: Any, what: str, path: pathlib.Path) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{path}: {what} has dtype {name!r}, expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _nbytes(shape: List[int], st_dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    n = 1
    for s in shape:
        n *= int(s)
    return n * size.get(st_dtype, 0)


def packed_state_info(path: PathLike) -> Dict[str, Any]:
    """What a packed checkpoint holds, from its header alone (no tensor data is read).

    Returns {"path", "file_bytes", "format_version", "model_class", "model_config" (dict or None),
    "fairy2i", "layers", "aliases", "dense_dtype", "extra", "num_tensors",
    "bytes": {"codes", "scales", "dense", "tensors", "header"}}; "dense" counts every stored
    tensor that is not codes/scales (embeddings, norms, biases, kept-real linears).
    """
    path = pathlib.Path(path)
    meta, header = _read_header(path)
    layers = _loads(meta, "layers", path, dict)
    codes = sum(_nbytes(*header[f"{n}.codes"]) for n in layers if f"{n}.codes" in header)
    scales = sum(_nbytes(*header[f"{n}.scales"]) for n in layers if f"{n}.scales" in header)
    total = sum(_nbytes(*v) for v in header.values())
    config_json = meta.get("model_config", "")
    try:
        model_config = json.loads(config_json) if config_json else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field 'model_config' is not valid JSON: {err}") from err
    file_bytes = path.stat().st_size
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "format_version": meta["format_version"],
        "model_class": meta.get("model_class") or None,
        "model_config": model_config,
        "fairy2i": _loads(meta, "fairy2i", path, dict),
        "layers": layers,
        "aliases": _loads(meta, "aliases", path, dict),
        "dense_dtype": json.loads(meta.get("dense_dtype", "null")),
        "extra": _loads(meta, "extra", path, dict) if "extra" in meta else {},
        "num_tensors": len(header),
        "bytes": {"codes": codes, "scales": scales, "dense": total - codes - scales, "tensors": total,
                  "header": file_bytes - total},
    }


def is_packed_checkpoint(path: PathLike) -> bool:
    """True for an existing `.safetensors` file whose metadata says format "fairy2i-packed" (any version)."""
    path = pathlib.Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # unreadable: not recognisably ours; load_packed would say why
        return False


# ------------------------------------------------------------------ load
def load_packed(
    path: PathLike,
    *,
    kernel: str = "auto",
    device: Union[str, torch.device] = "cpu",
    expected_config: Any = None,
) -> nn.Module:
    """Build the model stored in a packed checkpoint: PackedLinear layers, eval mode, on `device`.

    kernel:          the PackedLinear kernel ("auto", "cpu", "triton", "torch"; compiler/codegen/dispatch.py).
    expected_config: a transformers config or dict; ValueError when the checkpoint's config
                     differs in any of ARCH_FIELDS the two have.
    Every check (format, version, config, layer shapes, tensor names, shapes and dtypes)
    runs before a tensor is read; any failure raises and returns nothing.
    """
    Fairy2iConfig(kernel=kernel)  # validates the name before any work
    path = pathlib.Path(path)
    device = torch.device(device)
    meta, header = _read_header(path)
    layers = _loads(meta, "layers", path, dict)
    recorded = _loads(meta, "tensors", path, dict)
    aliases = _loads(meta, "aliases", path, dict)
    config = _model_config(meta, path)
    if expected_config is not None:
        _check_expected_config(config, expected_config, path)
    _check_config_against_header(config, layers, header, aliases, path)
    model = _skeleton(meta, config, layers, recorded, kernel, path, _allocation_cap(header, layers))
    expected = _expected_tensors(model, recorded, path)
    _check_tensors(header, recorded, aliases, expected, path)

    tensors = _read_tensors(path, device)
    _check_scales_finite(tensors, layers, path)
    state = dict(tensors)
    state.update({alias: tensors[kept] for alias, kept in aliases.items()})
    model.load_state_dict(state, strict=True, assign=True)
    for alias, kept in aliases.items():  # one tensor again, as saved (assign wrapped each key separately)
        _set_tensor(model, alias, _get_tensor(model, kept))
    model.to(device)  # the non-persistent buffers (rotary tables) were built on the CPU
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: tensors {first_few(left)} got no data from the checkpoint; it does not fit the model")
    return model.eval()


def _model_config(meta: Mapping[str, str], path: pathlib.Path) -> Any:
    cls_name, config_json = meta.get("model_class", ""), meta.get("model_config", "")
    if not cls_name or not config_json:
        raise ValueError(
            f"{path}: the checkpoint holds no transformers config (it was saved from a "
            f"non-transformers model), so load_packed cannot rebuild the model; build the model, "
            f"pack_model it and load the tensors with safetensors.torch.load_file + load_state_dict"
        )
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError:
        raise ValueError(f"{path}: loading a packed transformers model needs transformers: "
                         f"`pip install -c constraints.txt transformers`") from None
    digest = meta.get("config_sha256")
    if digest is None:
        raise ValueError(f"{path}: metadata field 'config_sha256' is missing (written before fairy2i_compile "
                         f"recorded the config's digest); write the checkpoint again with save_packed")
    if digest != _config_digest(cls_name, config_json):
        raise ValueError(f"{path}: metadata 'model_class'/'model_config' do not match their recorded digest "
                         f"'config_sha256': the config was edited after the file was written (fields such as "
                         f"rms_norm_eps, hidden_act or rope_theta change the results); write the file again")
    try:
        d = json.loads(config_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field 'model_config' is not valid JSON: {err}") from err
    model_type = d.get("model_type") if isinstance(d, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}")
    return CONFIG_MAPPING[model_type].from_dict(d)


def _config_digest(model_class: str, model_config: str) -> str:
    return hashlib.sha256(f"{model_class}\n{model_config}".encode("utf-8")).hexdigest()


def _int_field(config: Any, name: str, path: pathlib.Path) -> Optional[int]:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: config field {name} must be a non-negative integer, got {value!r}")
    return value


def _check_config_against_header(config: Any, layers: Mapping[str, Any], header: Mapping[str, Tuple[List[int], str]],
                                 aliases: Mapping[str, str], path: pathlib.Path) -> None:
    """What the config and the layer metadata claim about sizes, against the tensors the header
    lists: no model is built and nothing is allocated, so a forged config (a vocabulary of a
    billion tokens, thousands of layers) fails here, in microseconds."""
    for name, spec in layers.items():
        if not isinstance(spec, dict) or not {"in_features", "out_features", "stages", "granularity"} <= set(spec):
            raise ValueError(f"{path}: metadata of packed layer {name!r} is incomplete: {spec!r}")
        i, o = spec["in_features"], spec["out_features"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 and v % 2 == 0 for v in (i, o)):
            raise ValueError(f"{path}: packed layer {name!r} has in_features={i!r}, out_features={o!r}; "
                             f"both must be even integers >= 2")
        try:
            settings = Fairy2iConfig(stages=spec["stages"], scale_granularity=spec["granularity"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: packed layer {name!r}: {err}") from err
        n, m, planes = o // 2, i // 2, 2 * settings.stages
        want = {"codes": ([planes, n, words_per_row(m)], torch.int32),
                "scales": ([planes, 2, *scale_shape(n, m, settings.scale_granularity)], torch.float32)}
        for part, (shape, dtype) in want.items():
            key = f"{name}.{part}"
            if key in header and (header[key][0] != shape or header[key][1] != ST_DTYPES[dtype]):
                raise ValueError(
                    f"{path}: tensor {key!r} is {_dtype_name(_st_to_torch(header[key][1]))} {header[key][0]} in the "
                    f"file, expected {_dtype_name(dtype)} {shape} for layer {name!r} (in={i}, out={o}, "
                    f"stages={settings.stages}, granularity={settings.scale_granularity!r})")
    shapes = [shape for shape, _ in header.values()]
    vocab, hidden = _int_field(config, "vocab_size", path), _int_field(config, "hidden_size", path)
    if vocab is not None and not any(len(s) == 2 and s[0] == vocab and (hidden is None or s[1] == hidden)
                                     for s in shapes):
        raise ValueError(f"{path}: the config claims vocab_size={vocab}, hidden_size={hidden}, but the file holds "
                         f"no [{vocab}, {hidden}] embedding; the config does not describe these tensors")
    blocks = _int_field(config, "num_hidden_layers", path)
    if blocks is not None:
        indices = {int(m.group(1)) for key in (*header, *aliases) for m in [re.search(r"\.(\d+)\.", key)] if m}
        held = max(indices) + 1 if indices else 0
        if blocks > held:
            raise ValueError(f"{path}: the config claims num_hidden_layers={blocks}, but the file's tensors "
                             f"hold {held} blocks")


def _allocation_cap(header: Mapping[str, Tuple[List[int], str]], layers: Mapping[str, Any]) -> int:
    """Elements any one tensor of the skeleton may have: 4x the largest the file can fill (a stored
    tensor, or a packed layer's dense weight, checked against its codes already), at least 2**24."""
    largest = max([math.prod(shape) for shape, _ in header.values()]
                  + [spec["in_features"] * spec["out_features"] for spec in layers.values()] + [0])
    return max(4 * largest, 1 << 24)


class _AllocationCap(torch.overrides.TorchFunctionMode):
    """Refuse factory calls (torch.empty & co.) asking for more than `cap` elements."""

    _FACTORIES = frozenset([torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                            torch.empty_strided])

    def __init__(self, cap: int, path: pathlib.Path):
        super().__init__()
        self.cap, self.path = cap, path

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FACTORIES:
            size = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else \
                args[:1] if func is torch.full else args
            size = kwargs.get("size", size)
            try:
                numel = math.prod(int(d) for d in size)
            except (TypeError, ValueError):
                numel = 0
            if numel > self.cap:
                raise ValueError(f"{self.path}: the checkpoint's config asks for a tensor of {numel:,} elements "
                                 f"({list(size)}), more than any tensor the file can fill; the config does not "
                                 f"describe this file")
        return func(*args, **kwargs)


def _allowed_model_classes(model_type: str) -> List[str]:
    """The model class names transformers' auto mappings register for `model_type`."""
    from transformers.models.auto import modeling_auto

    names: List[str] = []
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES") and isinstance(mapping, Mapping):
            value = mapping.get(model_type)
            for name in ([value] if isinstance(value, str) else list(value or ())):
                if isinstance(name, str) and name not in names:
                    names.append(name)
    return names


def _check_scales_finite(tensors: Mapping[str, Tensor], layers: Mapping[str, Any], path: pathlib.Path) -> None:
    """Finite scales, and a valid outlier correction (distinct in-range columns, finite values)."""
    bad = [f"{name}.scales" for name in layers if not torch.isfinite(tensors[f"{name}.scales"]).all()]
    if bad:
        raise ValueError(f"{path}: tensors {first_few(bad)} hold non-finite scales (NaN or Inf): every output of "
                         f"those layers would be NaN; the file is corrupt or was altered, write it again")
    for name, spec in layers.items():
        k = spec.get("outliers", 0)
        if k:
            check_outliers(tensors[f"{name}.outlier_index"], tensors[f"{name}.outlier_weight"], spec["in_features"],
                           spec["out_features"], k, f"{path}: packed layer {name!r} (corrupt or altered file)")


def _config_dict(config: Any) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        out = config.to_dict()
        # attribute_map aliases (GPT-2: hidden_size -> n_embd) are properties, not in to_dict()
        out.update({f: getattr(config, f) for f in ARCH_FIELDS if f not in out and hasattr(config, f)})
        return out
    raise TypeError(f"expected_config must be a transformers config or a dict, got {type(config).__name__}")


def _check_expected_config(config: Any, expected: Any, path: pathlib.Path) -> None:
    have, want = _config_dict(config), _config_dict(expected)
    diffs = [f"{f}: checkpoint {have[f]!r}, expected {want[f]!r}"
             for f in ARCH_FIELDS if f in have and f in want and have[f] != want[f]]
    if diffs:
        raise ValueError(f"{path}: the checkpoint is of another model; config fields differ: {'; '.join(diffs)}")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device; buffers stay real.

    Under a plain `torch.device("meta")` the non-persistent buffers (rotary tables, which
    the file does not hold) would be meta too, with no way to recompute them. A parameter's
    initial CPU storage is an uninitialised `torch.empty`, moved to meta before anything
    writes it.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build_dtype(recorded: Mapping[str, str], layers: Mapping[str, Any]) -> torch.dtype:
    """The most common floating dtype of the dense tensors (what the model was built with)."""
    packed = {f"{n}.{p}" for n in layers for p in ("codes", "scales")}
    counts: Dict[str, int] = {}
    for key, name in recorded.items():
        if key not in packed and name in _DTYPES and _DTYPES[name].is_floating_point:
            counts[name] = counts.get(name, 0) + 1
    return _DTYPES[max(counts, key=counts.get)] if counts else torch.float32


def _skeleton(meta: Mapping[str, str], config: Any, layers: Mapping[str, Any], recorded: Mapping[str, str],
              kernel: str, path: pathlib.Path, cap: int) -> nn.Module:
    """The model from its config with meta parameters and PackedLinear at the recorded layers."""
    import transformers

    cls_name = meta["model_class"]
    allowed = _allowed_model_classes(config.model_type)
    cls = getattr(transformers, cls_name, None) if cls_name in allowed else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{path}: model_class {cls_name!r} is not a transformers model class for model_type "
                         f"{config.model_type!r} (transformers {transformers.__version__} has "
                         f"{first_few(sorted(allowed))}); the metadata is wrong or was altered")
    try:
        with parameters_on_meta(), _AllocationCap(cap, path):
            model = cls._from_config(config, dtype=_build_dtype(recorded, layers))
    except ValueError:
        raise
    except Exception as err:  # transformers' own checks of a config it cannot build (any type)
        raise ValueError(f"{path}: building {cls_name} from the checkpoint's config failed "
                         f"({type(err).__name__}: {err})") from err
    for name, spec in layers.items():
        try:
            mod = model.get_submodule(name) if name else None
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{path}: packed layer {name!r} is not an nn.Linear of {cls_name} built from the "
                             f"checkpoint's config (found {type(mod).__name__})")
        if not isinstance(spec, dict) or not {"in_features", "out_features", "stages", "granularity",
                                              "bias", "dtypes"} <= set(spec):
            raise ValueError(f"{path}: metadata of packed layer {name!r} is incomplete: {spec!r}")
        if (spec["in_features"], spec["out_features"], spec["bias"]) != (mod.in_features, mod.out_features,
                                                                         mod.bias is not None):
            raise ValueError(
                f"{path}: packed layer {name!r} is in={spec['in_features']}, out={spec['out_features']}, "
                f"bias={spec['bias']} in the checkpoint but in={mod.in_features}, out={mod.out_features}, "
                f"bias={mod.bias is not None} in {cls_name} built from its config"
            )
        bias_dtype = _dtype_of(spec["dtypes"].get("bias"), f"bias of packed layer {name!r}", path) \
            if spec["bias"] else torch.float32
        try:
            packed = PackedLinear(mod.in_features, mod.out_features, spec["stages"], spec["granularity"],
                                  spec["bias"], kernel, device="meta", bias_dtype=bias_dtype,
                                  outliers=spec.get("outliers", 0))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: packed layer {name!r}: {err}") from err
        set_submodule(model, name, packed)
    return model


def _expected_tensors(model: nn.Module, recorded: Mapping[str, str],
                      path: pathlib.Path) -> Dict[str, Tuple[List[int], torch.dtype]]:
    """{key: (shape, dtype)} the skeleton needs: PackedLinear tensors as the layer defines them,
    the others in the dtype the writer recorded (dense_dtype may have cast them)."""
    packed_tensors = {f"{name}.{key}" for name, mod in model.named_modules() if isinstance(mod, PackedLinear)
                      for key in ("codes", "scales", "bias", "outlier_index", "outlier_weight")}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        dtype = t.dtype if key in packed_tensors or key not in recorded else \
            _dtype_of(recorded[key], f"tensor {key!r} (metadata 'tensors')", path)
        out[key] = (list(t.shape), dtype)
    return out


def _check_tensors(header: Mapping[str, Tuple[List[int], str]], recorded: Mapping[str, str],
                   aliases: Mapping[str, str], expected: Mapping[str, Tuple[List[int], torch.dtype]],
                   path: pathlib.Path) -> None:
    stored = set(header)
    if set(recorded) != stored:
        raise ValueError(
            f"{path}: metadata 'tensors' does not list the file's tensors: not listed "
            f"{first_few(sorted(stored - set(recorded)))}, listed but absent {first_few(sorted(set(recorded) - stored))}"
        )
    bad_alias = sorted(a for a, k in aliases.items() if k not in stored or a in stored)
    if bad_alias:
        raise ValueError(f"{path}: aliases {first_few(bad_alias)} do not point from a missing key to a stored tensor")
    missing, unexpected = key_difference(expected, stored, aliases)
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors differ from the model built from the checkpoint's config: missing {first_few(missing)}, "
            f"unexpected {first_few(unexpected)}"
        )
    for key in sorted(stored | set(aliases)):
        shape, st_dtype = header[aliases.get(key, key)]
        want_shape, want_dtype = expected[key]
        if shape != want_shape or st_dtype != ST_DTYPES.get(want_dtype):
            raise ValueError(
                f"{path}: tensor {key!r} is {_dtype_name(_st_to_torch(st_dtype))} {shape} in the file, expected "
                f"{_dtype_name(want_dtype)} {want_shape}; the file was altered or written for another model"
            )


def _st_to_torch(st_dtype: str) -> Any:
    for dtype, name in ST_DTYPES.items():
        if name == st_dtype:
            return dtype
    return st_dtype


def _read_tensors(path: pathlib.Path, device: torch.device) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as err:
        raise ValueError(f"{path}: cannot read the tensors (truncated or corrupt file?): {err}") from err


def _get_tensor(model: nn.Module, key: str) -> Tensor:
    parent, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, leaf)


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    parent_name, _, leaf = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        setattr(parent, leaf, value)
