"""Triton lowering of the packed op: generated, spec-specialised kernels.

    packed_linear_triton(x, codes, scales, bias, m, group_size) -> y
    x [..., 2m] -> y [..., 2n]; codes int32 [2T, n, ceil(m/16)]; scales [2T, 2, n_s, G]

What the kernels compute (DESIGN.md 1.1-1.4). With z = a + i b (a = x[:, :m],
b = x[:, m:]) and plane p = 2t + (0 for U_t, 1 for W_t):

    y_re + i y_im = sum_t Q^U_t z + Q^W_t conj(z) + bias,     Q[j, c] = s(j, c) * i**code(j, c)

and s is s_re for the +-1 codes (0, 2) and s_im for the +-i codes (1, 3).

Four kernel paths; `choose_spec` picks one per call (M = activation rows):

    mma    M <= MMA_MAX_M (16)   each code as two +-1 sign-bit atoms, summed by tl.dot   triton_mma.py
    dense  M >  MMA_MAX_M        the atoms combined into dense tiles of A_hat + tl.dot   triton_mma.py
    gemv   M <= GEMV_MAX_M (2)   multiplication-free selects on the CUDA cores           below
    gemm   M >  GEMV_MAX_M       decode to tiles with selects + tl.dot                   below

mma and dense take tensor and row scales and groups whose size is a multiple of 16; gemv and
gemm take every group size (groups that start inside a code word: 6, 24, ...) and stay as the
CPU-style reference kernels. Which is which and why (sm_90 SASS of the main loops,
benchmarks/results/bench_kernels_sass_sm90.md): on a GPU a select costs what an FMA costs, so
"multiplication-free" buys nothing by itself; what costs is integer work per code. The GEMV spends
~34 lane-ops per code (compares, selects, adds, and a cross-warp reduction every step); the mma
path spends ~3.3-3.8 (a shift and two logic ops per pair of atoms) and lets the tensor cores add,
at 2T times the dense product's tensor-core work, which is cheap while the batch is small; dense
spends ~6-18 per code per BLOCK_M rows and does the dense product's work, for larger batches.

GEMV (decode, forced or M <= GEMV_MAX_M for other groups): grid (cdiv(n, BLOCK_N), M), one program per BLOCK_N
complex output rows of one activation row. Per code, i**k z (U) or i**k conj(z)
(W) is a signed pick of a or b (`sign_table.TABLE`, expanded with sympy), so
the inner loop is selects, negations and adds: it sums, per plane, the picks of
the +-1 codes and of the +-i codes into four fp32 vectors (re/im x axis) and
multiplies them by s_re / s_im once per output element and plane after the
loop. Group scales: the loop runs group by group (`for g0 in range(0, m, GROUP)`),
inner blocks start at the group's first column and are masked at its end, so a
block never straddles two groups and the scales multiply once per (output
element, plane, group). When GROUP % 16 == 0 the blocks stay word-aligned and
BLOCK_K divides GROUP; otherwise (e.g. g = 6 or 24) the shift of each code inside
its word is computed per column, which costs a few integer ops but no multiply.
The region between the `inner loop: begin/end` markers of every GEMV source has
no `*` (the tests parse it).

GEMM (forced, or M > 2 for other groups): grid (cdiv(n, BLOCK_N), cdiv(M, BLOCK_M)). Per K step
the codes of all 2T planes are decoded into fp32 tiles [BLOCK_K, BLOCK_N] of
Re/Im U and W summed over stages, scales applied during decode (a select of
+-s, group scales gathered per column), then the four real blocks of A_hat^T
(A11 = ReU + ReW, A12 = ImW - ImU, A21 = ImW + ImU, A22 = ReU - ReW) go to
`tl.dot` with fp32 accumulation: y_re += a A11^T + b A12^T, y_im += a A21^T + b A22^T.
On GPU the tiles are cast to the activation dtype (bf16/fp16 tensor cores, fp32
with input_precision="ieee"); under the interpreter everything is fp32, because
the interpreter's bf16 `tl.dot` is wrong.

Masks on every tail: columns past m load a = b = 0 (so the padding codes of the
last word, and any code past m, add nothing), rows past n (and M) are masked on
load and store. Accumulation is fp32; y is stored in x's dtype.

Code generation. A frozen :class:`KernelSpec` (path, stages, scale kind, group
size, activation dtype, bias, block sizes, launch config, interpreter flag) fills
the templates below; the per-code fragments come from `sign_table`. The source
gets a header comment (the spec and what the kernel computes) because dumps show
it to users. It is written atomically to
``kernel_cache_dir() / "triton" / f"{name}_{hash}.py"`` with the hash over (spec,
template text, generator version, sign table), imported from that file (Triton's
`@jit` reads the source of a real file), and the kernel is cached per spec in
this process. :func:`generated_sources` lists the files this process used.

torch.library registration. The launch is registered as
``torch.library.triton_op("fairy2i::packed_linear_triton")`` and, on GPU, the
kernel is launched through ``torch.library.wrap_triton``, so Inductor sees it
(AOTAutograd decomposes the op into a `triton_kernel_wrapper_functional` node).
Under TRITON_INTERPRET=1 (measured on torch 2.13 + triton 3.7) wrap_triton is
not enough: eager calls run (wrap_triton hands an interpreted kernel back
unchanged), but `triton_op` also runs the function as its fake implementation
and as the AOT functional decomposition, and an interpreted kernel launched on
FakeTensors fails ("Cannot access data pointer of Tensor"); an interpreted
kernel has no JITFunction to capture as a higher-order op. So under the
interpreter the triton_op's body calls a second, opaque op,
``fairy2i::packed_linear_triton_interpreted`` (custom_op + register_fake), that
launches the kernel directly: torch.compile still traces it, Inductor sees an
extern call. The choice is made per call, so it does not matter whether
TRITON_INTERPRET was set before or after this module was imported.
Eager calls with plain tensors skip the op dispatch and launch directly (the
op's Python wrapper costs tens of microseconds, as much as a decode-sized kernel);
anything traced (FakeTensor, a dispatch mode, torch.compile) goes through the op.

Triton is imported lazily: the package never imports this module at import time,
and this module imports triton only through `triton_op`'s registration on a
machine that has it (without triton it imports, generates sources and registers
a custom_op, so a missing triton surfaces when a kernel is launched).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import threading
from dataclasses import dataclass
from string import Template
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..cache import atomic_write_text, kernel_cache_dir
from ..packed_ops import check_packed_linear
from . import resolve_kernel, triton_interpreter_enabled
from .sign_table import AXIS, TABLE, UNIT, codes_on_axis, describe, term_expr
from .triton_mma import DENSE_BODY, DENSE_NOTE, DENSE_TEMPLATE, MMA_BODY, MMA_NOTE, MMA_TEMPLATE, dense_slots, mma_slots

__all__ = [
    "GEMV_MAX_M",
    "MMA_MAX_M",
    "PATHS",
    "GENERATOR_VERSION",
    "INNER_LOOP_BEGIN",
    "INNER_LOOP_END",
    "KernelSpec",
    "choose_spec",
    "generate_source",
    "source_path",
    "load_kernel",
    "generated_sources",
    "launch_packed_linear",
    "packed_linear_triton",
]

GENERATOR_VERSION = 2
PATHS = ("mma", "dense", "gemv", "gemm")
MMA_MAX_M = 16  # M <= 16 rows take the tensor-core atom kernel where it applies, more rows "dense" (choose_spec)
GEMV_MAX_M = 2  # otherwise M <= 2 rows take the multiplication-free GEMV (group sizes not a multiple of 16)
INNER_LOOP_BEGIN = "# --- inner loop: begin (selects, negations and adds only) ---"
INNER_LOOP_END = "# --- inner loop: end ---"

_ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TL_DTYPES = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_MAX_STAGES = 4


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@dataclass(frozen=True)
class KernelSpec:
    """Everything a generated kernel is specialised on (the cache key, with the template text).

    path:       "mma" (small batch: +-1 atoms on the tensor cores, triton_mma.py) |
                "dense" (larger batch: atoms combined into dense tiles of A_hat + tl.dot, triton_mma.py) |
                "gemv" (decode, multiplication-free) | "gemm" (decode to tiles with selects + tl.dot)
    stages:     T (the kernel reads 2T planes)
    scale:      "tensor" | "row" | "group"
    group_size: g for scale == "group", else 0
    act_dtype:  "float32" | "bfloat16" | "float16" (x, bias and y)
    has_bias:   the kernel adds a [2n] bias
    block_m:    activation rows per program (1 for gemv)
    block_n:    complex output rows per program
    block_k:    complex input columns per inner step
    num_warps, num_stages: launch config (baked into the source as a one-config autotune)
    interpret:  generated for the Triton interpreter (tl.dot inputs in fp32)
    decode:     "bits" (integer ops in Triton) | "asm" (mma / dense, GPU only: PTX lop3 per atom pair; dense
                also sums the tiles as bf16x2 / f16x2 pairs, so not for fp32 activations)
    split_k:    mma only: programs per output tile along K, their partial sums added into a zeroed y
                (atomic adds in y's dtype): more programs in flight when n is small (batch 1)
    """

    path: str
    stages: int
    scale: str
    group_size: int = 0
    act_dtype: str = "float32"
    has_bias: bool = False
    block_m: int = 1
    block_n: int = 16
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False
    decode: str = "bits"
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"KernelSpec.path must be one of {PATHS}, got {self.path!r}")
        if self.decode not in ("bits", "asm"):
            raise ValueError(f"KernelSpec.decode must be 'bits' or 'asm', got {self.decode!r}")
        if self.decode == "asm" and (self.path not in ("mma", "dense") or self.interpret):
            raise ValueError(f"KernelSpec: decode='asm' (inline PTX) exists for paths 'mma' and 'dense' on a GPU "
                             f"only, got {self.path=} {self.interpret=}")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 1 or (
                self.split_k > 1 and self.path != "mma"):
            raise ValueError(f"KernelSpec.split_k must be an int >= 1, and 1 unless path='mma', got "
                             f"{self.split_k!r} for {self.path=}")
        if self.decode == "asm" and self.path == "dense" and self.act_dtype == "float32":
            raise ValueError("KernelSpec: path='dense' with decode='asm' sums tiles in bf16x2 / f16x2 pairs: "
                             "bfloat16 or float16 activations only, got float32")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or not 1 <= self.stages <= _MAX_STAGES:
            raise ValueError(f"KernelSpec.stages must be an int in 1..{_MAX_STAGES}, got {self.stages!r}")
        if self.scale not in ("tensor", "row", "group"):
            raise ValueError(f"KernelSpec.scale must be 'tensor', 'row' or 'group', got {self.scale!r}")
        if self.scale == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"KernelSpec: scale='group' needs group_size >= 1, got {self.group_size!r}")
        elif self.group_size != 0:
            raise ValueError(f"KernelSpec: group_size must be 0 for scale={self.scale!r}, got {self.group_size!r}")
        if self.act_dtype not in _ACT_DTYPES:
            raise ValueError(f"KernelSpec.act_dtype must be one of {list(_ACT_DTYPES)}, got {self.act_dtype!r}")
        for field in ("block_m", "block_n", "block_k"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not _is_pow2(v):
                raise ValueError(f"KernelSpec.{field} must be a power of two, got {v!r}")
        if self.path == "gemv":
            if self.block_m != 1:
                raise ValueError(f"KernelSpec: gemv handles one activation row per program, got {self.block_m=}")
            # sub-word blocks (< 16 columns) are only useful to fit small ragged groups
            if self.block_k < 16 and not (self.scale == "group" and self.group_size % 16):
                raise ValueError(f"KernelSpec: gemv block_k must be >= 16 (one code word), got {self.block_k}")
        elif self.path in ("mma", "dense"):
            if self.block_k < 16:
                raise ValueError(f"KernelSpec: {self.path} block_k must be >= 16 (whole code words), "
                                 f"got {self.block_k}")
            if self.scale == "group" and self.group_size % self.block_k:
                raise ValueError(f"KernelSpec: {self.path} with group scales needs block_k to divide the group, got "
                                 f"{self.group_size=} {self.block_k=}")
        else:
            if min(self.block_m, self.block_n, self.block_k) < 16:
                raise ValueError(
                    f"KernelSpec: tl.dot needs block_m, block_n, block_k >= 16, got "
                    f"{(self.block_m, self.block_n, self.block_k)}"
                )
        if self.num_warps < 1 or not _is_pow2(self.num_warps) or self.num_stages < 1:
            raise ValueError(f"KernelSpec: bad launch config {self.num_warps=} {self.num_stages=}")

    @property
    def planes(self) -> int:
        return 2 * self.stages

    @property
    def word_aligned(self) -> bool:
        """Every inner block starts at a multiple of 16 columns (the code shifts are loop-invariant)."""
        if self.block_k % 16:
            return False
        return self.scale != "group" or self.group_size % 16 == 0

    @property
    def group_per_block(self) -> bool:
        """Group scales whose groups each hold whole K steps (GROUP % BLOCK_K == 0): one scale per row and step."""
        return self.scale == "group" and self.group_size % self.block_k == 0

    @property
    def name(self) -> str:
        scale = f"g{self.group_size}" if self.scale == "group" else self.scale
        bias = "_bias" if self.has_bias else ""
        interp = "_interp" if self.interpret else ""
        asm = "_asm" if self.decode == "asm" else ""
        split = f"_split{self.split_k}" if self.split_k > 1 else ""
        return f"fairy2i_{self.path}_t{self.stages}_{scale}_{_SHORT[self.act_dtype]}{bias}{asm}{split}{interp}"


# --------------------------------------------------------------------------- #
# templates ($-slots are filled by the generator; everything else is verbatim)
# --------------------------------------------------------------------------- #

_HEADER_TEMPLATE = """\
# Generated by fairy2i_compile.codegen.triton_packed (generator version $version). Do not edit:
# the file is regenerated from its template; its name carries the hash of (spec, template, generator).
#
# spec: $spec
#
# y[r, :n] + i*y[r, n:] = sum_{t=1..$stages} (Q^U_t z_r + Q^W_t conj(z_r))$bias_formula
#     z_r = x[r, :m] + i*x[r, m:]  (a = Re z, b = Im z), Q[j, c] = s(j, c) * i**code(j, c)
#     codes: int32 [$planes, n, ceil(m/16)], plane 2t-2 = U_t, 2t-1 = W_t, column c at bits 2*(c % 16)
#     scales: float32 [$planes, 2, n_s, G]: s_re for codes 0, 2 (+-1), s_im for codes 1, 3 (+-i); $scale_note
$path_note"""

_GEMV_NOTE = """\
# GEMV (decode): grid (cdiv(n, BLOCK_N), M), one program per BLOCK_N output rows of one activation row.
# Inner loop: per code a signed pick of a or b (code table below, derived with sympy), summed per plane
# separately for the +-1 and the +-i codes; the scales multiply those sums after the loop$group_note.
#     U (i**k z):       $u_table
#     W (i**k conj z):  $w_table
"""

_GEMM_NOTE = """\
# GEMM (prefill): grid (cdiv(n, BLOCK_N), cdiv(M, BLOCK_M)). Per K step the codes of all planes are decoded
# into tiles [BLOCK_K, BLOCK_N] of Re/Im U and W (summed over stages, scales applied), then
#     y_re += a @ A11^T + b @ A12^T,  y_im += a @ A21^T + b @ A22^T   (tl.dot, fp32 accumulation)
# with A11 = ReU + ReW, A12 = ImW - ImU, A21 = ImW + ImU, A22 = ReU - ReW; dot inputs in $dot_dtype.
#     i**k -> (Re, Im):  $unit_table
"""

_KERNEL_HEAD = """\
$header
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({}, num_warps=$num_warps, num_stages=$num_stages)], key=[])
@triton.jit
def $name(
    # pointers
    x_ptr,       # [M, 2m] $act_dtype, contiguous
    codes_ptr,   # [$planes, n, KW] int32, contiguous
    scales_ptr,  # [$planes, 2, n_s, G] float32, contiguous$bias_param
    y_ptr,       # [M, 2n] $act_dtype: y[:, :n] = Re, y[:, n:] = Im
    # sizes
"""

_GEMV_TEMPLATE = _KERNEL_HEAD + """\
    n, m, KW, G,
    # blocks
    BLOCK_N: tl.constexpr,  # complex output rows per program
    BLOCK_K: tl.constexpr,  # input columns per inner step$group_param
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # one activation row per program
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_k = tl.arange(0, BLOCK_K)
    x_re = x_ptr + row * (2 * m)  # a = Re z
    x_im = x_re + m               # b = Im z
    code_rows = offs_n[:, None] * KW
$setup
    acc_re = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_im = tl.zeros([BLOCK_N], dtype=tl.float32)
$loop
$epilogue"""

# tensor / row scales: one pass over K, scales after it
_GEMV_LOOP_FLAT = """\
    # partial sums per plane: _re1/_im1 collect the +-1-coded terms, _rei/_imi the +-i-coded terms
$zero
    for k in range(0, m, BLOCK_K):
        $begin
        kk = k + offs_k
        mask_k = kk < m  # padding codes past m meet a = b = 0 and add nothing
$inner
        $end
    # scales: once per output element, stage and U/W
$scale"""

# group scales: group by group; inner blocks start at the group's first column and stop at its end
_GEMV_LOOP_GROUPED = """\
    for g0 in range(0, m, GROUP):
        # partial sums of this group per plane: _re1/_im1 the +-1-coded terms, _rei/_imi the +-i-coded
$zero
        for k in range(g0, g0 + GROUP, BLOCK_K):
            $begin
            kk = k + offs_k
            mask_k = (kk < m) & (kk < g0 + GROUP)  # blocks never cross a group; padding past m adds nothing
$inner
            $end
        # scales: once per output element, stage, U/W and group
        gi = g0 // GROUP
$scale"""

_GEMV_INNER_HEAD = """\
a = tl.load(x_re + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
b = tl.load(x_im + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
na = -a
nb = -b"""

_EPILOGUE = """\
$bias
    mask_out = $mask_out
    tl.store(y_out, acc_re.to(y_ptr.dtype.element_ty), mask=mask_out)
    tl.store(y_out + n, acc_im.to(y_ptr.dtype.element_ty), mask=mask_out)
"""

_GEMM_TEMPLATE = _KERNEL_HEAD + """\
    M, n, m, KW, G,
    # blocks
    BLOCK_M: tl.constexpr,  # activation rows per program
    BLOCK_N: tl.constexpr,  # complex output rows per program
    BLOCK_K: tl.constexpr,  # input columns per K step$group_param
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < n
    x_re = x_ptr + offs_m[:, None] * (2 * m)  # [BLOCK_M, 1]: a = Re z
    x_im = x_re + m                           # b = Im z
    # weight tiles are [BLOCK_K, BLOCK_N]: input columns down, output rows across
    code_cols = offs_n[None, :] * KW
    offs_w = tl.arange(0, BLOCK_K // 16)  # code words per K step (16 codes each)
    lane_shift = (tl.arange(0, 16) * 2)[None, :, None]  # bit offset of code j in its word
$setup
    acc_re = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_im = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, m, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < m  # columns past m load a = b = 0, so the padding codes add nothing
        mask_mk = mask_m[:, None] & mask_k[None, :]
        wi = k // 16 + offs_w  # word index of this step's codes (BLOCK_K is a multiple of 16)
        mask_wn = (wi < KW)[:, None] & mask_n[None, :]
        a = tl.load(x_re + kk[None, :], mask=mask_mk, other=0.0)$x_cast
        b = tl.load(x_im + kk[None, :], mask=mask_mk, other=0.0)$x_cast
        words = code_cols + wi[:, None]  # [BLOCK_K // 16, BLOCK_N]: each word loaded once
$decode
        # the real blocks of A_hat, transposed (DESIGN.md 1.1)
        a11 = (u_re + w_re).to($dot_ty)
        a12 = (w_im - u_im).to($dot_ty)
        a21 = (w_im + u_im).to($dot_ty)
        a22 = (u_re - w_re).to($dot_ty)
        acc_re = tl.dot(a, a11, acc_re$dot_kw)
        acc_re = tl.dot(b, a12, acc_re$dot_kw)
        acc_im = tl.dot(a, a21, acc_im$dot_kw)
        acc_im = tl.dot(b, a22, acc_im$dot_kw)
$epilogue"""

_TEMPLATES = {
    "gemv": (_HEADER_TEMPLATE, _GEMV_NOTE, _GEMV_TEMPLATE, _GEMV_LOOP_FLAT, _GEMV_LOOP_GROUPED,
             _GEMV_INNER_HEAD, _EPILOGUE),
    "gemm": (_HEADER_TEMPLATE, _GEMM_NOTE, _GEMM_TEMPLATE, _EPILOGUE),
    "mma": (_HEADER_TEMPLATE, MMA_NOTE, _KERNEL_HEAD, MMA_TEMPLATE),
    "dense": (_HEADER_TEMPLATE, DENSE_NOTE, _KERNEL_HEAD, DENSE_TEMPLATE),
}

_NAMES = {"a": "a", "-a": "na", "b": "b", "-b": "nb"}


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _planes(stages: int) -> List[Tuple[int, str, bool, str]]:
    """(plane index, variable tag, conj, label) in storage order: U_1, W_1, U_2, ..."""
    out = []
    for t in range(1, stages + 1):
        out.append((2 * t - 2, f"u{t}", False, f"U_{t}"))
        out.append((2 * t - 1, f"w{t}", True, f"W_{t}"))
    return out


def _select_chain(picks: List[Tuple[int, str]]) -> str:
    """tl.where(c == k0, e0, tl.where(c == k1, e1, 0.0)) for [(k0, e0), (k1, e1), ...]."""
    expr = "0.0"
    for k, e in reversed(picks):
        expr = f"tl.where(c == {k}, {e}, {expr})"
    return expr


def _offset(coef: int, unit: str) -> str:
    """Source text of coef * unit, '' for 0 (keeps the generated pointer expressions short)."""
    if coef == 0:
        return ""
    return f"{unit} + " if coef == 1 else f"{coef} * {unit} + "


def _plane_base(p: int) -> str:
    return "codes_ptr" if p == 0 else f"codes_ptr + {_offset(p, 'n * KW')[:-3]}"


def _header(spec: KernelSpec) -> str:
    fields = ", ".join(f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec))
    scale_note = {
        "tensor": "one (s_re, s_im) per plane (n_s = G = 1)",
        "row": "one (s_re, s_im) per plane and output row (n_s = n, G = 1)",
        "group": (f"one per plane, output row and group of {spec.group_size} columns "
                  f"(n_s = n, G = ceil(m/{spec.group_size}))"),
    }[spec.scale]
    if spec.path == "gemv":
        group_note = "" if spec.scale != "group" else " (once per group: blocks never cross a group)"
        note = Template(_GEMV_NOTE).substitute(group_note=group_note, u_table=describe(False), w_table=describe(True))
    elif spec.path == "mma":
        slots = mma_slots(spec, _next_pow2(spec.planes))
        note = Template(MMA_NOTE).substitute(decode=slots["decode_name"], group_note=slots["group_note"],
                                             dot_dtype=slots["dot_dtype"])
    elif spec.path == "dense":
        slots = dense_slots(spec)
        note = Template(DENSE_NOTE).substitute(decode=slots["decode_name"], tile_math=slots["tile_math"],
                                               dot_dtype=slots["dot_dtype"])
    else:
        units = "  ".join(f"{k}: ({UNIT[k][0]:+d}, {UNIT[k][1]:+d})" for k in range(4))
        note = Template(_GEMM_NOTE).substitute(dot_dtype=_dot_dtype(spec), unit_table=units)
    return Template(_HEADER_TEMPLATE).substitute(
        version=GENERATOR_VERSION, spec=f"KernelSpec({fields})", stages=spec.stages, planes=spec.planes,
        bias_formula=" + bias[j] (re) / bias[n + j] (im)" if spec.has_bias else "",
        scale_note=scale_note, path_note=note,
    )


def _dot_dtype(spec: KernelSpec) -> str:
    # the interpreter's bf16/fp16 tl.dot gives wrong answers: keep dot inputs fp32 there
    return "float32" if spec.interpret else spec.act_dtype


def _common_slots(spec: KernelSpec) -> Dict[str, str]:
    return dict(
        header=_header(spec), name=spec.name, act_dtype=spec.act_dtype, planes=str(spec.planes),
        num_warps=str(spec.num_warps), num_stages=str(spec.num_stages),
        bias_param="\n    bias_ptr,    # [2n] " + spec.act_dtype if spec.has_bias else "",
        group_param=(f"\n    GROUP: tl.constexpr,    # scale group size ({spec.group_size} columns)"
                     if spec.scale == "group" else ""),
    )


def _epilogue(spec: KernelSpec) -> str:
    if spec.path == "gemv":
        out = "    y_out = y_ptr + row * (2 * n) + offs_n"
        bias = ("    acc_re += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)\n"
                "    acc_im += tl.load(bias_ptr + n + offs_n, mask=mask_n, other=0.0).to(tl.float32)\n")
        mask = "mask_n"
    else:
        out = "    y_out = y_ptr + offs_m[:, None] * (2 * n) + offs_n[None, :]"
        bias = ("    acc_re += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]\n"
                "    acc_im += tl.load(bias_ptr + n + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]\n")
        mask = "mask_m[:, None] & mask_n[None, :]"
    text = (bias if spec.has_bias else "") + out
    return Template(_EPILOGUE).substitute(bias=text, mask_out=mask)


def _gemv_source(spec: KernelSpec) -> str:
    planes = _planes(spec.stages)
    grouped = spec.scale == "group"
    depth = 12 if grouped else 8  # indentation of the inner loop body

    setup = []
    if spec.word_aligned:  # each code word is loaded once and split into its 16 codes in registers
        setup.append("    offs_w = tl.arange(0, BLOCK_K // 16)  # code words per inner step (16 codes each)")
        setup.append("    lane_shift = (tl.arange(0, 16) * 2)[None, None, :]  # bit offset of code j in its word")
    setup.append("    # plane p of the codes starts at p * n * KW")
    for p, tag, _, label in planes:
        setup.append(f"    {tag}_codes = {_plane_base(p)}  # {label}")
    if grouped:
        setup.append("    scale_rows = offs_n * G")

    zero = [f"{tag}_{part} = tl.zeros([BLOCK_N], dtype=tl.float32)"
            for _, tag, _, _ in planes for part in ("re1", "im1", "rei", "imi")]

    inner = [_GEMV_INNER_HEAD]
    if spec.word_aligned:
        inner += ["wi = k // 16 + offs_w  # word index of this block's codes",
                  "mask_w = mask_n[:, None] & (wi < KW)[None, :]",
                  "words = code_rows + wi[None, :]  # [BLOCK_N, BLOCK_K // 16]"]
        load = ("c = tl.reshape((tl.load({codes} + words, mask=mask_w, other=0)[:, :, None] >> lane_shift) & 3, "
                "[BLOCK_N, BLOCK_K])")
    else:  # blocks start inside a word (group size % 16 != 0): one word load per column
        inner += ["mask_nk = mask_n[:, None] & mask_k[None, :]",
                  "words = code_rows + (kk // 16)[None, :]",
                  "shift = ((kk % 16) << 1)[None, :]"]
        load = "c = (tl.load({codes} + words, mask=mask_nk, other=0) >> shift) & 3"
    for p, tag, conj, label in planes:
        what = "i**k conj(z)" if conj else "i**k z"
        inner.append(f"# {label} (plane {p}): {what}, code k -> (re, im)  {describe(conj)}")
        inner.append(load.format(codes=f"{tag}_codes"))
        for axis, suffix in ((0, "1"), (1, "i")):
            for comp, cname in ((0, "re"), (1, "im")):
                picks = [(k, term_expr(TABLE[(conj, k)][comp], _NAMES)) for k in codes_on_axis(axis)]
                inner.append(f"{tag}_{cname}{suffix} += tl.sum({_select_chain(picks)}, axis=1)")

    scale = []
    for p, tag, _, label in planes:
        s = []
        for axis in (0, 1):
            row = 2 * p + axis  # scales[p, axis] as a flat row index of [2P, n_s, G]
            if spec.scale == "tensor":
                s.append(f"tl.load(scales_ptr + {row})")
            elif spec.scale == "row":
                s.append(f"tl.load(scales_ptr + {_offset(row, 'n')}offs_n, mask=mask_n, other=0.0)")
            else:
                s.append(f"tl.load(scales_ptr + {_offset(row, 'n * G')}scale_rows + gi, mask=mask_n, other=0.0)")
        scale += [
            f"# {label}: s_re scales the +-1-coded sums, s_im the +-i-coded ones",
            f"s_re = {s[0]}",
            f"s_im = {s[1]}",
            f"acc_re += s_re * {tag}_re1 + s_im * {tag}_rei",
            f"acc_im += s_re * {tag}_im1 + s_im * {tag}_imi",
        ]

    outer = 8 if grouped else 4
    loop = Template(_GEMV_LOOP_GROUPED if grouped else _GEMV_LOOP_FLAT).substitute(
        zero=_indent("\n".join(zero), outer), inner=_indent("\n".join(inner), depth),
        scale=_indent("\n".join(scale), outer), begin=INNER_LOOP_BEGIN, end=INNER_LOOP_END,
    )
    return Template(_GEMV_TEMPLATE).substitute(
        _common_slots(spec), setup="\n".join(setup), loop=loop, epilogue=_epilogue(spec),
    )


def _gemm_source(spec: KernelSpec) -> str:
    planes = _planes(spec.stages)
    dot_dtype = _dot_dtype(spec)
    setup = ["    # plane p of the codes starts at p * n * KW"]
    for p, tag, _, label in planes:
        setup.append(f"    {tag}_codes = {_plane_base(p)}  # {label}")
    # scale of each plane and axis: loop-invariant for tensor / row, a per-column gather for groups
    for p, tag, _, label in planes:
        for axis, sname in ((0, "sre"), (1, "sim")):
            row = 2 * p + axis
            if spec.scale == "tensor":
                setup.append(f"    {tag}_{sname} = tl.load(scales_ptr + {row})")
            elif spec.scale == "row":
                setup.append(f"    {tag}_{sname} = tl.load(scales_ptr + {_offset(row, 'n')}offs_n, "
                             f"mask=mask_n, other=0.0)[None, :]")
            else:
                setup.append(f"    {tag}_{sname}_ptr = scales_ptr + {_offset(row, 'n * G')}offs_n[None, :] * G")
            if spec.scale != "group":
                setup.append(f"    {tag}_n{sname} = -{tag}_{sname}")

    decode = []
    if spec.group_per_block:  # GROUP % BLOCK_K == 0: one scale per output row in this K step
        decode.append("scale_cols = k // GROUP")
        scale_mask = "mask_n[None, :]"
    elif spec.scale == "group":  # groups narrower than the step, or not aligned to it: gathered per column
        decode.append("scale_cols = (kk // GROUP)[:, None]")
        decode.append("mask_kn = mask_k[:, None] & mask_n[None, :]")
        scale_mask = "mask_kn"
    first = {False: True, True: True}
    for p, tag, conj, label in planes:
        which = "w" if conj else "u"
        units = "  ".join(f"{k}: ({UNIT[k][0]:+d}, {UNIT[k][1]:+d})" for k in range(4))
        decode.append(f"# {label} (plane {p}): i**k -> (Re, Im)  {units}, times s_re (+-1 codes) / s_im (+-i codes)")
        decode.append(f"c = tl.reshape((tl.load({tag}_codes + words, mask=mask_wn, other=0)[:, None, :] "
                      f">> lane_shift) & 3, [BLOCK_K, BLOCK_N])")
        if spec.scale == "group":
            for sname in ("sre", "sim"):
                decode.append(f"{tag}_{sname} = tl.load({tag}_{sname}_ptr + scale_cols, mask={scale_mask}, "
                              f"other=0.0)")
                decode.append(f"{tag}_n{sname} = -{tag}_{sname}")
        for comp, cname in ((0, "re"), (1, "im")):
            picks = []
            for k in range(4):
                v = UNIT[k][comp]
                if v == 0:
                    continue
                sname = ("sre", "sim")[AXIS[k]]
                picks.append((k, f"{tag}_{sname}" if v > 0 else f"{tag}_n{sname}"))
            op = "=" if first[conj] else "+="
            decode.append(f"{which}_{cname} {op} {_select_chain(picks)}")
        first[conj] = False

    x_cast = ".to(tl.float32)" if dot_dtype != spec.act_dtype else ""
    dot_kw = ', input_precision="ieee"' if dot_dtype == "float32" and not spec.interpret else ""
    return Template(_GEMM_TEMPLATE).substitute(
        _common_slots(spec), setup="\n".join(setup), decode=_indent("\n".join(decode), 8),
        x_cast=x_cast, dot_ty=_TL_DTYPES[dot_dtype], dot_kw=dot_kw, epilogue=_epilogue(spec),
    )


_SOURCE_CACHE: Dict[KernelSpec, Tuple[str, str]] = {}


def _mma_source(spec: KernelSpec) -> str:
    slots = dict(_common_slots(spec), **mma_slots(spec, _next_pow2(spec.planes)))
    return Template(_KERNEL_HEAD + MMA_BODY).substitute(slots)


def _dense_source(spec: KernelSpec) -> str:
    return Template(_KERNEL_HEAD + DENSE_BODY).substitute(dict(_common_slots(spec), **dense_slots(spec)))


_SOURCES_BY_PATH = {"gemv": lambda s: _gemv_source(s), "gemm": lambda s: _gemm_source(s), "mma": _mma_source,
                    "dense": _dense_source}


def _source_and_hash(spec: KernelSpec) -> Tuple[str, str]:
    hit = _SOURCE_CACHE.get(spec)
    if hit is None:
        text = _SOURCES_BY_PATH[spec.path](spec)
        key = json.dumps({
            "spec": dataclasses.asdict(spec),
            "templates": _TEMPLATES[spec.path],
            "generator": GENERATOR_VERSION,
            "sign_table": sorted((str(k), str(v)) for k, v in TABLE.items()),
        }, sort_keys=True)
        hit = (text, hashlib.sha256(key.encode()).hexdigest()[:16])
        _SOURCE_CACHE[spec] = hit
    return hit


def generate_source(spec: KernelSpec) -> str:
    """The generated Triton module source for `spec` (pure text; needs no triton)."""
    return _source_and_hash(spec)[0]


def source_path(spec: KernelSpec) -> pathlib.Path:
    """Where `spec`'s source lives: kernel_cache_dir() / "triton" / f"{name}_{hash}.py"."""
    return kernel_cache_dir() / "triton" / f"{spec.name}_{_source_and_hash(spec)[1]}.py"


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


# --------------------------------------------------------------------------- #
# spec selection and launch
# --------------------------------------------------------------------------- #

def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(1, v))))


def mma_applies(group_size: int, m: int) -> bool:
    """Whether the tensor-core atom kernel handles these scales: tensor / row, or groups of whole code words."""
    return not group_size or -(-m // group_size) <= 1 or group_size % 16 == 0


@functools.lru_cache(maxsize=256)
def choose_spec(M: int, n: int, m: int, stages: int, group_size: int, row_scales: bool, act_dtype: torch.dtype,
                has_bias: bool, interpret: bool, path: Optional[str] = None) -> KernelSpec:
    """The kernel for a call: "mma" for M <= MMA_MAX_M, else "dense"; "gemv" / "gemm" for other groups.

    mma and dense (triton_mma.py) cover tensor and row scales and groups whose size is a multiple
    of 16; other group sizes take the multiplication-free GEMV at M <= GEMV_MAX_M and the GEMM
    above. mma does 2T times the tensor-core work of a dense product with the cheapest decode
    (two sign-bit atoms per code); dense decodes each tile of A_hat once per BLOCK_M rows and does
    the dense product's work, so it wins once the batch pays for its decode. `path` forces a
    path (benchmarks, tests). Measured on an H200 (benchmarks/results/bench_kernels.md and
    bench_kernels_h200_issue19_run1.md, 4096x11008, T = 2): the GEMV took 92 / 169 / 319 us at
    M = 1 / 2 / 4, mma 24-25 / 27 / 31 us and 37 us at M = 16 (dense 154 us there); at M = 64
    mma (106 us) and dense (245 us) both lose to cuBLAS bf16 (38 us), and at 11008x4096 dense
    is the faster of the two (95 us), hence MMA_MAX_M = 16.

    row_scales: the scales have one row per output (n_s = n) rather than one per tensor.
    The interpreter's cost grows with programs x loop steps, so it gets large blocks. On GPU the
    block sizes and launch config come from the measured table (:func:`tuned_config`, written by
    benchmarks/tune_kernels.py) for this device, path and T, nearest layer size; without an
    entry, from the defaults below. Group scales then cap BLOCK_K so blocks tile the groups.
    """
    G = -(-m // group_size) if group_size else 1
    if group_size and G > 1:
        scale, g = "group", int(group_size)
    else:  # g >= m is one group per row: the same scales as "row"
        scale, g = ("row" if (row_scales or group_size) else "tensor"), 0
    dtype = {v: k for k, v in _ACT_DTYPES.items()}[act_dtype]
    if path is None:
        if mma_applies(group_size, m):
            path = "mma" if M <= MMA_MAX_M else "dense"
        else:
            path = "gemv" if M <= GEMV_MAX_M else "gemm"
    elif path not in PATHS:
        raise ValueError(f"choose_spec: path must be one of {PATHS} or None, got {path!r}")
    elif path in ("mma", "dense") and not mma_applies(group_size, m):
        raise ValueError(f"choose_spec: the {path} path needs group sizes that are multiples of 16, got {group_size}")
    tuned = None if interpret else tuned_config(path, stages, n, m, M)
    decode, split_k = "bits", 1
    if path == "mma":
        if interpret:
            cfg = dict(block_m=_clamp_pow2(M, 1, 64), block_n=_clamp_pow2(n, 1, 16), block_k=_clamp_pow2(m, 16, 64),
                       num_warps=4, num_stages=2)
        # 4 warps take 16 stacked atom rows each: planes * BLOCK_N = 64 rows, or the warps decode the same
        # rows twice (sm_90 SASS, T = 1 at BLOCK_N = 16: 7.4 lane-ops per code against 3.8 at BLOCK_N = 32)
        rows = max(1, 64 // _next_pow2(2 * stages))
        if M <= 8:  # the dot's N side is at most 16 columns: long K steps, few registers
            cfg = dict(block_m=8, block_n=rows, block_k=256, num_warps=4, num_stages=3)
        else:  # [planes * BLOCK_N, 2 * BLOCK_M] fp32 accumulators: shorter K steps
            cfg = dict(block_m=32, block_n=rows, block_k=64, num_warps=4, num_stages=3)
        cfg.update(tuned or {})
        decode = "bits" if interpret else str((tuned or {}).get("decode", "bits"))
        if tuned and int(tuned.get("M", 0)) < M:
            # an entry measured at fewer rows (block_m 1 at M = 1) says nothing about BLOCK_M here: one
            # program per activation row would decode every tile M times
            cfg["block_m"] = 16
        cfg["block_m"] = min(cfg["block_m"], _clamp_pow2(M, 1, 64))  # no activation rows past next_pow2(M)
        split_k = int(cfg.get("split_k", 1))
        if dtype == "float32" and not interpret:  # the IEEE fp32 dot runs on FMAs: small tiles (sm_90: no spills)
            cfg.update(block_n=min(cfg["block_n"], 16), block_k=min(cfg["block_k"], 32))
        if scale == "group":  # the largest power of two dividing g (g % 16 == 0): steps tile each group
            cfg["block_k"] = min(cfg["block_k"], g & -g)
    elif path == "dense":
        if interpret:
            cfg = dict(block_m=_clamp_pow2(M, 16, 64), block_n=_clamp_pow2(n, 16, 64), block_k=_clamp_pow2(m, 16, 64),
                       num_warps=4, num_stages=2)
        else:
            cfg = dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3)  # sm_90 SASS: no spills
        cfg.update(tuned or {})
        decode = "bits" if interpret or dtype == "float32" else str((tuned or {}).get("decode", "bits"))
        cfg["block_m"] = min(cfg["block_m"], _clamp_pow2(M, 16, 256))
        if dtype == "float32" and not interpret:  # the IEEE fp32 dot runs on FMAs: small tiles
            cfg.update(block_m=min(cfg["block_m"], 32), block_n=min(cfg["block_n"], 32), block_k=16,
                       num_warps=4)
        if scale == "group":
            cfg["block_k"] = min(cfg["block_k"], g & -g)
    elif path == "gemv":
        if interpret:
            cfg = dict(block_n=_clamp_pow2(n, 16, 64), block_k=_clamp_pow2(m, 16, 128), num_warps=4, num_stages=2)
        else:
            cfg = dict(block_n=8, block_k=256, num_warps=2, num_stages=2)  # H200 run 1 sweep: small row blocks
        cfg.update(tuned or {})
        cfg["block_m"] = 1
        if scale == "group":
            if g % 16 == 0:  # the largest power of two dividing g: blocks tile each group exactly
                cfg["block_k"] = min(cfg["block_k"], g & -g)
            else:  # blocks start at each group's first column: one (or a few) per group
                cfg["block_k"] = min(cfg["block_k"], max(8, _next_pow2(g)))
    else:
        if interpret:
            cfg = dict(block_m=_clamp_pow2(M, 16, 64), block_n=_clamp_pow2(n, 16, 64), block_k=_clamp_pow2(m, 16, 64),
                       num_warps=4, num_stages=3)
        else:
            cfg = dict(block_m=64 if M >= 64 else 32, block_n=64, block_k=64, num_warps=4, num_stages=3)
        cfg.update(tuned or {})
        # no tiles of mostly masked rows: at most next_pow2(M) (>= 16, tl.dot's minimum here)
        cfg["block_m"] = min(cfg["block_m"], _clamp_pow2(M, 16, 256))
        if scale == "group":
            if g % 16 == 0:  # whole K steps per group: one scale load per row and step
                cfg["block_k"] = min(cfg["block_k"], g & -g)
            else:  # scales gathered per column: small steps, no pipelining (the gathers are [BLOCK_K, BLOCK_N])
                cfg["block_k"], cfg["num_stages"] = 16, 1
    return KernelSpec(path, stages, scale, g, dtype, has_bias, cfg["block_m"], cfg["block_n"], cfg["block_k"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], interpret=interpret, decode=decode,
                      split_k=split_k)


_CONFIG_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
CONFIGS_FILE = pathlib.Path(__file__).with_name("triton_configs.json")


@functools.lru_cache(maxsize=8)
def _config_table(path: str, device_name: str) -> List[Dict[str, Any]]:
    try:
        table = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if path != str(CONFIGS_FILE):
            raise FileNotFoundError(f"FAIRY2I_TRITON_CONFIGS={path!r}: no such file (unset it to use the "
                                    f"shipped table {CONFIGS_FILE})") from None
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"Triton config table {path!r} cannot be read as JSON ({e}); regenerate it with "
                         f"benchmarks/tune_kernels.py --write-configs") from None
    entries = table.get(device_name, []) if isinstance(table, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"path", "stages", "M", "n", "m", "config"} <= set(e) for e in entries):
        raise ValueError(f"Triton config table {path!r}: expected {{device name: [{{path, stages, M, n, m, "
                         f"config}}, ...]}}; regenerate it with benchmarks/tune_kernels.py --write-configs")
    return entries


def tuned_config(path: str, stages: int, n: int, m: int, M: int) -> Optional[Dict[str, Any]]:
    """The measured block sizes / launch config for this CUDA device, or None.

    Table: `$FAIRY2I_TRITON_CONFIGS` or the shipped ``codegen/triton_configs.json``, as
    ``{torch.cuda.get_device_name(): [{"path", "stages", "M", "n", "m", "config"}, ...]}``.
    Entries of the same path are ranked by (other T, |log n/n_e| + |log m/m_e|, |log M/M_e|):
    block sizes transfer between nearby layer sizes, so the nearest measured layer is used.
    The table is read once per process, and choose_spec caches its picks: set the variable
    before the first kernel launch (or call choose_spec.cache_clear() and
    _config_table.cache_clear()).
    """
    import math

    table = _config_table(os.environ.get("FAIRY2I_TRITON_CONFIGS") or str(CONFIGS_FILE),
                          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    entries = [e for e in table if e["path"] == path]
    if not entries:
        return None

    def rank(e: Dict[str, Any]) -> Tuple[bool, float, float]:
        size = abs(math.log(e["n"] / max(1, n))) + abs(math.log(e["m"] / max(1, m)))
        return (e["stages"] != stages, size, abs(math.log(e["M"] / max(1, M))))

    best = min(entries, key=rank)
    cfg = best["config"]
    out: Dict[str, Any] = {k: int(cfg[k]) for k in _CONFIG_KEYS if k in cfg}
    if path in ("mma", "dense") and cfg.get("decode") in ("bits", "asm"):
        out["decode"] = cfg["decode"]
    if path == "mma":
        out["split_k"] = int(cfg.get("split_k", 1))
        out["M"] = int(best["M"])  # the batch the entry was measured at (block_m follows it)
    return out


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
    assert P == spec.planes and (bias is not None) == spec.has_bias and x.dtype == _ACT_DTYPES[spec.act_dtype]
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


def _run(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int, group_size: int, n: int,
         interpret: bool, wrap: bool) -> Tensor:
    # x: [M, 2m] contiguous, arguments already validated. Under dynamic-shape tracing the weight
    # shapes may be SymInts: int() specialises on them (a layer's weights do not change shape)
    spec = choose_spec(_spec_rows(x.shape[0], interpret), int(n), int(m), int(codes.shape[0]) // 2,
                       int(group_size), bool(scales.shape[2] > 1), x.dtype, bias is not None, interpret)
    codes = codes.contiguous()
    scales = scales.to(torch.float32).contiguous()
    bias = bias.contiguous() if bias is not None else None
    return launch_packed_linear(spec, x, codes, scales, bias, m, wrap=wrap)


def _check_flat(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int, group_size: int) -> int:
    _, n, _ = check_packed_linear(x, codes, scales, bias, m, group_size)
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(
            f"fairy2i::packed_linear_triton takes x [M, 2m] contiguous, got shape {tuple(x.shape)} "
            f"strides {tuple(x.stride())}; call packed_linear_triton (it flattens) or pass x.contiguous()"
        )
    return n


def packed_linear_triton_impl(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                              group_size: int) -> Tensor:
    """Body of the op fairy2i::packed_linear_triton: x [M, 2m] contiguous -> y [M, 2n].

    triton_op runs it eagerly, under FakeTensorMode (as the fake kernel) and under AOTAutograd's
    functional decomposition, where wrap_triton turns the launch into a graph node. Under the
    interpreter it calls the opaque op fairy2i::packed_linear_triton_interpreted instead.
    """
    n = _check_flat(x, codes, scales, bias, m, group_size)
    if triton_interpreter_enabled():
        return torch.ops.fairy2i.packed_linear_triton_interpreted(x, codes, scales, bias, m, group_size)
    return _run(x, codes, scales, bias, m, group_size, n, False, wrap=True)


def _interpreted_impl(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                      group_size: int) -> Tensor:
    n = _check_flat(x, codes, scales, bias, m, group_size)
    return _run(x, codes, scales, bias, m, group_size, n, True, wrap=False)


def _fake(x, codes, scales, bias, m, group_size):
    n = _check_flat(x, codes, scales, bias, m, group_size)
    return x.new_empty((x.shape[0], 2 * n))


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _register_ops() -> Any:
    """Register fairy2i::packed_linear_triton (+ the interpreter's opaque op); returns the former."""
    if hasattr(torch.ops.fairy2i, "packed_linear_triton"):  # this module was loaded twice
        return torch.ops.fairy2i.packed_linear_triton
    interp = torch.library.custom_op("fairy2i::packed_linear_triton_interpreted", mutates_args=())(_interpreted_impl)
    interp.register_fake(_fake)
    if not _triton_installed():  # nothing to launch; keep the op traceable and let a launch say why
        op = torch.library.custom_op("fairy2i::packed_linear_triton", mutates_args=())(packed_linear_triton_impl)
        op.register_fake(_fake)
        return op
    # triton_op reads the function's source for kernels, which imports triton (installed, checked above)
    return torch.library.triton_op("fairy2i::packed_linear_triton", mutates_args=())(packed_linear_triton_impl)


# registered when the module loads, not on first call: torch.compile traces packed_linear_triton
# and cannot trace an op registration
_OP = _register_ops()


def _plain_eager(x: Tensor) -> bool:
    """No tracing in progress: a plain tensor, no dispatch mode (fake, proxy, functional), not compiling."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    # is_compiling() first: Dynamo cannot trace the dispatch-mode query
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor and _get_current_dispatch_mode() is None


def packed_linear_triton(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                         group_size: int) -> Tensor:
    """y = sum_t Q^U_t x + Q^W_t conj(x) + bias with the generated Triton kernels.

    x:      [..., 2m] float32 / bfloat16 / float16, contiguous (x[..., :m] = Re, x[..., m:] = Im)
    codes:  int32 [2T, n, ceil(m/16)];  scales: float [2T, 2, n_s, G];  bias: [2n] in x's dtype or None
    m:      complex input width;  group_size: the scale group size, 0 for tensor / row scales
    -> y:   [..., 2n] in x's dtype (y[..., :n] = Re, y[..., n:] = Im)

    M = prod(x.shape[:-1]) rows: the tensor-core atom kernel (mma) for M <= MMA_MAX_M, dense tiles above;
    group sizes that are not multiples of 16 take the GEMV (M <= GEMV_MAX_M) or the GEMM (choose_spec).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Eager calls launch directly;
    traced calls (torch.compile, make_fx, export) go through the op fairy2i::packed_linear_triton.
    """
    _, n, _ = check_packed_linear(x, codes, scales, bias, m, group_size)
    if not x.is_contiguous():
        raise ValueError(
            f"fairy2i.packed_linear_triton: x must be contiguous, got shape {tuple(x.shape)} with strides "
            f"{tuple(x.stride())}; pass x.contiguous()"
        )
    resolve_kernel("triton", x.device)  # RuntimeError with the fix for CPU tensors without the interpreter
    lead = x.shape[:-1]
    x2 = x.reshape(-1, 2 * m)
    if _plain_eager(x):  # skip the op dispatch (tens of microseconds a call) when nothing traces
        y = _run(x2, codes, scales, bias, m, group_size, n, triton_interpreter_enabled(), wrap=False)
    else:
        y = _OP(x2, codes, scales, bias, m, group_size)
    return y.reshape(*lead, 2 * n)
