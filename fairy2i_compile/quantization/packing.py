"""Packed 2-bit storage of a Fairy2i layer: all T stages of U and W side by side.

A quantized layer (real weight A [2n, 2m] -> U, W complex [n, m], T stages each)
is stored as

    codes:  int32   [P, n, KW]       P = 2T planes, KW = ceil(m / 16)
    scales: float32 [P, 2, n_s, G]   (plane, axis re|im, scale row, scale group)

Planes are ordered stage-major, U before W: plane p = 2t + (0 for U_t, 1 for W_t).
Code k in {0, 1, 2, 3} means i**k (0:+1, 1:+i, 2:-1, 3:-i), 2 bits each; one
int32 word holds the codes of 16 consecutive input columns of one row of one
plane, column c of the word at bits [2*(c % 16), 2*(c % 16) + 2):

    code(p, j, c) = (codes[p, j, c // 16] >> (2 * (c % 16))) & 3

Each plane is a contiguous [n, KW] block, so a kernel walking the input columns
block by block reads the same column block of all 2T planes in one pass (the
stage-fused op of `compiler/passes/fuse_stages.py`). Little-endian byte `c // 4` of a row
holds columns 4*(c//4) .. +3, which the CPU kernel reads as bytes.
Columns m..16*KW-1 of the last word are padding and hold code 0; kernels mask
the activations there (x = 0), so padding never contributes.

Scales: axis 0 is s_re (the +-1-coded entries), axis 1 is s_im (the +-i-coded).
n_s = 1 for "tensor" granularity, n for "row" and for groups; G = 1 for
"tensor" / "row", ceil(m / g) for group size g. One rule reads every layout:
scale(p, axis, j, c) = scales[p, axis, j if n_s > 1 else 0, c // g if G > 1 else 0].

Worked example (n = 1, m = 2, T = 1): U = [1+0.1i, -0.2+2i], W = [-3, -0.5i]

    codes U = [0, 1], codes W = [2, 3]                (PhaseQuant, quant.py)
    plane 0 (U_1) word = 0 | 1 << 2 = 4
    plane 1 (W_1) word = 2 | 3 << 2 = 14
    codes  = [[[4]], [[14]]]                          shape [2, 1, 1]
    scales[0] = [[[1.0]], [[2.0]]]   (U: s_re = |1|, s_im = |2|)
    scales[1] = [[[3.0]], [[0.5]]]   (W: s_re = |-3|, s_im = |-0.5|)

Bytes: 2 bits per complex weight per plane = 4T bits per (j, c) pair, which
replaces 4 real weights of A: T bits per real weight (plus padding of the last
word of each row), plus 4 bytes per scale.

Packing and unpacking are exact (integers and copied floats):
``unpack_codes(pack_codes(c)) == c`` bit for bit, and :func:`quant.dequant_phase`
on the unpacked codes and scales rebuilds the fake-quant weights exactly
(:meth:`PackedWidely.dequantize`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..compiler.options import ScaleGranularity, packed_group_size
from .quant import Granularity, PhaseQuantized, dequant_phase, phase_quant, validate_granularity

__all__ = [
    "CODES_PER_WORD",
    "PackedWidely",
    "pack_codes",
    "unpack_codes",
    "pack_phase",
    "pack_widely",
    "words_per_row",
    "scale_shape",
    "packed_nbytes",
    "check_packed",
]

CODES_PER_WORD = 16


def words_per_row(m: int) -> int:
    """KW = ceil(m / 16): int32 words per row of one plane."""
    return -(-int(m) // CODES_PER_WORD)


def scale_shape(n: int, m: int, granularity: Granularity) -> Tuple[int, int]:
    """(n_s, G) of one plane's scales for an [n, m] complex matrix."""
    typed = ScaleGranularity.of(granularity)
    if typed.group_size is None:
        return (1, 1) if typed.kind == "tensor" else (n, 1)
    return n, -(-m // typed.group_size)


def packed_nbytes(n: int, m: int, stages: int, granularity: Granularity) -> int:
    """Bytes of codes + float32 scales for a layer with U, W of shape [n, m]."""
    n_s, g = scale_shape(n, m, granularity)
    planes = 2 * stages
    return 4 * planes * n * words_per_row(m) + 4 * planes * 2 * n_s * g


def _shifts(device) -> Tensor:
    return torch.arange(CODES_PER_WORD, dtype=torch.int32, device=device) * 2


def pack_codes(codes: Tensor) -> Tensor:
    """uint8 codes [P, n, m] in 0..3 -> int32 words [P, n, ceil(m/16)]."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 3:
        raise ValueError(
            f"pack_codes needs uint8 codes [P, n, m], got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}"
        )
    if codes.numel() and int(codes.max()) > 3:
        raise ValueError(f"codes must be in 0..3, got max {int(codes.max())}")
    P, n, m = codes.shape
    kw = words_per_row(m)
    padded = torch.zeros((P, n, kw * CODES_PER_WORD), dtype=torch.int32, device=codes.device)
    padded[:, :, :m] = codes.to(torch.int32)
    # distinct bit fields: the sum is an OR; bit 31 wraps into the int32 sign as intended
    words = (padded.reshape(P, n, kw, CODES_PER_WORD) << _shifts(codes.device)).sum(-1, dtype=torch.int64)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_codes(words: Tensor, m: int) -> Tensor:
    """int32 words [P, n, KW] -> uint8 codes [P, n, m] (inverse of :func:`pack_codes`)."""
    if not isinstance(words, Tensor) or words.dtype != torch.int32 or words.dim() != 3:
        raise ValueError(
            f"unpack_codes needs int32 words [P, n, KW], got "
            f"{getattr(words, 'dtype', type(words).__name__)} {tuple(getattr(words, 'shape', ()))}"
        )
    P, n, kw = words.shape
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= kw * CODES_PER_WORD:
        raise ValueError(f"m={m!r} does not fit {kw} words of {CODES_PER_WORD} codes per row")
    # arithmetic shift; & 3 drops the copies of the sign bit
    codes = (words.unsqueeze(-1) >> _shifts(words.device)) & 3
    return codes.reshape(P, n, kw * CODES_PER_WORD)[:, :, :m].to(torch.uint8)


@dataclass(frozen=True)
class PackedWidely:
    """One layer's packed Fairy2i weights (layout in the module docstring).

    codes:  int32 [2T, n, ceil(m/16)]
    scales: float32 (float64 for float64 weights) [2T, 2, n_s, G]
    n, m:   complex shape of U and W (the real layer is [2n, 2m])
    group_size: g for int granularity, else None
    """

    codes: Tensor
    scales: Tensor
    n: int
    m: int
    group_size: Optional[int]
    # group_size as the packed ops take it (0: no groups), kept as a field: the PTQ op reads it per call
    packed_group_size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packed_group_size", packed_group_size(self.group_size))

    @property
    def stages(self) -> int:
        return int(self.codes.shape[0]) // 2

    @property
    def granularity(self) -> Granularity:
        if self.group_size is not None:
            return self.group_size
        return "row" if self.scales.shape[2] > 1 else "tensor"

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def quantized(self, which: str) -> PhaseQuantized:
        """Rebuild the PhaseQuantized of "U" or "W" (codes, scales, dequantized sum)."""
        if which not in ("U", "W"):
            raise ValueError(f"which must be 'U' or 'W', got {which!r}")
        planes = slice(0 if which == "U" else 1, None, 2)
        codes = unpack_codes(self.codes[planes], self.m)  # only this matrix's T planes
        s_re = self.scales[planes, 0]
        s_im = self.scales[planes, 1]
        re, im = dequant_phase(codes, s_re, s_im, self.m, self.group_size)
        return PhaseQuantized(codes, s_re, s_im, re, im, self.group_size)

    def dequantize(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(uq_re, uq_im, wq_re, wq_im) [n, m]: bit-identical to the fake-quant weights."""
        u, w = self.quantized("U"), self.quantized("W")
        return u.re, u.im, w.re, w.im


def pack_phase(qu: PhaseQuantized, qw: PhaseQuantized) -> PackedWidely:
    """Pack the PhaseQuant of U and of W (same shape, stages, granularity) into one layer."""
    if qu.codes.shape != qw.codes.shape or qu.s_re.shape != qw.s_re.shape or qu.group_size != qw.group_size:
        raise ValueError(
            f"U and W must be quantized alike, got codes {tuple(qu.codes.shape)} vs {tuple(qw.codes.shape)}, "
            f"scales {tuple(qu.s_re.shape)} vs {tuple(qw.s_re.shape)}, groups {qu.group_size} vs {qw.group_size}"
        )
    T, n, m = qu.codes.shape
    # planes stage-major, U before W: [U_1, W_1, U_2, W_2, ...]
    codes = torch.stack([qu.codes, qw.codes], dim=1).reshape(2 * T, n, m)
    s_u = torch.stack([qu.s_re, qu.s_im], dim=1)  # [T, 2, n_s, G]
    s_w = torch.stack([qw.s_re, qw.s_im], dim=1)
    scales = torch.stack([s_u, s_w], dim=1).reshape(2 * T, 2, *qu.s_re.shape[1:]).contiguous()
    return PackedWidely(pack_codes(codes), scales, n, m, qu.group_size)


def pack_widely(u_re: Tensor, u_im: Tensor, w_re: Tensor, w_im: Tensor, stages: int,
                granularity: Granularity = "tensor", *, name: str = "weight") -> PackedWidely:
    """PhaseQuant U and W (each [n, m]) with T stages and pack them: the PTQ packing path."""
    qu = phase_quant(u_re, u_im, stages, granularity, name=f"{name} (U)")
    qw = phase_quant(w_re, w_im, stages, granularity, name=f"{name} (W)")
    return pack_phase(qu, qw)


def check_packed(codes: Tensor, scales: Tensor, m: int, group_size: int) -> Tuple[int, int, int]:
    """Validate a packed layer's tensors; returns (P, n, KW). ``group_size`` 0 means none.

    Raises ValueError / TypeError naming the tensor and what was expected.
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.int32 or codes.dim() != 3:
        raise TypeError(
            f"packed codes must be an int32 tensor [2T, n, ceil(m/16)], got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}"
        )
    P, n, kw = codes.shape
    if P < 2 or P % 2:
        raise ValueError(f"packed codes must have an even number of planes 2T >= 2, got {tuple(codes.shape)=}")
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 or words_per_row(m) != kw:
        raise ValueError(
            f"packed codes have {kw} words per row, which holds ceil(m/16) words for m in "
            f"{16 * kw - 15}..{16 * kw}; got m={m!r}"
        )
    if not isinstance(scales, Tensor) or not scales.is_floating_point() or scales.dim() != 4:
        raise TypeError(
            f"packed scales must be a floating tensor [2T, 2, n_s, G], got "
            f"{getattr(scales, 'dtype', type(scales).__name__)} {tuple(getattr(scales, 'shape', ()))}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 0:
        raise ValueError(f"group_size must be an int >= 0 (0: no groups), got {group_size!r}")
    if group_size:
        validate_granularity(int(group_size), int(m))
        want = (P, 2, n, -(-int(m) // int(group_size)))
        if tuple(scales.shape) != want:
            raise ValueError(f"packed scales for group_size={group_size} must be {want}, got {tuple(scales.shape)}")
    elif tuple(scales.shape) not in ((P, 2, 1, 1), (P, 2, n, 1)):
        raise ValueError(
            f"packed scales must be {(P, 2, 1, 1)} (tensor) or {(P, 2, n, 1)} (row) without groups, "
            f"got {tuple(scales.shape)}"
        )
    if codes.device != scales.device:
        raise ValueError(f"packed codes and scales are on different devices: {codes.device} vs {scales.device}")
    return P, n, kw
