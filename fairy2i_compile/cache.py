"""Where fairy2i keeps files it derives (converted models, generated kernels), atomic writes,
and the checks made before anything in the cache is trusted.

    default_cache_dir()   $FAIRY2I_CACHE, else <repo>/.cache/fairy2i_compile in a source
                          checkout, else the platform's per-user cache folder
                          (user_cache_dir(): $XDG_CACHE_HOME or ~/.cache on Linux,
                          ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows) + /fairy2i_compile
    kernel_cache_dir()    $FAIRY2I_KERNEL_CACHE, else default_cache_dir()/kernels

Never the current directory: a script run in a folder someone else controls must not pick
up their files. Folders the cache creates are created 0700.

Files are written to a temporary name beside the target, flushed to disk (fsync) and
renamed into place (`os.replace` is atomic on POSIX), so a reader never sees half a file,
a crash after the rename cannot leave a truncated file under the final name, and two
processes writing the same content do not corrupt each other.

What the cache trusts (`untrusted_reason`): a file, and every folder above it, owned by
this user or root and not writable by group or others (a sticky folder such as /tmp is
allowed above the cache: others cannot replace entries they do not own there). Code
loaded from the cache (compiler/codegen/cpu_packed.py) must also match the SHA-256 digest recorded
beside it when it was built.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import sys
import tempfile
from typing import Optional, Union

__all__ = [
    "default_cache_dir", "kernel_cache_dir", "user_cache_dir", "make_private_dirs", "untrusted_reason",
    "file_sha256", "atomic_write_bytes", "atomic_write_text", "process_alive",
]

PathLike = Union[str, os.PathLike]


def user_cache_dir() -> pathlib.Path:
    """The platform's per-user cache folder for this package (not created here)."""
    home = pathlib.Path.home()
    if sys.platform == "win32":
        base = pathlib.Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = pathlib.Path(xdg) if os.path.isabs(xdg) else home / ".cache"  # XDG: relative values are ignored
    return base / "fairy2i_compile"


def default_cache_dir() -> pathlib.Path:
    """`$FAIRY2I_CACHE`, else `<repo>/.cache/fairy2i_compile` (source checkout), else user_cache_dir()."""
    env = os.environ.get("FAIRY2I_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    repo = pathlib.Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "fairy2i_compile").is_dir():
        return repo / ".cache" / "fairy2i_compile"
    return user_cache_dir()


def kernel_cache_dir() -> pathlib.Path:
    """Generated kernel sources and built libraries: `$FAIRY2I_KERNEL_CACHE` or `<cache>/kernels`."""
    env = os.environ.get("FAIRY2I_KERNEL_CACHE")
    return pathlib.Path(env).expanduser() if env else default_cache_dir() / "kernels"


def make_private_dirs(path: PathLike) -> pathlib.Path:
    """`mkdir -p path`, each folder it creates mode 0700 (existing folders are left as they are)."""
    path = pathlib.Path(os.path.abspath(path))
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made by a concurrent process
            pass
    return pathlib.Path(os.path.abspath(missing[0])) if missing else path


def _entry_problem(path: str, st: os.stat_result, final: bool) -> Optional[str]:
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is None:  # Windows: no POSIX owners; folder ACLs are the user's profile's
        return None
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid}) or root"
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode bits mean nothing; its target is checked on its resolved path
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not final):
        who = "group and others" if writable == (stat.S_IWGRP | stat.S_IWOTH) else (
            "its group" if writable == stat.S_IWGRP else "others")
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def untrusted_reason(path: PathLike) -> Optional[str]:
    """Why `path` must not be trusted, or None when it may be.

    `path` (file or folder) and every folder above it, both as written and as resolved
    through symlinks, must be owned by this user or root; `path` and the folder holding it
    must not be writable by group or others, the folders above only when sticky (/tmp),
    where others cannot replace what they do not own.
    """
    path = pathlib.Path(os.path.abspath(path))
    for chain in (path, pathlib.Path(os.path.realpath(path))):
        for entry in (chain, *chain.parents):
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                return f"{entry} does not exist"
            problem = _entry_problem(str(entry), st, final=entry in (chain, chain.parent))
            if problem:
                return problem
    return None


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: PathLike) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, os.replace."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def process_alive(pid: int) -> bool:
    """Whether process `pid` may still be running (this one, or one kill(pid, 0) finds); a
    temporary file named after a process that is not is safe to remove."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's), or cannot tell: leave its file alone
    return True
