/* Dequantization of k-bit views, a range of rows at a time: the prefill path.
 *
 * Prefill multiplies many tokens by each weight, so it is compute bound: the fastest way is the best
 * GEMM the machine has (oneDNN through torch; AMX/AVX512-BF16 tiles in bf16 where present) on tiles of
 * the k-bit view, dequantized here into a small reused buffer. The whole float weight is never built.
 * Portable C (the codes of 8 columns are rebuilt at once with the SWAR bit spread of gemv_ref.c), compiled
 * twice: as is (bd_dequant_rows) and with AVX-512 flags (bd_dequant_rows_avx512, dequant_avx512.c), so the
 * conversion loops vectorize 16 wide; the driver picks one at run time and splits rows over the pool. Output: fp32, or bf16 rounded to nearest even.
 *   w[n, j] = m_g + s_g * (c * L + h),  L = 2^(B-k),  h = (L-1)/2   (bitdial_kernels.h)
 */
#include "dequant.h"

#ifndef DQ_NAME
#define DQ_NAME bd_dequant_rows
#endif

static inline uint64_t spread8(uint8_t b) {
    uint64_t v = ((uint64_t)b * 0x0101010101010101ULL) & 0x8040201008040201ULL;
    return ((v + 0x00406070787C7E7FULL) >> 7) & 0x0101010101010101ULL;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (inputs are finite) */
    return (uint16_t)(u >> 16);
}

/* One row, columns [j0, j0 + 32) (all in one group): codes rebuilt 8 at a time, then one straight loop of
 * conversions that the compiler vectorizes for the unit's ISA. */
static inline void block32(const uint8_t *p0, int64_t ps, int k, int64_t j0, float s, float m, float L, float h,
                           float *of, uint16_t *ob) {
    uint8_t codes[32];
    for (int b = 0; b < 4; b++) {
        const int64_t byte = j0 / 8 + b;
        uint64_t c8 = 0;
        for (int p = 0; p < k; p++) c8 |= spread8(p0[p * ps + byte]) << (k - 1 - p);
        memcpy(codes + 8 * b, &c8, 8);
    }
    float w[32];
    const float a = m + s * h, sl = s * L;
    for (int i = 0; i < 32; i++) w[i] = a + sl * (float)codes[i];
    if (of) {
        memcpy(of + j0, w, sizeof w);
    } else {
        for (int i = 0; i < 32; i++) ob[j0 + i] = to_bf16(w[i]);
    }
}

void DQ_NAME(const bd_dequant *a, int64_t n0, int64_t n1) {
    const int64_t K = a->K, RB = (K + 7) / 8, ng = (K + a->G - 1) / a->G, ps = a->pstride;
    const int k = a->k;
    const float L = (float)(1 << (a->B - k)), h = (L - 1.0f) * 0.5f;
    const int64_t K32 = K / 32 * 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *p0 = a->planes + n * RB;
        const uint16_t *s16 = a->scales + n * ng, *m16 = a->offsets + n * ng;
        const int64_t o = (n - a->row0) * K;
        float *of = a->bf16 ? NULL : (float *)a->out + o;
        uint16_t *ob = a->bf16 ? (uint16_t *)a->out + o : NULL;
        for (int64_t j0 = 0; j0 < K32; j0 += 32) {
            const int64_t g = j0 / a->G;
            block32(p0, ps, k, j0, bd_half_to_float(s16[g]), bd_half_to_float(m16[g]), L, h, of, ob);
        }
        for (int64_t j = K32; j < K; j++) { /* tail: one column at a time */
            int c = 0;
            for (int p = 0; p < k; p++) c = (c << 1) | ((p0[p * ps + (j >> 3)] >> (j & 7)) & 1);
            const int64_t g = j / a->G;
            const float w = bd_half_to_float(m16[g]) + bd_half_to_float(s16[g]) * ((float)c * L + h);
            if (of) of[j] = w;
            else ob[j] = to_bf16(w);
        }
    }
}
