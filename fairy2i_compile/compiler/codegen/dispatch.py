"""Which implementation runs a packed layer: the `kernel` option, decided once.

The `kernel` option (config.py, PackedLinear, the op argument) names one of

    "auto"      "triton" on CUDA, "cpu" on CPU when the C++ kernel builds, else "torch"
    "triton"    the generated Triton kernels (triton_packed.py): CUDA, or CPU under TRITON_INTERPRET=1
    "cpu"       the vectorised C++ kernel (cpu_packed.py), CPU tensors
    "inductor"  the pass decompose_packed rewrites the layer into aten ops for Inductor;
                a layer it leaves alone runs as "auto"
    "torch"     the pure-torch reference (ops/packed_reference.py): every device, the test oracle

:data:`IMPLEMENTATIONS` is the table of what can run: one :class:`Kernel` per name, in
"auto"'s order of preference, each with a function that says why it cannot run on a
device (None when it can) and a loader for its implementation, which takes the op's
arguments less `kernel` and trusts them (the op boundary checked them once).
:func:`resolve_kernel` turns an option value and a device into a table entry, with the
fix in the error when the choice cannot run there; :func:`implementation` memoises that
per (option value, device type) in one dict, so the per-call cost of the op is one
lookup. Lowering (lower.py) asks once per graph node, where the device is known.

Adding a kernel: write its module (a function with the signature of
:func:`ops.packed_reference.packed_linear_body`) and add its :class:`Kernel` to
:data:`IMPLEMENTATIONS` here; the option, the op, PackedLinear and the checkpoints take
the new name from this table (README, "Adding a kernel").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..options import KernelName
from .triton_spec import triton_interpreter_enabled, triton_unavailable_reason

__all__ = [
    "IMPLEMENTATIONS",
    "Kernel",
    "check_kernel_name",
    "eager_cpu_op",
    "implementation",
    "kernel_names",
    "register_kernel",
    "resolve_kernel",
    "runs_cpu_kernel",
    "triton_interpreter_enabled",
]

PackedFn = Callable[..., Tensor]  # (x, codes, scales, bias, m, group_size) -> y, arguments trusted
AUTO = (KernelName.AUTO, KernelName.INDUCTOR)  # option values that pick from the table ("inductor": see docstring)


@dataclass(frozen=True)
class Kernel:
    """One implementation of fairy2i::packed_linear.

    why_not(device) -> None when it runs on tensors on `device`, else the error message (with the fix).
    load() -> the implementation (imported on first use: Triton and the C++ build stay lazy).
    auto_on: the device types where kernel="auto" tries it, in table order.
    per_call: whether why_not reads state that may change between calls (then nothing is memoised).
    """

    name: str
    why_not: Callable[[torch.device], Optional[str]]
    load: Callable[[], PackedFn]
    auto_on: Tuple[str, ...] = ()
    per_call: Callable[[torch.device], bool] = lambda device: False


def _load_triton() -> PackedFn:
    from ..ops.packed_triton import packed_linear_triton_trusted

    return packed_linear_triton_trusted


def _cpu_why_not(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"kernel='cpu' runs on CPU tensors, got {device}; use kernel='auto' or 'triton'"
    from .cpu_packed import cpu_kernel_available

    ok, why = cpu_kernel_available()
    return None if ok else f"kernel='cpu': the C++ kernel is unavailable ({why}); use kernel='torch'"


def _load_cpu() -> PackedFn:
    from .cpu_packed import cpu_forward

    return cpu_forward


def _load_torch() -> PackedFn:
    from ..ops.packed_reference import packed_linear_body

    return packed_linear_body


IMPLEMENTATIONS: Dict[str, Kernel] = {
    KernelName.TRITON: Kernel(KernelName.TRITON, triton_unavailable_reason, _load_triton, auto_on=("cuda",),
                              per_call=lambda device: device.type == "cpu"),  # the interpreter switch is read per call
    KernelName.CPU: Kernel(KernelName.CPU, _cpu_why_not, _load_cpu, auto_on=("cpu",)),
    KernelName.TORCH: Kernel(KernelName.TORCH, lambda device: None, _load_torch),
}
"""name -> Kernel, in "auto"'s order of preference ("torch", which runs everywhere, last)."""


def register_kernel(kernel: Kernel) -> None:
    """Add (or replace) an implementation; it becomes a valid `kernel` option value."""
    if kernel.name in AUTO:
        raise ValueError(f"kernel name {kernel.name!r} is reserved ({AUTO}); pick another name")
    IMPLEMENTATIONS[kernel.name] = kernel
    IMPLEMENTATIONS[KernelName.TORCH] = IMPLEMENTATIONS.pop(KernelName.TORCH)  # the reference stays the last resort
    _MEMO.clear()


def kernel_names() -> Tuple[str, ...]:
    """Every value of the `kernel` option: "auto", the implementations, "inductor", the reference "torch"."""
    return (KernelName.AUTO, *(k for k in IMPLEMENTATIONS if k != KernelName.TORCH), KernelName.INDUCTOR,
            KernelName.TORCH)


def check_kernel_name(kernel: str) -> None:
    """ValueError naming the allowed values unless `kernel` is one."""
    if kernel not in AUTO and kernel not in IMPLEMENTATIONS:
        raise ValueError(f"fairy2i.packed_linear: kernel must be one of {list(kernel_names())}, got {kernel!r}")


def _resolve(kernel: str, device: torch.device) -> Kernel:
    check_kernel_name(kernel)
    if kernel in AUTO:
        for entry in IMPLEMENTATIONS.values():
            if device.type in entry.auto_on and entry.why_not(device) is None:
                return entry
        return IMPLEMENTATIONS[KernelName.TORCH]
    entry = IMPLEMENTATIONS[kernel]
    why = entry.why_not(device)
    if why is not None:
        raise RuntimeError(why)
    return entry


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation ("triton" | "cpu" | "torch" | a registered one) that `kernel` means on `device`.

    ValueError for an unknown name, RuntimeError (with the fix) when it cannot run on `device`.
    """
    return str(_resolve(kernel, torch.device(device)).name)  # a plain str: it becomes an op argument


class _Resolved:
    __slots__ = ("name", "fn", "cpu_op")

    def __init__(self, name: str, fn: PackedFn):
        self.name, self.fn = name, fn
        self.cpu_op: Optional[bool] = None  # eager_cpu_op's answer, filled on first ask


_MEMO: Dict[Tuple[str, str], _Resolved] = {}  # (kernel option, device type) -> resolution: the only memo


def _resolved(kernel: str, device: torch.device) -> _Resolved:
    hit = _MEMO.get((kernel, device.type))
    if hit is None:
        entry = _resolve(kernel, device)
        hit = _Resolved(entry.name, entry.load())
        if not entry.per_call(device):
            _MEMO[(kernel, device.type)] = hit
    return hit


def implementation(kernel: str, device: torch.device) -> PackedFn:
    """The function that runs `kernel` on `device` (resolved once per pair, then one dict lookup)."""
    return _resolved(kernel, device).fn


def runs_cpu_kernel(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` on tensors on `device` runs the C++ CPU kernel. False where
    resolve_kernel raises: the op raises that error, with its message, when it runs."""
    device = torch.device(device)
    if device.type != "cpu":
        return False
    try:
        return resolve_kernel(kernel, device) == "cpu"
    except RuntimeError:
        return False


def eager_cpu_op(kernel: str) -> bool:
    """Whether `kernel` on CPU tensors means the C++ kernel and its op registration
    (fairy2i::packed_linear_cpu in C++) is loaded: PackedLinear's eager fast path."""
    hit = _MEMO.get((kernel, "cpu"))
    if hit is not None and hit.cpu_op is not None:  # every call after the first: one lookup
        return hit.cpu_op
    try:
        hit = _resolved(kernel, torch.device("cpu"))
    except RuntimeError:
        return False
    if hit.cpu_op is None:
        from .cpu_packed import cpu_op_available

        hit.cpu_op = hit.name == "cpu" and cpu_op_available()[0]
    return hit.cpu_op
