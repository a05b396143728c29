/* Portable C path ("ref"): the same arithmetic as the SIMD paths (int8 activations, integer dot
 * products per block, float scales), written for clarity. Used when no SIMD path is available and
 * as the baseline the SIMD paths are tested against. */
#include <math.h>

#include "bitdial_kernels.h"

/* Spread the 8 bits of b over 8 bytes: byte i of the result = bit i of b (0 or 1).
 * (b * 0x0101..) copies b into every byte; the mask keeps bit i in byte i; adding 128 - 2^i to
 * byte i carries into bit 7 exactly when bit i was set (no carry crosses a byte). */
static inline uint64_t spread_bits(uint8_t b) {
    uint64_t v = ((uint64_t)b * 0x0101010101010101ULL) & 0x8040201008040201ULL;
    return ((v + 0x00406070787C7E7FULL) >> 7) & 0x0101010101010101ULL;
}

static void prepare_ref(bd_gemv *a) {
    const int64_t K = a->K, QB = a->QB;
    for (int m = 0; m < a->M; m++) {
        const float *x = a->x + (int64_t)m * K;
        int8_t *xq = a->xq + (int64_t)m * a->Kp;
        float *dx = a->dx + (int64_t)m * a->nu_pad;
        float *qs = a->qs + (int64_t)m * a->nu_pad;
        float *xs = a->xs + (int64_t)m * a->ng_pad;
        for (int64_t u = 0; u < a->nu; u++) {
            int64_t j0 = u * QB, j1 = j0 + QB < K ? j0 + QB : K;
            float amax = 0.0f, d, inv;
            for (int64_t j = j0; j < j1; j++) amax = fmaxf(amax, fabsf(x[j]));
            bd_block_scale(amax, &d, &inv);
            dx[u] = d;
            int32_t qsum = 0;
            for (int64_t j = j0; j < j0 + QB; j++) {
                xq[j] = j < j1 ? (int8_t)lrintf(x[j] * inv) : 0;
                qsum += xq[j];
            }
            qs[u] = a->cmid * (float)qsum;
        }
        for (int64_t u = a->nu; u < a->nu_pad; u++) dx[u] = qs[u] = 0.0f;
        for (int64_t g = 0; g < a->ng_pad; g++) {
            float s = 0.0f;
            if (g < a->ng) {
                int64_t j1 = (g + 1) * a->G < K ? (g + 1) * a->G : K;
                for (int64_t j = g * a->G; j < j1; j++) s += x[j];
            }
            xs[g] = s;
        }
    }
}

#define REF_MAX_TOKENS 16

/* One row n, tokens m0..m0+T-1 (T <= REF_MAX_TOKENS). */
static void row_ref(const bd_gemv *a, int64_t n, int m0, int T) {
    const int k = a->k;
    const int64_t RB = a->RB, bytes_per_unit = a->QB / 8;
    const uint8_t *p0 = a->planes + n * RB;
    const uint16_t *s16 = a->scales + n * a->ng, *m16 = a->offsets + n * a->ng;
    double acc[REF_MAX_TOKENS] = {0};
    int32_t isum[REF_MAX_TOKENS] = {0};
    for (int64_t j = 0; j < RB; j++) {
        /* 8 k-bit codes, one per byte: c = sum_p bit_p << (k-1-p) (bits are disjoint, no carries) */
        uint64_t c8 = 0;
        for (int p = 0; p < k; p++) c8 |= spread_bits(p0[p * a->pstride + j]) << (k - 1 - p);
        for (int t = 0; t < T; t++) {
            const int8_t *q = a->xq + (int64_t)(m0 + t) * a->Kp + 8 * j;
            int32_t s = 0;
            for (int i = 0; i < 8; i++) s += (int32_t)((c8 >> (8 * i)) & 0xff) * q[i];
            isum[t] += s;
        }
        if ((j + 1) % bytes_per_unit == 0 || j == RB - 1) { /* end of x block u: scale and flush */
            int64_t u = j / bytes_per_unit;
            float sg = bd_half_to_float(s16[bd_group_of_unit(a, u)]);
            for (int t = 0; t < T; t++) { /* f_u (I_u - 2^(k-1) Q_u) */
                const int64_t i = (int64_t)(m0 + t) * a->nu_pad + u;
                acc[t] += (double)(sg * a->dx[i]) * ((double)isum[t] - a->qs[i]);
                isum[t] = 0;
            }
        }
    }
    for (int t = 0; t < T; t++) {
        const float *xs = a->xs + (int64_t)(m0 + t) * a->ng_pad;
        double off = 0.0;
        for (int64_t g = 0; g < a->ng; g++) {
            float s = bd_half_to_float(s16[g]), mo = bd_half_to_float(m16[g]);
            off += (double)(mo + a->hmid * s) * xs[g];
        }
        a->y[(int64_t)(m0 + t) * a->N + n] = (float)(a->L * acc[t] + off);
    }
}

static void rows_ref(const bd_gemv *a, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int m0 = 0; m0 < a->M; m0 += REF_MAX_TOKENS)
            row_ref(a, n, m0, a->M - m0 < REF_MAX_TOKENS ? a->M - m0 : REF_MAX_TOKENS);
}

/* Bandwidth probe: 8 interleaved sequential streams (one stream alone leaves memory parallelism unused). */
static uint64_t sum_bytes_ref(const uint8_t *p, size_t n) {
    const size_t per = n / 8 / 256 * 256;
    uint64_t s[8] = {0}, w[4];
    for (size_t i = 0; i < per; i += 32)
        for (int t = 0; t < 8; t++) {
            memcpy(w, p + t * per + i, 32);
            s[t] += w[0] + w[1] + w[2] + w[3];
        }
    for (size_t i = 8 * per; i < n; i += 8) {
        memcpy(w, p + i, 8);
        s[0] += w[0];
    }
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

const bd_isa bd_isa_ref = {"ref", prepare_ref, rows_ref, sum_bytes_ref};
