/* AVX-512 path (F, BW, VL, VNNI): 64 columns per step.
 *
 * Codes: bit i of the 8 plane bytes of a 64-column chunk is exactly the mask bit of byte lane i, so the
 * k-bit codes of 64 columns are rebuilt as u8 lanes with one masked op per plane:
 *     c = OR_p maskz_mov(plane_p_bits, 2^(k-1-p))        (p = 0..k-1; the ORs merged 3-way by vpternlog)
 * Dot: vpdpbusd multiplies the u8 codes by the int8 activations q and sums groups of 4 lanes into
 * 16 int32 lanes (lanes 0-7 = columns 0-31, lanes 8-15 = columns 32-63), exact (|sum| < 2^21).
 * Scale: one float multiply-add per chunk and row, acc += float(int32 lanes) * f_u, f_u = s_g * d_u
 * precomputed for 16 x blocks at a time (broadcast from memory, no shuffle); the centering term
 * -2^(k-1) f_u Q_u is one more multiply-add per 16 blocks. At the end of a row:
 * y = hsum(L * acc + sum_g a_g X_g)   (see bitdial_kernels.h).
 *
 * Decode (M = 1) is specialised on k and on the x block (64 or 32 columns) and runs 4 rows per pass
 * (each 64-byte load of x is reused 4 times). Small batches (M = 2..16) run 2 rows x up to 8 tokens
 * per pass: the codes of a chunk are rebuilt once per 8 tokens and reused for all of them.
 */
#include <immintrin.h>

#include "avx512_common.h"
#include "bitdial_kernels.h"

typedef uint64_t __attribute__((may_alias, aligned(1))) u64_unaligned;

/* The 64 bits of one plane over a 64-column chunk, as a mask register (kmovq from memory). */
BD_INLINE __mmask64 plane_bits(const uint8_t *p) { return _cvtu64_mask64(*(const u64_unaligned *)p); }

/* The last chunk of a row may hold fewer than 8 bytes: read exactly those (the rest is padding). */
BD_INLINE __mmask64 plane_bits_tail(const uint8_t *p, int nbytes) {
    __m128i v = _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1), p);
    return _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(v));
}

/* k-bit codes of 64 columns: plane q of the chunk at p + q * ps; tail = bytes in a partial chunk or 0.
 * Each plane becomes maskz_mov(bits_q, 2^(k-1-q)) (a zero-masking move: 2 per cycle, where a
 * merge-masked add runs at 1 per cycle) and the disjoint bit patterns are OR-ed, three at a time
 * with vpternlog (0xFE = a | b | c). */
BD_INLINE __m512i build_codes(const uint8_t *p, int64_t ps, const int k, const int tail) {
#define PLANE(q) _mm512_maskz_mov_epi8(tail ? plane_bits_tail(p + (q) * ps, tail) : plane_bits(p + (q) * ps), \
                                       _mm512_set1_epi8((char)(1 << (k - 1 - (q)))))
    __m512i c = PLANE(0);
    int q = 1;
#pragma GCC unroll 4
    for (; q + 1 < k; q += 2) c = _mm512_ternarylogic_epi32(c, PLANE(q), PLANE(q + 1), 0xFE);
    if (q < k) c = _mm512_or_si512(c, PLANE(q));
#undef PLANE
    return c;
}

/* Same with k known only at run time (small-batch path: amortized over the tokens). */
BD_INLINE __m512i build_codes_rt(const uint8_t *p, int64_t ps, int k, const __m512i *w, int tail) {
    __m512i c = _mm512_setzero_si512();
    for (int q = 0; q < k; q++) {
        __mmask64 b = tail ? plane_bits_tail(p + q * ps, tail) : plane_bits(p + q * ps);
        c = _mm512_mask_add_epi8(c, b, c, w[q]);
    }
    return c;
}

/* ---- decode: one token, R rows per pass ----------------------------------------------------- */

/* Accumulate chunk j (tail = its byte count if partial) of R rows; f = the 16 block factors of its block. */
BD_INLINE void decode_chunk(const uint8_t *const *row, int64_t ps, const int8_t *xq, int64_t j, int jj,
                            float (*fac)[16], __m512 *acc, const int R, const int k, const int qb64, const int tail) {
    const __m512i xv = _mm512_load_si512(xq + 64 * j); /* xq is zero-padded to a multiple of 64 */
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const __m512i c = build_codes(row[r] + 8 * j, ps, k, tail);
        const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xv);
        __m512 f;
        if (qb64) {
            f = _mm512_set1_ps(fac[r][jj]);
        } else { /* 32-column blocks: lanes 0-7 use block 2jj, lanes 8-15 block 2jj+1 */
            f = _mm512_mask_mov_ps(_mm512_set1_ps(fac[r][2 * jj]), 0xff00, _mm512_set1_ps(fac[r][2 * jj + 1]));
        }
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), f, acc[r]);
    }
}

BD_INLINE void decode_tile(const bd_gemv *a, int64_t n, const int R, const int k, const int qb64) {
    bd_prefetch_rows(a, n, R, k);
    const int64_t RB = a->RB, ps = a->pstride;
    const int64_t nfull = RB >> 3, nch = (RB + 7) >> 3;
    const int CB = qb64 ? 16 : 8; /* chunks per 16 x blocks */
    const int tail = (int)(RB - 8 * nfull);
    const uint8_t *row[4];
    __m512 acc[4];
    float fac[4][16] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) {
        row[r] = a->planes + (n + r) * RB;
        acc[r] = _mm512_setzero_ps();
    }
    for (int64_t j0 = 0; j0 < nch; j0 += CB) {
        const int64_t u0 = qb64 ? j0 : 2 * j0;
        const __m512i idx = unit_group_idx(a, u0);
        const __m512 q = _mm512_loadu_ps(a->qs + u0); /* 2^(k-1) Q_u */
        for (int r = 0; r < R; r++) {
            unit_factors(a, a->scales + (n + r) * a->ng, u0, idx, a->dx, fac[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_load_ps(fac[r]), q, acc[r]); /* - 2^(k-1) sum_u f_u Q_u */
        }
        const int64_t jend = j0 + CB < nfull ? j0 + CB : nfull;
        for (int64_t j = j0; j < jend; j++) decode_chunk(row, ps, a->xq, j, (int)(j - j0), fac, acc, R, k, qb64, 0);
        if (tail && nfull >= j0 && nfull < j0 + CB)
            decode_chunk(row, ps, a->xq, nfull, (int)(nfull - j0), fac, acc, R, k, qb64, tail);
    }
    const __m512 L = _mm512_set1_ps(a->L);
    for (int r = 0; r < R; r++) {
        const __m512 o = offset_term(a, a->scales + (n + r) * a->ng, a->offsets + (n + r) * a->ng, a->xs);
        a->y[n + r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[r], L, o));
    }
}

#define DEF_DECODE(K, Q)                                                              \
    static void decode_k##K##_q##Q(const bd_gemv *a, int64_t n0, int64_t n1) {        \
        int64_t n = n0;                                                               \
        for (; n + 4 <= n1; n += 4) decode_tile(a, n, 4, K, Q);                       \
        for (; n < n1; n++) decode_tile(a, n, 1, K, Q);                               \
    }
#define DEF_DECODE_K(K) DEF_DECODE(K, 0) DEF_DECODE(K, 1)
DEF_DECODE_K(1) DEF_DECODE_K(2) DEF_DECODE_K(3) DEF_DECODE_K(4)
DEF_DECODE_K(5) DEF_DECODE_K(6) DEF_DECODE_K(7) DEF_DECODE_K(8)

typedef void (*rows_fn)(const bd_gemv *, int64_t, int64_t);
static const rows_fn decode_fns[9][2] = {
    {0, 0},
    {decode_k1_q0, decode_k1_q1}, {decode_k2_q0, decode_k2_q1}, {decode_k3_q0, decode_k3_q1},
    {decode_k4_q0, decode_k4_q1}, {decode_k5_q0, decode_k5_q1}, {decode_k6_q0, decode_k6_q1},
    {decode_k7_q0, decode_k7_q1}, {decode_k8_q0, decode_k8_q1},
};

/* ---- small batch: R rows x T tokens per pass ------------------------------------------------ */

/* acc[t][r] += float(dot(codes_r, q_t)) * S_r * D_t, with S_r the scale(s) of the chunk for row r
 * and D_t = dxv (the x block scale(s) of token t expanded to 16 lanes). */
BD_INLINE void multi_tile(const bd_gemv *a, int64_t n, const int R, int m0, const int T) {
    const int64_t RB = a->RB, ps = a->pstride, Kp = a->Kp, nch64 = a->Kp >> 6;
    const int64_t nfull = RB >> 3, nch = (RB + 7) >> 3;
    const int qb64 = a->QB == 64, CB = qb64 ? 16 : 8;
    const int tail = (int)(RB - 8 * nfull);
    __m512i w[8];
    for (int q = 0; q < a->k; q++) w[q] = _mm512_set1_epi8((char)(1 << (a->k - 1 - q)));
    const uint8_t *row[2];
    __m512 acc[8][2];
    float sf[2][16] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) row[r] = a->planes + (n + r) * RB;
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < nch; j0 += CB) {
        const int64_t u0 = qb64 ? j0 : 2 * j0;
        const __m512i idx = unit_group_idx(a, u0);
        for (int r = 0; r < R; r++) unit_factors(a, a->scales + (n + r) * a->ng, u0, idx, NULL, sf[r]);
        for (int t = 0; t < T; t++) { /* - 2^(k-1) sum_u s_g(u) d_u Q_u */
            const int64_t o = (int64_t)(m0 + t) * a->nu_pad + u0;
            const __m512 dq = _mm512_mul_ps(_mm512_loadu_ps(a->dx + o), _mm512_loadu_ps(a->qs + o));
            for (int r = 0; r < R; r++) acc[t][r] = _mm512_fnmadd_ps(_mm512_load_ps(sf[r]), dq, acc[t][r]);
        }
        const int64_t jend = j0 + CB < nch ? j0 + CB : nch;
        for (int64_t j = j0; j < jend; j++) {
            const int tb = j == nfull ? tail : 0;
            const int jj = (int)(j - j0);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                const __m512i c = build_codes_rt(row[r] + 8 * j, ps, a->k, w, tb);
                const __m512 S = qb64 ? _mm512_set1_ps(sf[r][jj])
                                      : _mm512_mask_mov_ps(_mm512_set1_ps(sf[r][2 * jj]), 0xff00,
                                                           _mm512_set1_ps(sf[r][2 * jj + 1]));
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    const __m512i xv = _mm512_load_si512(a->xq + (int64_t)(m0 + t) * Kp + 64 * j);
                    const __m512i v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xv);
                    const __m512 f = _mm512_mul_ps(S, _mm512_load_ps(a->dxv + ((int64_t)(m0 + t) * nch64 + j) * 16));
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), f, acc[t][r]);
                }
            }
        }
    }
    const __m512 L = _mm512_set1_ps(a->L);
    for (int r = 0; r < R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        for (int t = 0; t < T; t++) {
            const __m512 o = offset_term(a, s16, m16, a->xs + (int64_t)(m0 + t) * a->ng_pad);
            a->y[(int64_t)(m0 + t) * a->N + n + r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[t][r], L, o));
        }
    }
}

#define DEF_MULTI(T)                                                                          \
    static void multi_t##T(const bd_gemv *a, int64_t n, int R, int m0) {                       \
        if (R == 2) multi_tile(a, n, 2, m0, T); else multi_tile(a, n, 1, m0, T);               \
    }
DEF_MULTI(1) DEF_MULTI(2) DEF_MULTI(3) DEF_MULTI(4) DEF_MULTI(5) DEF_MULTI(6) DEF_MULTI(7) DEF_MULTI(8)
typedef void (*multi_fn)(const bd_gemv *, int64_t, int, int);
static const multi_fn multi_fns[9] = {0, multi_t1, multi_t2, multi_t3, multi_t4, multi_t5, multi_t6, multi_t7, multi_t8};

static void rows_avx512(const bd_gemv *a, int64_t n0, int64_t n1) {
    if (a->M == 1) {
        decode_fns[a->k][a->QB == 64](a, n0, n1);
        return;
    }
    /* rows outer, token blocks inner: the plane bytes of a row pair are read from memory once */
    for (int64_t n = n0; n < n1; n += 2) {
        const int R = n + 2 <= n1 ? 2 : 1;
        for (int m0 = 0; m0 < a->M; m0 += 8) multi_fns[a->M - m0 < 8 ? a->M - m0 : 8](a, n, R, m0);
    }
}

const bd_isa bd_isa_avx512 = {"avx512", prepare_avx512, rows_avx512, sum_bytes_avx512};
