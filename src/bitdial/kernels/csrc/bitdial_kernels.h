/* bitdial native GEMV kernels: shared declarations and scalar logic.
 *
 * Weight layout (planes-v1, uniform method), see src/bitdial/quant/bitplanes.py and qtensor.py:
 *   planes  uint8 [B, N, RB], RB = ceil(K/8). planes[p] holds bit B-1-p of the B-bit code q
 *           (plane 0 = MSB); in a plane row, byte j holds columns 8j..8j+7, column 8j+i in bit i.
 *           The k-bit view c = q >> (B-k) is rebuilt from planes[:k]:  c = sum_p bit_p << (k-1-p).
 *   scales  fp16 [N, ng], offsets fp16 [N, ng], ng = ceil(K/G), groups of G consecutive columns.
 *   w_k[n,j] = m + s * (c * L + h),   L = 2^(B-k),  h = (L-1)/2   (m, s of row n, group g(j)).
 *
 * Centering the codes on the middle of their range, c~ = c - 2^(k-1), with a_g = m_g + s_g (h + L 2^(k-1))
 * the weight level of the middle code (so w_k = a_g + s_g L c~):
 *
 * y[t,n] = sum_j w_k[n,j] x[t,j]
 *        = L * sum_g s_g * sum_{j in g} c~_j x_j   +   sum_g a_g X_g,          X_g = sum_{j in g} x_j
 *
 * The first ("main") term is computed in integers: x is quantized per block of QB columns
 * (QB = 64 when G is a multiple of 64, else 32, so a block never straddles two groups) to int8,
 *   x_j ~ d_u * q_j,   d_u = max_{j in u} |x_j| / 127,   q_j = rint(x_j * 127 / max|x|) in [-127, 127],
 * so   sum_{j in u} c~_j x_j ~ d_u * (I_u - 2^(k-1) Q_u),   I_u = sum_{j in u} c_j q_j,  Q_u = sum_{j in u} q_j
 * (I_u: u8 x s8 dot products, exact in int32; Q_u: precomputed once per call). Per row:
 *   main = sum_u f_u I_u  -  2^(k-1) sum_u f_u Q_u,   f_u = s_g(u) d_u.
 * The second ("offset") term uses the exact float X_g. The only approximation is therefore
 *   y~ - y = sum_j (w_k[n,j] - a_g) * (d_u q_j - x_j),   |d_u q_j - x_j| <= d_u / 2,
 * and |w_k - a_g| is at most half the group's range: this is the bound tests/test_kernels.py checks.
 *
 * Every ISA file (gemv_<isa>.c) implements the three entry points of bd_isa below; the driver
 * (module.c) quantizes x once per call with isa->prepare, then splits the rows over the thread pool
 * and calls isa->rows on each slice.
 */
#ifndef BITDIAL_KERNELS_H
#define BITDIAL_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BD_INLINE static inline __attribute__((always_inline))
#define BD_MAX_THREADS 64

/* One GEMV call: y[M, N] = x[M, K] @ W_k^T. Filled by the driver; scratch pointers are 64-byte aligned. */
typedef struct bd_gemv {
    /* weights */
    const uint8_t *planes;    /* [B, N, RB] (only planes[:k] is read) */
    const uint16_t *scales;   /* fp16 bits [N, ng] */
    const uint16_t *offsets;  /* fp16 bits [N, ng] */
    int64_t N, K, RB, ng;
    int64_t pstride;          /* bytes between planes: N * RB, or more for padded planes (pad_planes) */
    int G, log2G, B, k;
    float L;                  /* 2^(B-k): code units of the k-bit view in B-bit steps */
    float h;                  /* (L - 1) / 2: mid-interval offset of a k-bit code, in B-bit steps */
    float cmid;               /* 2^(k-1): the middle code the codes are centered on */
    float hmid;               /* h + L * cmid: level of the middle code, in B-bit steps (a_g = m + hmid s) */
    /* activations */
    int M;
    const float *x;           /* [M, K] */
    float *y;                 /* [M, N], row stride N */
    /* activation quantization (written by isa->prepare) */
    int QB;                   /* x quantization block: 64 if G % 64 == 0 else 32 */
    int64_t Kp;               /* K rounded up to 64: row stride of xq */
    int64_t nu;               /* x blocks (units) per token: Kp / QB */
    int64_t nu_pad;           /* row stride of dx: nu rounded up to 16, + 16 */
    int64_t ng_pad;           /* row stride of xs: ng rounded up to 16, + 16 */
    int8_t *xq;               /* [M, Kp]      q_j, 0 beyond K */
    float *dx;                /* [M, nu_pad]  d_u, 0 beyond nu */
    float *qs;                /* [M, nu_pad]  Q_u = sum of q_j over block u (exact), 0 beyond nu */
    float *xs;                /* [M, ng_pad]  X_g, 0 beyond ng */
    float *dxv;               /* [M, Kp/64, 16] d_u expanded to the 16 int32 lanes of a 64-column chunk
                                 (lanes 0-7: columns 0-31, lanes 8-15: columns 32-63); AVX-512, M > 1 */
    float *dxt;               /* [nu_pad, Mp] d_u transposed (token-minor); AVX-512, M > 1 */
    int64_t Mp;               /* M rounded up to 16 */
} bd_gemv;

typedef struct bd_isa {
    const char *name;
    /* Quantize a->x into a->xq / dx / xs (/ dxv). Single-threaded, called once per GEMV. */
    void (*prepare)(bd_gemv *a);
    /* y[:, n0:n1] for rows n0 <= n < n1 (any n0, n1; the driver aligns slices to 4 rows). */
    void (*rows)(const bd_gemv *a, int64_t n0, int64_t n1);
    /* Bandwidth probe: a reduction over n bytes (n multiple of 256, p 64-byte aligned). */
    uint64_t (*sum_bytes)(const uint8_t *p, size_t n);
} bd_isa;

extern const bd_isa bd_isa_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const bd_isa bd_isa_avx2;
extern const bd_isa bd_isa_avx512;
extern const bd_isa bd_isa_avx512_gfni;
#endif
#if defined(__aarch64__)
extern const bd_isa bd_isa_neon;
#ifdef BITDIAL_HAVE_NEON_DOT
extern const bd_isa bd_isa_neon_dot;
#endif
#endif

/* ---- shared scalar helpers ------------------------------------------------------------------ */

/* IEEE fp16 bits -> float (exact; portable, used by the reference path and for tails). */
static inline float bd_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Group of x block u: g(u) = u * QB / G (G is a power of two >= QB). */
static inline int64_t bd_group_of_unit(const bd_gemv *a, int64_t u) {
    return (u * a->QB) >> a->log2G;
}

/* Scale of the int8 quantization of a block with max |x| = amax: d = amax / 127, and the
 * multiplier 127 / amax applied before rounding. Shared by every ISA so that all paths produce
 * the same q_j (rint in round-to-nearest-even, the default FP environment). */
static inline void bd_block_scale(float amax, float *d, float *inv) {
    *d = amax / 127.0f;
    *inv = amax > 0.0f ? 127.0f / amax : 0.0f;
}

/* Little-endian load of n (< 8) bytes, zero-extended: tails of plane rows (never reads past p + n). */
static inline uint64_t bd_load_partial(const uint8_t *p, int n) {
    uint64_t v = 0;
    memcpy(&v, p, (size_t)n);
    return v;
}

/* Software prefetch of the rows a decode pass reads next: the k plane rows, scales and offsets of rows
 * n .. n+R-1, issued about BD_PREFETCH_BYTES of plane row ahead (at least one row ahead). On AMD Zen 5
 * the hardware prefetchers leave the short per-plane streams of a low-k GEMV underfed: one core reads
 * 12-15 GB/s at k = 2 without this and ~20 GB/s with it (docs/kernels.md). Prefetches never fault;
 * rows past the layer's end are skipped. The GFNI decode pass spreads the same prefetches over the row's blocks
 * instead (gdecode_row: 3-8% faster on Sapphire Rapids, docs/kernels.md "Spread software prefetch"). */
#ifndef BD_PREFETCH_BYTES
#define BD_PREFETCH_BYTES 1024
#endif
/* Rows shorter than this many bytes per plane (K < 2048) are not prefetched. On Sapphire Rapids the default
 * model (K = 576 and 1536) took 13% less step time at 2 bits without them (2 threads, median of 10
 * interleaved rounds) and the same at 4 bits, while the Llama-3.2-1B shapes (K >= 2048) kept their gain
 * (docs/kernels.md, "Software prefetch"). */
#ifndef BD_PREFETCH_MIN_RB
#define BD_PREFETCH_MIN_RB 256
#endif
static inline void bd_prefetch_lines(const void *p, int64_t nbytes) {
    const uintptr_t l0 = (uintptr_t)p & ~(uintptr_t)63, l1 = ((uintptr_t)p + (uintptr_t)nbytes - 1) & ~(uintptr_t)63;
    for (uintptr_t l = l0; l <= l1; l += 64) __builtin_prefetch((const void *)l, 0, 3);
}
/* The first row about dist bytes of plane row past row n (at least the next one), or -1 when rows are too
 * short to prefetch or that row is past the layer's end. */
static inline int64_t bd_prefetch_row_ahead(const bd_gemv *a, int64_t n, int64_t dist) {
    if (a->RB < BD_PREFETCH_MIN_RB) return -1; /* short rows: the prefetches cost more than they save */
    const int64_t r0 = n + (a->RB >= dist ? 1 : dist / a->RB);
    return r0 < a->N ? r0 : -1;
}
/* The scales and offsets of rows r0 .. r0+nr-1. */
static inline void bd_prefetch_row_scales(const bd_gemv *a, int64_t r0, int64_t nr) {
    bd_prefetch_lines(a->scales + r0 * a->ng, nr * a->ng * 2);
    bd_prefetch_lines(a->offsets + r0 * a->ng, nr * a->ng * 2);
}
static inline void bd_prefetch_rows(const bd_gemv *a, int64_t n, int R, int k) {
    const int64_t r0 = bd_prefetch_row_ahead(a, n, BD_PREFETCH_BYTES);
    if (r0 < 0) return;
    const int64_t nr = r0 + R <= a->N ? R : a->N - r0;
    const uint8_t *row = a->planes + r0 * a->RB;
    for (int p = 0; p < k; p++) bd_prefetch_lines(row + p * a->pstride, nr * a->RB);
    bd_prefetch_row_scales(a, r0, nr);
}

#endif /* BITDIAL_KERNELS_H */
