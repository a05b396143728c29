/* AVX-512 + GFNI path: the k-bit codes of 512 columns rebuilt at once by a bit-matrix transpose.
 *
 * Why: rebuilding codes from mask registers (gemv_avx512.c) costs a kmov and a masked op per plane and
 * chunk (>= 1 cycle per plane on Sapphire Rapids). Here the cost per chunk hardly depends on k.
 *
 * For one row and a block of 512 columns (64 bytes of each plane row, "column group" b = byte b =
 * columns 8b..8b+7), the S plane vectors (S = 2, 4 or 8 >= k; plane p in slot s = p + S - k, the
 * leading slots are zero) are byte-transposed with in-lane unpacks (vpunpck{l,h}{bw,wd,dq}) so that
 * one qword holds the S plane bytes of one column group. vgf2p8affineqb(X, T) with X bytes 1 << i then
 * computes, for column i of that group, the byte whose bit t is bit i of qword byte 7 - t: the k-bit
 * code, plane 0 as the most significant bit. With S = 8 a qword is one group; with S = 4 it holds two
 * groups and the result bytes are nibble pairs; with S = 2 four groups and 2-bit fields. Fields are
 * split with one and each, left in place (the code times a power of two, compensated in the chunk's
 * float factor). A vpermb of each plane vector first (PIN2/4/8 below) orders the groups so that
 * every output vector is 64 consecutive columns in natural order: x needs no reordering.
 * Per 64-column chunk and row: S = 8: 4 shuffles, 1 gf2p8affine; S = 4: 1.5 shuffles, 0.5 gf2p8affine,
 * 1 and; S = 2: 0.5 shuffles, 0.25 gf2p8affine, 1 and. Then, as in gemv_avx512.c: vpdpbusd with the
 * int8 x and one float multiply-add per chunk with s_g * d_u.
 */
#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#include "avx512_common.h"
#include "bitdial_kernels.h"

/* Byte permutation of a 64-byte plane vector before the unpacks: position -> column group, chosen so
 * that output c[q] holds column group 8q + (2l + e) in its qword (lane l, e), i.e. chunk q in order.
 * S = 2 (unpack bw; lane l, lo/hi i, qword e, 2-bit field w -> chunk 4i + w):
 *   PIN2[16l + 8i + 4e + w] = 32i + 8w + 2l + e
 * S = 4 (bw, wd; wd output i, qword e, nibble f (0 = high) -> chunk 2i + f):
 *   PIN4[16l + 4i + 2e + f] = 16i + 8f + 2l + e
 * S = 8 (bw, wd, dq; wd output i, dq lo/hi h, qword e -> chunk 2i + h):
 *   PIN8[16l + 4i + 2h + e] = 16i + 8h + 2l + e */
static const uint8_t PIN2[64] __attribute__((aligned(64))) = {
    0,  8, 16, 24,  1,  9, 17, 25, 32, 40, 48, 56, 33, 41, 49, 57,
    2, 10, 18, 26,  3, 11, 19, 27, 34, 42, 50, 58, 35, 43, 51, 59,
    4, 12, 20, 28,  5, 13, 21, 29, 36, 44, 52, 60, 37, 45, 53, 61,
    6, 14, 22, 30,  7, 15, 23, 31, 38, 46, 54, 62, 39, 47, 55, 63};
static const uint8_t PIN4[64] __attribute__((aligned(64))) = {
    0,  8,  1,  9, 16, 24, 17, 25, 32, 40, 33, 41, 48, 56, 49, 57,
    2, 10,  3, 11, 18, 26, 19, 27, 34, 42, 35, 43, 50, 58, 51, 59,
    4, 12,  5, 13, 20, 28, 21, 29, 36, 44, 37, 45, 52, 60, 53, 61,
    6, 14,  7, 15, 22, 30, 23, 31, 38, 46, 39, 47, 54, 62, 55, 63};
static const uint8_t PIN8[64] __attribute__((aligned(64))) = {
    0,  1,  8,  9, 16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57,
    2,  3, 10, 11, 18, 19, 26, 27, 34, 35, 42, 43, 50, 51, 58, 59,
    4,  5, 12, 13, 20, 21, 28, 29, 36, 37, 44, 45, 52, 53, 60, 61,
    6,  7, 14, 15, 22, 23, 30, 31, 38, 39, 46, 47, 54, 55, 62, 63};

/* Octet layout of a full block (decode, M = 1): output vector j holds in its qword q the column group 8q + j,
 * i.e. columns 64q + 8j .. + 7 (chunk q, eighth j) instead of group 8j + q. The PINs above with the group
 * index transposed (g = 8a + b -> 8b + a), so PINO[S][pos] = T(PIN[S][pos]), built once by octet_pins().
 * The activations of a full block are stored in the same order (prepare_avx512_gfni: an 8 x 8 transpose of
 * qwords), so vpdpbusd lanes 2q and 2q + 1 of every output vector add up products of chunk q only: the 8
 * vectors of a block go into one int32 accumulator, converted and scaled once per block (one factor per
 * lane pair) instead of once per chunk. */
static uint8_t PINO[3][64] __attribute__((aligned(64)));
static void octet_pins(void) {
    const uint8_t *src[3] = {PIN2, PIN4, PIN8};
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < 64; i++) PINO[t][i] = (uint8_t)(((src[t][i] & 7) << 3) | (src[t][i] >> 3));
}

/* gf2p8affine matrix (data = codes byte) for (y >> sh) & (2^w - 1): result bit i = bit i + sh of y. */
#define GF_SHR(sh, w) ((long long)gf_shr_q(sh, w))
static inline uint64_t gf_shr_q(int sh, int w) {
    uint64_t m = 0;
    for (int i = 0; i < w; i++) m |= (uint64_t)(1u << (i + sh)) << (8 * (7 - i));
    return m;
}

#define SLOTS(k) ((k) <= 2 ? 2 : (k) <= 4 ? 4 : 8)

/* Codes of the 8 chunks of block J of one row: c[q] = u8 codes of columns 512J + 64q .. + 63.
 * vb = valid bytes of the block in each plane row (64, or fewer in the last block). */
BD_INLINE void block_codes_x(const uint8_t *row, int64_t ps, int64_t J, int vb, int k, const int S, __m512i *c,
                              const int oct) {
    const int full = vb >= 64;
    const __mmask64 live = full ? ~(__mmask64)0 : (((__mmask64)1 << vb) - 1);
    const __m512i pin = _mm512_load_si512(oct ? PINO[S == 2 ? 0 : S == 4 ? 1 : 2] : S == 2 ? PIN2 : S == 4 ? PIN4 : PIN8);
    const __m512i X = _mm512_set1_epi64((long long)0x8040201008040201ULL); /* byte i = 1 << i */
    __m512i V[8];
#pragma GCC unroll 8
    for (int s = 0; s < S; s++) {
        const int p = s - (S - k);
        const uint8_t *src = row + p * ps + 64 * J;
        V[s] = p < 0 ? _mm512_setzero_si512()
                     : _mm512_permutexvar_epi8(pin, full ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(live, src));
    }
    if (S == 2) { /* qword = 4 groups x [slot0, slot1] -> 2-bit fields, field w at bits 7-2w..6-2w */
#pragma GCC unroll 2
        for (int i = 0; i < 2; i++) {
            const __m512i t = i ? _mm512_unpackhi_epi8(V[0], V[1]) : _mm512_unpacklo_epi8(V[0], V[1]);
            const __m512i r = _mm512_gf2p8affine_epi64_epi8(X, t, 0);
            if (oct) { /* octet: every vector adds into one accumulator, so plain codes (one GF op each) */
                c[4 * i + 0] = _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(GF_SHR(6, 2)), 0);
                c[4 * i + 1] = _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(GF_SHR(4, 2)), 0);
                c[4 * i + 2] = _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(GF_SHR(2, 2)), 0);
                c[4 * i + 3] = _mm512_and_si512(r, _mm512_set1_epi8(0x03));
                continue;
            }
            /* fields left in place: code << (6 - 2w), undone by code_scale() on the chunk's factor */
            c[4 * i + 0] = _mm512_and_si512(r, _mm512_set1_epi8((char)0xc0));
            c[4 * i + 1] = _mm512_and_si512(r, _mm512_set1_epi8(0x30));
            c[4 * i + 2] = _mm512_and_si512(r, _mm512_set1_epi8(0x0c));
            c[4 * i + 3] = _mm512_and_si512(r, _mm512_set1_epi8(0x03));
        }
        return;
    }
    __m512i A[8], B[8];
#pragma GCC unroll 4
    for (int h = 0; h < S / 4; h++) { /* planes 4h..4h+3: byte pairs, then 4-byte groups */
        A[4 * h + 0] = _mm512_unpacklo_epi8(V[4 * h + 0], V[4 * h + 1]);
        A[4 * h + 1] = _mm512_unpackhi_epi8(V[4 * h + 0], V[4 * h + 1]);
        A[4 * h + 2] = _mm512_unpacklo_epi8(V[4 * h + 2], V[4 * h + 3]);
        A[4 * h + 3] = _mm512_unpackhi_epi8(V[4 * h + 2], V[4 * h + 3]);
        B[4 * h + 0] = _mm512_unpacklo_epi16(A[4 * h + 0], A[4 * h + 2]);
        B[4 * h + 1] = _mm512_unpackhi_epi16(A[4 * h + 0], A[4 * h + 2]);
        B[4 * h + 2] = _mm512_unpacklo_epi16(A[4 * h + 1], A[4 * h + 3]);
        B[4 * h + 3] = _mm512_unpackhi_epi16(A[4 * h + 1], A[4 * h + 3]);
    }
    if (S == 4) { /* qword = 2 groups x 4 slots -> nibble pairs, first group in the high nibble */
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m512i r = _mm512_gf2p8affine_epi64_epi8(X, B[i], 0);
            c[2 * i] = oct ? _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(GF_SHR(4, 4)), 0)
                           : _mm512_and_si512(r, _mm512_set1_epi8((char)0xf0)); /* 16 * code, see code_scale() */
            c[2 * i + 1] = _mm512_and_si512(r, _mm512_set1_epi8(0x0f));
        }
        return;
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) { /* S = 8: qword = 1 group x 8 slots */
        c[2 * i] = _mm512_gf2p8affine_epi64_epi8(X, _mm512_unpacklo_epi32(B[i], B[4 + i]), 0);
        c[2 * i + 1] = _mm512_gf2p8affine_epi64_epi8(X, _mm512_unpackhi_epi32(B[i], B[4 + i]), 0);
    }
}

BD_INLINE void block_codes(const uint8_t *row, int64_t ps, int64_t J, int vb, int k, const int S, __m512i *c) {
    block_codes_x(row, ps, J, vb, k, S, c, 0);
}

/* With S = 2 and 4 the codes of some chunks come out multiplied by a power of two (fields left in
 * place, no shift): chunk q of a block holds 2^(6 - 2(q%4)) c (S = 2) or 16^(1 - q%2) c (S = 4). The
 * factors of a window of 16 x blocks are multiplied by the inverse (exact: powers of two). */
BD_INLINE __m512 code_scale(const int S, const int qb64) {
    if (S == 2)
        return qb64 ? _mm512_setr_ps(1 / 64.f, 1 / 16.f, 1 / 4.f, 1, 1 / 64.f, 1 / 16.f, 1 / 4.f, 1, 1 / 64.f, 1 / 16.f, 1 / 4.f, 1,
                                     1 / 64.f, 1 / 16.f, 1 / 4.f, 1)
                    : _mm512_setr_ps(1 / 64.f, 1 / 64.f, 1 / 16.f, 1 / 16.f, 1 / 4.f, 1 / 4.f, 1, 1, 1 / 64.f, 1 / 64.f,
                                     1 / 16.f, 1 / 16.f, 1 / 4.f, 1 / 4.f, 1, 1);
    if (S == 4)
        return qb64 ? _mm512_setr_ps(1 / 16.f, 1, 1 / 16.f, 1, 1 / 16.f, 1, 1 / 16.f, 1, 1 / 16.f, 1, 1 / 16.f, 1, 1 / 16.f, 1,
                                     1 / 16.f, 1)
                    : _mm512_setr_ps(1 / 16.f, 1 / 16.f, 1, 1, 1 / 16.f, 1 / 16.f, 1, 1, 1 / 16.f, 1 / 16.f, 1, 1, 1 / 16.f,
                                     1 / 16.f, 1, 1);
    return _mm512_set1_ps(1.0f);
}

/* ---- decode: one token, one row per pass (4 accumulators) ----------------------------------- */

/* acc[q & 3] += float(dot(c[q], x chunk j)) * f, f = the x-block factor(s) of chunk j (window index jj). */
BD_INLINE void gdecode_chunk(const bd_gemv *a, const __m512i c, int64_t j, int jj, const float *fac, __m512 *acc,
                             const int qb64) {
    const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_load_si512(a->xq + 64 * j));
    __m512 f;
    if (qb64) f = _mm512_set1_ps(fac[jj]);
    else f = _mm512_mask_mov_ps(_mm512_set1_ps(fac[2 * jj]), 0xff00, _mm512_set1_ps(fac[2 * jj + 1]));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), f, *acc);
}

/* Full block J in the octet layout into acc2[0] (and acc2[1] with 32-column x blocks): the 8 code vectors
 * against the reordered activations, summed in int32 (two chains), then one convert and multiply-add per
 * accumulator. f = the factors of the window's 16 x blocks (s_g d_u, no code scale); h = the block's
 * place in its window (64-column x blocks: two blocks per window). */
BD_INLINE void octet_block(const bd_gemv *a, const uint8_t *row, int64_t J, const int k, __m512 f, int h, const int qb64,
                           __m512 *acc2) {
    __m512i c[8];
    block_codes_x(row, a->pstride, J, 64, k, SLOTS(k), c, 1);
    const int8_t *xb = a->xq + 512 * J;
    const __m512i lane = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    if (qb64) { /* lanes 2q, 2q+1: chunk q = x block 8h + q */
        __m512i s[4]; /* four chains of two: short rows are bound by this latency, not by throughput */
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            s[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c[j], _mm512_load_si512(xb + 64 * j)),
                                       c[j + 4], _mm512_load_si512(xb + 64 * j + 256));
        const __m512 F = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(8 * h)), f);
        const __m512i t = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
        acc2[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), F, acc2[0]);
    } else { /* eighths 0-3 of chunk q are x block 2q, eighths 4-7 x block 2q + 1 */
        __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], _mm512_load_si512(xb));
        __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[4], _mm512_load_si512(xb + 256));
#pragma GCC unroll 3
        for (int j = 1; j < 4; j++) {
            lo = _mm512_dpbusd_epi32(lo, c[j], _mm512_load_si512(xb + 64 * j));
            hi = _mm512_dpbusd_epi32(hi, c[4 + j], _mm512_load_si512(xb + 256 + 64 * j));
        }
        const __m512i i0 = _mm512_add_epi32(lane, lane);
        acc2[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_permutexvar_ps(i0, f), acc2[0]);
        acc2[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_permutexvar_ps(_mm512_add_epi32(i0, _mm512_set1_epi32(1)), f),
                                  acc2[1]);
    }
}

/* Plain k-bit codes of chunk ch (64 columns) of one row from mask registers, as gemv_avx512.c does: for a
 * short partial last block this is cheaper than the block transpose, which costs the same for 1 chunk as
 * for 8. Reads only bytes of the row (a partial load at the end of the row). */
#define TAIL_MASK_CHUNKS 2
BD_INLINE __m512i mask_codes(const uint8_t *row, int64_t ps, int64_t ch, int64_t RB, int k) {
    __m512i c = _mm512_setzero_si512();
    const int64_t b0 = 8 * ch;
    const int nb = RB - b0 >= 8 ? 8 : (int)(RB - b0);
    for (int p = 0; p < k; p++) {
        uint64_t bits;
        if (nb == 8) memcpy(&bits, row + p * ps + b0, 8);
        else bits = bd_load_partial(row + p * ps + b0, nb);
        c = _mm512_mask_add_epi8(c, _cvtu64_mask64(bits), c, _mm512_set1_epi8((char)(1 << (k - 1 - p))));
    }
    return c;
}

/* The chunks of plane block J of one row into the accumulators acc[q & amask]: 8 full chunks from the block
 * transpose, or the last, partial block (per-chunk mask codes for a short tail, e.g. the one chunk of K = 576,
 * else the transpose of the partial block). jj0 = the block's first chunk in the factor window; fac = the
 * window's factors (code_scale folded in), raw = the same without it (plain mask codes). */
BD_INLINE void block_chunks(const bd_gemv *a, const uint8_t *row, int64_t J, int jj0, const int k, const float *fac,
                            const float *raw, __m512 *acc, const int amask, const int qb64) {
    const int64_t RB = a->RB, ps = a->pstride, nch = (RB + 7) >> 3, nfull = RB >> 6;
    __m512i c[8];
    if (J < nfull) {
        block_codes(row, ps, J, 64, k, SLOTS(k), c);
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++) gdecode_chunk(a, c[q], 8 * J + q, jj0 + q, fac, &acc[q & amask], qb64);
        return;
    }
    const int nc = (int)(nch - 8 * J);
    if (nc <= TAIL_MASK_CHUNKS) {
        for (int q = 0; q < nc; q++)
            gdecode_chunk(a, mask_codes(row, ps, 8 * J + q, RB, k), 8 * J + q, jj0 + q, SLOTS(k) == 8 ? fac : raw,
                          &acc[q & amask], qb64);
    } else {
        block_codes(row, ps, J, (int)(RB - 64 * J), k, SLOTS(k), c);
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++)
            if (q < nc) gdecode_chunk(a, c[q], 8 * J + q, jj0 + q, fac, &acc[q & amask], qb64);
    }
}

/* One row: returns the 16-lane vector whose lane sum is y[n]. When the groups are the x blocks
 * (G == QB: G = 32 or 64) the offset term sum_g a_g X_g is folded into the window loop, sharing the
 * scale load; otherwise it is a separate pass over the groups. */
BD_INLINE __m512 gdecode_row(const bd_gemv *a, int64_t n, const int k, const int qb64, __m512i idx0) {
    const int64_t RB = a->RB, nfull = RB >> 6, nblk = (RB + 63) >> 6;
    const int BPF = qb64 ? 2 : 1; /* plane blocks (8 chunks) per window of 16 x blocks */
    const int gq = a->G == a->QB; /* group = x block: no lane permutation, offsets folded in */
    const int idx_const = a->G <= 16 * a->QB; /* then every window has the same block -> group map */
    const uint8_t *row = a->planes + n * RB;
    const uint16_t *s16 = a->scales + n * a->ng, *m16 = a->offsets + n * a->ng;
    const __m512 cs = code_scale(SLOTS(k), qb64), hmid = _mm512_set1_ps(a->hmid);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 off = _mm512_setzero_ps();
    float fac[16] __attribute__((aligned(64))), raw[16] __attribute__((aligned(64)));
    /* software prefetch, spread: the row about BD_PREFETCH_BYTES ahead in each plane (twice that at k <= 2,
     * whose blocks go by faster), one line per plane with each block below, its scales and offsets now */
    const int64_t rpf = bd_prefetch_row_ahead(a, n, k <= 2 ? 2 * BD_PREFETCH_BYTES : BD_PREFETCH_BYTES);
    const uint8_t *pf = rpf < 0 ? NULL : a->planes + rpf * RB;
    if (pf) bd_prefetch_row_scales(a, rpf, 1);
    for (int64_t J0 = 0; J0 < nblk; J0 += BPF) {
        const int64_t u0 = 16 * J0 / BPF;
        __m512 f;
        if (gq) { /* window = 16 groups: s, m once; f = s d; offsets a = m + hmid s */
            const int64_t left = a->ng - u0;
            const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16 + u0));
            const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m16 + u0));
            off = _mm512_fmadd_ps(_mm512_fmadd_ps(s, hmid, m), _mm512_loadu_ps(a->xs + u0), off);
            f = _mm512_mul_ps(s, _mm512_loadu_ps(a->dx + u0));
        } else {
            f = unit_factors_vec(a, s16, u0, idx_const ? idx0 : unit_group_idx(a, u0), a->dx);
        }
        acc[0] = _mm512_fnmadd_ps(f, _mm512_loadu_ps(a->qs + u0), acc[0]); /* centering */
        if (J0 + BPF >= nblk && nblk > nfull) { /* the partial block: per-chunk path, natural order */
            if (SLOTS(k) != 8) store_factors(raw, f); /* tail chunks: plain codes */
            store_factors(fac, SLOTS(k) == 8 ? f : _mm512_mul_ps(f, cs));
        }
        for (int64_t J = J0; J < J0 + BPF && J < nblk; J++) {
            if (pf)
                for (int p = 0; p < k; p++) __builtin_prefetch(pf + p * a->pstride + 64 * J, 0, 3);
            if (J < nfull) octet_block(a, row, J, k, f, (int)(J - J0), qb64, &acc[2 * (J & 1)]);
            else block_chunks(a, row, J, (int)(8 * (J - J0)), k, fac, raw, acc, 3, qb64);
        }
    }
    if (!gq) off = offset_term(a, s16, m16, a->xs);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    return _mm512_fmadd_ps(sum, _mm512_set1_ps(a->L), off);
}

/* Short rows (K <= 1024 with groups = x blocks of 64 columns, e.g. every matrix of a 576-wide model but
 * down_proj): R rows per pass. Such a row is one factor window and at most two plane blocks, so its time is
 * the latency of one dependency chain (scales -> factors -> chunk products -> sum, ~19 ns per row on AMD
 * Zen 4 whatever its length up to 512 columns); interleaving R independent rows lets them overlap.
 * Same arithmetic as gdecode_row (2 accumulators per row instead of 4). out[r] = the row's 16-lane vector. */
#define SHORT_R 2
BD_INLINE int short_rows(const bd_gemv *a, const int qb64) { return qb64 && a->G == a->QB && a->RB <= 128; }

BD_INLINE void gshort_rows(const bd_gemv *a, int64_t n, const int k, __m512 *out) {
    const int64_t RB = a->RB, nfull = RB >> 6, nblk = (RB + 63) >> 6; /* nblk <= 2: one window */
    const int S = SLOTS(k);
    const __mmask16 live = a->ng >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << a->ng) - 1);
    const __m512 cs = code_scale(S, 1), hmid = _mm512_set1_ps(a->hmid);
    const __m512 xs = _mm512_loadu_ps(a->xs), dx = _mm512_loadu_ps(a->dx), qs = _mm512_loadu_ps(a->qs);
    float fac[SHORT_R][16] __attribute__((aligned(64))), raw[SHORT_R][16] __attribute__((aligned(64)));
    __m512 acc[SHORT_R][2], off[SHORT_R], fr[SHORT_R];
    bd_prefetch_rows(a, n, SHORT_R, k);
#pragma GCC unroll 4
    for (int r = 0; r < SHORT_R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16));
        const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m16));
        off[r] = _mm512_mul_ps(_mm512_fmadd_ps(sc, hmid, m), xs);
        const __m512 f = _mm512_mul_ps(sc, dx);
        acc[r][0] = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), f), qs); /* centering */
        acc[r][1] = _mm512_setzero_ps();
        fr[r] = f;
        if (nblk > nfull) {
            if (S != 8) _mm512_store_ps(raw[r], f); /* tail chunks: plain codes */
            store_factors(fac[r], S == 8 ? f : _mm512_mul_ps(f, cs));
        }
    }
    for (int64_t J = 0; J < nblk; J++)
#pragma GCC unroll 4
        for (int r = 0; r < SHORT_R; r++) {
            if (J < nfull) octet_block(a, a->planes + (n + r) * RB, J, k, fr[r], (int)J, 1, &acc[r][J & 1]);
            else block_chunks(a, a->planes + (n + r) * RB, J, (int)(8 * J), k, fac[r], raw[r], acc[r], 1, 1);
        }
    const __m512 L = _mm512_set1_ps(a->L);
#pragma GCC unroll 4
    for (int r = 0; r < SHORT_R; r++) out[r] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][0], acc[r][1]), L, off[r]);
}

/* Rows n0..n1-1, 16 at a time: the 16 per-row vectors are reduced together (hsum16). */
BD_INLINE void gdecode_rows(const bd_gemv *a, int64_t n0, int64_t n1, const int k, const int qb64) {
    const __m512i idx0 = unit_group_idx(a, 0);
    const int shrt = short_rows(a, qb64);
    __m512 v[16];
    for (int64_t n = n0; n < n1; n += 16) {
        const int nr = n1 - n < 16 ? (int)(n1 - n) : 16;
        int r = 0;
        if (shrt)
            for (; r + SHORT_R <= nr; r += SHORT_R) gshort_rows(a, n + r, k, v + r);
        for (; r < 16; r++) v[r] = r < nr ? gdecode_row(a, n + r, k, qb64, idx0) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(a->y + n, (__mmask16)((1u << nr) - 1), hsum16(v));
    }
}

#define DEF_GDECODE(K, Q)                                                       \
    static void gdecode_k##K##_q##Q(const bd_gemv *a, int64_t n0, int64_t n1) { \
        gdecode_rows(a, n0, n1, K, Q);                                          \
    }
#define DEF_GDECODE_K(K) DEF_GDECODE(K, 0) DEF_GDECODE(K, 1)
DEF_GDECODE_K(1) DEF_GDECODE_K(2) DEF_GDECODE_K(3) DEF_GDECODE_K(4)
DEF_GDECODE_K(5) DEF_GDECODE_K(6) DEF_GDECODE_K(7) DEF_GDECODE_K(8)

typedef void (*rows_fn)(const bd_gemv *, int64_t, int64_t);
static const rows_fn gdecode_fns[9][2] = {
    {0, 0},
    {gdecode_k1_q0, gdecode_k1_q1}, {gdecode_k2_q0, gdecode_k2_q1}, {gdecode_k3_q0, gdecode_k3_q1},
    {gdecode_k4_q0, gdecode_k4_q1}, {gdecode_k5_q0, gdecode_k5_q1}, {gdecode_k6_q0, gdecode_k6_q1},
    {gdecode_k7_q0, gdecode_k7_q1}, {gdecode_k8_q0, gdecode_k8_q1},
};

/* ---- small batch: one row x T tokens per pass ----------------------------------------------- */

/* acc[t] += float(dot(c, q_t)) * s_g * d_(t,u) for the T tokens of one chunk; the codes are built once
 * per block for all tokens. With 64-column x blocks: one broadcast of s per chunk, d_(t,u) broadcast from
 * dxt (block scales, token-minor); with 32-column blocks each token gets a two-valued factor vector. */
BD_INLINE void gmulti_chunk(const bd_gemv *a, __m512i c, int64_t j, int jj, int m0, const float *sf, __m512 *acc,
                            const int T, const int qb64) {
    if (qb64) {
        const float s = sf[jj];
        const float *d = a->dxt + j * a->Mp + m0;
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_load_si512(a->xq + (int64_t)(m0 + t) * a->Kp + 64 * j));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(s)), _mm512_set1_ps(d[t]), acc[t]);
        }
    } else {
        const __m512 Sv = _mm512_mask_mov_ps(_mm512_set1_ps(sf[2 * jj]), 0xff00, _mm512_set1_ps(sf[2 * jj + 1]));
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, _mm512_load_si512(a->xq + (int64_t)(m0 + t) * a->Kp + 64 * j));
            const __m512 f = _mm512_mul_ps(Sv, _mm512_load_ps(a->dxv + ((int64_t)(m0 + t) * (a->Kp >> 6) + j) * 16));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), f, acc[t]);
        }
    }
}

/* One row, tokens m0..m0+T-1: out[t] = the 16-lane vector whose lane sum is y[m0 + t, n]. Same structure
 * as gdecode_row (offsets folded into the window loop when G == QB). */
BD_INLINE void gmulti_row(const bd_gemv *a, int64_t n, int m0, const int T, const int S, __m512i idx0, __m512 *out) {
    const int64_t RB = a->RB, ps = a->pstride;
    const int64_t nch = (RB + 7) >> 3, nfull = RB >> 6, nblk = (RB + 63) >> 6;
    const int qb64 = a->QB == 64, BPF = qb64 ? 2 : 1;
    const int gq = a->G == a->QB, idx_const = a->G <= 16 * a->QB;
    const uint8_t *row = a->planes + n * RB;
    const uint16_t *s16 = a->scales + n * a->ng, *m16 = a->offsets + n * a->ng;
    const __m512 cs = code_scale(S, qb64), hmid = _mm512_set1_ps(a->hmid);
    __m512 acc[8], off[8];
    float sf[16] __attribute__((aligned(64)));
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm512_setzero_ps();
    if (m0 == 0) bd_prefetch_rows(a, n, 1, a->k);
    for (int64_t J0 = 0; J0 < nblk; J0 += BPF) {
        const int64_t u0 = 16 * J0 / BPF;
        __m512 f;
        if (gq) {
            const int64_t left = a->ng - u0;
            const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            f = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16 + u0));
            const __m512 av = _mm512_fmadd_ps(f, hmid, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m16 + u0)));
            for (int t = 0; t < T; t++)
                off[t] = _mm512_fmadd_ps(av, _mm512_loadu_ps(a->xs + (int64_t)(m0 + t) * a->ng_pad + u0), off[t]);
        } else {
            f = unit_factors_vec(a, s16, u0, idx_const ? idx0 : unit_group_idx(a, u0), NULL);
        }
        for (int t = 0; t < T; t++) { /* centering: - 2^(k-1) sum_u s_g(u) d_u Q_u */
            const int64_t o = (int64_t)(m0 + t) * a->nu_pad + u0;
            acc[t] = _mm512_fnmadd_ps(f, _mm512_mul_ps(_mm512_loadu_ps(a->dx + o), _mm512_loadu_ps(a->qs + o)), acc[t]);
        }
        store_factors(sf, S == 8 ? f : _mm512_mul_ps(f, cs));
        for (int64_t J = J0; J < J0 + BPF && J < nblk; J++) {
            __m512i c[8];
            if (J < nfull) {
                block_codes(row, ps, J, 64, a->k, S, c);
#pragma GCC unroll 8
                for (int q = 0; q < 8; q++) gmulti_chunk(a, c[q], 8 * J + q, (int)(8 * (J - J0)) + q, m0, sf, acc, T, qb64);
            } else {
                block_codes(row, ps, J, (int)(RB - 64 * J), a->k, S, c);
                const int nc = (int)(nch - 8 * J);
#pragma GCC unroll 8
                for (int q = 0; q < 8; q++)
                    if (q < nc) gmulti_chunk(a, c[q], 8 * J + q, (int)(8 * (J - J0)) + q, m0, sf, acc, T, qb64);
            }
        }
    }
    const __m512 L = _mm512_set1_ps(a->L);
    for (int t = 0; t < T; t++)
        out[t] = _mm512_fmadd_ps(acc[t], L, gq ? off[t] : offset_term(a, s16, m16, a->xs + (int64_t)(m0 + t) * a->ng_pad));
}

/* Rows n0..n1-1 x tokens m0..m0+T-1, 16 rows at a time (one hsum16 per token and 16 rows). */
BD_INLINE void gmulti_rows(const bd_gemv *a, int64_t n0, int64_t n1, int m0, const int T, const int S) {
    const __m512i idx0 = unit_group_idx(a, 0);
    __m512 v[8][16], o[8];
    for (int64_t n = n0; n < n1; n += 16) {
        const int nr = n1 - n < 16 ? (int)(n1 - n) : 16;
        for (int r = 0; r < 16; r++) {
            if (r < nr) {
                gmulti_row(a, n + r, m0, T, S, idx0, o);
                for (int t = 0; t < T; t++) v[t][r] = o[t];
            } else {
                for (int t = 0; t < T; t++) v[t][r] = _mm512_setzero_ps();
            }
        }
        for (int t = 0; t < T; t++)
            _mm512_mask_storeu_ps(a->y + (int64_t)(m0 + t) * a->N + n, (__mmask16)((1u << nr) - 1), hsum16(v[t]));
    }
}

#define DEF_GMULTI(T)                                                                 \
    static void gmulti_t##T(const bd_gemv *a, int64_t n0, int64_t n1, int m0) {       \
        const int S = SLOTS(a->k);                                                    \
        if (S == 2) gmulti_rows(a, n0, n1, m0, T, 2);                                 \
        else if (S == 4) gmulti_rows(a, n0, n1, m0, T, 4);                            \
        else gmulti_rows(a, n0, n1, m0, T, 8);                                        \
    }
DEF_GMULTI(1) DEF_GMULTI(2) DEF_GMULTI(3) DEF_GMULTI(4) DEF_GMULTI(5) DEF_GMULTI(6) DEF_GMULTI(7) DEF_GMULTI(8)
typedef void (*gmulti_fn)(const bd_gemv *, int64_t, int64_t, int);
static const gmulti_fn gmulti_fns[9] = {0, gmulti_t1, gmulti_t2, gmulti_t3, gmulti_t4, gmulti_t5, gmulti_t6, gmulti_t7,
                                        gmulti_t8};

static void rows_avx512_gfni(const bd_gemv *a, int64_t n0, int64_t n1) {
    if (a->M == 1) {
        gdecode_fns[a->k][a->QB == 64](a, n0, n1);
        return;
    }
    /* 16 rows at a time, all token blocks for them: the plane bytes of a row come from memory once */
    for (int64_t n = n0; n < n1; n += 16) {
        const int64_t e = n + 16 < n1 ? n + 16 : n1;
        for (int m0 = 0; m0 < a->M; m0 += 8) gmulti_fns[a->M - m0 < 8 ? a->M - m0 : 8](a, n, e, m0);
    }
}

/* prepare_avx512, then (decode, M = 1) the activations of every full 512-column block in the octet order of
 * octet_block: xq'[512J + 64j + 8q + i] = xq[512J + 64q + 8j + i] (an 8 x 8 transpose of qwords). */
static void prepare_avx512_gfni(bd_gemv *a) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, octet_pins);
    prepare_avx512(a);
    if (a->M != 1) return;
    const int64_t nfull = a->RB >> 6; /* as the row loop counts full blocks */
    for (int64_t J = 0; J < nfull; J++) {
        uint64_t t[64], *blk = (uint64_t *)(void *)(a->xq + 512 * J);
        memcpy(t, blk, sizeof t);
        for (int q = 0; q < 8; q++)
            for (int j = 0; j < 8; j++) blk[8 * j + q] = t[8 * q + j];
    }
}

const bd_isa bd_isa_avx512_gfni = {"avx512", prepare_avx512_gfni, rows_avx512_gfni, sum_bytes_avx512};
