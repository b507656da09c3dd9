"""Reading the header of a fairy2i safetensors file (training checkpoints, packed models).

Both file kinds carry `format` and `format_version` in the safetensors metadata; this
reads the metadata and every tensor's (shape, dtype) without touching tensor data,
and checks the two fields, so a wrong, truncated or foreign file fails before
anything is loaded, with the path and the fix in the message.
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Tuple, Type

__all__ = ["read_header"]

Header = Dict[str, Tuple[List[int], str]]


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
