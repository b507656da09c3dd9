"""Quantize and pack one layer in row chunks: bounded memory, bit-identical to `quant.phase_quant`.

    packed = pack_layer_chunked(a, stages=2)                  # a: [2n, 2m] real weight
    packed = pack_layer_chunked(reader, stages=2, shape=(2n, 2m), dtype=torch.bfloat16)

`quant.phase_quant` on a whole [n, m] matrix keeps about a dozen [n, m] float32
temporaries alive (masks, magnitudes, each stage's values and residual, the final
dense sum): 5-7 times the layer's own bytes for an LLM's lm_head. Here U and W are
built, quantized and packed a block of complex rows at a time, so the temporaries
are those of one block (about `chunk_elements` entries each) and the only
layer-sized result is the packed codes (T/32 of the float32 layer).

Why the chunked result equals the whole-matrix one bit for bit
----------------------------------------------------------------
* U, W (ops.widely.real_to_widely_reference) are elementwise in A: complex rows j0..j1 of U and W
  come from real rows j0..j1 and n+j0..n+j1 of A, with the same float operations.
* Codes are elementwise in the residual; the residual is elementwise in U (or W),
  the earlier stages' codes and their scales.
* "row" and group scales are means over one row (or one group of one row):
  `quant.row_sums` sums a row in an order that does not depend on how many rows the
  tensor has, so quantizing a block of rows gives the rows' codes and scales of the
  whole matrix. One `quant.phase_quant` call per block does it.
* "tensor" scales: `quant.phase_quant` sums the whole matrix as the float64 sum of
  its row sums (`quant._group_sum`). The stream collects the same row sums
  block by block and finishes with the same `quant.tensor_sum` over all n of them.
  Stage t's scale needs stage t's codes of every row, and stage t's codes need the
  residual after stages 1..t-1, so there is one pass over the rows per stage; each
  pass rebuilds a block's residual from U (or W) and the packed codes and scales of
  the earlier stages (subtracting them in stage order, as phase_quant does), so no
  dense residual of the layer is ever held.

`reader(r0, r1)` returns real rows r0..r1-1 of A ([r1 - r0, 2m], any floating dtype);
a checkpoint reader (convert.py) reads them from disk, so a layer is never whole
in memory. `pack_layer_into` puts the codes in a `CodeSink` instead of a tensor: convert.py
writes them straight into the output file (and reads the earlier stages back from it), so
not even the codes of a layer are held (62.6 MiB for a 128256 x 2048 lm_head at T=2).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Tuple, Union

import torch
from torch import Tensor

from . import quant
from ..compiler.ops.widely import real_to_widely_reference
from .packing import PackedWidely, pack_codes, scale_shape, unpack_codes, words_per_row

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "CodeSink", "RowReader", "chunk_rows_for", "pack_layer_chunked",
           "pack_layer_into", "release_freed_memory"]

RowReader = Callable[[int, int], Tensor]
# entries of one [rows, m] block: each block temporary is 256 KiB in float32. Measured on a
# 128256 x 2048 bfloat16 layer, T=2 per-tensor (peak RSS above the start): +37 MiB at 2^18
# entries, +24 at 2^17, +17 at 2^16, +12 at 2^15 (freed temporaries the heap keeps until the
# block's malloc_trim, besides the live ones); the time did not change from 2^18 to 2^15
DEFAULT_CHUNK_ELEMENTS = 1 << 16


def _malloc_trim() -> Callable[[], Any]:
    """glibc's malloc_trim(0), or a no-op elsewhere.

    Blocks are allocated and freed over and over while small long-lived results (row sums,
    codes) are allocated between them; glibc raises its mmap threshold after the first large
    free, so the blocks then come from the heap, whose freed holes it does not return to the
    system: measured, +176 MiB of resident memory for a 65536 x 640 layer whose blocks are
    1 MiB each, +33 MiB with the holes released after every block.
    """
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        return lambda: trim(0)
    except (OSError, AttributeError):
        return lambda: None


release_freed_memory = _malloc_trim()
"""Give the heap's freed holes back to the system (glibc malloc_trim; a no-op elsewhere): see _malloc_trim."""


class CodeSink(Protocol):
    """Where a layer's packed codes go: int32 words [2T, n, KW] (packing.pack_codes), a plane's rows at a time."""

    def write(self, plane: int, j0: int, words: Tensor) -> None:
        """Store words [r, KW] as rows j0..j0+r-1 of plane `plane`."""

    def read(self, plane: int, j0: int, j1: int) -> Tensor:
        """Rows j0..j1-1 of plane `plane`, as written: int32 [j1 - j0, KW]."""


class _TensorSink:
    """The codes in one int32 tensor [2T, n, KW] (what pack_layer_chunked returns)."""

    def __init__(self, planes: int, n: int, m: int, device: torch.device):
        self.n, self.m = n, m
        self.codes = torch.zeros((planes, n, words_per_row(m)), dtype=torch.int32, device=device)

    def write(self, plane: int, j0: int, words: Tensor) -> None:
        self.codes[plane, j0:j0 + words.shape[0]] = words

    def read(self, plane: int, j0: int, j1: int) -> Tensor:
        return self.codes[plane, j0:j1]


def chunk_rows_for(n: int, m: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Complex rows per block so that a [rows, m] block has about ``chunk_elements`` entries (>= 1 row)."""
    return max(1, min(int(n), int(chunk_elements) // max(1, int(m))))


def pack_layer_chunked(
    a: Union[Tensor, RowReader],
    stages: int,
    granularity: quant.Granularity = "tensor",
    name: str = "weight",
    *,
    shape: Optional[Tuple[int, int]] = None,
    dtype: Optional[torch.dtype] = None,
    chunk_rows: Optional[int] = None,
    first_scale: float = 1.0,
) -> PackedWidely:
    """PhaseQuant (T stages) of A [2n, 2m] packed, one block of ``chunk_rows`` complex rows at a time.

    a:        the weight, or a reader (r0, r1) -> rows r0..r1-1 of A; a reader needs
              ``shape`` (out, in) and ``dtype`` (the weight's dtype).
    Returns a PackedWidely equal bit for bit (codes and scales) to ``packing.pack_phase`` of
    ``quant.phase_quant`` on U and on W of ``ops.real_to_widely(a)`` (same stages, granularity
    and first_scale).
    """
    scales, sink = _pack(None, a, stages, granularity, name, shape, dtype, chunk_rows, first_scale)
    assert isinstance(sink, _TensorSink)
    group_size = None if isinstance(granularity, str) else int(granularity)
    return PackedWidely(sink.codes, scales, sink.n, sink.m, group_size)


def pack_layer_into(
    sink: CodeSink,
    a: Union[Tensor, RowReader],
    stages: int,
    granularity: quant.Granularity = "tensor",
    name: str = "weight",
    *,
    shape: Optional[Tuple[int, int]] = None,
    dtype: Optional[torch.dtype] = None,
    chunk_rows: Optional[int] = None,
    first_scale: float = 1.0,
) -> Tensor:
    """pack_layer_chunked with the codes [2T, n, KW] written to ``sink`` (and, for per-tensor
    scales, the earlier stages read back from it) instead of held; returns the scales
    [2T, 2, n_s, G] (float32, float64 for float64 weights). Same arguments, same bits.
    """
    return _pack(sink, a, stages, granularity, name, shape, dtype, chunk_rows, first_scale)[0]


def _pack(sink: Optional[CodeSink], a: Union[Tensor, RowReader], stages: int, granularity: quant.Granularity,
          name: str, shape: Optional[Tuple[int, int]], dtype: Optional[torch.dtype], chunk_rows: Optional[int],
          first_scale: float) -> Tuple[Tensor, CodeSink]:
    """(scales, sink) of the layer; sink None: a tensor of the codes, made once the arguments are checked."""
    if isinstance(a, Tensor):
        if a.dim() != 2:
            raise ValueError(f"{name}: the weight must be 2-D [out, in], got {tuple(a.shape)}")
        weight = a.detach()
        shape, dtype = tuple(weight.shape), weight.dtype
        reader: RowReader = lambda r0, r1: weight[r0:r1]  # noqa: E731
        device = weight.device
    elif callable(a):
        if shape is None or dtype is None:
            raise ValueError(f"{name}: a row reader needs shape=(out_features, in_features) and dtype=")
        reader, device = a, torch.device("cpu")
    else:
        raise TypeError(f"{name}: pack_layer_chunked takes a weight tensor or a row reader, got {type(a).__name__}")
    out_f, in_f = (int(d) for d in shape)
    if out_f % 2 or in_f % 2 or out_f < 2 or in_f < 2:
        raise ValueError(f"{name}: Fairy2i needs even in/out features (pairing by halves), got {shape=}; "
                         f"leave this layer real")
    if not dtype.is_floating_point:
        raise TypeError(f"{name}: the weight must be a real floating type, got {dtype}")
    T = quant._validate_stages(stages)
    n, m = out_f // 2, in_f // 2
    quant.validate_granularity(granularity, m)
    rows = chunk_rows_for(n, m) if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    if not (isinstance(first_scale, (int, float)) and math.isfinite(first_scale) and first_scale > 0):
        raise ValueError(f"first_scale must be a positive finite float (1.0 = the paper's rule), got {first_scale!r}")
    cdt = quant.compute_dtype(dtype)
    blocks = [(j0, min(n, j0 + rows)) for j0 in range(0, n, rows)]

    def uw(j0: int, j1: int) -> Tuple[Tensor, ...]:
        top, bottom = reader(j0, j1), reader(n + j0, n + j1)
        parts = real_to_widely_reference(torch.cat([top, bottom]))  # [r, m] each, compute dtype
        for t, (mat, what) in zip(parts, (("U", "real"), ("U", "imaginary"), ("W", "real"), ("W", "imaginary"))):
            # quant.phase_quant's wording, plus where
            quant.check_finite(t, f"{name} ({mat}) ({what} part, complex rows {j0}..{j1 - 1})")
        return parts

    if sink is None:
        sink = _TensorSink(2 * T, n, m, device)
    n_s, groups = scale_shape(n, m, granularity)
    scales = torch.zeros((2 * T, 2, n_s, groups), dtype=cdt, device=device)
    if granularity != "tensor":
        for j0, j1 in blocks:
            u_re, u_im, w_re, w_im = uw(j0, j1)
            qu = quant.phase_quant(u_re, u_im, T, granularity, name=f"{name} (U)", first_scale=first_scale)
            qw = quant.phase_quant(w_re, w_im, T, granularity, name=f"{name} (W)", first_scale=first_scale)
            del u_re, u_im, w_re, w_im
            # planes stage-major, U before W (packing.pack_phase)
            words = pack_codes(torch.stack([qu.codes, qw.codes], dim=1).reshape(2 * T, j1 - j0, m))
            for p in range(2 * T):
                sink.write(p, j0, words[p])
            for off, q in ((0, qu), (1, qw)):
                scales[off::2, 0, j0:j1] = q.s_re
                scales[off::2, 1, j0:j1] = q.s_im
            del qu, qw, words
            release_freed_memory()
    else:
        for t in range(T):
            # per plane (U, W): row sums of the re magnitudes, re counts, im magnitudes, im counts, in
            # one buffer: a block's small results appended to lists would each pin a heap page
            # between the blocks' freed temporaries, which malloc_trim then cannot give back
            # (measured: +21 MiB left resident after a 128256 x 2048 layer, +40 MiB at 64-row blocks)
            sums = torch.zeros((2, 4, n), dtype=cdt, device=device)
            for j0, j1 in blocks:
                parts = uw(j0, j1)
                for off in (0, 1):
                    e_re, e_im = parts[2 * off], parts[2 * off + 1]
                    for s in range(t):  # the residual after stages 1..t-1, in phase_quant's order
                        p = 2 * s + off
                        c = unpack_codes(sink.read(p, j0, j1).unsqueeze(0), m)[0]
                        q_re, q_im = quant.stage_values(c, scales[p, 0], scales[p, 1])
                        e_re, e_im = e_re - q_re, e_im - q_im
                    c = quant.phase_codes(e_re, e_im)
                    on_re = ((c == 0) | (c == 2)).to(cdt)
                    on_im = ((c == 1) | (c == 3)).to(cdt)
                    acc = sums[off, :, j0:j1]
                    acc[0] = quant.row_sums(e_re.abs() * on_re)
                    acc[1] = quant.row_sums(on_re)
                    acc[2] = quant.row_sums(e_im.abs() * on_im)
                    acc[3] = quant.row_sums(on_im)
                    sink.write(2 * t + off, j0, pack_codes(c.unsqueeze(0))[0])
                del parts, e_re, e_im, c, on_re, on_im
                release_freed_memory()
            for off in (0, 1):
                for axis in (0, 1):
                    total = quant.tensor_sum(sums[off, 2 * axis])
                    count = quant.tensor_sum(sums[off, 2 * axis + 1])
                    s = quant._scale_of(quant._mean_of(total, count, cdt), count)
                    if t == 0 and first_scale != 1.0:
                        s = s * first_scale
                    scales[2 * t + off, axis] = s
    return scales, sink
