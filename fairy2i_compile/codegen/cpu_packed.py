"""The packed op on CPU: a vectorised C++ kernel, built once with the system compiler.

Why C++ and not an Inductor decomposition (measured on this project's 2-core AVX2 EPYC,
torch 2.13, SmolLM2's lm_head shape 49152 x 576, batch 1; benchmarks/bench_cpu.py has
the full comparison):

    fp32 F.linear (MKL)                                 10.1-11.6 ms   (memory-bound, 113 MB)
    Inductor, best of 4 decompositions (select, xor,    6.2-6.8 ms     T=1
      sign-multiply, row-vectorised layout)              8.6-9.9 ms    T=2
    this kernel (fold path)                              1.5 ms  T=1,  3.0 ms  T=2

Inductor does fuse the unpack/select/reduce into one OpenMP loop nest, but it
re-derives the scaled activations inside the inner loop, cannot express a float
sign flip as an xor (bitcasts are emulated through memory) and spills; the result is
4-5x slower than the hand-written loop, outside the 2x margin the issue allows. A
general-purpose LUT formulation (T-MAC style) was slower still under Inductor (gathers
are emulated with scalar loads).

The source (cpu_packed.cpp, portable C++ with GCC/Clang vector extensions) is compiled
with `c++ -O3 -march=native -fopenmp` into `kernel_cache_dir()/cpu/` under a name that
hashes the source, the flags, the compiler's version and the machine, written
atomically; later processes load the built library (ctypes, no torch headers, about a
second to build). `FAIRY2I_CPU_KERNEL=0` disables it (the op then uses the torch
reference under kernel="auto"); `FAIRY2I_CXX` picks the compiler.

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
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cache import kernel_cache_dir

__all__ = [
    "SOURCE",
    "FOLD_MAX_TOKENS",
    "cpu_kernel_available",
    "cpu_kernel_library",
    "packed_linear_cpu",
    "cpu_forward",
    "packed_linear_direct",
    "build_cpu_kernel",
]

SOURCE = pathlib.Path(__file__).with_name("cpu_packed.cpp")
ABI_VERSION = 2
FOLD_MAX_TOKENS = 4          # the multiplication-free fold path serves decode-sized batches
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_LIB_PATH: Optional[pathlib.Path] = None
_FN = None   # the kernel's ctypes function, bound once (argtypes set)
_ERROR: Optional[str] = None


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


def build_cpu_kernel(cache_dir: Optional[pathlib.Path] = None) -> pathlib.Path:
    """Compile cpu_packed.cpp (if not already built) and return the library's path.

    Raises RuntimeError with the compiler's output when the build fails.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for c++, g++, clang++; set FAIRY2I_CXX)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(_FLAGS).encode(), _compiler_version(cxx).encode(),
                    platform.machine().encode(), platform.processor().encode()])
    ).hexdigest()[:16]
    folder = (cache_dir or kernel_cache_dir()) / "cpu"
    lib_path = folder / f"libfairy2i_cpu_{key}.so"
    if lib_path.is_file():
        return lib_path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} with {cxx} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib_path


def _load() -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
    global _LIB, _LIB_PATH, _FN, _ERROR
    with _LOCK:
        if _LIB is not None or _ERROR is not None:
            return _LIB, _ERROR
        if os.environ.get("FAIRY2I_CPU_KERNEL", "1").lower() in ("0", "off", "false", "no"):
            _ERROR = "disabled by FAIRY2I_CPU_KERNEL=0"
            return None, _ERROR
        try:
            path = build_cpu_kernel()
            lib = ctypes.CDLL(str(path))
            if lib.fairy2i_cpu_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has ABI {lib.fairy2i_cpu_abi_version()}, expected {ABI_VERSION}")
            fn = lib.fairy2i_packed_linear
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
            fn.restype = None
            _LIB, _LIB_PATH, _FN = lib, path, fn
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _ERROR = str(e)
        return _LIB, _ERROR


def cpu_kernel_available() -> Tuple[bool, str]:
    """(True, library path) once the kernel is built and loaded, else (False, why)."""
    lib, err = _load()
    return (True, str(_LIB_PATH)) if lib is not None else (False, err or "unknown error")


def cpu_kernel_library() -> Optional[pathlib.Path]:
    """Path of the loaded library (None until first use or when unavailable)."""
    return _LIB_PATH


def packed_linear_cpu(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                      group_size: int) -> Tensor:
    """The packed op on CPU tensors: x [..., 2m] (contiguous) -> y [..., 2n] in x's dtype."""
    from ..packed_ops import check_packed_linear

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
    y = torch.empty(x.shape[:-1] + (2 * n,), dtype=_F32)
    if M:
        n_s, G = scales.shape[2], scales.shape[3]
        if bias is not None and (bias.dtype is not _F32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        _FN(xf.data_ptr(), M, m, codes.data_ptr(), P, n, kw, scales.data_ptr(), n_s, G, group_size,
            None if bias is None else bias.data_ptr(), y.data_ptr(),
            M <= FOLD_MAX_TOKENS and n_s == 1 and G == 1, torch.get_num_threads())
    return y if x.dtype is _F32 else y.to(x.dtype)


def packed_linear_direct(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                         group_size: int, kernel: str) -> Tensor:
    """`fairy2i.packed_linear` for the eager runner's CPU inference graphs (codegen/lower.py):
    the op's signature, the C++ kernel called straight from the graph, no dispatcher."""
    return cpu_forward(x if x.is_contiguous() else x.contiguous(), codes, scales, bias, m, group_size)
