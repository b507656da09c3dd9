"""Triton kernels of the packed op, part 3: load the generated source and launch it.

:func:`load_kernel` writes a spec's source (triton_source.py) atomically into
``kernel_cache_dir() / "triton"``, imports it from that file (Triton's `@jit` reads the
source of a real file) and caches the kernel per spec in this process;
:func:`generated_sources` lists the files this process used (dumps copy them).
:func:`launch_packed_linear` launches one spec; :func:`run_packed_triton` picks the spec
for the arguments (triton_spec.choose_spec) and launches it. Arguments are trusted:
the op boundary (ops/packed_triton.py) checked them.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import threading
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ...cache import atomic_write_text
from .triton_source import generate_source, source_path
from .triton_spec import ACT_DTYPES, KernelSpec, choose_spec

__all__ = ["generated_sources", "launch_packed_linear", "load_kernel", "run_packed_triton"]

_LOCK = threading.Lock()
_KERNELS: Dict[tuple, Any] = {}  # (spec, cache env) -> kernel
_SOURCES: Dict[pathlib.Path, None] = {}  # ordered set of files generated or loaded in this process


def generated_sources() -> List[pathlib.Path]:
    """Kernel source files generated or loaded by this process (for dumps to copy)."""
    return list(_SOURCES)


def _check_interpreter_imported() -> None:
    import triton.language as tl

    # triton's own @jit library (tl.zeros, tl.sum, ...) is decorated when triton is imported, and
    # is interpreted only if TRITON_INTERPRET was set by then; otherwise every kernel fails inside
    if type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton had been imported, so triton's library functions are "
            "not interpreted: set TRITON_INTERPRET=1 in the environment (or before the first `import triton`)"
        )


def load_kernel(spec: KernelSpec) -> Any:
    """The Triton kernel for `spec` (compiled on first launch), writing its source file on first use."""
    # keyed by the variables kernel_cache_dir() reads, so a changed cache folder gets its own file
    cache_key = (spec, os.environ.get("FAIRY2I_KERNEL_CACHE"), os.environ.get("FAIRY2I_CACHE"))
    kernel = _KERNELS.get(cache_key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _KERNELS.get(cache_key)
        if kernel is not None:
            return kernel
        if spec.interpret:
            _check_interpreter_imported()
        text = generate_source(spec)
        path = source_path(spec)
        try:
            current = path.read_text(encoding="utf-8") if path.is_file() else None
        except OSError:
            current = None
        if current != text:  # absent, or damaged: the hash names the content, so rewrite it
            atomic_write_text(path, text)
        mod_name = f"fairy2i_generated_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module  # triton resolves the kernel's globals through its module
        mod_spec.loader.exec_module(module)
        kernel = getattr(module, spec.name)
        _KERNELS[cache_key] = kernel
        _SOURCES[path] = None
        return kernel


def launch_packed_linear(spec: KernelSpec, x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
                         m: int, out: Optional[Tensor] = None, *, wrap: bool = False) -> Tensor:
    """Launch `spec`'s kernel: x [M, 2m], codes int32 [2T, n, KW], scales float32 [2T, 2, n_s, G], all contiguous.

    No validation beyond what the kernel needs (callers use :func:`packed_linear_triton`);
    exposed so tests and benchmarks can force a path or block sizes. `wrap` launches
    through torch.library.wrap_triton (inside the triton_op). -> y [M, 2n] in x's dtype.
    """
    M = x.shape[0]
    P, n, kw = (int(v) for v in codes.shape)
    G = int(scales.shape[3])
    assert P == spec.planes and (bias is not None) == spec.has_bias and x.dtype == ACT_DTYPES[spec.act_dtype]
    if out is None:
        y = x.new_zeros((M, 2 * n)) if spec.split_k > 1 else x.new_empty((M, 2 * n))
    else:
        y = out.zero_() if spec.split_k > 1 else out
    if M == 0:
        return y
    kernel = load_kernel(spec)
    if wrap:
        kernel = torch.library.wrap_triton(kernel)
    args = [x, codes, scales] + ([bias] if spec.has_bias else []) + [y]
    consts: Dict[str, int] = {"BLOCK_N": spec.block_n, "BLOCK_K": spec.block_k}
    if spec.scale == "group":
        consts["GROUP"] = spec.group_size
    if spec.path == "gemv":
        grid = (-(-n // spec.block_n), M)
        kernel[grid](*args, n, m, kw, G, **consts)
    else:
        grid = (-(-n // spec.block_n), -(-M // spec.block_m), spec.split_k)
        kernel[grid](*args, M, n, m, kw, G, BLOCK_M=spec.block_m, **consts)
    return y


def _spec_rows(M: Any, interpret: bool) -> int:
    """A concrete row count that picks the same spec as M, which is a SymInt under dynamic-shape tracing.

    On GPU the spec depends on M only through next_pow2(M) capped at 256 (the path thresholds are powers
    of two or 2, and block_m is at most next_pow2(M)), so tracing guards on M <= 1, 2, 4, ... rather than
    on M itself; the interpreter's blocks follow M (specialised, tests only).
    """
    if interpret:
        return int(M)
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        if M <= rows:
            return rows
    return 256


def run_packed_triton(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int, group_size: int,
                      n: int, interpret: bool, wrap: bool) -> Tensor:
    """Pick the spec for these arguments (choose_spec) and launch it: x [M, 2m] contiguous -> y [M, 2n]."""
    # arguments already validated. Under dynamic-shape tracing the weight shapes may be
    # SymInts: int() specialises on them (a layer's weights do not change shape)
    spec = choose_spec(_spec_rows(x.shape[0], interpret), int(n), int(m), int(codes.shape[0]) // 2,
                       int(group_size), bool(scales.shape[2] > 1), x.dtype, bias is not None, interpret)
    codes = codes.contiguous()
    scales = scales.to(torch.float32).contiguous()
    bias = bias.contiguous() if bias is not None else None
    return launch_packed_linear(spec, x, codes, scales, bias, m, wrap=wrap)
