"""Lowering of the packed op (`fairy2i::packed_linear`) to generated kernels.

One kernel family per file:

    sign_table.py      the code -> (swap, sign) table, derived with sympy
    triton_packed.py   Triton kernels generated from a template (GPU; TRITON_INTERPRET=1 on CPU):
                       specs, path choice, launch; multiplication-free GEMV, decode-to-tile GEMM
    triton_mma.py      its tensor-core templates: codes as +-1 sign-bit atoms summed by tl.dot
                       (small batches), or combined into dense tiles of A_hat (larger batches)
    cpu_packed.py      the vectorised C++ kernel for CPU tensors, built once with the system
                       compiler and cached

`resolve_kernel(kernel, device)` turns the `kernel` option into the implementation
that runs ("triton", "cpu" or "torch"), with a clear error when the choice cannot
run on that device; `runs_cpu_kernel(kernel, device)` asks only whether it is the C++
CPU kernel (what the CPU lowerings and PackedLinear's eager fast path check).
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_kernel", "runs_cpu_kernel", "triton_interpreter_enabled"]


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation ("triton" | "cpu" | "torch") that `kernel` means for tensors on `device`."""
    device = torch.device(device)
    if kernel == "torch":
        return "torch"
    if kernel == "triton":
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise RuntimeError(
                "kernel='triton' got CPU tensors, and Triton runs on CPU only through its interpreter: "
                "set TRITON_INTERPRET=1 before importing triton, move the model to CUDA, or use "
                "kernel='auto' (the C++ CPU kernel) / kernel='torch'"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"kernel='triton' supports CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {device}")
        return "triton"
    if kernel == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"kernel='cpu' runs on CPU tensors, got {device}; use kernel='auto' or 'triton'")
        from .cpu_packed import cpu_kernel_available

        ok, why = cpu_kernel_available()
        if not ok:
            raise RuntimeError(f"kernel='cpu': the C++ kernel is unavailable ({why}); use kernel='torch'")
        return "cpu"
    if kernel in ("auto", "inductor"):  # "inductor": layers the pass did not decompose run as "auto"
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu":
            from .cpu_packed import cpu_kernel_available

            return "cpu" if cpu_kernel_available()[0] else "torch"
        return "torch"
    raise ValueError(f"kernel must be one of 'auto', 'triton', 'cpu', 'inductor', 'torch', got {kernel!r}")


def runs_cpu_kernel(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` on tensors on `device` runs the C++ CPU kernel. False where
    resolve_kernel raises: the op raises that error, with its message, when it runs."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return resolve_kernel(kernel, device) == "cpu"
    except RuntimeError:
        return False
