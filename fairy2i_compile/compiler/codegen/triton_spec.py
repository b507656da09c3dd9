"""Triton kernels of the packed op, part 1: the kernel spec and which spec runs.

What the kernels compute, and how: triton_source.py. Where they may run:
:func:`triton_unavailable_reason` (CUDA, or CPU under TRITON_INTERPRET=1).

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

A frozen :class:`KernelSpec` (path, stages, scale kind, group size, activation dtype,
bias, block sizes, launch config, interpreter flag) is everything a generated kernel is
specialised on; :func:`choose_spec` picks one per call from the shapes and the tuned
table `triton_configs.json` (:func:`tuned_config`). Source generation: triton_source.py;
loading and launching: triton_launch.py; the op: ops/packed_triton.py.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..options import ScaleKind, check_stages

__all__ = [
    "ACT_DTYPES",
    "CONFIGS_FILE",
    "GEMV_MAX_M",
    "MMA_MAX_M",
    "PATHS",
    "TL_DTYPES",
    "KernelSpec",
    "choose_spec",
    "is_pow2",
    "mma_applies",
    "next_pow2",
    "triton_interpreter_enabled",
    "triton_unavailable_reason",
    "tuned_config",
]

PATHS = ("mma", "dense", "gemv", "gemm")
MMA_MAX_M = 16  # M <= 16 rows take the tensor-core atom kernel where it applies, more rows "dense" (choose_spec)
GEMV_MAX_M = 2  # otherwise M <= 2 rows take the multiplication-free GEMV (group sizes not a multiple of 16)

ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TL_DTYPES = {"float32": "tl.float32", "bfloat16": "tl.bfloat16", "float16": "tl.float16"}
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def triton_interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set (read per call: tests switch it at run time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when kernel="triton" runs on tensors on `device`, else why not and the fix."""
    if device.type == "cpu" and not triton_interpreter_enabled():
        return ("kernel='triton' got CPU tensors, and Triton runs on CPU only through its interpreter: "
                "set TRITON_INTERPRET=1 before importing triton, move the model to CUDA, or use "
                "kernel='auto' (the C++ CPU kernel) / kernel='torch'")
    if device.type not in ("cpu", "cuda"):
        return f"kernel='triton' supports CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {device}"
    return None


def is_pow2(v: int) -> bool:
    """Whether v is a power of two (1, 2, 4, ...)."""
    return v >= 1 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
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
        check_stages(self.stages, "KernelSpec.stages")
        if self.scale not in ScaleKind.values():
            raise ValueError(f"KernelSpec.scale must be 'tensor', 'row' or 'group', got {self.scale!r}")
        if self.scale == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"KernelSpec: scale='group' needs group_size >= 1, got {self.group_size!r}")
        elif self.group_size != 0:
            raise ValueError(f"KernelSpec: group_size must be 0 for scale={self.scale!r}, got {self.group_size!r}")
        if self.act_dtype not in ACT_DTYPES:
            raise ValueError(f"KernelSpec.act_dtype must be one of {list(ACT_DTYPES)}, got {self.act_dtype!r}")
        for field in ("block_m", "block_n", "block_k"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not is_pow2(v):
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
        if self.num_warps < 1 or not is_pow2(self.num_warps) or self.num_stages < 1:
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


def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(1, v))))


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
    dtype = {v: k for k, v in ACT_DTYPES.items()}[act_dtype]
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
        rows = max(1, 64 // next_pow2(2 * stages))
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
                cfg["block_k"] = min(cfg["block_k"], max(8, next_pow2(g)))
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
