/* AVX-512 helpers shared by the two AVX-512 kernels (gemv_avx512.c: mask-register code rebuild;
 * gemv_avx512_gfni.c: GFNI bit-matrix transpose): block factors, offset term, x quantization,
 * bandwidth probe. Included by both translation units (static functions, compiled with each one's flags). */
#ifndef BITDIAL_AVX512_COMMON_H
#define BITDIAL_AVX512_COMMON_H

#include <immintrin.h>

#include "bitdial_kernels.h"

/* Lane -> group permutation for the 16 x blocks u0..u0+15 (u0 a multiple of 16): lane l belongs to
 * group g(u0 + l) = ((u0 + l) * QB) >> log2 G, i.e. to group g(u0) + idx[l]. 16 consecutive blocks
 * span at most 16 groups. */
BD_INLINE __m512i unit_group_idx(const bd_gemv *a, int64_t u0) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int64_t first = (u0 * a->QB) & (a->G - 1); /* column of block u0 inside its group */
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32((int)first), _mm512_slli_epi32(lane, a->QB == 64 ? 6 : 5));
    return _mm512_srl_epi32(col, _mm_cvtsi32_si128(a->log2G));
}

/* s[g(u0 + l)] * (dx ? dx[u0 + l] : 1) for the 16 x blocks u0..u0+15: one masked load of the fp16
 * scales of the groups from g(u0) on, permuted to the blocks. Lanes past the last group read 0. */
BD_INLINE __m512 unit_factors_vec(const bd_gemv *a, const uint16_t *s16, int64_t u0, __m512i idx, const float *dx) {
    const int64_t g0 = bd_group_of_unit(a, u0);
    const int64_t left = a->ng - g0;
    const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16 + g0));
    s = _mm512_permutexvar_ps(idx, s);
    if (dx) s = _mm512_mul_ps(s, _mm512_loadu_ps(dx + u0));
    return s;
}

/* Store the factors for the chunk loop, which reads them back one at a time. */
BD_INLINE void store_factors(float *out, __m512 f) {
    _mm512_store_ps(out, f);
    /* Make the compiler read the factors back from memory: the chunk loop then broadcasts each one as
     * a memory operand ({1to16}, no shuffle) instead of extracting lanes with two shuffles per chunk. */
    __asm__ __volatile__("" ::: "memory");
}

BD_INLINE void unit_factors(const bd_gemv *a, const uint16_t *s16, int64_t u0, __m512i idx, const float *dx,
                            float *out) {
    store_factors(out, unit_factors_vec(a, s16, u0, idx, dx));
}

/* Lane sums of 16 vectors, in order: out[r] = sum_l v[r][l] (45 shuffles/adds for 16 rows instead of a
 * full horizontal reduction per row). */
BD_INLINE __m512 hsum16(const __m512 *v) {
    __m512 c[8], d[4], e[2];
    for (int i = 0; i < 8; i++) /* [a0..7 + a8..15 | b0..7 + b8..15] */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane l now holds row (l % 4) * 4 + l / 4: a 4x4 transpose, its own inverse */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* Offset term of one row for one token, as a 16-lane vector: sum_g a_g X_g, a_g = m_g + hmid s_g. */
BD_INLINE __m512 offset_term(const bd_gemv *a, const uint16_t *s16, const uint16_t *m16, const float *xs) {
    __m512 o = _mm512_setzero_ps();
    const __m512 h = _mm512_set1_ps(a->hmid);
    for (int64_t g = 0; g < a->ng; g += 16) {
        const int64_t left = a->ng - g;
        const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16 + g));
        __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m16 + g));
        o = _mm512_fmadd_ps(_mm512_fmadd_ps(s, h, m), _mm512_loadu_ps(xs + g), o);
    }
    return o;
}

/* ---- activation quantization ---------------------------------------------------------------- */

__attribute__((unused)) static void prepare_avx512(bd_gemv *a) {
    const int64_t K = a->K, QB = a->QB, nv = QB / 16;
    for (int m = 0; m < a->M; m++) {
        const float *x = a->x + (int64_t)m * K;
        int8_t *xq = a->xq + (int64_t)m * a->Kp;
        float *dx = a->dx + (int64_t)m * a->nu_pad;
        float *qs = a->qs + (int64_t)m * a->nu_pad;
        float *xs = a->xs + (int64_t)m * a->ng_pad;
        memset(xs, 0, (size_t)a->ng_pad * sizeof(float));
        for (int64_t u = 0; u < a->nu; u++) {
            const int64_t j0 = u * QB;
            __m512 v[4], amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
            for (int i = 0; i < nv; i++) {
                const int64_t left = K - (j0 + 16 * i);
                const __mmask16 live = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                v[i] = _mm512_maskz_loadu_ps(live, x + j0 + 16 * i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
                sum = _mm512_add_ps(sum, v[i]);
            }
            float d, inv;
            bd_block_scale(_mm512_reduce_max_ps(amax), &d, &inv);
            dx[u] = d;
            xs[bd_group_of_unit(a, u)] += _mm512_reduce_add_ps(sum);
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512i qsum = _mm512_setzero_si512();
            for (int i = 0; i < nv; i++) { /* rint (round to nearest even) then narrow; |q| <= 127 */
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], vinv));
                qsum = _mm512_add_epi32(qsum, q);
                _mm_storeu_si128((__m128i *)(xq + j0 + 16 * i), _mm512_cvtepi32_epi8(q));
            }
            qs[u] = a->cmid * (float)_mm512_reduce_add_epi32(qsum);
        }
        for (int64_t u = a->nu; u < a->nu_pad; u++) dx[u] = qs[u] = 0.0f;
        if (a->M > 1) { /* d_u transposed, token-minor: the factors of 16 tokens in one load */
            for (int64_t u = 0; u < a->nu_pad; u++) a->dxt[u * a->Mp + m] = dx[u];
            if (m == a->M - 1) /* zero the padding tokens: stale scratch could hold denormals (slow) */
                for (int64_t u = 0; u < a->nu_pad; u++)
                    for (int64_t t = a->M; t < a->Mp; t++) a->dxt[u * a->Mp + t] = 0.0f;
        }
        if (a->M > 1) { /* d_u expanded to the 16 int32 lanes of each 64-column chunk */
            float *dv = a->dxv + (int64_t)m * (a->Kp >> 6) * 16;
            for (int64_t j = 0; j < (a->Kp >> 6); j++) {
                const __m512 f = QB == 64 ? _mm512_set1_ps(dx[j])
                                          : _mm512_mask_mov_ps(_mm512_set1_ps(dx[2 * j]), 0xff00, _mm512_set1_ps(dx[2 * j + 1]));
                _mm512_store_ps(dv + 16 * j, f);
            }
        }
    }
}

/* Bandwidth probe: 8 interleaved sequential streams (one stream alone leaves memory parallelism
 * unused: measured 7.9 GB/s with 1 stream, 11.5 with 4-8 streams on one Sapphire Rapids core). */
__attribute__((unused)) static uint64_t sum_bytes_avx512(const uint8_t *p, size_t n) {
    const size_t per = n / 8 / 256 * 256;
    __m512i s[8];
    for (int t = 0; t < 8; t++) s[t] = _mm512_setzero_si512();
    for (size_t i = 0; i < per; i += 64)
        for (int t = 0; t < 8; t++) s[t] = _mm512_add_epi64(s[t], _mm512_load_si512(p + t * per + i));
    for (size_t i = 8 * per; i < n; i += 64) s[0] = _mm512_add_epi64(s[0], _mm512_load_si512(p + i));
    for (int t = 1; t < 8; t++) s[0] = _mm512_add_epi64(s[0], s[t]);
    return (uint64_t)_mm512_reduce_add_epi64(s[0]);
}

#endif /* BITDIAL_AVX512_COMMON_H */
