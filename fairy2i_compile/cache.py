"""Where fairy2i keeps files it derives (converted models, generated kernels), and atomic writes.

    default_cache_dir()   $FAIRY2I_CACHE, else <repo>/.cache/fairy2i_compile in a source
                          checkout, else ./.cache/fairy2i_compile
    kernel_cache_dir()    $FAIRY2I_KERNEL_CACHE, else default_cache_dir()/kernels

Files are written to a temporary name beside the target and renamed into place
(`os.replace` is atomic on POSIX), so a reader never sees half a file and two
processes writing the same content do not corrupt each other.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Union

__all__ = ["default_cache_dir", "kernel_cache_dir", "atomic_write_bytes", "atomic_write_text"]

PathLike = Union[str, os.PathLike]


def default_cache_dir() -> pathlib.Path:
    """`$FAIRY2I_CACHE`, else `<repo>/.cache/fairy2i_compile` (source checkout), else `./.cache/fairy2i_compile`."""
    env = os.environ.get("FAIRY2I_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    repo = pathlib.Path(__file__).resolve().parent.parent
    root = repo if (repo / "pyproject.toml").is_file() and (repo / "fairy2i_compile").is_dir() else pathlib.Path.cwd()
    return root / ".cache" / "fairy2i_compile"


def kernel_cache_dir() -> pathlib.Path:
    """Generated kernel sources and built libraries: `$FAIRY2I_KERNEL_CACHE` or `<cache>/kernels`."""
    env = os.environ.get("FAIRY2I_KERNEL_CACHE")
    return pathlib.Path(env).expanduser() if env else default_cache_dir() / "kernels"


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder + os.replace."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
