/* The fused decode step: one token through the whole decoder in one native call.
 *
 * A decode step of a small model is ~210 GEMVs of a few microseconds each plus ~20 tiny ops per layer
 * (norms, RoPE, attention over one query, SwiGLU, residuals). Run from Python, the tiny ops and the
 * per-call overhead cost more than the GEMVs (docs/kernels.md, "Per-call overhead"). Here the whole step
 * runs in C: per layer four thread-pool jobs (q/k/v together, o, gate/up together, down), the rest on
 * the calling thread, then the final norm and the output head. The GEMVs are the ISA kernels of
 * gemv_<isa>.c, the activations are quantized once per input vector and shared by the matrices that
 * read it (q/k/v, gate/up).
 *
 * Everything the step reads is described once by the Python side (bitdial/runtime/fused.py) in one
 * int64 descriptor array (layout below, DESC_*); the KV cache, the norm weights and the RoPE tables are
 * the model's own torch tensors, so the torch prefill and this decode share one cache.
 *
 * Module slots: decoder linears 7*l + j (j = q, k, v, o, gate, up, down), then lm_head (7L), then the
 * embedding (7L + 1). Per slot the width comes from `bits` (int32, written by Python whenever a layer's
 * width changes) unless the slot's dynamic rule is on (rules[slot].on): then the width is h or l by the
 * DP-LLM estimate of ||(W_h - W_l) x|| against the rule's threshold, decided here per step (the same
 * arithmetic as bitdial.policies.dynamic.ModuleRule.estimate, in double for the norms). The chosen widths
 * are written to `chosen` (uint8) and the high decisions counted in `n_high` (int64).
 */
#include <math.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdatomic.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>

#include "bitdial_kernels.h"
#include "decode.h"
#include "pool.h"
#if defined(__AVX512F__)
#include "avx512_common.h" /* hsum16 (its kernel helpers are marked unused) */
#endif

/* Compiled twice (setup.py): as is, and as decode_avx512.c with AVX-512 flags (BD_DECODE_STEP =
 * bd_decode_step_avx512), so that the float loops (norms, attention, the dynamic estimate G x) run 16 wide
 * where the CPU has it; module.c picks the step with the ISA family. Construction is in the plain build. */
#ifndef BD_DECODE_STEP
#define BD_DECODE_STEP bd_decode_step
#endif

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static size_t rup(size_t v, size_t m) { return (v + m - 1) / m * m; }

__attribute__((unused)) static int ilog2_exact(int64_t v) {
    int l = 0;
    while (((int64_t)1 << l) < v) l++;
    return ((int64_t)1 << l) == v ? l : -1;
}

/* ---- small float ops (calling thread; -O3 vectorizes them for the unit's ISA) -------------------- */

/* e^x for the SiLU and the softmax, in a form the compiler vectorizes (glibc's expf is a scalar call):
 * e^x = 2^n 2^f, n = round(x log2 e), f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial in f ln 2
 * (relative error < 4e-6 on the clamped range, from rounding x log2 e near |x| = 87; x < -87 gives 0-ish, x > 88
 * is clamped). setup.py builds with -fno-trapping-math: without it gcc keeps the clamp's loops scalar except with
 * AVX-512. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = x * 1.44269504088896341f;
    /* round to nearest by the 1.5 * 2^23 trick, not floorf(t + 0.5f): gcc vectorizes no floorf under trapping
       math (|t| < 2^22 here, so both steps are exact) */
    const float nf = (t + 12582912.0f) - 12582912.0f;
    const float f = (t - nf) * 0.693147180559945309f; /* in [-ln2/2, ln2/2] */
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    const int32_t n = (int32_t)nf;
    uint32_t bits;
    memcpy(&bits, &p, 4);
    bits += (uint32_t)n << 23; /* p in [0.7, 1.42]: the exponent never under- or overflows for |n| <= 126 */
    memcpy(&p, &bits, 4);
    return p;
}

/* The 16 partial sums of dotf/doth/doti8 added in lane order (the same result on every build). */
static float lane_sum(const float *acc) {
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

/* sum_i a[i] b[i] with 16 independent partial sums: a reduction the compiler vectorizes without
 * reassociating (the lanes are the partial sums), so the result is the same on every build. */
static float dotf(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += a[i] * b[i];
    return lane_sum(acc);
}

/* dotf with a in fp16 (the estimators' projection G): the same 16 partial sums over the same values. The
 * F16C/AVX-512 builds convert 8 or 16 halves per instruction. */
static float doth(const uint16_t *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        v = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a + i))), _mm512_loadu_ps(b + i), v);
    _mm512_storeu_ps(acc, v);
#elif defined(__F16C__) && defined(__FMA__)
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        v0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))), _mm256_loadu_ps(b + i), v0);
        v1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i + 8))), _mm256_loadu_ps(b + i + 8),
                             v1);
    }
    _mm256_storeu_ps(acc, v0);
    _mm256_storeu_ps(acc + 8, v1);
#else
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += bd_half_to_float(a[i + l]) * b[i + l];
#endif
    for (int l = 0; i < n; i++, l++) acc[l] += bd_half_to_float(a[i]) * b[i];
    return lane_sum(acc);
}

/* dotf with a in int8 (an estimator's projection G stored as q * 2^e per row, bitdial.policies.dynamic):
 * the same 16 partial sums over the integer codes; the caller applies the row's power-of-two scale, which
 * commutes exactly with every rounding, so the result is dotf over the fp32 values q * 2^e. */
static float doti8(const int8_t *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a + i)))),
                            _mm512_loadu_ps(b + i), v);
    _mm512_storeu_ps(acc, v);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m128i q = _mm_loadu_si128((const __m128i *)(a + i));
        v0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(b + i), v0);
        v1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), _mm256_loadu_ps(b + i + 8),
                             v1);
    }
    _mm256_storeu_ps(acc, v0);
    _mm256_storeu_ps(acc + 8, v1);
#else
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += (float)a[i + l] * b[i + l];
#endif
    for (int l = 0; i < n; i++, l++) acc[l] += (float)a[i] * b[i];
    return lane_sum(acc);
}

static void rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps) {
    const double ss = dotf(x, x, n);
    const float r = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* rotate_half RoPE on one head vector of width hd: cos/sin rows hold [f, f] (both halves). */
static void rope(float *x, const float *c, const float *s, int hd) {
    const int h2 = hd / 2;
    for (int i = 0; i < h2; i++) {
        const float a = x[i], b = x[i + h2];
        x[i] = a * c[i] - b * s[i];
        x[i + h2] = b * c[i + h2] + a * s[i + h2];
    }
}

/* g <- silu(g) * u, in place (SwiGLU). Local restrict pointers and count: -fno-strict-aliasing would
 * otherwise reload d->F after every store, and the loop would not vectorize. */
static void silu_mul(float *restrict g, const float *restrict u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + exp_fast(-g[i])) * u[i];
}

static double norm2(const float *x, int64_t n) { return sqrt((double)dotf(x, x, n)); }

/* ---- multi-matrix GEMV job ---------------------------------------------------------------------- */

#define MAXM 3

typedef struct {
    bd_gemv g[MAXM];
    int dense[MAXM]; /* matrix m is a dense fp32 weight (the fp32 decoder): g[m].planes holds it */
    int n;
    int64_t first[MAXM + 1]; /* slice index where matrix m starts */
    int64_t step[MAXM];      /* rows per slice of matrix m */
    const bd_isa *isa;
    _Atomic int64_t next;
} multi_job;

/* y[n] = W[n] . x for a dense fp32 weight [N, K] (rows n0..n1-1). */
static void dense_rows(const bd_gemv *a, int64_t n0, int64_t n1) {
    const float *W = (const float *)(const void *)a->planes, *x = a->x;
    const int64_t K = a->K, K16 = K / 16 * 16;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) { /* 4 rows per pass share each load of x: 4 x 16 independent sums */
        float acc[4][16] = {{0}};
        const float *w0 = W + n * K;
        for (int64_t i = 0; i < K16; i += 16)
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 16; l++) acc[r][l] += w0[r * K + i + l] * x[i + l];
        for (int r = 0; r < 4; r++) {
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += acc[r][l];
            for (int64_t i = K16; i < K; i++) s += w0[r * K + i] * x[i];
            a->y[n + r] = s;
        }
    }
    for (; n < n1; n++) a->y[n] = dotf(W + n * K, x, K);
}

static void multi_task(void *ctx, int tid, int nth) {
    (void)tid; (void)nth;
    multi_job *j = ctx;
    for (;;) {
        const int64_t s = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (s >= j->first[j->n]) break;
        int m = 0;
        while (s >= j->first[m + 1]) m++;
        const bd_gemv *a = &j->g[m];
        const int64_t n0 = (s - j->first[m]) * j->step[m];
        const int64_t n1 = n0 + j->step[m] < a->N ? n0 + j->step[m] : a->N;
        if (j->dense[m]) dense_rows(a, n0, n1);
        else j->isa->rows(a, n0, n1);
    }
}

#define PAR_MIN_BYTES (48 * 1024)

/* The per-call constants of one matrix at k bits (activation fields are filled by prepare). */
static void gemv_setup(bd_gemv *a, const bd_lin *L, int k, const float *x, float *y) {
    a->planes = L->planes;
    a->scales = L->scales;
    a->offsets = L->offsets;
    a->N = L->N;
    a->K = L->K;
    a->G = L->G;
    a->log2G = L->log2G;
    a->B = L->B;
    a->k = k;
    a->RB = (L->K + 7) / 8;
    a->ng = (L->K + L->G - 1) / L->G;
    a->pstride = L->pstride;
    a->L = (float)(1 << (L->B - k));
    a->h = (a->L - 1.0f) * 0.5f;
    a->cmid = (float)(1 << (k - 1));
    a->hmid = a->h + a->L * a->cmid;
    a->M = 1;
    a->Mp = 16;
    a->x = x;
    a->y = y;
    a->QB = L->G % 64 == 0 ? 64 : 32;
    a->Kp = (int64_t)rup((size_t)L->K, 64);
    a->nu = a->Kp / a->QB;
    a->nu_pad = (int64_t)rup((size_t)a->nu, 16) + 16;
    a->ng_pad = (int64_t)rup((size_t)a->ng, 16) + 16;
}

/* Point a's activation scratch into slot `s` of the decoder's scratch. */
static void gemv_scratch(bd_gemv *a, bd_decoder *d, int s) {
    char *base = d->act[s];
    size_t off = 0;
    a->xq = (int8_t *)(base + off);
    off += rup((size_t)a->Kp, 64);
    a->dx = (float *)(base + off);
    off += rup((size_t)a->nu_pad * 4, 64);
    a->qs = (float *)(base + off);
    off += rup((size_t)a->nu_pad * 4, 64);
    a->xs = (float *)(base + off);
    off += rup((size_t)a->ng_pad * 4, 64);
    a->dxv = (float *)(base + off);
    off += (size_t)(a->Kp / 64) * 64;
    a->dxt = (float *)(base + off);
}

__attribute__((unused)) static size_t act_bytes(int64_t K) {
    /* worst case over group sizes: 32-column blocks and groups */
    const size_t Kp = rup((size_t)K, 64), nu_pad = rup(Kp / 32, 16) + 16;
    return Kp + 2 * rup(nu_pad * 4, 64) + rup(nu_pad * 4, 64) + Kp + rup(nu_pad * 16 * 4, 64) + 256;
}

/* ---- the dynamic estimate ||G x|| --------------------------------------------------------------- */

/* G [k, K] of a slot is read in chunks of EST_ROWS rows, each chunk's sum of squares (acc_t^2) kept apart
 * and the chunks added in order, so the estimate is the same whether one thread or several compute it. G
 * arrives cold from DRAM (the weight streams evicted it). On the Llama-3.2-1B shapes (64-256 KB of G per
 * module) two threads took ~30% less time than one; on the default model's short G (18-49 KB, bound by
 * the latency of the misses) the difference was within the noise. Within a chunk, rows are read one at a
 * time, in order (8 rows interleaved, to hide the FMA latency, ran 1.7x slower cold; 4 accumulators per
 * row, no faster on the 1B shapes). */
#define EST_ROWS 16
#define EST_AHEAD 4 /* rows of G prefetched ahead */
#define EST_MAXCH 64 /* chunks per slot: k <= 1024 rows */

typedef struct {
    const bd_decoder *d;
    const float *x;
    int n;                     /* slots with a projection */
    int slot[MAXM];
    int64_t first[MAXM + 1];   /* chunk index where slot m starts */
    double part[MAXM * EST_MAXCH];
    _Atomic int64_t next;
} est_job;

static int64_t est_chunks(int64_t k) { return (k + EST_ROWS - 1) / EST_ROWS; }

/* Sum of (G_t . x)^2 over rows t0..t1-1 of slot i's G. int8: k rows of K codes, then k fp32 row scales
 * (powers of two). */
static double est_rows(const bd_decoder *d, int i, const float *x, int64_t t0, int64_t t1) {
    const void *G = (const void *)(uintptr_t)d->gptr[3 * i];
    const int64_t k = d->gptr[3 * i + 1], fmt = d->gptr[3 * i + 2], K = d->lin[i].K;
    const float *sc = fmt == BD_G_INT8 ? (const float *)((const int8_t *)G + bd_g_int8_scales_offset(k, K)) : NULL;
    double g2 = 0.0;
    /* software prefetch EST_AHEAD rows ahead (the first rows at the chunk's start): on Sapphire Rapids the
     * estimate of the Llama-3.2-1B shapes with 16-row G took 0.72-0.81 ms per step against 0.80-0.88 without
     * (step_profile.py, three interleaved pairs); the default model's short G is unchanged (0.14-0.16 ms) */
    const int64_t esz = fmt == BD_G_INT8 ? 1 : fmt == BD_G_FP16 ? 2 : 4, rb = K * esz;
    const char *gb = (const char *)G;
    for (int64_t o = 0; o < EST_AHEAD * rb && (t0 * rb + o) < k * rb; o += 64) __builtin_prefetch(gb + t0 * rb + o, 0, 3);
    for (int64_t t = t0; t < t1; t++) {
        if (t + EST_AHEAD < k)
            for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(gb + (t + EST_AHEAD) * rb + o, 0, 3);
        const double acc = fmt == BD_G_INT8   ? (double)(doti8((const int8_t *)G + t * K, x, K) * sc[t])
                           : fmt == BD_G_FP16 ? doth((const uint16_t *)G + t * K, x, K)
                                              : dotf((const float *)G + t * K, x, K);
        g2 += acc * acc;
    }
    return g2;
}

static void est_task(void *ctx, int tid, int nth) {
    (void)tid; (void)nth;
    est_job *j = ctx;
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (c >= j->first[j->n]) break;
        int m = 0;
        while (c >= j->first[m + 1]) m++;
        const int i = j->slot[m];
        const int64_t k = j->d->gptr[3 * i + 1], t0 = (c - j->first[m]) * EST_ROWS;
        j->part[m * EST_MAXCH + (c - j->first[m])] = est_rows(j->d, i, j->x, t0, t0 + EST_ROWS < k ? t0 + EST_ROWS : k);
    }
}

/* ||G x||^2 of each of the n slots (0 for a slot without a projection or with its rule off), the chunks
 * spread over the pool. */
static void estimates(bd_decoder *d, const int *slots, int n, const float *x, double *g2) {
    est_job j;
    j.d = d;
    j.x = x;
    j.n = 0;
    j.first[0] = 0;
    int which[MAXM];
    for (int m = 0; m < n; m++) {
        const int i = slots[m];
        g2[m] = 0.0;
        which[m] = -1;
        const double *r = d->rules + (size_t)i * BD_RULE_COLS;
        if (d->lin[i].B == 0 || r[BD_RULE_ON] == 0.0 || r[BD_RULE_LOW] == r[BD_RULE_HIGH] || !d->gptr[3 * i]) continue;
        which[m] = j.n;
        j.slot[j.n] = i;
        j.first[j.n + 1] = j.first[j.n] + est_chunks(d->gptr[3 * i + 1]);
        j.n++;
    }
    if (!j.n) return;
    atomic_init(&j.next, 0);
    if (j.first[j.n] > 1 && bd_pool_threads() > 1) bd_pool_run(est_task, &j);
    else est_task(&j, 0, 1);
    for (int m = 0; m < n; m++) {
        if (which[m] < 0) continue;
        const int64_t nc = j.first[which[m] + 1] - j.first[which[m]];
        double s = 0.0;
        for (int64_t c = 0; c < nc; c++) s += j.part[which[m] * EST_MAXCH + c];
        g2[m] = s;
    }
}

/* The width of slot i for an input of norm nx whose projection has ||G x||^2 = g2: static, or the dynamic
 * rule's decision (32: dense fp32). */
static int pick_bits(bd_decoder *d, int i, double nx, double g2) {
    if (d->lin[i].B == 0) return 32;
    const double *r = d->rules + (size_t)i * BD_RULE_COLS;
    if (r[BD_RULE_ON] == 0.0) return d->bits[i];
    const int lo = (int)r[BD_RULE_LOW], hi = (int)r[BD_RULE_HIGH];
    if (lo == hi) {
        d->n_high[i]++;
        return hi;
    }
    const double e = d->gptr[3 * i] ? r[BD_RULE_A] * sqrt(g2) + r[BD_RULE_C] * nx + r[BD_RULE_B]
                                    : r[BD_RULE_A] * nx + r[BD_RULE_B];
    if (e > r[BD_RULE_THRESHOLD]) {
        d->n_high[i]++;
        return hi;
    }
    return lo;
}

/* y_m = W_m x for the slots in `slots` (all reading the same x of width K); bias added. Its time goes to
   profile part `part` (BD_PART_*). */
static void run_linears(bd_decoder *d, int part, const int *slots, float *const *ys, int n, const float *x) {
    const int64_t t0 = now_ns();
    int64_t t_prep = 0, t_est = 0;
    multi_job j;
    j.n = n;
    j.isa = d->isa;
    atomic_init(&j.next, 0);
    double nx = 0.0, g2[MAXM];
    int dynamic = 0;
    for (int m = 0; m < n; m++) dynamic |= d->rules[(size_t)slots[m] * BD_RULE_COLS + BD_RULE_ON] != 0.0;
    if (dynamic) { /* the dynamic estimates: timed on their own */
        const int64_t te = now_ns();
        nx = norm2(x, d->lin[slots[0]].K);
        estimates(d, slots, n, x, g2);
        t_est += now_ns() - te;
    }
    int64_t bytes = 0;
    for (int m = 0; m < n; m++) {
        const int i = slots[m];
        const int k = pick_bits(d, i, nx, dynamic ? g2[m] : 0.0);
        d->chosen[i] = (uint8_t)k;
        if (i < d->n_dec) d->wb += (double)d->lin[i].N * (double)d->lin[i].K * k;
        bd_gemv *a = &j.g[m];
        j.dense[m] = d->lin[i].B == 0;
        if (j.dense[m]) { /* fp32 weights: no activation quantization */
            memset(a, 0, sizeof *a);
            a->planes = d->lin[i].planes;
            a->N = d->lin[i].N;
            a->K = d->lin[i].K;
            a->x = x;
            a->y = ys[m];
            a->k = 32;
            a->RB = (a->K + 7) / 8;
            bytes += (int64_t)4 * a->N * a->K;
            continue;
        }
        gemv_setup(a, &d->lin[i], k, x, ys[m]);
        bytes += (int64_t)k * a->N * a->RB;
        d->n_bytes += (int64_t)k * a->N * a->RB + (int64_t)4 * a->N * a->ng; /* planes, fp16 scales + offsets */
        /* share the quantized activations with an earlier matrix of the same group size and width (the
           block sums Q_u are stored premultiplied by the centering code 2^(k-1), see bitdial_kernels.h) */
        int shared = -1;
        for (int p = 0; p < m; p++)
            if (!j.dense[p] && j.g[p].G == a->G && j.g[p].k == a->k) shared = p;
        if (shared >= 0) {
            a->xq = j.g[shared].xq; a->dx = j.g[shared].dx; a->qs = j.g[shared].qs;
            a->xs = j.g[shared].xs; a->dxv = j.g[shared].dxv; a->dxt = j.g[shared].dxt;
        } else {
            gemv_scratch(a, d, m);
            const int64_t tp = now_ns();
            d->isa->prepare(a);
            t_prep += now_ns() - tp;
        }
    }
    const int nth = bd_pool_threads();
    if (bytes < PAR_MIN_BYTES || nth == 1) {
        for (int m = 0; m < n; m++) {
            if (j.dense[m]) dense_rows(&j.g[m], 0, j.g[m].N);
            else d->isa->rows(&j.g[m], 0, j.g[m].N);
        }
    } else {
        j.first[0] = 0;
        for (int m = 0; m < n; m++) {
            const bd_gemv *a = &j.g[m];
            /* ~8 slices per thread over the whole job, at least 16 rows (and 32 KiB of planes) each */
            int64_t step = (a->N * n) / ((int64_t)nth * 8);
            const int64_t min_rows = 32768 / ((int64_t)a->k * a->RB) + 1;
            if (step < min_rows) step = min_rows;
            if (step < 16) step = 16;
            step = (step + 3) & ~(int64_t)3;
            j.step[m] = step;
            j.first[m + 1] = j.first[m] + (a->N + step - 1) / step;
        }
        bd_pool_run(multi_task, &j);
    }
    for (int m = 0; m < n; m++) {
        const float *b = d->lin[slots[m]].bias;
        if (b)
            for (int64_t t = 0; t < d->lin[slots[m]].N; t++) ys[m][t] += b[t];
    }
    const int64_t dt = now_ns() - t0;
    d->t_gemv_ns += dt;
    d->t_part_ns[part] += dt;
    d->t_prep_ns += t_prep;
    d->t_est_ns += t_est;
}

/* ---- attention over one query ------------------------------------------------------------------ */

typedef struct {
    bd_decoder *d;
    int layer;
    int64_t S; /* keys: positions 0..S-1 */
    _Atomic int next;
} attn_job;

#if defined(__AVX512F__)
/* attn_head for head sizes of 16..128 in steps of 16 (the AVX-512 build): the query in registers, the
 * scores of 16 keys at a time reduced together (hsum16), the output in registers over two interleaved
 * chains of keys. ~2x the plain loops (whose per-key lane sums and output loads/stores were the cost:
 * 20 -> 10-12 ns per head and key on Sapphire Rapids, a standalone probe, S = 33..512). */
/* The 16 lanes whose sum is q . k for one key (q pre-scaled, nv vectors of 16). */
static inline __m512 qk_lanes(const __m512 *qv, const float *kr, int nv) {
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
    for (int i = 1; i < nv; i++) a = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kr + 16 * i), a);
    return a;
}

static void attn_head16(bd_decoder *d, int layer, int64_t S, int h, float *sc) {
    const int hd = d->Hd, grp = d->H / d->Hk, kvh = h / grp, nv = hd / 16;
    const float *q = d->q + (size_t)h * hd;
    const float *kc = d->kc[layer] + (size_t)kvh * d->S_max * hd;
    const float *vc = d->vc[layer] + (size_t)kvh * d->S_max * hd;
    __m512 qv[8], o[8], o2[8];
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)hd));
    for (int i = 0; i < nv; i++) qv[i] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * i), scale);
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) {
        __m512 p[16];
        for (int j = 0; j < 16; j++) p[j] = qk_lanes(qv, kc + (s + j) * hd, nv);
        const __m512 r = hsum16(p); /* lane j = the score of key s + j */
        _mm512_storeu_ps(sc + s, r);
        mxv = _mm512_max_ps(mxv, r);
    }
    float mx = _mm512_reduce_max_ps(mxv);
    for (; s < S; s++) {
        sc[s] = _mm512_reduce_add_ps(qk_lanes(qv, kc + s * hd, nv));
        if (sc[s] > mx) mx = sc[s];
    }
    for (int64_t t = 0; t < S; t++) sc[t] = exp_fast(sc[t] - mx);
    float ls[16] = {0}; /* the sum in 16 lanes, then in double */
    int64_t t = 0;
    for (; t + 16 <= S; t += 16)
        for (int l = 0; l < 16; l++) ls[l] += sc[t + l];
    for (int l = 0; t < S; t++, l++) ls[l] += sc[t];
    double sum = 0.0;
    for (int l = 0; l < 16; l++) sum += ls[l];
    for (int i = 0; i < nv; i++) o[i] = o2[i] = _mm512_setzero_ps();
    for (t = 0; t + 2 <= S; t += 2) {
        const __m512 pa = _mm512_set1_ps(sc[t]), pb = _mm512_set1_ps(sc[t + 1]);
        const float *va = vc + t * hd, *vb = va + hd;
        for (int i = 0; i < nv; i++) {
            o[i] = _mm512_fmadd_ps(pa, _mm512_loadu_ps(va + 16 * i), o[i]);
            o2[i] = _mm512_fmadd_ps(pb, _mm512_loadu_ps(vb + 16 * i), o2[i]);
        }
    }
    if (t < S) {
        const __m512 pa = _mm512_set1_ps(sc[t]);
        for (int i = 0; i < nv; i++) o[i] = _mm512_fmadd_ps(pa, _mm512_loadu_ps(vc + t * hd + 16 * i), o[i]);
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    float *out = d->att + (size_t)h * hd;
    for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + 16 * i, _mm512_mul_ps(_mm512_add_ps(o[i], o2[i]), inv));
}
#endif

static void attn_head(bd_decoder *d, int layer, int64_t S, int h, float *sc) {
    const int hd = d->Hd, grp = d->H / d->Hk, kvh = h / grp;
#if defined(__AVX512F__)
    if (hd % 16 == 0 && hd <= 128) {
        attn_head16(d, layer, S, h, sc);
        return;
    }
#endif
    const float *q = d->q + (size_t)h * hd;
    const float *kc = d->kc[layer] + (size_t)kvh * d->S_max * hd;
    const float *vc = d->vc[layer] + (size_t)kvh * d->S_max * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        const float acc = dotf(q, kc + s * hd, hd) * scale;
        sc[s] = acc;
        if (acc > mx) mx = acc;
    }
    double sum = 0.0;
    for (int64_t s = 0; s < S; s++) sc[s] = exp_fast(sc[s] - mx);
    for (int64_t s = 0; s < S; s++) sum += sc[s];
    const float inv = (float)(1.0 / sum);
    float *o = d->att + (size_t)h * hd;
    for (int t = 0; t < hd; t++) o[t] = 0.f;
    for (int64_t s = 0; s < S; s++) {
        const float p = sc[s] * inv;
        const float *vr = vc + s * hd;
        for (int t = 0; t < hd; t++) o[t] += p * vr[t];
    }
}

static void attn_task(void *ctx, int tid, int nth) {
    (void)nth;
    attn_job *j = ctx;
    float *sc = j->d->scores + (size_t)tid * j->d->S_max;
    for (;;) {
        const int h = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (h >= j->d->H) break;
        attn_head(j->d, j->layer, j->S, h, sc);
    }
}

/* ---- the step ---------------------------------------------------------------------------------- */

static void embed_row(const bd_lin *E, int k, int64_t row, float *out) {
    const int64_t K = E->K, RB = (K + 7) / 8, ng = (K + E->G - 1) / E->G;
    const float L = (float)(1 << (E->B - k)), h = (L - 1.0f) * 0.5f;
    const uint16_t *sc = E->scales + row * ng, *of = E->offsets + row * ng;
    for (int64_t j = 0; j < K; j++) {
        int c = 0;
        for (int p = 0; p < k; p++) {
            const uint8_t byte = E->planes[(size_t)p * E->pstride + row * RB + (j >> 3)];
            c = (c << 1) | ((byte >> (j & 7)) & 1);
        }
        const int64_t g = j / E->G;
        out[j] = bd_half_to_float(of[g]) + bd_half_to_float(sc[g]) * ((float)c * L + h);
    }
}

double BD_DECODE_STEP(bd_decoder *d, int64_t token, int64_t pos, float *logits) {
    const int D = d->D, H = d->H, Hk = d->Hk, hd = d->Hd;
    float *x = d->x, *hb = d->hb;
    const int64_t t_start = now_ns();
    d->wb = 0.0;
    const int E = 7 * d->L + 1;
    d->chosen[E] = (uint8_t)d->bits[E];
    if (d->lin[E].B == 0) memcpy(x, (const float *)(const void *)d->lin[E].planes + token * D, (size_t)D * 4);
    else embed_row(&d->lin[E], d->bits[E], token, x);
    const float *cs = d->cos + (size_t)pos * hd, *sn = d->sin + (size_t)pos * hd;
    const int64_t S = pos + 1;
    for (int l = 0; l < d->L; l++) {
        const int base = 7 * l;
        /* attention */
        rmsnorm(hb, x, d->attn_norm[l], D, d->eps);
        float *kv_k = d->kc[l] + (size_t)pos * hd, *kv_v = d->vc[l] + (size_t)pos * hd;
        {
            const int slots[3] = {base + 0, base + 1, base + 2};
            float *const ys[3] = {d->q, d->kn, d->vn};
            run_linears(d, BD_PART_QKV, slots, ys, 3, hb);
        }
        for (int h = 0; h < H; h++) {
            float *qh = d->q + (size_t)h * hd;
            if (d->q_norm[l]) rmsnorm(qh, qh, d->q_norm[l], hd, d->eps);
            rope(qh, cs, sn, hd);
        }
        for (int h = 0; h < Hk; h++) {
            float *kh = d->kn + (size_t)h * hd;
            if (d->k_norm[l]) rmsnorm(kh, kh, d->k_norm[l], hd, d->eps);
            rope(kh, cs, sn, hd);
            memcpy(kv_k + (size_t)h * d->S_max * hd, kh, (size_t)hd * 4);
            memcpy(kv_v + (size_t)h * d->S_max * hd, d->vn + (size_t)h * hd, (size_t)hd * 4);
        }
        if (S * H * hd >= 64 * 1024 && bd_pool_threads() > 1) {
            attn_job aj;
            aj.d = d;
            aj.layer = l;
            aj.S = S;
            atomic_init(&aj.next, 0);
            bd_pool_run(attn_task, &aj);
        } else {
            for (int h = 0; h < H; h++) attn_head(d, l, S, h, d->scores);
        }
        {
            const int slots[1] = {base + 3};
            float *const ys[1] = {hb};
            run_linears(d, BD_PART_O, slots, ys, 1, d->att);
        }
        for (int i = 0; i < D; i++) x[i] += hb[i];
        /* MLP */
        rmsnorm(hb, x, d->ffn_norm[l], D, d->eps);
        {
            const int slots[2] = {base + 4, base + 5};
            float *const ys[2] = {d->g, d->u};
            run_linears(d, BD_PART_GATE_UP, slots, ys, 2, hb);
        }
        silu_mul(d->g, d->u, d->F);
        {
            const int slots[1] = {base + 6};
            float *const ys[1] = {hb};
            run_linears(d, BD_PART_DOWN, slots, ys, 1, d->g);
        }
        for (int i = 0; i < D; i++) x[i] += hb[i];
    }
    rmsnorm(hb, x, d->final_norm, D, d->eps);
    {
        const int slots[1] = {7 * d->L};
        float *const ys[1] = {logits};
        run_linears(d, BD_PART_HEAD, slots, ys, 1, hb);
    }
    d->n_steps++;
    d->t_total_ns += now_ns() - t_start;
    return d->wb;
}

/* ---- construction from the descriptor ------------------------------------------------------------ */
#ifndef BD_DECODE_VARIANT

static void *alloc64(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, rup(n ? n : 64, 64)) != 0) return NULL;
    memset(p, 0, rup(n ? n : 64, 64));
    return p;
}

void bd_decoder_free(bd_decoder *d) {
    if (!d) return;
    free(d->lin);
    free(d->attn_norm); free(d->ffn_norm); free(d->q_norm); free(d->k_norm);
    free(d->kc); free(d->vc);
    for (int s = 0; s < MAXM; s++) free(d->act[s]);
    free(d->x); free(d->hb); free(d->q); free(d->kn); free(d->vn); free(d->att);
    free(d->g); free(d->u); free(d->scores);
    free(d);
}

#define P(v) ((const void *)(uintptr_t)(v))

bd_decoder *bd_decoder_new(const int64_t *desc, int64_t n, const bd_isa *isa, const char **err) {
    *err = "descriptor too short";
    if (n < DESC_HEAD) return NULL;
    const int64_t L = desc[DESC_L];
    const int64_t need = DESC_HEAD + L * DESC_PER_LAYER + (7 * L + 2) * DESC_PER_LIN;
    if (L < 1 || n != need) {
        *err = "descriptor length does not match its layer count";
        return NULL;
    }
    bd_decoder *d = calloc(1, sizeof *d);
    if (!d) { *err = "out of memory"; return NULL; }
    d->isa = isa;
    d->L = (int)L;
    d->D = (int)desc[DESC_D];
    d->H = (int)desc[DESC_H];
    d->Hk = (int)desc[DESC_HK];
    d->Hd = (int)desc[DESC_HD];
    d->F = (int)desc[DESC_F];
    d->S_max = desc[DESC_SMAX];
    float eps;
    const uint32_t eb = (uint32_t)desc[DESC_EPS_BITS];
    memcpy(&eps, &eb, 4);
    d->eps = eps;
    d->cos = P(desc[DESC_COS]);
    d->sin = P(desc[DESC_SIN]);
    d->final_norm = P(desc[DESC_FINAL_NORM]);
    d->bits = (int32_t *)(uintptr_t)desc[DESC_BITS];
    d->chosen = (uint8_t *)(uintptr_t)desc[DESC_CHOSEN];
    d->n_high = (int64_t *)(uintptr_t)desc[DESC_NHIGH];
    d->rules = (double *)(uintptr_t)desc[DESC_RULES];
    d->gptr = (int64_t *)(uintptr_t)desc[DESC_GPTR];
    d->n_dec = 7 * d->L;
    *err = "bad model sizes";
    if (d->D < 1 || d->H < 1 || d->Hk < 1 || d->H % d->Hk || d->Hd < 2 || d->Hd % 2 || d->F < 1 || d->S_max < 1 ||
        !d->cos || !d->sin || !d->final_norm || !d->bits || !d->chosen || !d->n_high || !d->rules || !d->gptr)
        goto fail;
    d->attn_norm = calloc(L, sizeof(float *));
    d->ffn_norm = calloc(L, sizeof(float *));
    d->q_norm = calloc(L, sizeof(float *));
    d->k_norm = calloc(L, sizeof(float *));
    d->kc = calloc(L, sizeof(float *));
    d->vc = calloc(L, sizeof(float *));
    const int nlin = 7 * d->L + 2;
    d->lin = calloc(nlin, sizeof(bd_lin));
    *err = "out of memory";
    if (!d->attn_norm || !d->ffn_norm || !d->q_norm || !d->k_norm || !d->kc || !d->vc || !d->lin) goto fail;
    const int64_t *p = desc + DESC_HEAD;
    for (int l = 0; l < d->L; l++, p += DESC_PER_LAYER) {
        d->attn_norm[l] = P(p[0]);
        d->ffn_norm[l] = P(p[1]);
        d->q_norm[l] = P(p[2]);
        d->k_norm[l] = P(p[3]);
        d->kc[l] = (float *)(uintptr_t)p[4];
        d->vc[l] = (float *)(uintptr_t)p[5];
        *err = "null norm or cache pointer";
        if (!d->attn_norm[l] || !d->ffn_norm[l] || !d->kc[l] || !d->vc[l]) goto fail;
    }
    int64_t kmax = 0;
    for (int i = 0; i < nlin; i++, p += DESC_PER_LIN) {
        bd_lin *W = &d->lin[i];
        W->planes = P(p[0]);
        W->scales = P(p[1]);
        W->offsets = P(p[2]);
        W->bias = P(p[3]);
        W->N = p[4];
        W->K = p[5];
        W->G = (int)p[6];
        W->B = (int)p[7];
        W->log2G = ilog2_exact(p[6]);
        W->pstride = p[8] ? p[8] : W->N * ((W->K + 7) / 8);
        *err = "a linear has a null pointer, bad sizes or a group size that is not a power of two >= 32";
        if (W->B == 0) { /* dense fp32 [N, K] in planes */
            if (!W->planes || W->N < 1 || W->K < 1) goto fail;
        } else if (!W->planes || !W->scales || !W->offsets || W->N < 1 || W->K < 1 || W->B < 1 || W->B > 8 ||
                   W->G < 32 || W->log2G < 0 || W->pstride < W->N * ((W->K + 7) / 8)) {
            goto fail;
        }
        if (W->K > kmax) kmax = W->K;
    }
    /* shapes the step relies on */
    const int qd = d->H * d->Hd, kd = d->Hk * d->Hd;
    *err = "linear shapes do not match the model config";
    for (int l = 0; l < d->L; l++) {
        const bd_lin *w = d->lin + 7 * l;
        if (w[0].N != qd || w[0].K != d->D || w[1].N != kd || w[1].K != d->D || w[2].N != kd || w[2].K != d->D ||
            w[3].N != d->D || w[3].K != qd || w[4].N != d->F || w[4].K != d->D || w[5].N != d->F ||
            w[5].K != d->D || w[6].N != d->D || w[6].K != d->F)
            goto fail;
    }
    if (d->lin[7 * d->L].K != d->D || d->lin[7 * d->L + 1].K != d->D) goto fail;
    *err = "out of memory";
    for (int s = 0; s < MAXM; s++)
        if (!(d->act[s] = alloc64(act_bytes(kmax)))) goto fail;
    d->x = alloc64((size_t)d->D * 4);
    d->hb = alloc64((size_t)(d->D > qd ? d->D : qd) * 4);
    d->q = alloc64((size_t)qd * 4);
    d->kn = alloc64((size_t)kd * 4);
    d->vn = alloc64((size_t)kd * 4);
    d->att = alloc64((size_t)qd * 4);
    d->g = alloc64((size_t)d->F * 4);
    d->u = alloc64((size_t)d->F * 4);
    d->scores = alloc64((size_t)BD_POOL_MAX * d->S_max * 4);
    if (!d->x || !d->hb || !d->q || !d->kn || !d->vn || !d->att || !d->g || !d->u || !d->scores) goto fail;
    *err = NULL;
    return d;
fail:
    bd_decoder_free(d);
    return NULL;
}
#endif /* BD_DECODE_VARIANT */
