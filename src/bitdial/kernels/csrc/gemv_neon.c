/* NEON path (AArch64): 16 columns per step. Built twice by setup.py: plain (any ARMv8-A CPU) and, as
 * gemv_neon_dot.c, with the dot-product extension (SDOT), chosen at run time.
 *
 * Codes: the 2 bytes of one plane over a 16-column chunk are spread to 8 lanes each and tested
 * against the lane's bit (vtst) -> 0xFF where set; Horner over the planes, MSB first: c = 2c - mask.
 * Dot: codes <= 127 (k <= 7) are valid int8, so SDOT (or vmull_s8 + vpadal without dotprod) sums
 * c * q into 4 int32 lanes; at k = 8 the code is split as 2 * c7 + b0 (top 7 bits, last bit).
 * The int32 sums of one x block (QB columns) are converted once: acc += float(isum) * s_g * d_u.
 * At the end y = L * (hsum(acc) - 2^(k-1) sum_u f_u Q_u) + sum_g a_g X_g (see bitdial_kernels.h).
 * Decode runs 4 rows x 1 token per pass, small batches 1 row x up to 8 tokens.
 */
#include <arm_neon.h>

#include "bitdial_kernels.h"

static inline float half_at(const uint16_t *p) {
    __fp16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* 16 plane bits (2 bytes at p, or 1 if tail) -> 16 bytes of 0x00 / 0xFF. */
BD_INLINE uint8x16_t expand_bits(const uint8_t *p, int tail) {
    static const uint8_t bitsel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t v = vcombine_u8(vdup_n_u8(p[0]), vdup_n_u8(tail ? 0 : p[1]));
    return vtstq_u8(v, vld1q_u8(bitsel));
}

/* Codes of one chunk: c (top min(k,7) bits, <= 127) and, at k = 8, b0 (last bit, 0/1). */
BD_INLINE void chunk_codes(const uint8_t *p, int64_t ps, int k, int tail, int8x16_t *c, int8x16_t *b0) {
    const int k7 = k < 8 ? k : 7;
    uint8x16_t v = vdupq_n_u8(0);
    for (int q = 0; q < k7; q++) v = vsubq_u8(vaddq_u8(v, v), expand_bits(p + q * ps, tail));
    *c = vreinterpretq_s8_u8(v);
    *b0 = k == 8 ? vreinterpretq_s8_u8(vandq_u8(expand_bits(p + 7 * ps, tail), vdupq_n_u8(1))) : vdupq_n_s8(0);
}

/* acc += 4-lane partial sums of a . b (int8 x int8). */
BD_INLINE int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#ifdef BITDIAL_NEON_DOT
    return vdotq_s32(acc, a, b);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_s8(vget_high_s8(a), vget_high_s8(b)));
#endif
}

BD_INLINE int32x4_t codes_dot(int32x4_t acc, int8x16_t c, int8x16_t b0, int k, const int8_t *q) {
    const int8x16_t xv = vld1q_s8(q);
    if (k == 8) { /* 2 * c7 . q + b0 . q */
        const int32x4_t d7 = dot16(vdupq_n_s32(0), c, xv);
        return dot16(vaddq_s32(acc, vaddq_s32(d7, d7)), b0, xv);
    }
    return dot16(acc, c, xv);
}

/* sum_g a_g X_g (a_g = m_g + hmid s_g) for one row and one token. */
static float offset_term(const bd_gemv *a, const uint16_t *s16, const uint16_t *m16, const float *xs) {
    float32x4_t o = vdupq_n_f32(0.0f);
    int64_t g = 0;
    for (; g + 4 <= a->ng; g += 4) {
        const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s16 + g)));
        const float32x4_t m = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(m16 + g)));
        o = vfmaq_f32(o, vfmaq_n_f32(m, s, a->hmid), vld1q_f32(xs + g));
    }
    float r = vaddvq_f32(o);
    for (; g < a->ng; g++) r += (half_at(m16 + g) + a->hmid * half_at(s16 + g)) * xs[g];
    return r;
}

/* R rows x T tokens (T * R <= 8). */
BD_INLINE void tile_neon(const bd_gemv *a, int64_t n, const int R, int m0, const int T) {
    const int64_t RB = a->RB, ps = a->pstride;
    const int64_t nfull = RB >> 1, nch = (RB + 1) >> 1; /* 16-column chunks: 2 bytes per plane row */
    const int cpu = a->QB / 16;                          /* chunks per x block */
    const int k = a->k;
    float32x4_t acc[8][4];
    float corr[8][4];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            acc[t][r] = vdupq_n_f32(0.0f);
            corr[t][r] = 0.0f;
        }
    for (int64_t u = 0; u < a->nu; u++) {
        const int64_t j0 = u * cpu;
        if (j0 >= nch) break; /* blocks past the last chunk hold only zero padding */
        const int64_t g = bd_group_of_unit(a, u);
        int32x4_t isum[8][4];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) isum[t][r] = vdupq_n_s32(0);
        for (int64_t j = j0; j < j0 + cpu && j < nch; j++) {
            const int tb = j == nfull ? 1 : 0;
            for (int r = 0; r < R; r++) {
                int8x16_t c, b0;
                chunk_codes(a->planes + (n + r) * RB + 2 * j, ps, k, tb, &c, &b0);
                for (int t = 0; t < T; t++)
                    isum[t][r] = codes_dot(isum[t][r], c, b0, k, a->xq + (int64_t)(m0 + t) * a->Kp + 16 * j);
            }
        }
        for (int r = 0; r < R; r++) {
            const float s = half_at(a->scales + (n + r) * a->ng + g);
            for (int t = 0; t < T; t++) {
                const int64_t i = (int64_t)(m0 + t) * a->nu_pad + u;
                const float f = s * a->dx[i];
                acc[t][r] = vfmaq_n_f32(acc[t][r], vcvtq_f32_s32(isum[t][r]), f);
                corr[t][r] += f * a->qs[i];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        for (int t = 0; t < T; t++)
            a->y[(int64_t)(m0 + t) * a->N + n + r] =
                a->L * (vaddvq_f32(acc[t][r]) - corr[t][r]) + offset_term(a, s16, m16, a->xs + (int64_t)(m0 + t) * a->ng_pad);
    }
}

#define DEF_MULTI(T) \
    static void multi_t##T(const bd_gemv *a, int64_t n, int m0) { tile_neon(a, n, 1, m0, T); }
DEF_MULTI(1) DEF_MULTI(2) DEF_MULTI(3) DEF_MULTI(4) DEF_MULTI(5) DEF_MULTI(6) DEF_MULTI(7) DEF_MULTI(8)
typedef void (*multi_fn)(const bd_gemv *, int64_t, int);
static const multi_fn multi_fns[9] = {0, multi_t1, multi_t2, multi_t3, multi_t4, multi_t5, multi_t6, multi_t7, multi_t8};

static void rows_neon(const bd_gemv *a, int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (a->M == 1) {
        for (; n + 4 <= n1; n += 4) tile_neon(a, n, 4, 0, 1);
        for (; n < n1; n++) tile_neon(a, n, 1, 0, 1);
        return;
    }
    for (; n < n1; n++)
        for (int m0 = 0; m0 < a->M; m0 += 8) multi_fns[a->M - m0 < 8 ? a->M - m0 : 8](a, n, m0);
}

/* ---- activation quantization ---------------------------------------------------------------- */

static void prepare_neon(bd_gemv *a) {
    const int64_t K = a->K, QB = a->QB;
    float tmp[64];
    for (int m = 0; m < a->M; m++) {
        const float *x = a->x + (int64_t)m * K;
        int8_t *xq = a->xq + (int64_t)m * a->Kp;
        float *dx = a->dx + (int64_t)m * a->nu_pad;
        float *qs = a->qs + (int64_t)m * a->nu_pad;
        float *xs = a->xs + (int64_t)m * a->ng_pad;
        memset(xs, 0, (size_t)a->ng_pad * sizeof(float));
        for (int64_t u = 0; u < a->nu; u++) {
            const int64_t j0 = u * QB;
            const float *src = x + j0;
            if (j0 + QB > K) { /* partial block: zero-padded copy */
                memset(tmp, 0, sizeof tmp);
                if (K > j0) memcpy(tmp, x + j0, (size_t)(K - j0) * sizeof(float));
                src = tmp;
            }
            float32x4_t amax = vdupq_n_f32(0.0f), sum = vdupq_n_f32(0.0f);
            for (int i = 0; i < QB; i += 4) {
                const float32x4_t v = vld1q_f32(src + i);
                amax = vmaxq_f32(amax, vabsq_f32(v));
                sum = vaddq_f32(sum, v);
            }
            float d, inv;
            bd_block_scale(vmaxvq_f32(amax), &d, &inv);
            dx[u] = d;
            xs[bd_group_of_unit(a, u)] += vaddvq_f32(sum);
            int32x4_t qsum = vdupq_n_s32(0);
            for (int i = 0; i < QB; i += 8) { /* round to nearest even, like rint */
                const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(src + i), inv));
                const int32x4_t q1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(src + i + 4), inv));
                qsum = vaddq_s32(qsum, vaddq_s32(q0, q1));
                vst1_s8(xq + j0 + i, vqmovn_s16(vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1))));
            }
            qs[u] = a->cmid * (float)vaddvq_s32(qsum);
        }
        for (int64_t u = a->nu; u < a->nu_pad; u++) dx[u] = qs[u] = 0.0f;
    }
}

/* Bandwidth probe: 8 interleaved sequential streams (one stream alone leaves memory parallelism unused). */
static uint64_t sum_bytes_neon(const uint8_t *p, size_t n) {
    const size_t per = n / 8 / 256 * 256;
    uint64x2_t s[8];
    for (int t = 0; t < 8; t++) s[t] = vdupq_n_u64(0);
    for (size_t i = 0; i < per; i += 64)
        for (int t = 0; t < 8; t++) {
            const uint64_t *q = (const uint64_t *)(p + t * per + i);
            s[t] = vaddq_u64(s[t], vaddq_u64(vaddq_u64(vld1q_u64(q), vld1q_u64(q + 2)), vaddq_u64(vld1q_u64(q + 4), vld1q_u64(q + 6))));
        }
    for (size_t i = 8 * per; i < n; i += 16) s[0] = vaddq_u64(s[0], vld1q_u64((const uint64_t *)(p + i)));
    for (int t = 1; t < 8; t++) s[0] = vaddq_u64(s[0], s[t]);
    return vaddvq_u64(s[0]);
}

#ifdef BITDIAL_NEON_DOT
const bd_isa bd_isa_neon_dot = {"neon", prepare_neon, rows_neon, sum_bytes_neon};
#else
const bd_isa bd_isa_neon = {"neon", prepare_neon, rows_neon, sum_bytes_neon};
#endif
