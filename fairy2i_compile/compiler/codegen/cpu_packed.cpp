// fairy2i packed widely-linear op on CPU: y = sum_t (Q^U_t x + Q^W_t conj(x)) + bias
// read straight from the 2-bit codes (layout: fairy2i_compile/packing.py).
//
// Built by codegen/cpu_packed.py with the system C++ compiler (-O3 -march=native -fopenmp)
// and called through ctypes. Portable C++: GCC/Clang vector extensions (8 x 32-bit lanes),
// which the compiler maps to AVX2 on x86-64 and to NEON pairs on AArch64.
//
// Two paths, both multi-threaded over output rows (OpenMP):
//
//  fold   (M <= 4 tokens: decode; tensor scales, or row / group scales when the groups
//         hold whole code words). Code k = 2*hi + lo means i^k, and
//         i^k * z contributes to (Re y, Im y):
//             U (z = a + ib):      lo=0: (+-a, +-b) * s_re     lo=1: (-+b, +-a) * s_im
//             W (conj z = a - ib): lo=0: (+-a, -+b) * s_re     lo=1: (+-b, +-a) * s_im
//         with the sign (-1)^hi. The caller folds the scales and the conj into four
//         vectors per plane and token, Pre|Qre|Pim|Qim, so the inner loop per code is one
//         select (by lo) and one sign flip (xor of hi into the float sign bit) per output:
//         no multiplications. Row / group scales differ per output row (and group), so
//         they cannot be folded into the activations: the vectors are then unscaled and the
//         loop keeps the +-1-coded (lo = 0) and +-i-coded (lo = 1) sums apart, per plane and
//         group, multiplying them by s_re / s_im once per output, plane and group.
//  lut    (the fold path's tokens with tensor scales, on CPUs with AVX-512; T-MAC-style table
//         lookups): two adjacent complex columns of one plane hold 4 code bits, so their joint
//         contribution to (Re y, Im y) takes one of 16 values per token. Those 16 values are
//         tabulated once per token, plane and column pair (sign flips and selects of the
//         scaled activations, built with permutes: no multiplications past the scaling), and
//         16 output rows at a time look theirs up in one register permute (vpermps: each lane
//         picks table entry code-bits of its own row), then add. The codes of 16 rows are
//         gathered word by word, so the packed layout is unchanged. Per 16 rows x 2 columns
//         and token this is one shift, two permutes and two adds, against the select path's
//         one select, sign flip and add per code and output. Sums run in another order than
//         the select path's, so results agree with it to float32 rounding, not bit for bit.
//  lut8   (opt-in, FAIRY2I_CPU_LUT8=1; tensor or row scales, up to LUT8_MAX_TOKENS tokens, CPUs
//         with AVX2; T-MAC-style byte lookups): the same 16-entry tables per column pair, but of
//         integers: per token, plane and block of 32 complex columns the scaled activations are
//         rounded to multiples of sigma = max(|s_re|, |s_im|) * max|x over the block| / 127 (int8
//         with a scale per block of activations, as llama.cpp's Q8_0), each entry (a sum of two
//         of them, |e| <= 254) stored as an int16 split into a low-byte and a high-byte table of
//         16 bytes. 32 output rows look theirs up with one byte shuffle (vpshufb) per table, the
//         two bytes are interleaved back into int16 and summed in int16 over the block, then
//         widened and multiplied by the block's sigma (one float FMA per output and block). The
//         codes are read from a transposed copy (fairy2i_lut8_layout: byte i of a 32-byte line
//         holds 4 columns of row 32b + i, so one line is the index vector of 32 rows for 2 column
//         pairs). Per 32 rows x 2 columns: 4 shuffles, 4 unpacks, 4 adds (row scales: twice that,
//         lut8_block_rows). Error: every activation term is off by at most its block's sigma / 2
//         (the row's scales for row scales), so |y - y_exact| <= the sum over planes and columns
//         of sigma / 2 (worst case; cpu_packed.lut8_error_bound). Non-finite activations are
//         refused (the caller falls back to the fold path).
//  decode (any scales, a few tokens): rebuild one block of 4 complex rows of A_hat (as the
//         8 real rows [A11 | A12] and [A21 | A22], each 2m long) in a thread-local buffer
//         by selects only, summing the stages in order exactly as quant.dequant_phase does
//         (so the buffer equals the reference weight bit for bit), then take the dot
//         products with every token. The buffer is 8 rows, never the whole weight.
//  decode_rows (many tokens): the same rows, a block of a few hundred at a time, handed
//         back to the caller, which multiplies each block with the BLAS GEMM
//         (cpu_packed.py); again never the whole weight.

#include <atomic>
#include <cstdint>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <strings.h>
#include <vector>
#include <cstdlib>
#include <omp.h>
#if defined(__AVX512F__)
#define FAIRY2I_HAVE_LUT 1
#else
#define FAIRY2I_HAVE_LUT 0
#endif
#if defined(__AVX2__)
#define FAIRY2I_HAVE_LUT8 1
#else
#define FAIRY2I_HAVE_LUT8 0
#endif
#if FAIRY2I_HAVE_LUT || FAIRY2I_HAVE_LUT8
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

static inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void storef(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vi splat_i(int32_t s) { return (vi){s, s, s, s, s, s, s, s}; }
static inline vf splat_f(float s) { return (vf){s, s, s, s, s, s, s, s}; }
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Lane l of half h (columns 8h .. 8h+7 of a word) holds code column c = 8h + l.
// Shifting the word left by 31 - 2c puts the code's lo bit in the sign bit; by 30 - 2c
// puts its hi bit there.
static const vi SH_LO[2] = {{31, 29, 27, 25, 23, 21, 19, 17}, {15, 13, 11, 9, 7, 5, 3, 1}};
static const vi SH_HI[2] = {{30, 28, 26, 24, 22, 20, 18, 16}, {14, 12, 10, 8, 6, 4, 2, 0}};

template <int MT>
static void fold_rows(const float* pq, const int32_t* codes, int64_t P, int64_t n, int64_t KW,
                      int64_t M, int64_t t0, const float* bias, float* y, int64_t j) {
  const int64_t mp = KW * 16;
  const vi SIGN = splat_i((int32_t)0x80000000u);
  vf ar[MT], ai[MT];
  for (int t = 0; t < MT; ++t) { ar[t] = splat_f(0.f); ai[t] = splat_f(0.f); }
  for (int64_t p = 0; p < P; ++p) {
    const int32_t* w = codes + (p * n + j) * KW;
    for (int64_t kw = 0; kw < KW; ++kw) {
      const vi wv = splat_i(w[kw]);
      for (int h = 0; h < 2; ++h) {
        const int64_t k = kw * 16 + h * 8;
        const vi lo = (wv << SH_LO[h]) < 0;          // all-ones lanes where lo = 1
        const vi hs = (wv << SH_HI[h]) & SIGN;       // float sign bit = hi
        for (int t = 0; t < MT; ++t) {
          const float* base = pq + ((p * M) + t0 + t) * 4 * mp;
          const vf r = lo ? loadf(base + mp + k) : loadf(base + k);
          const vf i = lo ? loadf(base + 3 * mp + k) : loadf(base + 2 * mp + k);
          ar[t] += (vf)((vi)r ^ hs);
          ai[t] += (vf)((vi)i ^ hs);
        }
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    y[(t0 + t) * 2 * n + j] = hsum(ar[t]) + (bias ? bias[j] : 0.f);
    y[(t0 + t) * 2 * n + n + j] = hsum(ai[t]) + (bias ? bias[n + j] : 0.f);
  }
}

// Fold with per-row (n_s = n) or per-group (G > 1, group % 16 == 0: groups hold whole code
// words) scales: pq holds the UNSCALED vectors (fold_vectors with unit scales). Per plane
// and group, the lo = 0 (+-1) and lo = 1 (+-i) terms are summed apart by masking, then
// multiplied by s_re / s_im: the only multiplications, once per output, plane and group
// (on the 8-lane partial sums, so each output needs one horizontal sum, not one per group).
template <int MT>
static void fold_rows_scaled(const float* pq, const int32_t* codes, const float* scales, int64_t P, int64_t n,
                             int64_t KW, int64_t M, int64_t t0, int64_t n_s, int64_t G, int64_t group,
                             const float* bias, float* y, int64_t j) {
  const int64_t mp = KW * 16;
  const int64_t wpg = G > 1 ? group / 16 : KW;  // code words per scale group
  const vi SIGN = splat_i((int32_t)0x80000000u);
  vf yr[MT], yi[MT];  // lane sums of the scaled terms; one horizontal sum per output at the end
  for (int t = 0; t < MT; ++t) { yr[t] = splat_f(0.f); yi[t] = yr[t]; }
  for (int64_t p = 0; p < P; ++p) {
    const int32_t* w = codes + (p * n + j) * KW;
    const float* s_re = scales + ((p * 2 + 0) * n_s + (n_s > 1 ? j : 0)) * G;
    const float* s_im = scales + ((p * 2 + 1) * n_s + (n_s > 1 ? j : 0)) * G;
    for (int64_t g0 = 0, gi = 0; g0 < KW; g0 += wpg, ++gi) {
      const int64_t g1 = g0 + wpg < KW ? g0 + wpg : KW;
      vf r1[MT], ri[MT], i1[MT], ii[MT];  // (Re, Im) x (+-1-coded, +-i-coded)
      for (int t = 0; t < MT; ++t) { r1[t] = splat_f(0.f); ri[t] = r1[t]; i1[t] = r1[t]; ii[t] = r1[t]; }
      for (int64_t kw = g0; kw < g1; ++kw) {
        const vi wv = splat_i(w[kw]);
        for (int h = 0; h < 2; ++h) {
          const int64_t k = kw * 16 + h * 8;
          const vi lo = (wv << SH_LO[h]) < 0;     // all-ones lanes where lo = 1
          const vi hs = (wv << SH_HI[h]) & SIGN;  // float sign bit = hi
          for (int t = 0; t < MT; ++t) {
            const float* base = pq + ((p * M) + t0 + t) * 4 * mp;
            r1[t] += (vf)(((vi)loadf(base + k) ^ hs) & ~lo);
            ri[t] += (vf)(((vi)loadf(base + mp + k) ^ hs) & lo);
            i1[t] += (vf)(((vi)loadf(base + 2 * mp + k) ^ hs) & ~lo);
            ii[t] += (vf)(((vi)loadf(base + 3 * mp + k) ^ hs) & lo);
          }
        }
      }
      const vf sr = splat_f(s_re[G > 1 ? gi : 0]), si = splat_f(s_im[G > 1 ? gi : 0]);
      for (int t = 0; t < MT; ++t) {
        yr[t] += sr * r1[t] + si * ri[t];
        yi[t] += sr * i1[t] + si * ii[t];
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    y[(t0 + t) * 2 * n + j] = hsum(yr[t]) + (bias ? bias[j] : 0.f);
    y[(t0 + t) * 2 * n + n + j] = hsum(yi[t]) + (bias ? bias[n + j] : 0.f);
  }
}

// Scale of plane p, axis ax (0: re, 1: im) for row j and the 8 columns starting at k.
static inline vf scale_vec(const float* scales, int64_t p, int ax, int64_t j, int64_t k, int64_t n_s,
                           int64_t G, int64_t group, int64_t m) {
  const float* s = scales + ((p * 2 + ax) * n_s + (n_s > 1 ? j : 0)) * G;
  if (G == 1) return splat_f(s[0]);
  if (group % 8 == 0) return splat_f(s[k < m ? k / group : 0]);
  vf v;
  for (int l = 0; l < 8; ++l) {
    const int64_t c = k + l;
    v[l] = s[c < m ? c / group : 0];
  }
  return v;
}

// Decode complex row j into rr = [A11 | A12] and ri = [A21 | A22] (each 2 * mp floats).
static void decode_row(const int32_t* codes, const float* scales, int64_t P, int64_t n, int64_t KW,
                       int64_t m, int64_t n_s, int64_t G, int64_t group, int64_t j, float* rr, float* ri) {
  const int64_t mp = KW * 16;
  const vi SIGN = splat_i((int32_t)0x80000000u);
  const vf zero = splat_f(0.f);
  for (int64_t kw = 0; kw < KW; ++kw) {
    for (int h = 0; h < 2; ++h) {
      const int64_t k = kw * 16 + h * 8;
      vf re_u = zero, im_u = zero, re_w = zero, im_w = zero;
      for (int64_t p = 0; p < P; ++p) {
        const vi wv = splat_i(codes[(p * n + j) * KW + kw]);
        const vi lo = (wv << SH_LO[h]) < 0;
        const vi hs = (wv << SH_HI[h]) & SIGN;
        const vf s_re = scale_vec(scales, p, 0, j, k, n_s, G, group, m);
        const vf s_im = scale_vec(scales, p, 1, j, k, n_s, G, group, m);
        // code 0: +s_re, 2: -s_re on the real axis; 1: +s_im, 3: -s_im on the imaginary axis
        const vf q_re = lo ? zero : (vf)((vi)s_re ^ hs);
        const vf q_im = lo ? (vf)((vi)s_im ^ hs) : zero;
        if (p & 1) { re_w += q_re; im_w += q_im; } else { re_u += q_re; im_u += q_im; }
      }
      storef(rr + k, re_u + re_w);        // A11
      storef(rr + mp + k, im_w - im_u);   // A12
      storef(ri + k, im_w + im_u);        // A21
      storef(ri + mp + k, re_u - re_w);   // A22
    }
  }
}


#if FAIRY2I_HAVE_LUT
// LUT path (see the header). Tables: tab[((t * P + p) * (mp / 2) + pair) * 32 + 16 * part + e],
// part 0 = Re y, 1 = Im y, entry e = k0 + 4 * k1 for the codes k0, k1 of columns 2 * pair and
// 2 * pair + 1 (a code k sits at bits 2c, 2c + 1 of its word: (word >> 4 * (pair % 8)) & 15 = e).
// With b' = b (U planes) or -b (W planes, conj), code k of a column contributes
//     Re: {s_re a, -s_im b', -s_re a, s_im b'}[k]      Im: {s_re b', s_im a, -s_re b', -s_im a}[k]
// i.e. {A, B, -A, -B}[k] with (A, B) = (s_re a, -s_im b') for Re and (s_re b', s_im a) for Im
// (the same vectors fold_vectors folds), so entry e = {A, B, -A, -B}[k0](c0) + {..}[k1](c1).
static void lut_tables_word(const float* x, int64_t m, int64_t P, const float* scales, int64_t t, int64_t p,
                            int64_t w, int64_t mp, float* tab) {
  const float s_re = scales[p * 2], s_im = scales[p * 2 + 1];
  const float conj = (p & 1) ? -1.f : 1.f;
  const int64_t c = w * 16;
  const __mmask16 live = c + 16 <= m ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - c)) - 1u);
  const __m512 a = _mm512_maskz_loadu_ps(live, x + t * 2 * m + c);
  const __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, x + t * 2 * m + m + c), _mm512_set1_ps(conj));
  const __m512 SRE = _mm512_set1_ps(s_re), SIM = _mm512_set1_ps(s_im);
  const __m512 src[2][2] = {{_mm512_mul_ps(SRE, a), _mm512_mul_ps(_mm512_set1_ps(-s_im), b)},
                            {_mm512_mul_ps(SRE, b), _mm512_mul_ps(SIM, a)}};
  // entry e: column c0 = 2q takes A (k0 even) or B (k0 odd, index + 16), negated when k0 & 2;
  // column c1 = 2q + 1 likewise with k1 = e >> 2
  const __m512i base0 = _mm512_set_epi32(16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0);
  const __m512i base1 = _mm512_set_epi32(17, 17, 17, 17, 1, 1, 1, 1, 17, 17, 17, 17, 1, 1, 1, 1);
  const int S = (int)0x80000000u;
  const __m512i sgn0 = _mm512_set_epi32(S, S, 0, 0, S, S, 0, 0, S, S, 0, 0, S, S, 0, 0);
  const __m512i sgn1 = _mm512_set_epi32(S, S, S, S, S, S, S, S, 0, 0, 0, 0, 0, 0, 0, 0);
  float* out = tab + ((t * P + p) * (mp / 2) + w * 8) * 32;
  for (int q = 0; q < 8; ++q) {
    const __m512i off = _mm512_set1_epi32(2 * q);
    const __m512i i0 = _mm512_add_epi32(base0, off), i1 = _mm512_add_epi32(base1, off);
    for (int part = 0; part < 2; ++part) {
      const __m512 v0 = _mm512_castsi512_ps(
          _mm512_xor_si512(_mm512_castps_si512(_mm512_permutex2var_ps(src[part][0], i0, src[part][1])), sgn0));
      const __m512 v1 = _mm512_castsi512_ps(
          _mm512_xor_si512(_mm512_castps_si512(_mm512_permutex2var_ps(src[part][0], i1, src[part][1])), sgn1));
      _mm512_storeu_ps(out + q * 32 + part * 16, _mm512_add_ps(v0, v1));
    }
  }
}

#ifndef LUT_PREFETCH_WORDS
#define LUT_PREFETCH_WORDS 32
#endif
// R blocks of 16 rows from j0, MT tokens from t0. Lane l of block r is row j0 + 16 r + l.
template <int R, int MT>
static void lut_rows(const float* tab, const int32_t* codes, int64_t P, int64_t n, int64_t KW, int64_t mp,
                     int64_t t0, int64_t j0, const float* bias, float* y) {
  __m512 ar[R][MT], ai[R][MT];
  __mmask16 live[R];
  for (int r = 0; r < R; ++r) {
    const int64_t left = n - (j0 + 16 * r);
    live[r] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (left > 0 ? left : 0)) - 1u);
    for (int t = 0; t < MT; ++t) { ar[r][t] = _mm512_setzero_ps(); ai[r][t] = _mm512_setzero_ps(); }
  }
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)KW));
  const int64_t pairs = mp / 2;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t kw = 0; kw < KW; ++kw) {
      if ((kw & 15) == 0)  // 16 * R row streams at once: more than the hardware prefetchers follow
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < 16; ++l)
            _mm_prefetch((const char*)(codes + (p * n + j0 + 16 * r + l) * KW + kw + LUT_PREFETCH_WORDS), _MM_HINT_T0);
      __m512i v[R];
      for (int r = 0; r < R; ++r)
        v[r] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live[r], rows,
                                           codes + (p * n + j0 + 16 * r) * KW + kw, 4);
      const float* tw = tab + (p * pairs + kw * 8) * 32;
      for (int q = 0; q < 8; ++q) {
        __m512i idx[R];
        for (int r = 0; r < R; ++r) idx[r] = _mm512_srli_epi32(v[r], 4 * q);  // vpermps reads bits 0-3 only
        for (int t = 0; t < MT; ++t) {
          const float* tq = tw + (t0 + t) * P * pairs * 32 + q * 32;
          const __m512 tr = _mm512_loadu_ps(tq), ti = _mm512_loadu_ps(tq + 16);
          for (int r = 0; r < R; ++r) {
            ar[r][t] = _mm512_add_ps(ar[r][t], _mm512_permutexvar_ps(idx[r], tr));
            ai[r][t] = _mm512_add_ps(ai[r][t], _mm512_permutexvar_ps(idx[r], ti));
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t j = j0 + 16 * r;
    const __m512 br = bias ? _mm512_maskz_loadu_ps(live[r], bias + j) : _mm512_setzero_ps();
    const __m512 bi = bias ? _mm512_maskz_loadu_ps(live[r], bias + n + j) : _mm512_setzero_ps();
    for (int t = 0; t < MT; ++t) {
      _mm512_mask_storeu_ps(y + (t0 + t) * 2 * n + j, live[r], _mm512_add_ps(ar[r][t], br));
      _mm512_mask_storeu_ps(y + (t0 + t) * 2 * n + n + j, live[r], _mm512_add_ps(ai[r][t], bi));
    }
  }
}

template <int MT>
static void lut_super(const float* tab, const int32_t* codes, int64_t P, int64_t n, int64_t KW, int64_t mp,
                      int64_t t0, int64_t j0, int64_t j_end, const float* bias, float* y) {
  constexpr int RMAX = MT == 1 ? 4 : 2;  // 2 * R * MT accumulators + R code vectors stay in the 32 registers
  const int64_t blocks = (j_end - j0 + 15) / 16;
  switch (blocks >= RMAX ? RMAX : blocks) {
    case 4: lut_rows<4, MT>(tab, codes, P, n, KW, mp, t0, j0, bias, y); break;
    case 3: lut_rows<3, MT>(tab, codes, P, n, KW, mp, t0, j0, bias, y); break;
    case 2: lut_rows<2, MT>(tab, codes, P, n, KW, mp, t0, j0, bias, y); break;
    default: lut_rows<1, MT>(tab, codes, P, n, KW, mp, t0, j0, bias, y); break;
  }
}

static void lut_linear(const float* x, int64_t M, int64_t m, const int32_t* codes, int64_t P, int64_t n,
                       int64_t KW, const float* scales, const float* bias, float* y, int nthreads) {
  const int64_t mp = KW * 16;
  // the tables, reused across calls (grown, never zeroed: every entry read is written first)
  static thread_local std::vector<float> tab_buf;
  const size_t need = (size_t)(M * P * (mp / 2) * 32);
  if (tab_buf.size() < need) tab_buf.resize(need);
  float* tab = tab_buf.data();
  const int64_t blocks = (n + 15) / 16;  // 16-row lanes
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, blocks));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * P * KW; ++i)
      lut_tables_word(x, m, P, scales, i / (P * KW), (i / KW) % P, i % KW, mp, tab);
    // each thread takes a contiguous, equal share of the 16-row blocks (small layers have few)
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t b0 = blocks * id / nt, b1 = blocks * (id + 1) / nt;
    int64_t t0 = 0;
    for (; t0 + 2 <= M; t0 += 2)
      for (int64_t b = b0; b < b1; b += 2) lut_super<2>(tab, codes, P, n, KW, mp, t0, 16 * b, std::min(n, 16 * b1), bias, y);
    if (t0 < M)
      for (int64_t b = b0; b < b1; b += 4) lut_super<1>(tab, codes, P, n, KW, mp, t0, 16 * b, std::min(n, 16 * b1), bias, y);
  }
}
#endif


#if FAIRY2I_HAVE_LUT8
// The lut8 path's code layout: lt[(((p * NB + b) * KW + w) * 4 + k) * 32 + i] = byte k of the
// code word w of row 32 b + i in plane p (0 past the last row), NB = ceil(n / 32) blocks. Byte k
// of a word holds columns 4k .. 4k + 3 of that word, i.e. column pairs q = 8w + 2k (low nibble)
// and 8w + 2k + 1 (high nibble).
static void lut8_layout(const int32_t* codes, int64_t P, int64_t n, int64_t KW, uint8_t* lt) {
  const int64_t NB = (n + 31) / 32;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < NB; ++b)
      for (int64_t w = 0; w < KW; ++w)
        for (int k = 0; k < 4; ++k) {
          uint8_t* o = lt + (((p * NB + b) * KW + w) * 4 + k) * 32;
          for (int i = 0; i < 32; ++i) {
            const int64_t row = 32 * b + i;
            o[i] = row < n ? (uint8_t)(((uint32_t)codes[(p * n + row) * KW + w]) >> (8 * k)) : 0;
          }
        }
}

#ifndef LUT8_BLOCK_WORDS
#define LUT8_BLOCK_WORDS 2  // code words (16 complex columns each) per activation block of the lut8 path
#endif
static constexpr int64_t kLut8Cols = 16 * LUT8_BLOCK_WORDS;  // complex columns per block: one sigma each

// Activation blocks of a row of KW code words.
static inline int64_t lut8_blocks(int64_t KW) { return (KW + LUT8_BLOCK_WORDS - 1) / LUT8_BLOCK_WORDS; }

// Per block of kLut8Cols complex columns c (real activations x[c] and x[m + c]): the largest |x|,
// into xmax[ceil(KW / LUT8_BLOCK_WORDS)] (0 for padding); false when one of them is NaN or Inf.
static bool lut8_xmax(const float* x, int64_t m, int64_t KW, float* xmax) {
  const int64_t nblk = lut8_blocks(KW);
  bool finite = true;
  for (int64_t k = 0; k < nblk; ++k) {
    float v = 0.f;
    for (int64_t c = k * kLut8Cols; c < std::min<int64_t>(m, (k + 1) * kLut8Cols); ++c) {
      const float a = std::fabs(x[c]), b = std::fabs(x[m + c]);
      finite &= a <= 3.4028235e38f && b <= 3.4028235e38f;  // false for NaN and Inf
      v = std::max(v, std::max(a, b));
    }
    xmax[k] = v;
  }
  return finite;
}

// Tables of one token and plane: tab[q * 64 + {0: Re low bytes, 16: Re high bytes, 32: Im low,
// 48: Im high} + e], entry e = k0 + 4 k1 for the codes k0, k1 of columns 2q, 2q + 1. With
// b' = b (U planes) or -b (W planes, conj), code k of a column contributes {A, B, -A, -B}[k] to
// Re y with (A, B) = (s_re a, -s_im b') and {C, D, -C, -D}[k] to Im y with (C, D) = (s_re b',
// s_im a) (the fold path's vectors), here rounded to integers in units of the column's block's
// sigma[k] = max(|s_re|, |s_im|) * xmax[k] / 127, so |A|, |B|, |C|, |D| <= 127 and every entry
// fits in int16. quads: scratch of 8 int16 per padded column, [A, B, -A, -B] (Re part) at
// quads[4c], [C, D, -C, -D] (Im part) at quads[4 (mp + c)].
static void lut8_tables(const float* x, int64_t m, int64_t KW, const float* xmax, float s_re, float s_im,
                        bool conj_plane, int8_t* tab, float* sigma, int16_t* quads) {
  const int64_t mp = KW * 16, pairs = mp / 2;
  const float smax = std::max(std::fabs(s_re), std::fabs(s_im));
  const __m128 kcj = _mm_set1_ps(conj_plane ? -1.f : 1.f);
  const __m128i pairs16 = _mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);  // [u0 v0 u1 v1 ..]
  const __m128i zero = _mm_setzero_si128();
  int16_t* qre = quads;
  int16_t* qim = quads + 4 * mp;
  __m128 kre = _mm_setzero_ps(), kim = kre, kimn = kre;
  for (int64_t c = 0; c < mp; c += 4) {
    if (c % kLut8Cols == 0) {  // a new block: its sigma; _mm_cvtps_epi32 rounds to nearest, ties to even
      const float sg = smax * xmax[c / kLut8Cols] / 127.f;
      sigma[c / kLut8Cols] = sg;
      const float inv = sg > 0.f ? 1.f / sg : 0.f;
      kre = _mm_set1_ps(s_re * inv);
      kim = _mm_set1_ps(s_im * inv);
      kimn = _mm_set1_ps(-s_im * inv);
    }
    __m128 a, b;
    if (c + 4 <= m) {
      a = _mm_loadu_ps(x + c);
      b = _mm_loadu_ps(x + m + c);
    } else {
      alignas(16) float ta[4], tb[4];
      for (int l = 0; l < 4; ++l) { ta[l] = c + l < m ? x[c + l] : 0.f; tb[l] = c + l < m ? x[m + c + l] : 0.f; }
      a = _mm_load_ps(ta);
      b = _mm_load_ps(tb);
    }
    b = _mm_mul_ps(b, kcj);
    const __m128i ab[2] = {
        _mm_shuffle_epi8(_mm_packs_epi32(_mm_cvtps_epi32(_mm_mul_ps(kre, a)), _mm_cvtps_epi32(_mm_mul_ps(kimn, b))), pairs16),
        _mm_shuffle_epi8(_mm_packs_epi32(_mm_cvtps_epi32(_mm_mul_ps(kre, b)), _mm_cvtps_epi32(_mm_mul_ps(kim, a))), pairs16)};
    int16_t* dst[2] = {qre + 4 * c, qim + 4 * c};
    for (int part = 0; part < 2; ++part) {
      const __m128i neg = _mm_sub_epi16(zero, ab[part]);
      _mm_storeu_si128((__m128i*)dst[part], _mm_unpacklo_epi32(ab[part], neg));      // columns c, c + 1
      _mm_storeu_si128((__m128i*)(dst[part] + 8), _mm_unpackhi_epi32(ab[part], neg));  // c + 2, c + 3
    }
  }
  // entries 0..15 as int16: [v0[e & 3]] + [v1[e >> 2]]; lane 0 holds e = 0..7, lane 1 e = 8..15
  const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3,
                                          4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t q = 0; q < pairs; ++q) {
    for (int part = 0; part < 2; ++part) {
      const int16_t* src = part ? qim : qre;
      int64_t v0, v1;
      std::memcpy(&v0, src + 4 * (2 * q), 8);
      std::memcpy(&v1, src + 4 * (2 * q + 1), 8);
      const __m256i e = _mm256_add_epi16(_mm256_set1_epi64x(v0),
                                         _mm256_shuffle_epi8(_mm256_set1_epi64x(v1), spread));
      // per lane [low bytes | high bytes] of its 8 entries, then [low e0-15 | high e0-15]
      const __m256i lh = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xD8);
      _mm256_storeu_si256((__m256i*)(tab + q * 64 + 32 * part), lh);
    }
  }
}

// The lookups of one pair of column pairs (one 32-byte line v of the layout) from one table
// (64 bytes: Re low/high, Im low/high at t) into int16 sums: r[0] rows 0-7 | 16-23 and r[1]
// rows 8-15 | 24-31 of Re, i[0] / i[1] of Im.
static inline void lut8_lookup(__m256i idx, const int8_t* t, __m256i* r, __m256i* i) {
  const __m256i trl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t));
  const __m256i trh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + 16)));
  const __m256i til = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + 32)));
  const __m256i tih = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + 48)));
  const __m256i l_r = _mm256_shuffle_epi8(trl, idx), h_r = _mm256_shuffle_epi8(trh, idx);
  const __m256i l_i = _mm256_shuffle_epi8(til, idx), h_i = _mm256_shuffle_epi8(tih, idx);
  r[0] = _mm256_add_epi16(r[0], _mm256_unpacklo_epi8(l_r, h_r));
  r[1] = _mm256_add_epi16(r[1], _mm256_unpackhi_epi8(l_r, h_r));
  i[0] = _mm256_add_epi16(i[0], _mm256_unpacklo_epi8(l_i, h_i));
  i[1] = _mm256_add_epi16(i[1], _mm256_unpackhi_epi8(l_i, h_i));
  // keep each sum in its register here: otherwise GCC re-associates the adds of consecutive lookups
  // into a tree whose temporaries spill to the stack
  __asm__("" : "+x"(r[0]), "+x"(r[1]), "+x"(i[0]), "+x"(i[1]));
}

// dst[32] (rows of a 32-row block) += sg * the int16 sums acc[0] (rows 0-7 | 16-23), acc[1] (8-15 | 24-31).
static inline void lut8_flush(const __m256i* acc, float sg, float* dst) {
  static const int first_row[4] = {0, 16, 8, 24};
  const __m256 s = _mm256_set1_ps(sg);
  for (int r = 0; r < 2; ++r)
    for (int half = 0; half < 2; ++half) {
      const __m128i part = half ? _mm256_extracti128_si256(acc[r], 1) : _mm256_castsi256_si128(acc[r]);
      float* d = dst + first_row[2 * r + half];
      _mm256_store_ps(d, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part)), _mm256_load_ps(d)));
    }
}

// Rows 32 b .. 32 b + 31 of one token, tensor scales: y[j] and y[n + j]. sigma[p * nblk + k]:
// the sigma of plane p's block k.
static void lut8_block(const uint8_t* lt, const int8_t* tab, const float* sigma, int64_t P, int64_t n,
                       int64_t KW, int64_t b, const float* bias, float* y) {
  const int64_t NB = (n + 31) / 32, pairs = KW * 8, nblk = lut8_blocks(KW);
  const __m256i NIB = _mm256_set1_epi8(0x0F);
  alignas(32) float yr[32] = {0}, yi[32] = {0};
  for (int64_t p = 0; p < P; ++p) {
    const uint8_t* lp = lt + (p * NB + b) * KW * 128;
    const int8_t* tp = tab + p * pairs * 64;
    for (int64_t k = 0; k < nblk; ++k) {  // |int16 sum| <= 8 * LUT8_BLOCK_WORDS * 254
      __m256i r[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, i[2] = {r[0], r[1]};
      for (int64_t w = k * LUT8_BLOCK_WORDS; w < std::min<int64_t>(KW, (k + 1) * LUT8_BLOCK_WORDS); ++w)
        // not unrolled: unrolled, GCC 12 re-associates the int16 sums into a tree of temporaries
        // and spills them to the stack (measured 1.3-1.6x slower)
#pragma GCC unroll 1
        for (int kb = 0; kb < 4; ++kb) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(lp + (w * 4 + kb) * 32));
          lut8_lookup(_mm256_and_si256(v, NIB), tp + (w * 8 + 2 * kb) * 64, r, i);
          lut8_lookup(_mm256_and_si256(_mm256_srli_epi16(v, 4), NIB), tp + (w * 8 + 2 * kb + 1) * 64, r, i);
        }
      lut8_flush(r, sigma[p * nblk + k], yr);
      lut8_flush(i, sigma[p * nblk + k], yi);
    }
  }
  for (int i = 0; i < 32 && 32 * b + i < n; ++i) {
    const int64_t j = 32 * b + i;
    y[j] = yr[i] + (bias ? bias[j] : 0.f);
    y[n + j] = yi[i] + (bias ? bias[n + j] : 0.f);
  }
}

// Row scales (n_s = n): the scale differs per output row, so it cannot be folded into the
// tables. Each plane then has two tables per token (lut8_tables with (s_re, s_im) = (1, 0) and
// (0, 1)): tab1 holds the +-1-coded terms {a, 0, -a, 0}[k] (Re) and {b', 0, -b', 0}[k] (Im),
// tabi the +-i-coded ones {0, -b', 0, b'}[k] and {0, a, 0, -a}[k]; the block sums the two kinds
// apart and multiplies them by the row's s_re / s_im once per plane:
// Re y += s_re * sum1 + s_im * sumi, likewise Im. Twice the lookups of the tensor path. These
// tables hold no scale, so they depend on the plane only through conj: every U plane (p even)
// reads the tables and sigma of parity 0, every W plane those of parity 1. tab: [parity][1 | i]
// tables of pairs * 64 bytes; sigma[parity * nblk + k].
static void lut8_block_rows(const uint8_t* lt, const int8_t* tab, const float* sigma, const float* scales,
                            int64_t P, int64_t n, int64_t KW, int64_t b, const float* bias, float* y) {
  const int64_t NB = (n + 31) / 32, pairs = KW * 8, nblk = lut8_blocks(KW);
  const __m256i NIB = _mm256_set1_epi8(0x0F);
  alignas(32) float yr[32] = {0}, yi[32] = {0};
  alignas(32) float f[4][32];  // [Re 1-coded, Re i-coded, Im 1-coded, Im i-coded][row in block], sigma applied
  for (int64_t p = 0; p < P; ++p) {
    std::memset(f, 0, sizeof f);
    const uint8_t* lp = lt + (p * NB + b) * KW * 128;
    const int8_t* t1 = tab + (2 * (p & 1)) * pairs * 64;
    const int8_t* ti = tab + (2 * (p & 1) + 1) * pairs * 64;
    const float* sg = sigma + (p & 1) * nblk;
    for (int64_t k = 0; k < nblk; ++k) {
      __m256i acc[4][2];
      for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_si256();
      for (int64_t w = k * LUT8_BLOCK_WORDS; w < std::min<int64_t>(KW, (k + 1) * LUT8_BLOCK_WORDS); ++w)
        for (int kb = 0; kb < 4; ++kb) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(lp + (w * 4 + kb) * 32));
          for (int h = 0; h < 2; ++h) {
            const __m256i idx = h ? _mm256_and_si256(_mm256_srli_epi16(v, 4), NIB) : _mm256_and_si256(v, NIB);
            const int64_t off = (w * 8 + 2 * kb + h) * 64;
            lut8_lookup(idx, t1 + off, acc[0], acc[2]);
            lut8_lookup(idx, ti + off, acc[1], acc[3]);
          }
        }
      for (int u = 0; u < 4; ++u) lut8_flush(acc[u], sg[k], f[u]);
    }
    const float* s_re = scales + (p * 2 + 0) * n;
    const float* s_im = scales + (p * 2 + 1) * n;
    for (int i = 0; i < 32 && 32 * b + i < n; ++i) {
      const int64_t j = 32 * b + i;
      yr[i] += s_re[j] * f[0][i] + s_im[j] * f[1][i];
      yi[i] += s_re[j] * f[2][i] + s_im[j] * f[3][i];
    }
  }
  for (int i = 0; i < 32 && 32 * b + i < n; ++i) {
    const int64_t j = 32 * b + i;
    y[j] = yr[i] + (bias ? bias[j] : 0.f);
    y[n + j] = yi[i] + (bias ? bias[n + j] : 0.f);
  }
}

// One layer of a lut8 call: its layout, planes, rows, scales (n_s = 1 tensor or n row), bias, output.
struct Lut8Layer {
  const uint8_t* lt;
  int64_t P, n;
  const float* scales;
  int64_t n_s;
  const float* bias;
  float* y;  // [M, 2n]
};

// M tokens through several layers that read the same activations x [M, 2m] (siblings such as
// q/k/v or gate/up: one call instead of one per layer), each from its lut8 layout, tensor or row
// scales; false, every y untouched, when the activations hold NaN or Inf (the integer tables
// cannot carry them: the caller runs the fold path instead). What the siblings share is built
// once per token: the block maxima, and the tables of every row-scale layer (they hold no
// scale, lut8_block_rows, so all row-scale layers read the same four: parity x {1, i}); a
// tensor-scale layer has its own table per plane (its scales are in it). The row blocks of all
// layers are then split evenly over the threads in one parallel region. Each layer's result is
// bit-identical to a call with that layer alone (same tables, same sums, same order).
static bool lut8_linear_layers(const float* x, int64_t M, int64_t m, int64_t KW, const Lut8Layer* layers,
                               int64_t nl, int nthreads) {
  const int64_t mp = KW * 16, pairs = mp / 2, tab_bytes = pairs * 64;
  const int64_t nblk = lut8_blocks(KW);
  // per token: ntab tables and nsig sigma rows; layer l's first table tab0[l] and sigma row sig0[l]
  struct Job { const float* scales; int64_t p; int which; int64_t sig; };  // sig < 0: writes no sigma
  std::vector<Job> jobs;
  std::vector<int64_t> tab0(nl), sig0(nl), blk0(nl + 1, 0);
  int64_t nsig = 0, shared_tab = -1, shared_sig = -1;
  for (int64_t l = 0; l < nl; ++l) {
    const Lut8Layer& L = layers[l];
    if (L.n_s > 1) {  // row scales: the shared scale-free tables, [parity][1 | i]
      if (shared_tab < 0) {
        shared_tab = (int64_t)jobs.size();
        shared_sig = nsig;
        nsig += 2;
        for (int64_t parity = 0; parity < 2; ++parity)  // both tables of a parity have the same sigma
          for (int which = 0; which < 2; ++which) jobs.push_back({nullptr, parity, which, which ? -1 : shared_sig + parity});
      }
      tab0[l] = shared_tab;
      sig0[l] = shared_sig;
    } else {
      tab0[l] = (int64_t)jobs.size();
      sig0[l] = nsig;
      for (int64_t p = 0; p < L.P; ++p) jobs.push_back({L.scales, p, 0, nsig + p});
      nsig += L.P;
    }
    blk0[l + 1] = blk0[l] + (L.n + 31) / 32;
  }
  const int64_t ntab = (int64_t)jobs.size(), NB = blk0[nl];
  static thread_local std::vector<int8_t> tab_buf;
  static thread_local std::vector<float> sigma_buf, xmax_buf;
  if (tab_buf.size() < (size_t)(M * ntab * tab_bytes)) tab_buf.resize(M * ntab * tab_bytes);
  if (sigma_buf.size() < (size_t)(M * nsig * nblk)) sigma_buf.resize(M * nsig * nblk);
  if (xmax_buf.size() < (size_t)(M * nblk)) xmax_buf.resize(M * nblk);
  int8_t* tab = tab_buf.data();      // [M, ntab, tab_bytes]
  float* sigma = sigma_buf.data();   // [M, nsig, nblk]
  float* xmax = xmax_buf.data();     // [M, nblk]
  for (int64_t t = 0; t < M; ++t)
    if (!lut8_xmax(x + t * 2 * m, m, KW, xmax + t * nblk)) return false;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, NB));
#pragma omp parallel num_threads(threads)
  {
    std::vector<int16_t> quads(8 * mp);
    std::vector<float> unused(nblk);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * ntab; ++i) {
      const int64_t t = i / ntab;
      const Job& j = jobs[i % ntab];
      const float s_re = j.scales ? j.scales[j.p * 2] : (j.which ? 0.f : 1.f);
      const float s_im = j.scales ? j.scales[j.p * 2 + 1] : (j.which ? 1.f : 0.f);
      lut8_tables(x + t * 2 * m, m, KW, xmax + t * nblk, s_re, s_im, j.p & 1, tab + i * tab_bytes,
                  j.sig < 0 ? unused.data() : sigma + (t * nsig + j.sig) * nblk, quads.data());
    }
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t g0 = NB * id / nt, g1 = NB * (id + 1) / nt;
    for (int64_t t = 0; t < M; ++t) {
      int64_t l = 0;
      for (int64_t g = g0; g < g1; ++g) {
        while (g >= blk0[l + 1]) ++l;
        const Lut8Layer& L = layers[l];
        const int8_t* tt = tab + (t * ntab + tab0[l]) * tab_bytes;
        const float* st = sigma + (t * nsig + sig0[l]) * nblk;
        if (L.n_s > 1)
          lut8_block_rows(L.lt, tt, st, L.scales, L.P, L.n, KW, g - blk0[l], L.bias, L.y + t * 2 * L.n);
        else
          lut8_block(L.lt, tt, st, L.P, L.n, KW, g - blk0[l], L.bias, L.y + t * 2 * L.n);
      }
    }
  }
  return true;
}

// One layer: lut8_linear_layers with nl = 1.
static bool lut8_linear(const float* x, int64_t M, int64_t m, const uint8_t* lt, int64_t P, int64_t n,
                        int64_t KW, const float* scales, int64_t n_s, const float* bias, float* y, int nthreads) {
  const Lut8Layer layer{lt, P, n, scales, n_s, bias, y};
  return lut8_linear_layers(x, M, m, KW, &layer, 1, nthreads);
}
#endif

// The two path switches, set once by cpu_packed.py right after it loads this library
// (fairy2i_cpu_set_switches: FAIRY2I_CPU_LUT8 and FAIRY2I_CPU_LUT as options.env_switch reads them;
// the environment is read in Python only). Until then: lut8 off, LUT on (the defaults).
static std::atomic<bool> g_lut8_switch{false};
static std::atomic<bool> g_lut_switch{true};

// Whether the lut8 path is switched on (FAIRY2I_CPU_LUT8 set to an on value). Off by default: it
// rounds the activations to 8 bits.
static bool lut8_enabled() {
#if FAIRY2I_HAVE_LUT8
  return g_lut8_switch.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// Whether the fold path's tensor-scale tokens take the LUT path: compiled with AVX-512 and not
// switched off by FAIRY2I_CPU_LUT set to an off value.
static bool lut_enabled() {
#if FAIRY2I_HAVE_LUT
  return g_lut_switch.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

extern "C" {

int fairy2i_cpu_abi_version() { return 7; }

// Set the lut8 / LUT switches (nonzero = on); cpu_packed.py calls it once after loading the library.
void fairy2i_cpu_set_switches(int lut8, int lut) {
  g_lut8_switch.store(lut8 != 0);
  g_lut_switch.store(lut != 0);
}

// 0: the lut8 path is not compiled in (no AVX2); 1: compiled, off (FAIRY2I_CPU_LUT8 unset);
// 2: on (tensor-scale batches of up to LUT8_MAX_TOKENS tokens run it, from the op's layout cache).
int fairy2i_cpu_lut8() { return FAIRY2I_HAVE_LUT8 ? (lut8_enabled() ? 2 : 1) : 0; }

// Complex columns per activation block of the lut8 path, one sigma each (0 when it is not compiled in).
int fairy2i_lut8_block_columns() {
#if FAIRY2I_HAVE_LUT8
  return (int)kLut8Cols;
#else
  return 0;
#endif
}

// Bytes of the lut8 layout of codes [P, n, KW] (0 when the path is not compiled in).
int64_t fairy2i_lut8_layout_bytes(int64_t P, int64_t n, int64_t KW) {
  return FAIRY2I_HAVE_LUT8 ? P * ((n + 31) / 32) * KW * 128 : 0;
}

// Fill `out` (fairy2i_lut8_layout_bytes bytes) with the lut8 layout of codes [P, n, KW].
void fairy2i_lut8_layout(const int32_t* codes, int64_t P, int64_t n, int64_t KW, uint8_t* out) {
#if FAIRY2I_HAVE_LUT8
  lut8_layout(codes, P, n, KW, out);
#else
  (void)codes; (void)P; (void)n; (void)KW; (void)out;
#endif
}

// y [M, 2n] = the packed layer on x [M, 2m] through the lut8 path, from the layout `lt`; scales
// [P, 2, n_s, 1] with n_s = 1 (tensor) or n (row). Returns 1 when it ran; 0 when the path is not
// compiled in, the scales are neither, or x holds NaN/Inf (y untouched: run
// fairy2i_packed_linear instead).
int fairy2i_lut8_linear(const float* x, int64_t M, int64_t m, const uint8_t* lt, int64_t P, int64_t n,
                        int64_t KW, const float* scales, int64_t n_s, const float* bias, float* y, int nthreads) {
#if FAIRY2I_HAVE_LUT8
  if (n_s != 1 && n_s != n) return 0;
  return lut8_linear(x, M, m, lt, P, n, KW, scales, n_s, bias, y, nthreads) ? 1 : 0;
#else
  (void)x; (void)M; (void)m; (void)lt; (void)P; (void)n; (void)KW; (void)scales; (void)n_s; (void)bias; (void)y;
  (void)nthreads;
  return 0;
#endif
}

// 0: the LUT path is not compiled in (no AVX-512); 1: compiled, switched off (FAIRY2I_CPU_LUT=0);
// 2: the fold path's tensor-scale tokens run it.
int fairy2i_cpu_lut() { return FAIRY2I_HAVE_LUT ? (lut_enabled() ? 2 : 1) : 0; }

// [P, M, 4, mp] = (Pre, Qre, Pim, Qim) per plane and token, scales and conj folded in.
// With code k = 2*hi + lo and the sign (-1)^hi applied in the loop:
//     U: Re y <- lo ? -s_im b : s_re a     Im y <- lo ? s_im a :  s_re b
//     W: Re y <- lo ?  s_im b : s_re a     Im y <- lo ? s_im a : -s_re b
// These are the only multiplications of the fold path: O(P * M * m), on activations.
static void fold_vectors(const float* x, int64_t M, int64_t m, int64_t mp, const float* scales, int64_t P,
                         float* pq) {
  for (int64_t p = 0; p < P; ++p) {
    const float s_re = scales[p * 2], s_im = scales[p * 2 + 1];
    const float conj = (p & 1) ? -1.f : 1.f;
    for (int64_t t = 0; t < M; ++t) {
      float* v = pq + (p * M + t) * 4 * mp;
      const float* a = x + t * 2 * m;
      const float* b = a + m;
      for (int64_t k = 0; k < mp; ++k) {
        const float ak = k < m ? a[k] : 0.f, bk = k < m ? conj * b[k] : 0.f;
        v[k] = s_re * ak;
        v[mp + k] = -s_im * bk;
        v[2 * mp + k] = s_re * bk;
        v[3 * mp + k] = s_im * ak;
      }
    }
  }
}

// x: [M, 2m] fp32 (contiguous); codes [P, n, KW] int32; scales [P, 2, n_s, G] fp32;
// bias [2n] fp32 or null; y: [M, 2n] fp32. fold != 0 asks for the fold path, which runs
// for tensor and row scales and for groups of whole code words (group % 16 == 0); other
// group sizes, and fold == 0, take the decode path. Within the fold path, tensor scales take
// the LUT path when fold == 1 and lut_enabled(), or when fold == 3 and it is compiled in;
// fold == 2 keeps the select path (the tests compare the two). fold == 4 (more tokens than
// the select path serves, cpu_packed.fold_mode): the LUT path when fold == 1 would take it,
// else the decode path.
void fairy2i_packed_linear(const float* x, int64_t M, int64_t m, const int32_t* codes, int64_t P,
                           int64_t n, int64_t KW, const float* scales, int64_t n_s, int64_t G,
                           int64_t group, const float* bias, float* y, int fold, int nthreads) {
  const int64_t mp = KW * 16;
  const bool per_tensor = n_s == 1 && G == 1;
#if FAIRY2I_HAVE_LUT
  if (per_tensor && (((fold == 1 || fold == 4) && lut_enabled()) || fold == 3)) {
    lut_linear(x, M, m, codes, P, n, KW, scales, bias, y, nthreads);
    return;
  }
#endif
  if (fold == 4) fold = 0;
  if (fold && (G == 1 || group % 16 == 0)) {
    std::vector<float> pq_buf(P * M * 4 * mp);
    const float* pq = pq_buf.data();
    // row / group scales are applied per output instead: fold unit scales into the vectors
    const std::vector<float> unit(per_tensor ? 0 : 2 * P, 1.f);
    fold_vectors(x, M, m, mp, per_tensor ? scales : unit.data(), P, pq_buf.data());
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      int64_t t0 = 0;
      if (per_tensor) {
        for (; t0 + 4 <= M; t0 += 4) fold_rows<4>(pq, codes, P, n, KW, M, t0, bias, y, j);
        switch (M - t0) {
          case 3: fold_rows<3>(pq, codes, P, n, KW, M, t0, bias, y, j); break;
          case 2: fold_rows<2>(pq, codes, P, n, KW, M, t0, bias, y, j); break;
          case 1: fold_rows<1>(pq, codes, P, n, KW, M, t0, bias, y, j); break;
          default: break;
        }
      } else {
        for (; t0 + 2 <= M; t0 += 2)
          fold_rows_scaled<2>(pq, codes, scales, P, n, KW, M, t0, n_s, G, group, bias, y, j);
        if (t0 < M) fold_rows_scaled<1>(pq, codes, scales, P, n, KW, M, t0, n_s, G, group, bias, y, j);
      }
    }
  } else {
    const int64_t RB = 4;  // complex rows per block -> 8 real rows in the buffer
    const int64_t blocks = (n + RB - 1) / RB;
    // the activations in the padded width [a (mp) | b (mp)], zeros past m, laid out once
    // (as they are when m is a multiple of 16)
    std::vector<float> xpad;
    const float* xp = x;
    if (m != mp) {
      xpad.assign(M * 2 * mp, 0.f);
      for (int64_t t = 0; t < M; ++t) {
        std::memcpy(&xpad[t * 2 * mp], x + t * 2 * m, m * sizeof(float));
        std::memcpy(&xpad[t * 2 * mp + mp], x + t * 2 * m + m, m * sizeof(float));
      }
      xp = xpad.data();
    }
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<float> buf(2 * RB * 2 * mp);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t j0 = b * RB, rows = (n - j0 < RB) ? n - j0 : RB;
        for (int64_t r = 0; r < rows; ++r)
          decode_row(codes, scales, P, n, KW, m, n_s, G, group, j0 + r, &buf[(2 * r) * 2 * mp],
                     &buf[(2 * r + 1) * 2 * mp]);
        for (int64_t t = 0; t < M; ++t) {
          const float* xt = xp + t * 2 * mp;
          vf acc[2 * RB];
          for (int64_t r = 0; r < 2 * rows; ++r) acc[r] = splat_f(0.f);
          for (int64_t k = 0; k < 2 * mp; k += 8) {
            const vf xv = loadf(xt + k);
            for (int64_t r = 0; r < 2 * rows; ++r) acc[r] += loadf(&buf[r * 2 * mp + k]) * xv;
          }
          for (int64_t r = 0; r < rows; ++r) {
            y[t * 2 * n + j0 + r] = hsum(acc[2 * r]) + (bias ? bias[j0 + r] : 0.f);
            y[t * 2 * n + n + j0 + r] = hsum(acc[2 * r + 1]) + (bias ? bias[n + j0 + r] : 0.f);
          }
        }
      }
    }
  }
}


// Rows j0 .. j1-1 of A_hat as a dense float32 block out[2, R, 2m] (R = j1 - j0): out[0, r] is
// real output row j0 + r ([A11 | A12]), out[1, r] is real output row n + j0 + r ([A21 | A22]),
// bit-identical to the reference weight. The prefill path (many tokens) decodes the layer a
// block of rows at a time into such a buffer and hands it to the BLAS GEMM (cpu_packed.py).
void fairy2i_decode_rows(const int32_t* codes, int64_t P, int64_t n, int64_t KW, int64_t m,
                         const float* scales, int64_t n_s, int64_t G, int64_t group, int64_t j0,
                         int64_t j1, float* out, int nthreads) {
  const int64_t mp = KW * 16, R = j1 - j0;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> rr(2 * mp), ri(2 * mp);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      decode_row(codes, scales, P, n, KW, m, n_s, G, group, j0 + r, rr.data(), ri.data());
      float* o_re = out + r * 2 * m;
      float* o_im = out + (R + r) * 2 * m;
      std::memcpy(o_re, rr.data(), m * sizeof(float));
      std::memcpy(o_re + m, rr.data() + mp, m * sizeof(float));
      std::memcpy(o_im, ri.data(), m * sizeof(float));
      std::memcpy(o_im + m, ri.data() + mp, m * sizeof(float));
    }
  }
}

}  // extern "C"
