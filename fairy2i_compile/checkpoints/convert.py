"""Hugging Face model folder -> packed checkpoint, layer by layer, without building the dense model.

    info = convert_folder("Llama-3.2-1B/", "llama-1b-w2.safetensors", {"stages": 2})
    fairy2i quantize --model Llama-3.2-1B/ --stages 2 --out llama-1b-w2.safetensors

For a model that does not fit in memory. The transformers model is built from the
folder's config.json with its parameters on the meta device (no storage), only to
learn which modules are nn.Linear and what the state_dict holds; the tensors are
read from the folder's safetensors shards with plain positioned reads (no mmap, so
the shards never count towards this process's resident memory), a block of rows at
a time:

* a linear layer packed with `chunked.pack_layer_into`, reading its rows from the
  shard as it goes (one pass per stage for per-tensor scales) and writing its codes
  straight into their place in the output file (the earlier stages are read back from
  there), so they are never held: only the scales wait in memory for their turn;
* every other tensor (embeddings, norms, biases, kept-real layers) copied block by
  block, cast to the load dtype (float32 unless told otherwise, what `fairy2i quantize`
  loads a folder in) and then to `dense_dtype` if given.

The output file is written in the order and with the header of
`safetensors_io.write_safetensors` (every shape and dtype is known before a byte of
data is read), and with the metadata `checkpoint.save_packed` writes for the same
model loaded dense: the two files are identical byte for byte (tests/test_convert.py),
so `load_packed` reads it as any other. Memory: the blocks being processed, the scales
of one layer, and the model skeleton; not one dense layer, nor a layer's codes. Measured
on a 1B-class Llama folder (benchmarks/results/convert_memory.md), the peak is mostly the
imports: torch + transformers' modeling code (which pulls in torch.distributed.tensor,
sympy, torch._dynamo) is about 450 MiB before the first tensor is read.

Weights tied to another module (lm_head tied to the embedding) are read from the key
the folder stores. The folder must hold the model's tensors under the state_dict keys
of the transformers class (the layout `save_pretrained` writes); a key it lacks that
the model would initialise itself (a persistent buffer) is taken from the skeleton.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..compiler.config import Fairy2iConfig

__all__ = ["convert_folder", "ShardReader"]

PathLike = Union[str, os.PathLike]
# bytes of one block read for a dense tensor (its float32 copy is up to twice that)
_COPY_BLOCK_BYTES = 4 << 20


# ------------------------------------------------------------------ reading the shards
@dataclass(frozen=True)
class _Entry:
    file: pathlib.Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data
    nbytes: int


class ShardReader:
    """The tensors of a folder's safetensors shards, read by rows with os.pread (no mmap)."""

    def __init__(self, folder: PathLike):
        from .safetensors_io import ST_DTYPES

        by_name = {v: k for k, v in ST_DTYPES.items()}
        self.folder = pathlib.Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.folder}: no *.safetensors files in the folder; convert_folder reads the "
                             f"safetensors shards `save_pretrained` writes (pytorch_model.bin is not read)")
        self.entries: Dict[str, _Entry] = {}
        for file in files:
            with open(file, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes)")
                (size,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(size))
                except ValueError as err:
                    raise ValueError(f"{file}: unreadable safetensors header ({err})") from err
            for key, spec in header.items():
                if key == "__metadata__":
                    continue
                if spec["dtype"] not in by_name:
                    raise ValueError(f"{file}: tensor {key!r} has dtype {spec['dtype']}, which this reader does not "
                                     f"know (known: {sorted(by_name)})")
                if key in self.entries:
                    raise ValueError(f"{self.folder}: tensor {key!r} is in both {self.entries[key].file.name} and "
                                     f"{file.name}; remove the stale shard")
                lo, hi = spec["data_offsets"]
                self.entries[key] = _Entry(file, by_name[spec["dtype"]], tuple(spec["shape"]), 8 + size + lo, hi - lo)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def rows(self, key: str, r0: int, r1: int) -> Tensor:
        """Rows r0..r1-1 of tensor `key` (dim 0), as stored: [r1 - r0, *shape[1:]]."""
        e = self.entries[key]
        shape = e.shape if e.shape else (1,)
        row_bytes = e.nbytes // max(1, shape[0])
        fd = os.open(e.file, os.O_RDONLY)
        try:
            t = _pread_tensor(fd, e.start + r0 * row_bytes, (r1 - r0) * row_bytes, e.dtype,
                              f"{e.file}: truncated while reading tensor {key!r}")
        finally:
            os.close(fd)
        return t.reshape(r1 - r0, *shape[1:]) if e.shape else t.reshape(())


def _pread_tensor(fd: int, offset: int, count: int, dtype: torch.dtype, truncated: str) -> Tensor:
    """`count` bytes at `offset` of the open file `fd` as a 1-D tensor of `dtype` (os.preadv, no mmap)."""
    if not count:
        return torch.empty(0, dtype=dtype)
    buf = bytearray(count)
    view, done = memoryview(buf), 0
    while done < count:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(truncated)
        done += got
    return torch.frombuffer(buf, dtype=dtype)


class _FileCodes:
    """chunked.CodeSink over the output file: codes [P, n, KW] int32 at byte `offset` of `fd`."""

    def __init__(self, fd: int, offset: int, shape: Tuple[int, ...], name: str):
        self.fd, self.offset, self.name = fd, offset, name
        self.n, self.kw = int(shape[1]), int(shape[2])

    def _at(self, plane: int, j0: int) -> int:
        return self.offset + 4 * (plane * self.n + j0) * self.kw

    def write(self, plane: int, j0: int, words: Tensor) -> None:
        assert words.dtype == torch.int32 and words.shape[1] == self.kw, (words.dtype, words.shape)
        data = memoryview(words.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
        at, done = self._at(plane, j0), 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], at + done)

    def read(self, plane: int, j0: int, j1: int) -> Tensor:
        words = _pread_tensor(self.fd, self._at(plane, j0), 4 * (j1 - j0) * self.kw, torch.int32,
                              f"{self.name}: the output file is shorter than the codes written to it")
        return words.reshape(j1 - j0, self.kw)


# ------------------------------------------------------------------ the conversion
def convert_folder(
    folder: PathLike,
    out: PathLike,
    config: Union[Fairy2iConfig, Mapping[str, Any]],
    *,
    dtype: torch.dtype = torch.float32,
    dense_dtype: Optional[torch.dtype] = None,
    extra: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Quantize the model in Hugging Face folder `folder` into the packed checkpoint `out`, streaming.

    config:      the Fairy2i settings (as for `checkpoint.save_packed`).
    dtype:       what the dense tensors are cast to first: the dtype `fairy2i quantize` would load
                 the model in (float32); the codes do not depend on it.
    dense_dtype: then cast the dense tensors to this dtype (as save_packed's dense_dtype).
    Returns `checkpoint.packed_state_info(out)`. The file equals, byte for byte, what
    `save_packed(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), out, config,
    dense_dtype=dense_dtype, extra=extra)` writes.
    """
    from . import checkpoint as ck
    from ..quantization.chunked import pack_layer_into, release_freed_memory
    from ..quantization.packed_model import select_layers, with_progress
    from ..quantization.packing import scale_shape, words_per_row
    from .safetensors_io import ST_DTYPES

    folder, out = pathlib.Path(folder).expanduser(), pathlib.Path(out).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json in it)")
    if out.is_dir():
        raise ValueError(f"convert_folder: {out} is a folder; give a file path such as {out / 'model.safetensors'}")
    for what, d in (("dtype", dtype), ("dense_dtype", dense_dtype)):
        if d is not None and (not isinstance(d, torch.dtype) or not d.is_floating_point or d not in ST_DTYPES):
            raise TypeError(f"{what} must be a floating torch.dtype such as torch.float16, got {d!r}")
    settings = ck._settings(config)
    extra_json = ck._dumps(dict(extra) if extra is not None else {}, "extra")
    shards = ShardReader(folder)
    model = _skeleton(folder, dtype)

    # where each state_dict tensor comes from: its own key when the folder stores it (from_pretrained
    # unties a tied lm_head whose weight the folder stores as well), else the key the folder stores
    # for the tensor it is tied to (lm_head -> the embedding)
    state = model.state_dict(keep_vars=True)
    source: Dict[str, str] = {}
    for key, t in state.items():
        stored = [k for k, v in state.items() if v is t and k in shards]
        source[key] = key if key in shards else (stored[0] if stored else "")

    targets, kept_real, _ = select_layers(model, settings.skip)  # the selection of checkpoint._pack_float
    weight_keys = {f"{name}.weight" for name in targets}

    # every tensor of the file: (shape, dtype) and how to make it
    specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    dense: Dict[str, str] = {}           # file key -> folder key (or "" for a skeleton buffer)
    aliases: Dict[str, str] = {}
    kept_view: Dict[Any, str] = {}
    for key, t in state.items():
        if key in weight_keys:
            continue
        same = source[key] or id(t)  # one tensor of the loaded model <=> one key of the folder
        if t.numel() > 0 and same in kept_view:  # safetensors_io.dedupe_state: a tied tensor stored once
            aliases[key] = kept_view[same]
            continue
        if t.numel() > 0:
            kept_view[same] = key
        if not source[key] and t.is_meta:
            raise ValueError(f"{folder}: the model's tensor {key!r} is in none of the safetensors shards; the "
                             f"folder is incomplete or uses other key names (load it with transformers and use "
                             f"checkpoint.save_packed instead)")
        want = dtype if t.is_floating_point() else t.dtype
        if dense_dtype is not None and t.is_floating_point():
            want = dense_dtype
        specs[key] = (tuple(t.shape), want)
        dense[key] = source[key]
    layers: Dict[str, Any] = {}
    for name in targets:
        mod = model.get_submodule(name)
        wkey = source[f"{name}.weight"]
        if not wkey:
            raise ValueError(f"{folder}: the weight of {name!r} is in none of the safetensors shards")
        if shards.entries[wkey].shape != (mod.out_features, mod.in_features):
            raise ValueError(f"{folder}: tensor {wkey!r} is {list(shards.entries[wkey].shape)} in the shards, "
                             f"the config makes {name} [{mod.out_features}, {mod.in_features}]")
        n, m = mod.out_features // 2, mod.in_features // 2
        specs[f"{name}.codes"] = ((2 * settings.stages, n, words_per_row(m)), torch.int32)
        specs[f"{name}.scales"] = ((2 * settings.stages, 2, *scale_shape(n, m, settings.scale_granularity)),
                                   torch.float32)
        layers[name] = ck._layer_spec(mod.in_features, mod.out_features, settings.stages,
                                      settings.scale_granularity, mod.bias is not None)
        if mod.bias is not None:
            layers[name]["dtypes"]["bias"] = ck._dtype_name(specs[f"{name}.bias"][1])
    for key, (shape, _) in specs.items():
        if key in dense and dense[key] and shards.entries[dense[key]].shape != shape:
            raise ValueError(f"{folder}: tensor {dense[key]!r} is {list(shards.entries[dense[key]].shape)} in the "
                             f"shards, the model built from config.json has {list(shape)}")

    info = {"method": "phase", "stages": settings.stages, "scale_granularity": settings.scale_granularity,
            "skip": list(settings.skip), "kept_real": kept_real}
    hf_config = model.config
    metadata = {
        "format": ck.FORMAT,
        "format_version": ck.FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_config": hf_config.to_json_string(),
        "fairy2i": ck._dumps(info, "fairy2i settings"),
        "layers": ck._dumps(layers, "layers"),
        "tensors": ck._dumps({k: ck._dtype_name(d) for k, (_, d) in specs.items()}, "tensors"),
        "aliases": ck._dumps(aliases, "aliases"),
        "dense_dtype": ck._dumps(ck._dtype_name(dense_dtype) if dense_dtype is not None else None, "dense_dtype"),
        "extra": extra_json,
        "torch_version": torch.__version__,
    }
    metadata["config_sha256"] = ck._config_digest(metadata["model_class"], metadata["model_config"])

    scales_due: Dict[str, Tensor] = {}  # a packed layer's scales, until the writer reaches them
    bar = iter(with_progress(range(len(targets)), progress))

    def produce(key: str, fd: int, at: int) -> Iterator[Union[Tensor, int]]:
        shape, want = specs[key]
        name, _, part = key.rpartition(".")
        if name in layers and part == "codes":  # written in place, the scales kept for later
            mod = model.get_submodule(name)
            wkey = source[f"{name}.weight"]
            scales_due[name] = pack_layer_into(
                _FileCodes(fd, at, shape, key), lambda r0, r1: shards.rows(wkey, r0, r1), settings.stages,
                settings.scale_granularity, name, shape=(mod.out_features, mod.in_features),
                dtype=shards.entries[wkey].dtype)
            next(bar, None)
            release_freed_memory()
            yield 4 * math.prod(shape)
            return
        if name in layers and part == "scales":
            yield scales_due.pop(name).to(torch.float32).contiguous()
            return
        src = dense[key]
        if not src:  # a persistent buffer the folder does not store: the skeleton's own value
            yield state[key].detach().to(want).contiguous()
            return
        e = shards.entries[src]
        rows = e.shape[0] if e.shape else 1
        row_bytes = max(1, e.nbytes // max(1, rows))
        step = max(1, _COPY_BLOCK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            block = shards.rows(src, r0, min(rows, r0 + step)) if e.shape else shards.rows(src, 0, 1)
            yield block.to(dtype if block.is_floating_point() else block.dtype).to(want).contiguous()
            del block
            release_freed_memory()

    out.parent.mkdir(parents=True, exist_ok=True)
    ck._remove_stale_partials(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_streaming(specs, produce, f, metadata)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return ck.packed_state_info(out)


def _skeleton(folder: pathlib.Path, dtype: torch.dtype) -> nn.Module:
    """The transformers model of `folder`'s config with its parameters on the meta device."""
    import transformers
    from transformers import AutoConfig

    from .checkpoint import parameters_on_meta

    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: transformers cannot read config.json: {err}") from err
    archs = list(getattr(hf_config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    with parameters_on_meta():
        model = cls._from_config(hf_config, dtype=dtype)
    model.config.dtype = dtype  # what from_pretrained(dtype=...) records
    return model.eval()


def _write_streaming(specs: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]],
                     produce: Callable[[str, int, int], Iterator[Union[Tensor, int]]], f: Any,
                     metadata: Mapping[str, str]) -> None:
    """safetensors_io.write_safetensors with the tensors made one at a time, in blocks, by `produce`.

    Same tensor order and header bytes as write_safetensors (larger element size first, then
    by name; metadata sorted; header padded with spaces to 8 bytes). `produce(key, fd, at)`
    yields the tensor's blocks in order, or the number of bytes it has itself written with
    os.pwrite at byte `at` of `fd` (the open file `f`, which must be readable too: the packer
    reads earlier stages back).
    """
    from .safetensors_io import ST_DTYPES, write_header

    for key, (_, dt) in specs.items():
        if dt not in ST_DTYPES:
            raise TypeError(f"tensor {key!r} has dtype {dt}, which safetensors cannot store")
    size = {k: torch.empty((), dtype=d).element_size() for k, (_, d) in specs.items()}
    order = sorted(specs, key=lambda k: (-size[k], k))
    header: Dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        shape, dt = specs[key]
        nbytes = size[key]
        for d in shape:
            nbytes *= int(d)
        header[key] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    write_header(f, header)
    for key in order:
        shape, dt = specs[key]
        want = header[key]["data_offsets"][1] - header[key]["data_offsets"][0]  # type: ignore[index]
        written = 0
        at = f.tell()
        for block in produce(key, f.fileno(), at):
            if isinstance(block, int):  # written in place by the producer
                written += block
                f.seek(at + written)
                continue
            if block.dtype != dt or block.device.type != "cpu" or not block.is_contiguous():
                raise ValueError(f"tensor {key!r}: a block came as {block.dtype} on {block.device} "
                                 f"(contiguous={block.is_contiguous()}), the file needs contiguous CPU {dt}")
            if block.numel():
                f.write(block.reshape(-1).view(torch.uint8).numpy().data)
                written += block.numel() * block.element_size()
            del block
        if written != want:
            raise AssertionError(f"convert_folder wrote {written} bytes for {key!r}, the header says {want}")
