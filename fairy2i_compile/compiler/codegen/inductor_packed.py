"""The packed op written as plain torch ops, for Inductor to fuse into one loop nest.

    packed_linear_decomposed(x, codes, scales, bias, m, group_size, kernel) -> y     (the op's signature)

`passes/decompose_packed.py` puts this function in place of `fairy2i.packed_linear` nodes
for decode-sized batches (<= DECOMPOSE_MAX_TOKENS tokens) when `kernel="inductor"`. AOTAutograd then traces it into aten ops
and Inductor generates the code: per output row one OpenMP-parallel, vectorised reduction
that unpacks the 2-bit codes with shifts and masks and picks the scaled activations with
selects (the scales are folded into the activations, O(m) multiplications per plane; per
code there are selects and a negation, no multiplication). This is the engine the CPU
issue asked to try before a hand-written kernel: benchmarks/bench_cpu.py measures it
against the C++ kernel (codegen/cpu_packed.cpp) per layer and end to end.

Formulation notes (measured on Inductor, torch 2.13, 2-core AVX2): one token at a time as
a 3-D [n, KW, 16] expression (tokens are few here) generated code 2.8x faster than the
same computation broadcast over a token dimension ([M, n, KW, 16]); the sign flip as a
select (`where(hi, -r, r)`) beat a bitcast xor (Inductor emulates bitcasts through memory).

Larger batches keep the op (the C++ kernel's tiled decode, or Triton's GEMM): written as
torch ops they would either repeat the per-code work per token or rebuild the dense
weight on every call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DECOMPOSE_MAX_TOKENS", "packed_linear_decomposed"]

DECOMPOSE_MAX_TOKENS = 4


def _plane_scales(scales: Tensor, p: int, n: int, kw: int, m: int, group_size: int):
    """(s_re, s_im) of plane p, broadcastable against [n, KW, 16] codes."""
    s = scales[p].to(torch.float32)               # [2, n_s, G]
    if s.shape[2] == 1:
        return s[0].reshape(-1, 1, 1), s[1].reshape(-1, 1, 1)
    cols = torch.arange(kw * 16, device=scales.device) // group_size
    cols = cols.clamp(max=s.shape[2] - 1)         # padding columns: any group (their x is 0)
    return s[0][:, cols].reshape(n, kw, 16), s[1][:, cols].reshape(n, kw, 16)


def _one_token(a: Tensor, b: Tensor, codes: Tensor, scales: Tensor, m: int, group_size: int) -> Tensor:
    """a, b: [KW, 16] (padded with zeros past m) -> y [2n] for one token."""
    P, n, kw = codes.shape
    shifts = torch.arange(16, dtype=torch.int32, device=codes.device) * 2
    y_re: Optional[Tensor] = None
    y_im: Optional[Tensor] = None
    for p in range(P):
        s_re, s_im = _plane_scales(scales, p, n, kw, m, group_size)
        bc = -b if p % 2 else b                   # W planes act on conj(z)
        t = codes[p].unsqueeze(-1) >> shifts      # [n, KW, 16]; code k = 2*hi + lo in bits 0, 1
        lo, hi = (t & 1) != 0, (t & 2) != 0
        # i^k z: lo picks the +-i axis (a swap of a and b), hi flips the sign
        r = torch.where(lo, -s_im * bc, s_re * a)
        i = torch.where(lo, s_im * a, s_re * bc)
        r = torch.where(hi, -r, r).sum((-1, -2))
        i = torch.where(hi, -i, i).sum((-1, -2))
        y_re = r if y_re is None else y_re + r
        y_im = i if y_im is None else y_im + i
    assert y_re is not None and y_im is not None
    return torch.cat([y_re, y_im])


def packed_linear_decomposed(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], m: int,
                             group_size: int, kernel: str = "inductor") -> Tensor:
    """`fairy2i.packed_linear` as torch ops: x [..., 2m] -> [..., 2n] (x's dtype), fp32 inside."""
    P, n, kw = codes.shape
    mp = kw * 16
    lead = x.shape[:-1]
    x2 = x.reshape(-1, 2 * m).to(torch.float32)
    a = F.pad(x2[:, :m], (0, mp - m)).reshape(-1, kw, 16)
    b = F.pad(x2[:, m:], (0, mp - m)).reshape(-1, kw, 16)
    ys = [_one_token(a[t], b[t], codes, scales, m, group_size) for t in range(x2.shape[0])]
    y = torch.stack(ys) if ys else x2.new_zeros((0, 2 * n))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, 2 * n)
