"""Tensor-core kernel for the packed op at small batch: codes -> +-1 atoms -> tl.dot ("mma" path).

What it computes is the packed op of `triton_packed` (derived in ops/widely.py, quant.py and sign_table.py):
y_re + i y_im = sum_t Q^U_t z + Q^W_t conj(z), z = a + i b, Q[j, c] = s(j, c) * i**code(j, c).

Atoms. Write code k = 2*b1 + b0 (b0: the axis, 0 for +-1 and 1 for +-i; b1: the sign).
With E = Re i**k in {1, 0, -1, 0} and O = Im i**k in {0, 1, 0, -1} (k = 0..3), one plane adds

    U (i**k z):       re += s_re E a - s_im O b      im += s_re E b + s_im O a
    W (i**k conj z):  re += s_re E a + s_im O b      im += -s_re E b + s_im O a

E and O take three values; their sum and difference take two:

    P = E + O = (-1)**b1            Q = E - O = (-1)**(b1 xor b0)
    E = (P + Q) / 2                 O = (P - Q) / 2

so every code is two +-1 atoms, each a sign bit of the code word. Per plane p the kernel
sums, with the tensor cores,

    PA[j] = sum_c P[j, c] a_c    PB[j] = sum_c P[j, c] b_c    (QA, QB likewise)

for every activation row, and after the loop (once per output element, plane and, for group
scales, group) combines them with the scales:

    Ea = (PA + QA)/2   Eb = (PB + QB)/2   Oa = (PA - QA)/2   Ob = (PB - QB)/2
    re += s_re Ea - sgn s_im Ob      im += sgn s_re Eb + s_im Oa      (sgn = +1 for U, -1 for W)

Exact arithmetic: the atoms are +-1 in bf16/fp16 and a, b are the activations as given, so the
dot products are sums of activations with signs, accumulated in fp32; the scales multiply
fp32 sums. (The GEMM path instead rounds decoded weights s * i**k to the activation dtype.)

Shape of the dot (swap-AB). The weights are the dot's M side: all planes stacked,
A = [P rows of plane 0; plane 1; ...] of shape [planes * BLOCK_N, BLOCK_K], one dot for the P atoms
and one for the Q atoms; the activations are the N side: X = [BLOCK_K, 2 * BLOCK_M] with column
2r = a of row r and 2r + 1 = b. At batch 1 the N side is 2 columns (padded to the MMA's 8), so
the tensor cores do 8 / 2 = 4x the needed work, which is cheap next to the decode on the CUDA cores.

Decode (the inner loop's integer work). A code word holds 16 codes, code s at bits 2s, 2s+1.
The tile's K order is permuted so that one int32 register holds the atoms of codes s and s + 8
as a bf16/fp16 pair: K position 16w + 2s + h is column 16w + s + 8h (s < 8, h < 2), and

    t  = word << (14 - 2s)                 bit 2s+1 -> 15, bit 2s+17 -> 31 (the two b1 bits)
    rP = (t & 0x80008000) | ONE2           ONE2 = the bit pattern of the pair (1, 1)
    rQ = rP ^ ((t << 1) & 0x80008000)      b0 bits to 15 / 31: sign flipped where b0 = 1

which LLVM keeps as the MMA operand register (the int16 split / join below is folded away):
about 4 integer ops per 2 codes. The `asm` decode writes the same with one `lop3` per atom
pair (two constants in one instruction) through `tl.inline_asm_elementwise`: GPU only.
Activations are loaded in natural order and permuted to the tile's K order in registers.

fp32 activations use the same atoms widened to fp32 with an IEEE fp32 dot (exact, no TF32);
the Triton interpreter computes every dot in fp32 (its bf16 dot is wrong).

Tiles: planes are padded to a power of two (T = 3 reads 8 planes, the last two masked, with
zero scales). Masks: rows past n load code word 0 and are not stored; columns past m load
a = b = 0, so padding codes add nothing; activation rows past M are zero and not stored.
"""

from __future__ import annotations

from string import Template
from typing import Dict

__all__ = ["MMA_BODY", "MMA_TEMPLATE", "MMA_NOTE", "mma_slots", "DENSE_BODY", "DENSE_TEMPLATE", "DENSE_NOTE",
           "dense_slots", "ONE_PAIR"]

# bit pattern of the pair (+1, +1) in the atom dtype; the sign bits are 15 and 31
ONE_PAIR = {"bfloat16": "0x3F803F80", "float16": "0x3C003C00"}
_SIGN_PAIR = "-2147450880"  # 0x80008000 as an int32 literal

MMA_NOTE = """\
# MMA (small batch): grid (cdiv(n, BLOCK_N), cdiv(M, BLOCK_M)). Each code is two +-1 atoms,
#     P = (-1)**b1, Q = (-1)**(b1 xor b0)   (code = 2*b1 + b0; E = Re i**k = (P+Q)/2, O = Im i**k = (P-Q)/2)
# decoded from sign bits ($decode decode) into [planes * BLOCK_N, BLOCK_K] tiles; tl.dot with the
# activations [BLOCK_K, 2 * BLOCK_M] (columns a_r, b_r) sums PA, PB, QA, QB per plane in fp32; after the
# loop$group_note: re += s_re (PA+QA)/2 - sgn s_im (PB-QB)/2, im += sgn s_re (PB+QB)/2 + s_im (PA-QA)/2,
# sgn = +1 (U) / -1 (W). Dot inputs: $dot_dtype.
"""

MMA_BODY = """\
    M, n, m, KW, G,
    # blocks
    BLOCK_M: tl.constexpr,  # activation rows per program (the dot's N side is 2 * BLOCK_M: a and b)
    BLOCK_N: tl.constexpr,  # complex output rows per program (per plane: the dot's M side is PLANES * BLOCK_N)
    BLOCK_K: tl.constexpr,  # input columns per K step (a multiple of 16: whole code words)$group_param
):
    PLANES: tl.constexpr = $planes_pad  # 2T = $planes planes, padded to a power of two
    SPLIT_K: tl.constexpr = $split_k  # programs per output tile along K (their sums meet in y by atomic adds)
    R: tl.constexpr = PLANES * BLOCK_N
    BW: tl.constexpr = BLOCK_K // 16
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)  # this program's K steps: pid_k, pid_k + SPLIT_K, ...
    # weight side: tile row rho = plane * BLOCK_N + i holds output row j = pid_n * BLOCK_N + i of that plane
    rho = tl.arange(0, R)
    plane_of_row = rho // BLOCK_N
    j_of_row = pid_n * BLOCK_N + rho % BLOCK_N
    mask_rows = (j_of_row < n)$plane_mask
    code_rows = codes_ptr + (plane_of_row.to(tl.int64) * n + j_of_row) * KW  # [R]: row starts
    offs_w = tl.arange(0, BW)
    # activation side: column 2r is a = Re z of row pid_m * BLOCK_M + r, column 2r + 1 is b = Im z
    col = tl.arange(0, 2 * BLOCK_M)
    x_row = pid_m * BLOCK_M + col // 2
    mask_x = x_row < M
    x_cols = x_ptr + x_row.to(tl.int64) * (2 * m) + (col % 2) * m
    offs_k = tl.arange(0, BLOCK_K)
    # code s of a word (s < 8) and code s + 8 share a register: b1 bits 2s+1, 2s+17 -> 15, 31
    shl = (14 - 2 * tl.arange(0, 8))[None, None, :]
$loop
    # y[r, j] = re, y[r, n + j] = im
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
$bias    y_out = y_ptr + offs_m[None, :].to(tl.int64) * (2 * n) + offs_n[:, None]
    mask_out = mask_n[:, None] & (offs_m < M)[None, :]
$store
"""

_STORE = """\
    tl.store(y_out, re.to(y_ptr.dtype.element_ty), mask=mask_out)
    tl.store(y_out + n, im.to(y_ptr.dtype.element_ty), mask=mask_out)"""

# split K: y was zeroed by the launcher; every program adds its partial sums (rounded to y's dtype)
_STORE_SPLIT = """\
    tl.atomic_add(y_out, re.to(y_ptr.dtype.element_ty), mask=mask_out, sem="relaxed")
    tl.atomic_add(y_out + n, im.to(y_ptr.dtype.element_ty), mask=mask_out, sem="relaxed")"""

# one K step: activations, code words, atoms, two dots
_STEP = """\
kk = k + offs_k
xn = tl.load(x_cols[:, None] + kk[None, :], mask=mask_x[:, None] & (kk < m)[None, :], other=0.0)
# to the tiles' K order: position 16w + 2s + h holds column 16w + s + 8h
xt = tl.trans(tl.reshape(tl.permute(tl.reshape(xn$x_cast, [2 * BLOCK_M, BW, 2, 8]), [0, 1, 3, 2]),
                         [2 * BLOCK_M, BLOCK_K]))
wi = k // 16 + offs_w
w = tl.load(code_rows[:, None] + wi[None, :], mask=mask_rows[:, None] & (wi < KW)[None, :], other=0)
$decode
pt = tl.reshape(tl.join(rp.to(tl.int16), (rp >> 16).to(tl.int16)), [R, BLOCK_K]).to($atom_ty, bitcast=True)
qt = tl.reshape(tl.join(rq.to(tl.int16), (rq >> 16).to(tl.int16)), [R, BLOCK_K]).to($atom_ty, bitcast=True)
acc_p = tl.dot(pt$atom_cast, xt, acc_p$dot_kw)
acc_q = tl.dot(qt$atom_cast, xt, acc_q$dot_kw)"""

_DECODE_BITS = """\
t = w[:, :, None] << shl
rp = (t & $sign_pair) | $one_pair  # P atoms of codes s, s + 8
rq = rp ^ ((t << 1) & $sign_pair)  # Q atoms: flip where b0 = 1"""

# (a & b) | c = lut 0xEA; a ^ (b & c) = lut 0x78
_DECODE_ASM = """\
rp, rq = tl.inline_asm_elementwise(
    "{ .reg .b32 t, u; shl.b32 t, $$2, $$3; lop3.b32 $$0, t, 0x80008000, $one_pair, 0xEA; "
    "shl.b32 u, t, 1; lop3.b32 $$1, $$0, u, 0x80008000, 0x78; }",
    "=r,=r,r,r", [w[:, :, None], shl], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)"""

_COMBINE = """\
# planes: PA, PB (and QA, QB) = sum of the atoms times a, b, per plane, output row and activation row
pa, pb = tl.split(tl.reshape(acc_p, [PLANES, BLOCK_N, BLOCK_M, 2]))
qa, qb = tl.split(tl.reshape(acc_q, [PLANES, BLOCK_N, BLOCK_M, 2]))
pl = tl.arange(0, PLANES)
sgn = (1 - 2 * (pl % 2)).to(tl.float32)[:, None, None]  # +1 for U (even planes), -1 for W (conj)
# scales[p, 0] = s_re, scales[p, 1] = s_im (halved: E = (P+Q)/2, O = (P-Q)/2)
$scale_loads
re $op tl.sum(s_re * (pa + qa) - sgn * s_im * (pb - qb), axis=0)  # [BLOCK_N, BLOCK_M]
im $op tl.sum(sgn * s_re * (pb + qb) + s_im * (pa - qa), axis=0)"""

_LOOP_FLAT = """\
    acc_p = tl.zeros([R, 2 * BLOCK_M], dtype=tl.float32)
    acc_q = tl.zeros([R, 2 * BLOCK_M], dtype=tl.float32)
    for k in range(pid_k * BLOCK_K, m, SPLIT_K * BLOCK_K):
$step
$combine"""

_LOOP_GROUPED = """\
    re = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    im = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in range(pid_k * GROUP, m, SPLIT_K * GROUP):  # BLOCK_K divides GROUP: steps never cross a group
        acc_p = tl.zeros([R, 2 * BLOCK_M], dtype=tl.float32)
        acc_q = tl.zeros([R, 2 * BLOCK_M], dtype=tl.float32)
        for k in range(g0, g0 + GROUP, BLOCK_K):
$step
        gi = g0 // GROUP
$combine"""

# every fragment's text, for the source hash
MMA_TEMPLATE = MMA_BODY + _STORE + _STORE_SPLIT + _STEP + _DECODE_BITS + _DECODE_ASM + _COMBINE + _LOOP_FLAT + _LOOP_GROUPED


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _scale_loads(scale: str, planes: int, planes_pad: int) -> str:
    """s_re, s_im as [PLANES, 1, 1] (tensor) or [PLANES, BLOCK_N, 1] (row, group gi), halved."""
    pmask = f"pl < {planes}" if planes != planes_pad else None
    if scale == "tensor":
        idx, mask = "2 * pl", pmask
        shape = "[:, None, None]"
    elif scale == "row":  # scales [P, 2, n, 1]: (2p + axis) * n + j
        idx = "(2 * pl[:, None]) * n + offs_r[None, :]"
        mask = "mask_r[None, :]" + (f" & ({pmask})[:, None]" if pmask else "")
        shape = "[:, :, None]"
    else:  # scales [P, 2, n, G]: ((2p + axis) * n + j) * G + gi
        idx = "((2 * pl[:, None]) * n + offs_r[None, :]) * G + gi"
        mask = "mask_r[None, :]" + (f" & ({pmask})[:, None]" if pmask else "")
        shape = "[:, :, None]"
    lines = []
    if scale != "tensor":
        lines += ["offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "mask_r = offs_r < n"]
    im_idx = idx.replace("2 * pl", "2 * pl + 1")
    if scale != "tensor":  # the axis steps the flat row by n (row/group layouts: [P, 2, n, G])
        im_idx = idx.replace("(2 * pl[:, None]) * n", "(2 * pl[:, None] + 1) * n")
    m_kw = f", mask={mask}, other=0.0" if mask else ""
    lines.append(f"s_re = (0.5 * tl.load(scales_ptr + {idx}{m_kw})){shape}")
    lines.append(f"s_im = (0.5 * tl.load(scales_ptr + {im_idx}{m_kw})){shape}")
    return "\n".join(lines)


def mma_slots(spec, planes_pad: int) -> Dict[str, str]:
    """Template slots for `spec` (a KernelSpec with path == "mma")."""
    grouped = spec.scale == "group"
    interpret = spec.interpret
    if interpret or spec.act_dtype == "float32":
        atom_dtype = "bfloat16"  # +-1 is exact in any float type; widened to fp32 for the dot
        atom_cast, x_cast = ".to(tl.float32)", ".to(tl.float32)"
        dot_kw = "" if interpret else ', input_precision="ieee"'
        dot_dtype = "float32" + ("" if interpret else " (IEEE)")
    else:
        atom_dtype = spec.act_dtype
        atom_cast, x_cast, dot_kw, dot_dtype = "", "", "", spec.act_dtype
    one_pair = ONE_PAIR[atom_dtype]
    if spec.decode == "asm":
        decode = Template(_DECODE_ASM).substitute(one_pair=one_pair)
    else:
        decode = Template(_DECODE_BITS).substitute(sign_pair=_SIGN_PAIR, one_pair=one_pair)
    step = Template(_STEP).substitute(
        x_cast=x_cast, decode=decode, atom_ty=f"tl.{atom_dtype}", atom_cast=atom_cast, dot_kw=dot_kw)
    planes = spec.planes
    plane_mask = f" & (plane_of_row < {planes})" if planes != planes_pad else ""
    scale_loads = _scale_loads(spec.scale, planes, planes_pad)
    if grouped:
        combine = Template(_COMBINE).substitute(scale_loads=scale_loads, op="+=")
        loop = Template(_LOOP_GROUPED).substitute(step=_indent(step, 12), combine=_indent(combine, 8))
    else:
        combine = Template(_COMBINE).substitute(scale_loads=scale_loads, op="=")
        loop = Template(_LOOP_FLAT).substitute(step=_indent(step, 8), combine=_indent(combine, 4))
    bias = ""
    if spec.has_bias:  # with split K only the first program adds it
        keep = "" if spec.split_k == 1 else " * (pid_k == 0)"
        bias = (f"    re += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]{keep}\n"
                f"    im += tl.load(bias_ptr + n + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]{keep}\n")
    return dict(
        planes=str(planes), planes_pad=str(planes_pad), plane_mask=plane_mask, loop=loop, bias=bias,
        split_k=str(spec.split_k), store=_STORE if spec.split_k == 1 else _STORE_SPLIT,
        dot_dtype=dot_dtype, decode_name=spec.decode,
        group_note=" (per group: the sums restart at every group)" if grouped else "",
    )


# --------------------------------------------------------------------------- #
# "dense" path (larger batches): the same atoms, combined into dense tiles of A_hat
# --------------------------------------------------------------------------- #

DENSE_NOTE = """\
# DENSE (larger batch): grid (cdiv(n, BLOCK_N), cdiv(M, BLOCK_M)). Per K step each plane's codes become
# P, Q atoms ($decode decode) and Re = s_re (P+Q)/2, Im = s_im (P-Q)/2 summed over stages into Re/Im U and W
# ($tile_math), then the four real blocks of A_hat (A11 = ReU + ReW, A12 = ImW - ImU, A21 = ImW + ImU,
# A22 = ReU - ReW) meet the activations on the tensor cores, weights on the dot's M side:
#     y_re^T += A11 a^T + A12 b^T,  y_im^T += A21 a^T + A22 b^T   (fp32 accumulation; dot inputs $dot_dtype)
"""

DENSE_BODY = """\
    M, n, m, KW, G,
    # blocks
    BLOCK_M: tl.constexpr,  # activation rows per program (the dot's N side)
    BLOCK_N: tl.constexpr,  # complex output rows per program (the dot's M side)
    BLOCK_K: tl.constexpr,  # input columns per K step (a multiple of 16: whole code words)$group_param
):
    BW: tl.constexpr = BLOCK_K // 16
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_re = x_ptr + offs_m.to(tl.int64)[:, None] * (2 * m)  # [BLOCK_M, 1]: a = Re z
    x_im = x_re + m                                         # b = Im z
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BW)
    # code s of a word (s < 8) and code s + 8 share a register: b1 bits 2s+1, 2s+17 -> 15, 31
    shl = (14 - 2 * tl.arange(0, 8))[None, None, :]
    # plane p of the codes starts at p * n * KW
$setup
    acc_re = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_im = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, m, BLOCK_K):
        kk = k + offs_k
        mask_mk = mask_m[:, None] & (kk < m)[None, :]  # columns past m load a = b = 0
        # activations to the tiles' K order (position 16w + 2s + h holds column 16w + s + 8h), transposed
        a = tl.load(x_re + kk[None, :], mask=mask_mk, other=0.0)$x_cast
        b = tl.load(x_im + kk[None, :], mask=mask_mk, other=0.0)$x_cast
        a = tl.trans(tl.reshape(tl.permute(tl.reshape(a, [BLOCK_M, BW, 2, 8]), [0, 1, 3, 2]), [BLOCK_M, BLOCK_K]))
        b = tl.trans(tl.reshape(tl.permute(tl.reshape(b, [BLOCK_M, BW, 2, 8]), [0, 1, 3, 2]), [BLOCK_M, BLOCK_K]))
        wi = k // 16 + offs_w
        mask_w = mask_n[:, None] & (wi < KW)[None, :]
$decode
        acc_re = tl.dot(a11, a, acc_re$dot_kw)
        acc_re = tl.dot(a12, b, acc_re$dot_kw)
        acc_im = tl.dot(a21, a, acc_im$dot_kw)
        acc_im = tl.dot(a22, b, acc_im$dot_kw)
    # y[r, j] = acc_re[j, r], y[r, n + j] = acc_im[j, r]
$bias    y_out = y_ptr + offs_m[None, :].to(tl.int64) * (2 * n) + offs_n[:, None]
    mask_out = mask_n[:, None] & mask_m[None, :]
    tl.store(y_out, acc_re.to(y_ptr.dtype.element_ty), mask=mask_out)
    tl.store(y_out + n, acc_im.to(y_ptr.dtype.element_ty), mask=mask_out)
"""

# fp32 tile math (interpreter, fp32 activations, and the pure-Triton decode)
_DENSE_PLANE_BITS = """\
# $label (plane $p): P, Q atoms, then s_re (P+Q)/2 and s_im (P-Q)/2 (scales halved in setup)
t = tl.load(${tag}_codes + wi[None, :], mask=mask_w, other=0)[:, :, None] << shl
rp = (t & $sign_pair) | $one_pair
rq = rp ^ ((t << 1) & $sign_pair)
pt = tl.reshape(tl.join(rp.to(tl.int16), (rp >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($atom_ty, bitcast=True).to(tl.float32)
qt = tl.reshape(tl.join(rq.to(tl.int16), (rq >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($atom_ty, bitcast=True).to(tl.float32)
$which_re $op ${tag}_sre * (pt + qt)
$which_im $op ${tag}_sim * (pt - qt)"""

_DENSE_TILES_BITS = """\
# the real blocks of A_hat (ops/widely.py), in the dot dtype
a11 = (u_re + w_re).to($dot_ty)
a12 = (w_im - u_im).to($dot_ty)
a21 = (w_im + u_im).to($dot_ty)
a22 = (u_re - w_re).to($dot_ty)"""

# packed tile math on pairs: one register holds codes s, s + 8 as a bf16x2 / f16x2 pair
_DENSE_PLANE_ASM = """\
# $label (plane $p): P, Q atoms and Re += s_re/2 (P + Q), Im += s_im/2 (P - Q) on $pair pairs, in PTX
$which_re, $which_im = tl.inline_asm_elementwise(
    "{ .reg .b32 t, u, p, q; shl.b32 t, $$2, $$3; lop3.b32 p, t, 0x80008000, $one_pair, 0xEA; "
    "shl.b32 u, t, 1; lop3.b32 q, p, u, 0x80008000, 0x78; "
    "fma.rn.$pair $$0, $$4, p, $$7; fma.rn.$pair $$0, $$4, q, $$0; "
    "fma.rn.$pair $$1, $$5, p, $$8; fma.rn.$pair $$1, $$6, q, $$1; }",
    "=r,=r,r,r,r,r,r,r,r",
    [tl.load(${tag}_codes + wi[None, :], mask=mask_w, other=0)[:, :, None], shl, ${tag}_sre2, ${tag}_sim2, ${tag}_nsim2,
     $which_re_in, $which_im_in],
    dtype=(tl.int32, tl.int32), is_pure=True, pack=1)"""

_DENSE_TILES_ASM = """\
# the real blocks of A_hat (ops/widely.py) as pairs, then split into the tile's K order
p11, p12, p21, p22 = tl.inline_asm_elementwise(
    "{ add.rn.$pair $$0, $$4, $$5; sub.rn.$pair $$1, $$7, $$6; "
    "add.rn.$pair $$2, $$7, $$6; sub.rn.$pair $$3, $$4, $$5; }",
    "=r,=r,=r,=r,r,r,r,r", [u_re, w_re, u_im, w_im],
    dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
a11 = tl.reshape(tl.join(p11.to(tl.int16), (p11 >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($dot_ty, bitcast=True)
a12 = tl.reshape(tl.join(p12.to(tl.int16), (p12 >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($dot_ty, bitcast=True)
a21 = tl.reshape(tl.join(p21.to(tl.int16), (p21 >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($dot_ty, bitcast=True)
a22 = tl.reshape(tl.join(p22.to(tl.int16), (p22 >> 16).to(tl.int16)), [BLOCK_N, BLOCK_K]).to($dot_ty, bitcast=True)"""

_PAIR = {"bfloat16": "bf16x2", "float16": "f16x2"}

# every dense fragment's text, for the source hash
DENSE_TEMPLATE = DENSE_BODY + _DENSE_PLANE_BITS + _DENSE_TILES_BITS + _DENSE_PLANE_ASM + _DENSE_TILES_ASM


def dense_slots(spec) -> Dict[str, str]:
    """Template slots for `spec` (a KernelSpec with path == "dense")."""
    asm = spec.decode == "asm"
    if spec.interpret or spec.act_dtype == "float32":
        atom_dtype, dot_dtype = "bfloat16", "float32"
        x_cast = ".to(tl.float32)"
        dot_kw = "" if spec.interpret else ', input_precision="ieee"'
    else:
        atom_dtype = dot_dtype = spec.act_dtype
        x_cast, dot_kw = "", ""
    one_pair = ONE_PAIR[atom_dtype]
    pair = _PAIR.get(dot_dtype, "")
    setup, decode = [], []
    first = {"u": True, "w": True}
    per_row = "[:, None, None]" if asm else "[:, None]"
    for t in range(1, spec.stages + 1):
        for p, which, label in ((2 * t - 2, "u", f"U_{t}"), (2 * t - 1, "w", f"W_{t}")):
            tag = f"{which}{t}"
            base = "codes_ptr" if p == 0 else f"codes_ptr + {p} * n * KW"
            setup.append(f"    {tag}_codes = {base} + offs_n.to(tl.int64)[:, None] * KW  # {label}: [BLOCK_N, 1] row starts")
            for axis, sname in ((0, "sre"), (1, "sim")):
                row = 2 * p + axis  # scales[p, axis] as a flat row of [2P, n_s, G]
                if spec.scale == "tensor":
                    load = f"tl.load(scales_ptr + {row})"
                elif spec.scale == "row":  # asm: [BLOCK_N, 1, 1] beside the pairs; fp32 tiles: [BLOCK_N, 1]
                    load = f"tl.load(scales_ptr + {row} * n + offs_n, mask=mask_n, other=0.0){per_row}"
                else:
                    load = f"tl.load({tag}_{sname}_ptr + k // GROUP, mask=mask_n, other=0.0){per_row}"
                    setup.append(f"    {tag}_{sname}_ptr = scales_ptr + ({row} * n + offs_n) * G  # one scale per group")
                target = setup if spec.scale != "group" else decode
                indent = "    " if spec.scale != "group" else ""
                half = f"0.5 * {load}"
                if asm:  # the scale pair (s/2, s/2) as the pair dtype's bits; -s_im/2 for the Q term of Im
                    cast = f".to(tl.{dot_dtype}).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF"
                    target.append(f"{indent}{tag}_{sname}1 = ({half}){cast}")
                    target.append(f"{indent}{tag}_{sname}2 = {tag}_{sname}1 | ({tag}_{sname}1 << 16)")
                    if sname == "sim":
                        target.append(f"{indent}{tag}_nsim2 = {tag}_sim2 ^ {_SIGN_PAIR}")
                else:
                    target.append(f"{indent}{tag}_{sname} = {half}")
            frag = _DENSE_PLANE_ASM if asm else _DENSE_PLANE_BITS
            op = "=" if first[which] else "+="
            decode.append(Template(frag).substitute(
                label=label, p=p, tag=tag, sign_pair=_SIGN_PAIR, one_pair=one_pair, atom_ty=f"tl.{atom_dtype}",
                which_re=f"{which}_re", which_im=f"{which}_im", op=op, pair=pair,
                which_re_in="0" if first[which] else f"{which}_re", which_im_in="0" if first[which] else f"{which}_im"))
            first[which] = False
    if asm:
        decode.append(Template(_DENSE_TILES_ASM).substitute(pair=pair, dot_ty=f"tl.{dot_dtype}"))
    else:
        decode.append(Template(_DENSE_TILES_BITS).substitute(dot_ty=f"tl.{dot_dtype}"))
    bias = ""
    if spec.has_bias:
        bias = ("    acc_re += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]\n"
                "    acc_im += tl.load(bias_ptr + n + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]\n")
    tile_math = f"{pair} FMAs in PTX" if asm else "fp32"
    return dict(setup="\n".join(setup), decode=_indent("\n".join(decode), 8), x_cast=x_cast, dot_kw=dot_kw,
                bias=bias, dot_dtype=dot_dtype, decode_name=spec.decode, tile_math=tile_math)
