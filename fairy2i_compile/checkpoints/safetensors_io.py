"""Reading the header of a fairy2i safetensors file (training checkpoints, packed models),
and writing one byte-deterministically.

Both file kinds carry `format` and `format_version` in the safetensors metadata; this
reads the metadata and every tensor's (shape, dtype) without touching tensor data,
and checks the two fields, so a wrong, truncated or foreign file fails before
anything is loaded, with the path and the fix in the message.

`write_safetensors` writes the same format as safetensors' `save_file`, with one
difference that matters for content hashing: `save_file` passes the metadata through a
Rust HashMap, whose order changes from call to call, so the same tensors and metadata give
different bytes each time. Here the header is built in Python: metadata sorted by key,
tensors in safetensors' own order (larger element size first, then by name, so every
tensor stays aligned), the header padded with spaces to a multiple of 8 bytes.
Equal inputs give equal files.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any, BinaryIO, Dict, List, Mapping, Tuple, Type

import torch

__all__ = ["ST_DTYPES", "dedupe_state", "first_few", "read_header", "standalone_tensor", "write_header",
           "write_safetensors"]

Header = Dict[str, Tuple[List[int], str]]


ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


"""torch dtype -> safetensors dtype name (the dtypes checkpoints can hold)."""


def dedupe_state(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Keep one key per tensor view; later keys that are the same view become aliases {alias: kept}."""
    kept: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    first: Dict[Any, str] = {}
    for name, t in state.items():
        if t.numel() > 0:
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                    t.dtype)
            if view in first:
                aliases[name] = first[view]
                continue
            first[view] = name
        kept[name] = t
    return kept, aliases


def standalone_tensor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared or partial storage)."""
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def key_difference(expected, stored, aliases) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) keys of a file against what the model expects; an alias (a tied key
    the file stores once under another name) counts as present."""
    present = set(stored) | set(aliases)
    return sorted(set(expected) - present), sorted(present - set(expected))


def first_few(names, n: int = 5) -> str:
    """The first n names and how many more, for error messages."""
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"


def read_header(path: pathlib.Path, fmt: str, version: str, what: str, hint: str,
                error: Type[Exception] = ValueError) -> Tuple[Dict[str, str], Header]:
    """(metadata, {key: (shape, safetensors dtype)}) of `path`, after the format/version checks.

    what: "packed checkpoint" / "training checkpoint" (for messages); hint: how to write one.
    Raises FileNotFoundError for a missing file and `error` for anything else.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            header = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
        raise error(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    if meta.get("format") != fmt:
        raise error(f"{path}: not a fairy2i {what} (metadata 'format' is {meta.get('format')!r}, expected "
                    f"{fmt!r}); {hint}")
    found = meta.get("format_version")
    if found != version:
        raise error(f"{path}: {what} format_version is {found!r}, this fairy2i_compile reads version {version!r}; "
                    f"load it with the fairy2i_compile version that wrote it, or write it again")
    return meta, header


def write_header(f: BinaryIO, header: Mapping[str, object]) -> None:
    """The safetensors preamble: the JSON header's length (u64 little-endian) and the header,
    compact, padded with spaces to a multiple of 8 bytes (the tensors that follow stay aligned)."""
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)


def write_safetensors(tensors: Mapping[str, "torch.Tensor"], f: BinaryIO, metadata: Mapping[str, str]) -> None:
    """Write `tensors` (contiguous CPU tensors) and `metadata` (str -> str) to the open file `f`
    in the safetensors format, byte-deterministically (module docstring)."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: Dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {key!r} must be a contiguous CPU tensor")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    write_header(f, header)
    for key in order:
        t = tensors[key]
        if t.numel():
            f.write(t.detach().reshape(-1).view(torch.uint8).numpy().data)  # safetensors is little-endian, as are our hosts
