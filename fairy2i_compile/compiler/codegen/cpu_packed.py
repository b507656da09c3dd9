"""The packed op on CPU: a vectorised C++ kernel, built once with the system compiler.

Why C++ and not an Inductor decomposition: the decomposition of the same op
(codegen/inductor_packed.py, `kernel="inductor"`) runs 1.1-2.2x slower per layer on this
project's 2-core CPU and compiling a model's worth of decomposed layers takes 2.3-3.5x as
long as compiling the plain model; so this kernel is the CPU default and the decomposition
is opt-in. The measurements, Inductor's trouble spots in its generated code and the other
formulations tried are in benchmarks/results/bench_cpu.md.

The source (cpu_packed.cpp, portable C++ with GCC/Clang vector extensions) is compiled
with `c++ -O3 -march=native -fopenmp` into `kernel_cache_dir()/cpu/` under a name that
hashes the source, the flags, the compiler's version and the machine, flushed to disk and
renamed into place, with its SHA-256 beside it (`<lib>.so.sha256`); later processes load
the built library (ctypes, no torch headers, about a second to build).

What is checked before a cached library is loaded (dlopen runs its code): the library and
every folder above it pass cache.untrusted_reason (owned by this user or root, not
writable by others), and its bytes match the recorded digest. A digest mismatch (a
truncated file: dlopen would map past its end and the process die of SIGBUS) rebuilds it,
with a warning; an untrusted folder or file, or a library without the kernel's symbols,
is not loaded: one warning says why, and the pure-torch reference runs instead. `FAIRY2I_CPU_KERNEL=0` disables it (the op then uses the torch
reference under kernel="auto"); `FAIRY2I_CXX` picks the compiler.

The same source is also compiled, with cpu_packed_op.cpp and against torch's own headers
(~15 s, once per machine and torch version), into a library that registers the C++ CPU
kernel of the ops `fairy2i::packed_linear_cpu` and `fairy2i::ptq_packed_linear_cpu`
(cpu_op_available). Compiled inference graphs call those ops (codegen/lower.py): a call
through the dispatcher straight into C++ costs a fraction of one through ctypes or a Python
op implementation (benchmarks/results/bench_cpu.md, bench_cpu_ptq_dense.md).
`FAIRY2I_CPU_OP=0` skips that build; a failed build warns once and the ops run the ctypes
path.

Batches of up to LUT_MAX_TOKENS tokens with tensor scales run the LUT path where the
library was compiled with AVX-512 (cpu_lut_status; FAIRY2I_CPU_LUT=0 keeps the select path):
16 output rows look up the joint contribution of two complex columns in a per-token table of
16 entries with one register permute. Per layer shape, thread count and the select path's
times: benchmarks/results/bench_cpu_lut.md.

`FAIRY2I_CPU_LUT8=1` (opt-in; CPUs with AVX2; cpu_lut8_status) sends batches of up to
LUT8_MAX_TOKENS tokens with tensor or row scales through the C++ op to the int8-table path
(T-MAC style): per token, plane and block of 32 complex columns the scaled activations are
rounded to 8 bits (a scale per block, as llama.cpp's Q8_0), two complex
columns' 16 possible sums become byte tables, and 32 output rows look theirs up with one byte
shuffle (vpshufb) per table, summed in int16; the codes are read from a transposed copy that
the op makes on first use and keeps while the codes live (as many bytes again as the codes).
It is off by default because it is not exact: |y - y_exact| <= lut8_error_bound (worst case),
about 0.5-1% of |y| in relative rms on Gaussian activations. Only the C++ op takes it (the
ctypes path has nowhere to keep the transposed copy); lut8_forward runs it for tests and
benchmarks.

Activations in bf16/fp16 are converted to float32 for the kernel and the result
converted back (the kernel accumulates in float32 either way).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import atomic_write_text, file_sha256, kernel_cache_dir, make_private_dirs, untrusted_reason
from ..options import env_switch

__all__ = [
    "SOURCE",
    "FOLD_MAX_TOKENS",
    "LUT_MAX_TOKENS",
    "cpu_kernel_available",
    "cpu_kernel_library",
    "packed_linear_cpu",
    "cpu_forward",
    "packed_linear_direct",
    "build_cpu_kernel",
    "build_cpu_op",
    "cpu_op_available",
    "cpu_lut_status",
    "cpu_lut8_status",
    "lut8_forward",
    "lut8_layout",
    "lut8_error_bound",
    "lut8_block_columns",
    "fold_path_forward",
]

SOURCE = pathlib.Path(__file__).with_name("cpu_packed.cpp")
OP_SOURCE = pathlib.Path(__file__).with_name("cpu_packed_op.cpp")
ABI_VERSION = 7
FOLD_MAX_TOKENS = 4          # the multiplication-free fold path serves decode-sized batches
LUT_MAX_TOKENS = 16          # tensor scales: the LUT path up to here (measured: beats 4-row decode to 16 tokens, not at 32)
LUT8_MAX_TOKENS = 8          # the opt-in int8-table path (FAIRY2I_CPU_LUT8=1) up to here (measured on an AVX2 EPYC, one
                             # thread: 1.7-1.9x the fold/decode paths at 8 tokens with tensor scales, 1.0-1.1x with row
                             # scales; 1.3x / 0.8x at 16)
GEMM_MIN_TOKENS = 64         # from here on: decode row blocks, multiply them with the BLAS GEMM (measured crossover 32-128)
MULTI_MAX = 8                # sibling layers in one multi call (passes/fuse_siblings.py splits larger groups): the ops
                             # packed_linear_cpu_multi / ptq_packed_linear_cpu_multi have one overload n2 .. n{MULTI_MAX}
_BLOCK_BYTES = 2 << 20       # dense bytes of one decoded row block (fits in L2/L3)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_LOCK = threading.RLock()
_LIB: Optional[ctypes.CDLL] = None
_LIB_PATH: Optional[pathlib.Path] = None
_FN = None   # the kernel's ctypes function, bound once (argtypes set)
_DECODE_ROWS = None
_ERROR: Optional[str] = None
_OP_PATH: Optional[pathlib.Path] = None
_OP_ERROR: Optional[str] = None


def _compiler() -> Optional[str]:
    env = os.environ.get("FAIRY2I_CXX")
    if env:
        return shutil.which(env) or env
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


class UntrustedCacheError(RuntimeError):
    """A cached library, or the folder holding it, that others could have written: never loaded."""


def _library_path(source_path: pathlib.Path, flags: list, name: str, cache_dir: Optional[pathlib.Path],
                  extra_sources: Tuple[pathlib.Path, ...] = (), libs: Tuple[str, ...] = ()) -> Tuple[str, pathlib.Path]:
    """(compiler, `<cache>/cpu/lib<name>_<hash>.so`): the hash covers every source, the flags, the
    compiler's version and the machine."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for c++, g++, clang++; set FAIRY2I_CXX)")
    key = hashlib.sha256(
        b"\0".join([*(f.read_bytes() for f in (source_path, *extra_sources)), " ".join([*flags, *libs]).encode(),
                    _compiler_version(cxx).encode(), platform.machine().encode(), platform.processor().encode()])
    ).hexdigest()[:16]
    return cxx, (cache_dir or kernel_cache_dir()) / "cpu" / f"lib{name}_{key}.so"


def _digest_path(lib_path: pathlib.Path) -> pathlib.Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _digest_mismatch(lib_path: pathlib.Path) -> Optional[str]:
    """None when the library's bytes match the digest recorded at build time, else why not."""
    try:
        recorded = _digest_path(lib_path).read_text().strip()
    except FileNotFoundError:
        return "no digest recorded"
    actual = file_sha256(lib_path)
    return None if actual == recorded else f"SHA-256 {actual[:16]}... != recorded {recorded[:16]}..."


def _build(source_path: pathlib.Path, flags: list, name: str, cache_dir: Optional[pathlib.Path],
           extra_sources: Tuple[pathlib.Path, ...] = (), libs: Tuple[str, ...] = ()) -> pathlib.Path:
    """Compile `source_path` into `<cache>/cpu/lib<name>_<hash>.so` unless built already, and
    return a path that is safe to load (module docstring: what is checked).

    The library is compiled under a temporary name, fsynced, renamed into place, and its
    digest recorded (atomically) beside it, so concurrent builds are safe and a crash
    leaves either no library or one whose digest check fails (and is rebuilt).
    Raises UntrustedCacheError when the folder or a cached library could be others'."""
    cxx, lib_path = _library_path(source_path, flags, name, cache_dir, extra_sources, libs)
    folder = lib_path.parent
    make_private_dirs(folder)
    problem = untrusted_reason(folder)
    if problem:
        raise UntrustedCacheError(f"the kernel cache folder {folder} is not private to this user: {problem}")
    if os.path.lexists(lib_path):
        digest = _digest_path(lib_path)
        problem = untrusted_reason(lib_path) or (untrusted_reason(digest) if os.path.lexists(digest) else None)
        if problem:
            raise UntrustedCacheError(f"the cached library {lib_path} is not private to this user: {problem}")
        mismatch = _digest_mismatch(lib_path)
        if mismatch is None:
            return lib_path
        if mismatch != "no digest recorded":  # an older build without one is simply rebuilt
            warnings.warn(f"fairy2i: the cached C++ kernel {lib_path} does not match the digest recorded when it "
                          f"was built ({mismatch}: truncated, corrupted or replaced); rebuilding it",
                          RuntimeWarning, stacklevel=3)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(source_path), *libs, "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source_path.name} with {cxx} failed:\n{proc.stderr[-4000:]}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o700)
        digest = file_sha256(tmp)
        os.replace(tmp, lib_path)
        atomic_write_text(_digest_path(lib_path), digest + "\n")  # fsyncs the file and the folder
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib_path


def build_cpu_kernel(cache_dir: Optional[pathlib.Path] = None) -> pathlib.Path:
    """Compile cpu_packed.cpp (if not already built) and return the library's path.

    Raises RuntimeError with the compiler's output when the build fails.
    """
    return _build(SOURCE, _FLAGS, "fairy2i_cpu", cache_dir)


def _op_flags() -> list:
    from torch.utils import cpp_extension

    return [
        *_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DFAIRY2I_FOLD_MAX_TOKENS={FOLD_MAX_TOKENS}", f"-DFAIRY2I_GEMM_MIN_TOKENS={GEMM_MIN_TOKENS}",
        f"-DFAIRY2I_LUT_MAX_TOKENS={LUT_MAX_TOKENS}", f"-DFAIRY2I_LUT8_MAX_TOKENS={LUT8_MAX_TOKENS}",
        f"-DFAIRY2I_BLOCK_BYTES={_BLOCK_BYTES}", f"-DFAIRY2I_MULTI_MAX={MULTI_MAX}", f"-DFAIRY2I_TORCH_VERSION={torch.__version__!r}",
        f"-I{SOURCE.parent}", *(f"-I{d}" for d in cpp_extension.include_paths()),
    ]


def _op_libs() -> Tuple[str, ...]:
    from torch.utils import cpp_extension

    dirs = cpp_extension.library_paths()
    return (*(f"-L{d}" for d in dirs), *(f"-Wl,-rpath,{d}" for d in dirs), "-ltorch", "-ltorch_cpu", "-lc10")


def build_cpu_op(cache_dir: Optional[pathlib.Path] = None) -> pathlib.Path:
    """Compile cpu_packed_op.cpp (the C++ CPU registrations of `fairy2i::packed_linear_cpu` and
    `ptq_packed_linear_cpu`, against this torch's headers: ~15 s once per machine and torch
    version) and return its path."""
    return _build(OP_SOURCE, _op_flags(), "fairy2i_cpu_op", cache_dir, extra_sources=(SOURCE,), libs=_op_libs())


def _set_switches(lib: ctypes.CDLL) -> None:
    """Hand the library its path switches, read here once (options.env_switch): FAIRY2I_CPU_LUT8
    (the int8-table path, off unless set to an on value) and FAIRY2I_CPU_LUT (the AVX-512 LUT path,
    on unless set to an off value). The C++ code reads no environment variable itself."""
    lib.fairy2i_cpu_set_switches(int(env_switch("FAIRY2I_CPU_LUT8", default=False)), int(env_switch("FAIRY2I_CPU_LUT")))


def _abi_of(lib: ctypes.CDLL, path: pathlib.Path) -> None:
    """Raise RuntimeError unless `lib` exports the kernel's ABI marker with this module's ABI_VERSION."""
    try:
        abi = lib.fairy2i_cpu_abi_version
    except AttributeError:
        raise RuntimeError(f"{path} does not export fairy2i_cpu_abi_version: not a fairy2i kernel library") from None
    abi.restype = ctypes.c_int
    if abi() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {abi()}, expected {ABI_VERSION}")


def _load() -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
    global _LIB, _LIB_PATH, _FN, _DECODE_ROWS, _ERROR
    with _LOCK:
        if _LIB is not None or _ERROR is not None:
            return _LIB, _ERROR
        if not env_switch("FAIRY2I_CPU_KERNEL"):
            _ERROR = "disabled by FAIRY2I_CPU_KERNEL=0"
            return None, _ERROR
        path = None
        try:
            path = build_cpu_kernel()
            lib = ctypes.CDLL(str(path))
            _abi_of(lib, path)
            _set_switches(lib)
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            try:
                fn, dec = lib.fairy2i_packed_linear, lib.fairy2i_decode_rows
            except AttributeError as e:
                raise RuntimeError(f"{path} lacks a kernel symbol ({e})") from None
            fn.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
            fn.restype = None
            dec.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
            dec.restype = None
            lib.fairy2i_cpu_lut.restype = ctypes.c_int
            lib.fairy2i_cpu_lut8.restype = ctypes.c_int
            lib.fairy2i_lut8_block_columns.restype = ctypes.c_int
            lib.fairy2i_lut8_layout_bytes.argtypes = [i64, i64, i64]
            lib.fairy2i_lut8_layout_bytes.restype = i64
            lib.fairy2i_lut8_layout.argtypes = [ptr, i64, i64, i64, ptr]
            lib.fairy2i_lut8_layout.restype = None
            lib.fairy2i_lut8_linear.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
            lib.fairy2i_lut8_linear.restype = ctypes.c_int
            _LIB, _LIB_PATH, _FN, _DECODE_ROWS = lib, path, fn, dec
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _ERROR = str(e)
            if isinstance(e, UntrustedCacheError) or path is not None:  # refused or broken, not merely unbuildable
                warnings.warn(
                    f"fairy2i: not using the C++ CPU kernel: {_ERROR.strip()[:2000]}. Packed layers on CPU run the "
                    f"pure-torch reference instead (slower; kernel='cpu' raises). To fix: give the kernel cache "
                    f"folder to this user with mode 700 (chmod 700), or set FAIRY2I_KERNEL_CACHE to a folder only "
                    f"you can write.",
                    RuntimeWarning, stacklevel=3,
                )
        return _LIB, _ERROR


def cpu_kernel_available() -> Tuple[bool, str]:
    """(True, library path) once the kernel is built and loaded, else (False, why)."""
    lib, err = _load()
    return (True, str(_LIB_PATH)) if lib is not None else (False, err or "unknown error")


def _op_registered() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fairy2i::{op}", "CPU")
               for op in ("packed_linear_cpu", "ptq_packed_linear_cpu", f"packed_linear_cpu_multi.n{MULTI_MAX}",
                          f"ptq_packed_linear_cpu_multi.n{MULTI_MAX}"))


def cpu_op_available() -> Tuple[bool, str]:
    """Build (once) and load the C++ registrations of `fairy2i::packed_linear_cpu` and `ptq_packed_linear_cpu`.

    (True, library path) when the op's CPU kernel is C++; (False, why) otherwise, with one
    warning naming the reason and what runs instead: the same kernel through ctypes (its
    Python implementation in ops/packed.py, ~25 us more per call), or the pure-torch
    reference when that kernel is unavailable too. `FAIRY2I_CPU_OP=0` skips the build."""
    global _OP_PATH, _OP_ERROR
    with _LOCK:
        if _OP_PATH is None and _OP_ERROR is None:
            if not env_switch("FAIRY2I_CPU_OP"):
                _OP_ERROR = "disabled by FAIRY2I_CPU_OP=0"
            else:
                try:
                    path = build_cpu_op()
                    op_lib = ctypes.CDLL(str(path))  # CDLL's OSError names a missing symbol; load_library's does not
                    _abi_of(op_lib, path)
                    _set_switches(op_lib)  # the same loaded object torch.ops.load_library gets next
                    torch.ops.load_library(str(path))
                    if not _op_registered():
                        raise RuntimeError(f"{path} loaded but registered no CPU kernel for fairy2i::packed_linear_cpu")
                    _OP_PATH = path
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    _OP_ERROR = str(e)
                    instead = ("call the same kernel through Python instead (~25 us more per call)"
                               if cpu_kernel_available()[0] else "run the pure-torch reference instead")
                    warnings.warn(
                        f"fairy2i: the C++ registration of the packed CPU op is unavailable ({_OP_ERROR.strip()[:2000]}); "
                        f"packed layers {instead}. Set FAIRY2I_CPU_OP=0 to skip this build.",
                        RuntimeWarning, stacklevel=2,
                    )
    return (True, str(_OP_PATH)) if _OP_PATH is not None else (False, _OP_ERROR or "unknown error")


def cpu_lut_status() -> str:
    """Which path decode-sized batches with tensor scales take: "lut" (AVX-512 table lookups),
    "off" (compiled in, switched off by FAIRY2I_CPU_LUT=0: the select path runs),
    "absent" (the CPU lacks AVX-512: the select path runs) or "unavailable" (no C++ kernel)."""
    lib, _ = _load()
    if lib is None:
        return "unavailable"
    return {0: "absent", 1: "off", 2: "lut"}[lib.fairy2i_cpu_lut()]


def cpu_lut8_status() -> str:
    """Whether the int8-table path runs decode-sized batches with tensor or row scales: "on"
    (FAIRY2I_CPU_LUT8=1 and the CPU has AVX2; compiled graphs and PackedLinear's eager calls
    through the C++ op take it), "off" (compiled in, not switched on: the default, since it
    rounds the activations to 8 bits), "absent" (no AVX2) or "unavailable" (no C++ kernel)."""
    lib, _ = _load()
    if lib is None:
        return "unavailable"
    return {0: "absent", 1: "off", 2: "on"}[lib.fairy2i_cpu_lut8()]


def _lut8_lib() -> ctypes.CDLL:
    """The kernel library, RuntimeError unless the lut8 path is compiled into it."""
    status = cpu_lut8_status()
    if status not in ("on", "off"):
        raise RuntimeError(f"the lut8 path is not compiled into this CPU kernel ({status}): it needs AVX2")
    return _LIB


def lut8_layout(codes: Tensor) -> Tensor:
    """The lut8 path's transposed copy of codes [P, n, KW] (uint8, the same bytes rounded up to
    32-row blocks; cpu_packed.cpp, fairy2i_lut8_layout)."""
    lib = _lut8_lib()
    if codes.dim() != 3 or codes.dtype != torch.int32:
        raise ValueError(f"lut8_layout: codes must be int32 [P, n, KW], got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.contiguous()
    P, n, kw = codes.shape
    layout = torch.empty(lib.fairy2i_lut8_layout_bytes(P, n, kw), dtype=torch.uint8)
    lib.fairy2i_lut8_layout(codes.data_ptr(), P, n, kw, layout.data_ptr())
    return layout


def lut8_forward(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                 layout: Optional[Tensor] = None) -> Tensor:
    """The int8-table (lut8) path, whether switched on or not, for tensor or row scales: x [M, 2m]
    float32, contiguous -> y [M, 2n] float32. For the tests and benchmarks; models reach it through
    the C++ op with FAIRY2I_CPU_LUT8=1, which keeps each layer's transposed codes between calls;
    here they are `layout` (from :func:`lut8_layout` of these codes) or built in this call.

    Activations are rounded per token, plane and block of lut8_block_columns() complex columns to
    multiples of sigma = max(|s_re|, |s_im|) * max|x over the block| / 127 (the row's scales for
    row scales), so |y - y_exact| <= :func:`lut8_error_bound` per output (cpu_packed.cpp). ValueError for NaN/Inf
    activations (the integer tables cannot carry them)."""
    lib = _lut8_lib()
    if x.dim() != 2 or x.dtype is not _F32 or not x.is_contiguous() or x.shape[1] != 2 * m:
        raise ValueError(f"lut8_forward: x must be contiguous float32 [M, 2m = {2 * m}], got {x.dtype} {tuple(x.shape)}")
    P, n, kw = codes.shape
    if scales.shape[3] != 1 or scales.shape[2] not in (1, n):
        raise ValueError(f"lut8_forward: tensor or row scales only, got scales of shape {tuple(scales.shape)}")
    if layout is None:
        layout = lut8_layout(codes)
    elif layout.dtype != torch.uint8 or layout.numel() != lib.fairy2i_lut8_layout_bytes(P, n, kw):
        raise ValueError(f"lut8_forward: layout must be lut8_layout(codes) (uint8, "
                         f"{lib.fairy2i_lut8_layout_bytes(P, n, kw)} bytes), got {layout.dtype} {layout.numel()}")
    scales = scales.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.zeros((x.shape[0], 2 * n), dtype=_F32)
    if x.shape[0] and not lib.fairy2i_lut8_linear(x.data_ptr(), x.shape[0], m, layout.data_ptr(), P, n, kw,
                                                   scales.data_ptr(), scales.shape[2],
                                                   None if bias is None else bias.data_ptr(),
                                                   y.data_ptr(), torch.get_num_threads()):
        raise ValueError("lut8_forward: the activations hold NaN or Inf; the lut8 path refuses them "
                         "(the op falls back to the float32 fold path)")
    return y


def lut8_block_columns() -> int:
    """Complex columns per activation block of the lut8 path (one activation scale each)."""
    return int(_lut8_lib().fairy2i_lut8_block_columns())


def lut8_error_bound(x: Tensor, scales: Tensor, m: int) -> Tensor:
    """The lut8 path's worst-case |y - y_exact|, [M, 2n] (or [M, 1] for tensor scales, which is
    the same for every output): each complex column c contributes at most sigma / 2 of rounding
    error per plane, sigma = max(|s_re|, |s_im|) * max|x| over c's block of lut8_block_columns()
    columns (x[c] and x[m + c] of the block's columns) / 127, with the output's row scales for
    row scales [P, 2, n, 1]; summed over planes and columns."""
    x = x.float().abs()
    cols = lut8_block_columns()
    blocks = -(-m // cols)
    pad = blocks * cols - m
    a = F.pad(x[:, :m], (0, pad)).reshape(x.shape[0], blocks, -1)
    b = F.pad(x[:, m:], (0, pad)).reshape(x.shape[0], blocks, -1)
    width = torch.full((blocks,), float(cols))
    width[-1] = m - (blocks - 1) * cols
    per_token = (torch.maximum(a.amax(-1), b.amax(-1)) * width).sum(-1, keepdim=True) / 127 / 2  # [M, 1]
    s = scales.float()[..., 0].abs().amax(1).sum(0)  # [n_s]: sum over planes of max(|s_re|, |s_im|)
    per_output = torch.cat([s, s]) if s.numel() > 1 else s  # Re rows then Im rows
    return per_token * per_output[None, :]


_FOLD_PATHS = {"auto": 1, "select": 2, "lut": 3}


def fold_mode(M: int) -> int:
    """The kernel's `fold` argument for M tokens (cpu_packed.cpp, fairy2i_packed_linear): 1 = the
    fold path (LUT for tensor scales where available, selects otherwise), 4 = LUT for tensor
    scales where available, else the 4-row decode path, 0 = the decode path."""
    return 1 if M <= FOLD_MAX_TOKENS else 4 if M <= LUT_MAX_TOKENS else 0


def fold_path_forward(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                      path: str) -> Tensor:
    """The fold path for tensor scales, x [M, 2m] float32 (M >= 1), with the path forced:
    "select" (per-code selects and sign flips) or "lut" (table lookups; needs cpu_lut_status()
    in ("lut", "off")), or "auto" (what cpu_forward runs for M <= FOLD_MAX_TOKENS). For the tests and benchmarks that
    compare the two; models go through cpu_forward."""
    if path not in _FOLD_PATHS:
        raise ValueError(f"fold_path_forward: path={path!r}; use one of {sorted(_FOLD_PATHS)}")
    if path == "lut" and cpu_lut_status() not in ("lut", "off"):
        raise RuntimeError(f"the LUT path is not compiled into this CPU kernel ({cpu_lut_status()}): it needs AVX-512")
    lib, err = _load()
    if lib is None:
        raise RuntimeError(f"the fairy2i C++ CPU kernel is unavailable ({err})")
    if x.dim() != 2 or x.dtype is not _F32 or not x.is_contiguous() or x.shape[0] < 1 or x.shape[1] != 2 * m:
        raise ValueError(f"fold_path_forward: x must be contiguous float32 [M >= 1, 2m = {2 * m}], "
                         f"got {x.dtype} {tuple(x.shape)}")
    if scales.shape[2] != 1 or scales.shape[3] != 1:
        raise ValueError(f"fold_path_forward: tensor scales only, got scales of shape {tuple(scales.shape)}")
    P, n, kw = codes.shape
    codes, scales = codes.contiguous(), scales.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty((x.shape[0], 2 * n), dtype=_F32)
    _FN(x.data_ptr(), x.shape[0], m, codes.data_ptr(), P, n, kw, scales.data_ptr(), 1, 1, 0,
        None if bias is None else bias.data_ptr(), y.data_ptr(), _FOLD_PATHS[path], torch.get_num_threads())
    return y


def cpu_kernel_library() -> Optional[pathlib.Path]:
    """Path of the loaded library (None until first use or when unavailable)."""
    return _LIB_PATH


def packed_linear_cpu(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                      group_size: int) -> Tensor:
    """The packed op on CPU tensors: x [..., 2m] (contiguous) -> y [..., 2n] in x's dtype."""
    from ..ops.packed_reference import check_packed_linear

    check_packed_linear(x, codes, scales, bias, m, group_size)
    if x.device.type != "cpu":
        raise RuntimeError(f"packed_linear_cpu needs CPU tensors, got {x.device}; use kernel='triton' on CUDA")
    if not x.is_contiguous():
        raise ValueError(
            f"packed_linear_cpu: activations must be contiguous, got shape {tuple(x.shape)} with strides "
            f"{x.stride()}; call x.contiguous()"
        )
    lib, err = _load()
    if lib is None:
        raise RuntimeError(f"the fairy2i C++ CPU kernel is unavailable ({err}); use kernel='torch'")
    return cpu_forward(x, codes, scales, bias, m, group_size)


_F32 = torch.float32


def cpu_forward(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                group_size: int) -> Tensor:
    """:func:`packed_linear_cpu` without the checks, for arguments validated already.

    Called once per layer per decoded token, so it does the least Python it can:
    x must be contiguous; codes, scales and bias contiguous (packing and PackedLinear
    make them so).
    """
    P, n, kw = codes.shape
    if not codes.is_contiguous():
        codes = codes.contiguous()
    if scales.dtype is not _F32 or not scales.is_contiguous():
        scales = scales.float().contiguous()
    xf = x if x.dtype is _F32 else x.float()
    M = xf.numel() // (2 * m)
    if M >= GEMM_MIN_TOKENS:
        y = _blocked_gemm(xf.reshape(M, 2 * m), codes, scales, bias, m, group_size).reshape(x.shape[:-1] + (2 * n,))
        return y if x.dtype is _F32 else y.to(x.dtype)
    y = torch.empty(x.shape[:-1] + (2 * n,), dtype=_F32)
    if M:
        n_s, G = scales.shape[2], scales.shape[3]
        if bias is not None and (bias.dtype is not _F32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        _FN(xf.data_ptr(), M, m, codes.data_ptr(), P, n, kw, scales.data_ptr(), n_s, G, group_size,
            None if bias is None else bias.data_ptr(), y.data_ptr(),
            fold_mode(M), torch.get_num_threads())
    return y if x.dtype is _F32 else y.to(x.dtype)


def _blocked_gemm(x2: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                  group_size: int) -> Tensor:
    """Many tokens: decode a few hundred rows of A_hat at a time (C++, bit-identical to the
    reference weight) and multiply each block with torch.mm (MKL/OpenBLAS): x2 [M, 2m] -> [M, 2n]."""
    P, n, kw = codes.shape
    n_s, G = scales.shape[2], scales.shape[3]
    rows = max(16, min(n, _BLOCK_BYTES // (2 * 2 * m * 4)))
    y = torch.empty((x2.shape[0], 2 * n), dtype=_F32)
    block = torch.empty((2, rows, 2 * m), dtype=_F32)
    threads = torch.get_num_threads()
    for j0 in range(0, n, rows):
        j1 = min(n, j0 + rows)
        R = j1 - j0
        blk = block if R == rows else torch.empty((2, R, 2 * m), dtype=_F32)
        _DECODE_ROWS(codes.data_ptr(), P, n, kw, m, scales.data_ptr(), n_s, G, group_size, j0, j1,
                     blk.data_ptr(), threads)
        out = torch.mm(x2, blk.view(2 * R, 2 * m).t())      # [M, 2R]: Re rows, then Im rows
        y[:, j0:j1] = out[:, :R]
        y[:, n + j0:n + j1] = out[:, R:]
    if bias is not None:
        y += bias.to(_F32)
    return y


def packed_linear_direct(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                         group_size: int, kernel: str) -> Tensor:
    """`fairy2i.packed_linear` for the eager runner's CPU inference graphs (codegen/lower.py):
    the op's signature, the C++ kernel called straight from the graph, no dispatcher."""
    return cpu_forward(x if x.is_contiguous() else x.contiguous(), codes, scales, bias, m, group_size)
