/* AVX2 path (AVX2, FMA, F16C): 32 columns per step.
 *
 * Codes: the 4 bytes of one plane over a 32-column chunk are broadcast, each byte copied to its 8
 * lanes (vpshufb), and compared with the lane's bit (1 << (i % 8)) -> 0xFF where the bit is set.
 * Horner over the planes, MSB first: c = 2c - bitmask (bitmask = -1 where set) gives c = 2c + bit.
 * Dot: vpmaddubsw (u8 codes x s8 q -> pairs summed in int16) then vpmaddwd by 1 (-> int32 per 4
 * columns). Pairs fit int16 for codes <= 127 (2 * 127 * 127 < 2^15); at k = 8 the code is split as
 * 2 * c7 + b0 (top 7 bits, last bit) and the two dots are combined in int32.
 * Scale: acc += float(int32 lanes) * s_g * d_u; at the end y = L * (hsum(acc) - 2^(k-1) sum_u f_u Q_u)
 * + sum_g a_g X_g (see bitdial_kernels.h).
 * Decode runs 4 rows x 1 token per pass (k known at compile time), small batches 1 row x up to 8 tokens.
 */
#include <immintrin.h>

#include "bitdial_kernels.h"

typedef uint32_t __attribute__((may_alias, aligned(1))) u32_unaligned;

/* 32 plane bits (4 bytes at p; tail = bytes in a partial chunk or 0) -> 32 bytes of 0x00 / 0xFF. */
BD_INLINE __m256i expand_bits(const uint8_t *p, int tail) {
    const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    uint32_t b;
    if (tail) { /* 1..3 bytes: never read past the row */
        b = p[0];
        if (tail > 1) b |= (uint32_t)p[1] << 8;
        if (tail > 2) b |= (uint32_t)p[2] << 16;
    } else {
        b = *(const u32_unaligned *)p;
    }
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b), rep);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* int32 dot products (8 lanes of 4 columns) of the k-bit codes of one chunk with q. */
BD_INLINE __m256i chunk_dot(const uint8_t *p, int64_t ps, int k, int tail, const int8_t *q) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i xv = _mm256_load_si256((const __m256i *)q);
    const int k7 = k < 8 ? k : 7;
    __m256i c = _mm256_setzero_si256();
    for (int p_ = 0; p_ < k7; p_++) c = _mm256_sub_epi8(_mm256_add_epi8(c, c), expand_bits(p + p_ * ps, tail));
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones);
    if (k == 8) {
        const __m256i b0 = _mm256_and_si256(expand_bits(p + 7 * ps, tail), _mm256_set1_epi8(1));
        d = _mm256_add_epi32(_mm256_add_epi32(d, d), _mm256_madd_epi16(_mm256_maddubs_epi16(b0, xv), ones));
    }
    return d;
}

/* Codes for several tokens: build once, dot with each token's q (same arithmetic as chunk_dot). */
BD_INLINE void chunk_codes(const uint8_t *p, int64_t ps, int k, int tail, __m256i *c, __m256i *b0) {
    const int k7 = k < 8 ? k : 7;
    *c = _mm256_setzero_si256();
    for (int p_ = 0; p_ < k7; p_++) *c = _mm256_sub_epi8(_mm256_add_epi8(*c, *c), expand_bits(p + p_ * ps, tail));
    *b0 = k == 8 ? _mm256_and_si256(expand_bits(p + 7 * ps, tail), _mm256_set1_epi8(1)) : _mm256_setzero_si256();
}

BD_INLINE __m256i codes_dot(__m256i c, __m256i b0, int k, const int8_t *q) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i xv = _mm256_load_si256((const __m256i *)q);
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones);
    if (k == 8) d = _mm256_add_epi32(_mm256_add_epi32(d, d), _mm256_madd_epi16(_mm256_maddubs_epi16(b0, xv), ones));
    return d;
}

BD_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_g a_g X_g (a_g = m_g + hmid s_g) for one row and one token. */
BD_INLINE float offset_term(const bd_gemv *a, const uint16_t *s16, const uint16_t *m16, const float *xs) {
    __m256 o = _mm256_setzero_ps();
    const __m256 h = _mm256_set1_ps(a->hmid);
    int64_t g = 0;
    for (; g + 8 <= a->ng; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + g)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m16 + g)));
        o = _mm256_fmadd_ps(_mm256_fmadd_ps(s, h, m), _mm256_loadu_ps(xs + g), o);
    }
    float r = hsum256(o);
    for (; g < a->ng; g++) r += (_cvtsh_ss(m16[g]) + a->hmid * _cvtsh_ss(s16[g])) * xs[g];
    return r;
}

/* R rows x T tokens (T * R <= 8 accumulators). */
BD_INLINE void tile_avx2(const bd_gemv *a, int64_t n, const int R, int m0, const int T) {
    const int64_t RB = a->RB, ps = a->pstride;
    const int64_t nfull = RB >> 2, nch = (RB + 3) >> 2; /* 32-column chunks: 4 bytes per plane row */
    const int tail = (int)(RB - 4 * nfull);
    const int sh = a->QB == 64 ? 1 : 0; /* chunk j belongs to x block j >> sh */
    const int k = a->k;
    __m256 acc[8][4];
    float sf[4][16], corr[8][4];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            acc[t][r] = _mm256_setzero_ps();
            corr[t][r] = 0.0f;
        }
    for (int64_t u0 = 0; u0 < a->nu; u0 += 16) {
        for (int r = 0; r < R; r++) {
            const uint16_t *s16 = a->scales + (n + r) * a->ng;
            for (int l = 0; l < 16; l++) {
                const int64_t g = bd_group_of_unit(a, u0 + l);
                sf[r][l] = (u0 + l < a->nu && g < a->ng) ? _cvtsh_ss(s16[g]) : 0.0f;
            }
        }
        for (int t = 0; t < T; t++) { /* centering: 2^(k-1) sum_u s_g(u) d_u Q_u */
            const int64_t o = (int64_t)(m0 + t) * a->nu_pad + u0;
            const __m256 dq0 = _mm256_mul_ps(_mm256_loadu_ps(a->dx + o), _mm256_loadu_ps(a->qs + o));
            const __m256 dq1 = _mm256_mul_ps(_mm256_loadu_ps(a->dx + o + 8), _mm256_loadu_ps(a->qs + o + 8));
            for (int r = 0; r < R; r++)
                corr[t][r] += hsum256(_mm256_fmadd_ps(_mm256_loadu_ps(sf[r]), dq0, _mm256_mul_ps(_mm256_loadu_ps(sf[r] + 8), dq1)));
        }
        const int64_t jend = ((u0 + 16) << sh) < nch ? ((u0 + 16) << sh) : nch;
        for (int64_t j = u0 << sh; j < jend; j++) {
            const int tb = j == nfull ? tail : 0;
            const int64_t u = j >> sh;
            for (int r = 0; r < R; r++) {
                const uint8_t *p = a->planes + (n + r) * RB + 4 * j;
                if (T == 1) {
                    const __m256i d = chunk_dot(p, ps, k, tb, a->xq + (int64_t)m0 * a->Kp + 32 * j);
                    const float f = sf[r][u - u0] * a->dx[(int64_t)m0 * a->nu_pad + u];
                    acc[0][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(f), acc[0][r]);
                } else {
                    __m256i c, b0;
                    chunk_codes(p, ps, k, tb, &c, &b0);
                    for (int t = 0; t < T; t++) {
                        const __m256i d = codes_dot(c, b0, k, a->xq + (int64_t)(m0 + t) * a->Kp + 32 * j);
                        const float f = sf[r][u - u0] * a->dx[(int64_t)(m0 + t) * a->nu_pad + u];
                        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(f), acc[t][r]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        for (int t = 0; t < T; t++)
            a->y[(int64_t)(m0 + t) * a->N + n + r] =
                a->L * (hsum256(acc[t][r]) - corr[t][r]) + offset_term(a, s16, m16, a->xs + (int64_t)(m0 + t) * a->ng_pad);
    }
}

/* ---- decode: one token, 4 rows per pass, k known at compile time --------------------------- */

/* int32 dot products (8 lanes of 4 columns) of the k-bit codes of the 32 columns at p with q (k fixed). */
BD_INLINE __m256i half_dot(const uint8_t *p, int64_t ps, const int k, int tail, __m256i xv) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int k7 = k < 8 ? k : 7;
    __m256i c = _mm256_sub_epi8(_mm256_setzero_si256(), expand_bits(p, tail));
#pragma GCC unroll 8
    for (int q = 1; q < k7; q++) c = _mm256_sub_epi8(_mm256_add_epi8(c, c), expand_bits(p + q * ps, tail));
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones);
    if (k == 8) {
        const __m256i b0 = _mm256_and_si256(expand_bits(p + 7 * ps, tail), _mm256_set1_epi8(1));
        d = _mm256_add_epi32(_mm256_add_epi32(d, d), _mm256_madd_epi16(_mm256_maddubs_epi16(b0, xv), ones));
    }
    return d;
}

/* Chunk j (64 columns, two 32-column halves) of R rows; tail = plane bytes in a partial chunk, or 0. */
BD_INLINE void decode_chunk(const bd_gemv *a, int64_t n, int64_t j, int jj, float (*fac)[16], __m256 *acc,
                            const int R, const int k, const int qb64, const int tail) {
    const int64_t RB = a->RB, ps = a->pstride, b0 = 8 * j;
    const int t0 = tail ? (tail >= 4 ? 0 : tail) : 0;         /* bytes of the first half if partial */
    const int t1 = tail ? (tail > 4 ? tail - 4 : -1) : 0;      /* second half: -1 = absent */
    const __m256i x0 = _mm256_load_si256((const __m256i *)(a->xq + 64 * j));
    const __m256i x1 = _mm256_load_si256((const __m256i *)(a->xq + 64 * j + 32));
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const uint8_t *p = a->planes + (n + r) * RB + b0;
        const __m256i d0 = half_dot(p, ps, k, t0, x0);
        const __m256i d1 = t1 < 0 ? _mm256_setzero_si256() : half_dot(p + 4, ps, k, t1, x1);
        if (qb64) {
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)), _mm256_set1_ps(fac[r][jj]), acc[r]);
        } else {
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(fac[r][2 * jj]), acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(fac[r][2 * jj + 1]), acc[r]);
        }
    }
}

/* R rows, one token; 64 columns (two 32-column halves sharing the loads of x) per step. */
BD_INLINE void decode_tile(const bd_gemv *a, int64_t n, const int R, const int k, const int qb64) {
    bd_prefetch_rows(a, n, R, k);
    const int64_t RB = a->RB;
    const int64_t nch = (RB + 7) >> 3, nfull = RB >> 3;
    const int CB = qb64 ? 16 : 8; /* 64-column chunks per 16 x blocks */
    __m256 acc[4];
    float fac[4][16], corr_r[4];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        corr_r[r] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < nch; j0 += CB) {
        const int64_t u0 = qb64 ? j0 : 2 * j0;
        for (int r = 0; r < R; r++) { /* f_u = s_g(u) d_u and the centering sum f_u 2^(k-1) Q_u */
            const uint16_t *s16 = a->scales + (n + r) * a->ng;
            float c = 0.0f;
            for (int l = 0; l < 16; l++) {
                const int64_t g = bd_group_of_unit(a, u0 + l);
                fac[r][l] = (u0 + l < a->nu && g < a->ng) ? _cvtsh_ss(s16[g]) * a->dx[u0 + l] : 0.0f;
                c += fac[r][l] * a->qs[u0 + l];
            }
            corr_r[r] += c;
        }
        const int64_t jend = j0 + CB < nfull ? j0 + CB : nfull;
        for (int64_t j = j0; j < jend; j++) decode_chunk(a, n, j, (int)(j - j0), fac, acc, R, k, qb64, 0);
        if (nfull < nch && nfull >= j0 && nfull < j0 + CB) /* the last, partial chunk */
            decode_chunk(a, n, nfull, (int)(nfull - j0), fac, acc, R, k, qb64, (int)(RB - 8 * nfull));
    }
    for (int r = 0; r < R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        a->y[n + r] = a->L * (hsum256(acc[r]) - corr_r[r]) + offset_term(a, s16, m16, a->xs);
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

#define DEF_MULTI(T) \
    static void multi_t##T(const bd_gemv *a, int64_t n, int m0) { tile_avx2(a, n, 1, m0, T); }
DEF_MULTI(1) DEF_MULTI(2) DEF_MULTI(3) DEF_MULTI(4) DEF_MULTI(5) DEF_MULTI(6) DEF_MULTI(7) DEF_MULTI(8)
typedef void (*multi_fn)(const bd_gemv *, int64_t, int);
static const multi_fn multi_fns[9] = {0, multi_t1, multi_t2, multi_t3, multi_t4, multi_t5, multi_t6, multi_t7, multi_t8};

static void rows_avx2(const bd_gemv *a, int64_t n0, int64_t n1) {
    if (a->M == 1) {
        decode_fns[a->k][a->QB == 64](a, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int m0 = 0; m0 < a->M; m0 += 8) multi_fns[a->M - m0 < 8 ? a->M - m0 : 8](a, n, m0);
}

/* ---- activation quantization ---------------------------------------------------------------- */

BD_INLINE __m256 masked_load8(const float *p, int64_t left) {
    if (left >= 8) return _mm256_loadu_ps(p);
    if (left <= 0) return _mm256_setzero_ps();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), lane));
}

BD_INLINE float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

BD_INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static void prepare_avx2(bd_gemv *a) {
    const int64_t K = a->K, QB = a->QB;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < a->M; m++) {
        const float *x = a->x + (int64_t)m * K;
        int8_t *xq = a->xq + (int64_t)m * a->Kp;
        float *dx = a->dx + (int64_t)m * a->nu_pad;
        float *qs = a->qs + (int64_t)m * a->nu_pad;
        float *xs = a->xs + (int64_t)m * a->ng_pad;
        memset(xs, 0, (size_t)a->ng_pad * sizeof(float));
        for (int64_t u = 0; u < a->nu; u++) {
            const int64_t j0 = u * QB;
            __m256 v[8], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < QB / 8; i++) {
                v[i] = masked_load8(x + j0 + 8 * i, K - (j0 + 8 * i));
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], absmask));
                sum = _mm256_add_ps(sum, v[i]);
            }
            float d, inv;
            bd_block_scale(hmax256(amax), &d, &inv);
            dx[u] = d;
            xs[bd_group_of_unit(a, u)] += hsum256(sum);
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i qsum = _mm256_setzero_si256();
            for (int i = 0; i < QB / 8; i += 4) { /* 4 x 8 int32 -> 32 int8, rint then saturating packs */
                const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
                const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], vinv));
                const __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 2], vinv));
                const __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 3], vinv));
                qsum = _mm256_add_epi32(qsum, _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
                const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
                _mm256_storeu_si256((__m256i *)(xq + j0 + 8 * i), _mm256_permutevar8x32_epi32(b, order));
            }
            qs[u] = a->cmid * (float)hsum_epi32(qsum);
        }
        for (int64_t u = a->nu; u < a->nu_pad; u++) dx[u] = qs[u] = 0.0f;
    }
}

/* Bandwidth probe: 8 interleaved sequential streams (see avx512_common.h). */
static uint64_t sum_bytes_avx2(const uint8_t *p, size_t n) {
    const size_t per = n / 8 / 256 * 256;
    __m256i s[8];
    for (int t = 0; t < 8; t++) s[t] = _mm256_setzero_si256();
    for (size_t i = 0; i < per; i += 64)
        for (int t = 0; t < 8; t++)
            s[t] = _mm256_add_epi64(s[t], _mm256_add_epi64(_mm256_load_si256((const __m256i *)(p + t * per + i)),
                                                           _mm256_load_si256((const __m256i *)(p + t * per + i + 32))));
    for (size_t i = 8 * per; i < n; i += 32) s[0] = _mm256_add_epi64(s[0], _mm256_load_si256((const __m256i *)(p + i)));
    for (int t = 1; t < 8; t++) s[0] = _mm256_add_epi64(s[0], s[t]);
    uint64_t w[4];
    _mm256_storeu_si256((__m256i *)w, s[0]);
    return w[0] + w[1] + w[2] + w[3];
}

const bd_isa bd_isa_avx2 = {"avx2", prepare_avx2, rows_avx2, sum_bytes_avx2};
