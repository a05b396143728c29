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

/* sum_g a_g X_g (a_g = m_g + hmid s_g) for one row and one token, as 8 partial sums (the scalar remainder
 * in lane 0). */
BD_INLINE __m256 offset_vec(const bd_gemv *a, const uint16_t *s16, const uint16_t *m16, const float *xs) {
    __m256 o = _mm256_setzero_ps();
    const __m256 h = _mm256_set1_ps(a->hmid);
    int64_t g = 0;
    for (; g + 8 <= a->ng; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + g)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m16 + g)));
        o = _mm256_fmadd_ps(_mm256_fmadd_ps(s, h, m), _mm256_loadu_ps(xs + g), o);
    }
    float r = 0.0f;
    for (; g < a->ng; g++) r += (_cvtsh_ss(m16[g]) + a->hmid * _cvtsh_ss(s16[g])) * xs[g];
    return _mm256_add_ps(o, _mm256_setr_ps(r, 0, 0, 0, 0, 0, 0, 0));
}

/* The 4 horizontal sums of a, b, c, d. */
BD_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
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
                a->L * (hsum256(acc[t][r]) - corr[t][r]) + hsum256(offset_vec(a, s16, m16, a->xs + (int64_t)(m0 + t) * a->ng_pad));
    }
}

/* ---- decode (M = 1): bit slices against a permuted activation layout ------------------------- */
/*
 * One token. The codes are never expanded byte by byte: a 32-byte load of one plane row covers 256
 * columns (a superblock), byte b holding columns 8b..8b+7 in bits 0..7. The i-th "slice" of that load,
 * bit i of every byte, is the bit of columns 8b + i, b = 0..31: one shift and one AND per plane and
 * slice put it where its plane's weight goes, an OR merges the planes into the code c of those 32
 * columns, and vpmaddubsw takes the dot product with the matching 32 activations. prepare_avx2 stores
 * the activations of a single token in exactly that order (the dot product does not care about the
 * order, only that codes and activations agree), so xq needs no shuffles here:
 *
 *   full superblock s (bytes 32s..32s+31 of a plane row):  xq[256 s + 32 i + b] = q[256 s + 8 b + i]
 *
 *   plane row byte b of the superblock:  bit 7 ... bit 1  bit 0
 *                                         col 8b+7   8b+1   8b      (of the superblock)
 *   slice i = bit i of bytes 0..31   ->  columns i, 8+i, 16+i, ..., 248+i  ->  xq[256 s + 32 i .. + 31]
 *
 * Codes of up to 4 bits go two per byte (slices i and i + 4, nibble_dot); above 4 bits the top 4 planes
 * and the remaining k - 4 are two such nibbles. The int32 lane l of vpmaddwd(vpmaddubsw(c, q), 1) sums
 * bytes 4l..4l+3 of a slice, i.e. columns of the 32-column block l of the superblock, for every slice:
 * the lanes are the superblock's 8 blocks, so scales and activation scales apply per lane
 * (f_l = s_g(l) d_u(l)), and the centering term 2^(k-1) Q_l is subtracted exactly in int32 (Q_l: the sum
 * of q over block l, written by prepare).
 *
 * The row tail (fewer than 32 bytes left) goes in pieces of W = 16 or 8 bytes, broadcast to the whole
 * register (2 or 4 copies) and sliced with per-qword shift counts (vpsrlvq), 4 or 2 registers per piece:
 *
 *   tail piece at byte o, width W:  xq[8 o + W i + b] = q[8 (o + b) + i],  b < W
 *
 * so that register j of a piece holds slices (W/8) j .. (W/8) j + W/8 - 1 and lane l is block l mod W/4
 * of the piece (piece_dot: Horner over the planes, int16 sums widened every F registers, at 8 bits the
 * code split as 2 c7 + b0). The usual 8-byte tail of 4 rows at once is sliced like a superblock
 * (tail4_dot). Bytes past the row end are never read (partial pieces are copied to a zeroed buffer).
 */

/* Bits i and i + 4 of every byte of P moved to bits w and w + 4 (i < 4, w < 4), all other bits 0. */
BD_INLINE __m256i place_bit2(__m256i P, const int i, const int w) {
    __m256i t = P;
    if (i > w) t = _mm256_srli_epi16(P, i - w);
    if (i < w) t = _mm256_slli_epi16(P, w - i);
    return _mm256_and_si256(t, _mm256_set1_epi8((char)(0x11 << w)));
}

/* Slices per int16 flush: F pairs of 2 (2^kh - 1) 127 stay below 2^15. */
#define FLUSH(kh) ((kh) <= 4 ? 8 : 1 << (7 - (kh)))

/* The activations of slice i. bcast = 0: the 32 bytes at xq + 32 i (a superblock); bcast = 1: the 8
 * bytes at xq + 8 i, broadcast (the 8-byte tails of 4 rows, tail4_dot). */
BD_INLINE __m256i slice_x(const int8_t *xq, const int i, const int bcast) {
    if (bcast) return _mm256_set1_epi64x(*(const int64_t __attribute__((may_alias, aligned(1))) *)(xq + 8 * i));
    return _mm256_load_si256((const __m256i *)(xq + 32 * i));
}

/* int32 lanes: sum of c_j q_j over each 32-column block, c = the np-bit code of planes P[0..np-1]
 * (np <= 4, P[0] most significant). Slices i and i + 4 are built together: one shift and one AND per
 * plane move bit i to bit w and bit i + 4 to bit w + 4 (w = the plane's weight), so one byte holds the
 * codes of two columns, split by an AND and a shift. Activations as slice_x(bcast). */
BD_INLINE __m256i nibble_dot(const __m256i *P, const int np, const int8_t *xq, const int bcast) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    __m256i acc16 = _mm256_setzero_si256(); /* <= 8 pairs of 2 * 15 * 127 per lane: no overflow */
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        __m256i c = place_bit2(P[0], i, np - 1);
#pragma GCC unroll 3
        for (int q = 1; q < np; q++) c = _mm256_or_si256(c, place_bit2(P[q], i, np - 1 - q));
        const __m256i c0 = _mm256_and_si256(c, lo4), c1 = _mm256_and_si256(_mm256_srli_epi16(c, 4), lo4);
        acc16 = _mm256_add_epi16(acc16, _mm256_maddubs_epi16(c0, slice_x(xq, i, bcast)));
        acc16 = _mm256_add_epi16(acc16, _mm256_maddubs_epi16(c1, slice_x(xq, i + 4, bcast)));
    }
    return _mm256_madd_epi16(acc16, _mm256_set1_epi16(1));
}

/* The same for the k-bit code (k fixed): one nibble up to 4 bits; above, the top 4 planes and the
 * remaining k - 4 as two nibbles, I = (I_hi << (k - 4)) + I_lo (exact in int32). */
BD_INLINE __m256i sb_dot(const uint8_t *p, int64_t ps, const int k, const int8_t *xq) {
    __m256i P[8];
#pragma GCC unroll 8
    for (int q = 0; q < k; q++) P[q] = _mm256_loadu_si256((const __m256i *)(p + q * ps));
    if (k <= 4) return nibble_dot(P, k, xq, 0);
    return _mm256_add_epi32(_mm256_slli_epi32(nibble_dot(P, 4, xq, 0), k - 4), nibble_dot(P + 4, k - 4, xq, 0));
}

/* The 8-byte row tails (64 columns) of 4 consecutive rows at once: one qword per row in one register, so
 * the tails are sliced like a superblock. xq: the tail's compact order (slice i at xq + 8 i). int32 lane
 * l = row l / 2, 32-column block l % 2 of the tail. */
BD_INLINE __m256i tail4_dot(const uint8_t *p, int64_t RB, int64_t ps, const int k, const int8_t *xq) {
    __m256i P[8];
#pragma GCC unroll 8
    for (int q = 0; q < k; q++) {
        const uint8_t *b = p + q * ps;
        const __m128i lo = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)b)), (const double *)(b + RB)));
        const __m128i hi = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)(b + 2 * RB))), (const double *)(b + 3 * RB)));
        P[q] = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    }
    if (k <= 4) return nibble_dot(P, k, xq, 1);
    return _mm256_add_epi32(_mm256_slli_epi32(nibble_dot(P, 4, xq, 1), k - 4), nibble_dot(P + 4, k - 4, xq, 1));
}

/* The same for a tail piece of W = 16 or 8 bytes per plane row (nb <= W of them present). */
BD_INLINE __m256i piece_dot(const uint8_t *p, int64_t ps, const int k, const int W, int nb, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1), one8 = _mm256_set1_epi8(1);
    const int kh = k < 8 ? k : 7, F = FLUSH(kh), nreg = W / 4;
    __m256i P[8];
#pragma GCC unroll 8
    for (int q = 0; q < k; q++) {
        uint8_t buf[16] = {0};
        const uint8_t *src = p + q * ps;
        if (nb < W) {
            memcpy(buf, src, (size_t)nb);
            src = buf;
        }
        if (W == 16) P[q] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)src));
        else P[q] = _mm256_set1_epi64x((long long)*(const uint64_t __attribute__((may_alias, aligned(1))) *)src);
    }
    __m256i acc32 = _mm256_setzero_si256(), acc16 = _mm256_setzero_si256(), accb = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < nreg; j++) {
        const __m256i cnt = W == 16 ? _mm256_setr_epi64x(2 * j, 2 * j, 2 * j + 1, 2 * j + 1)
                                    : _mm256_setr_epi64x(4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3);
        const __m256i xv = _mm256_load_si256((const __m256i *)(xq + 32 * j));
        __m256i c = _mm256_and_si256(_mm256_srlv_epi64(P[0], cnt), one8);
#pragma GCC unroll 7
        for (int q = 1; q < kh; q++) /* Horner, MSB first: c = 2c + bit */
            c = _mm256_or_si256(_mm256_add_epi8(c, c), _mm256_and_si256(_mm256_srlv_epi64(P[q], cnt), one8));
        acc16 = _mm256_add_epi16(acc16, _mm256_maddubs_epi16(c, xv));
        if ((j + 1) % F == 0 || j == nreg - 1) {
            acc32 = _mm256_add_epi32(acc32, _mm256_madd_epi16(acc16, ones));
            acc16 = _mm256_setzero_si256();
        }
        if (k == 8)
            accb = _mm256_add_epi16(accb, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srlv_epi64(P[7], cnt), one8), xv));
    }
    if (k == 8) acc32 = _mm256_add_epi32(_mm256_add_epi32(acc32, acc32), _mm256_madd_epi16(accb, ones));
    return acc32;
}

/* Scales s_g of the 8 blocks of full superblock s of one row (lane l = block l). */
BD_INLINE __m256 sb_scales(const bd_gemv *a, const uint16_t *s16, int64_t s) {
    switch (a->log2G) {
    case 5:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + 8 * s)));
    case 6:
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s16 + 4 * s)))),
                                        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 7: {
        uint32_t w;
        memcpy(&w, s16 + 2 * s, 4);
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128((int)w))),
                                        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    }
    default:
        return _mm256_set1_ps(_cvtsh_ss(s16[(256 * s) >> a->log2G]));
    }
}

/* Width in bytes of the next tail piece with rem plane bytes left in the row (decode_tile and
 * permute_single must agree). */
BD_INLINE int tail_width(int64_t rem) { return rem > 8 ? 16 : 8; }

/* Scale of the 32-column block blk of one row, 0 past the row's columns. */
BD_INLINE float block_scale(const bd_gemv *a, const uint16_t *s16, int64_t blk) {
    const int64_t col = 32 * blk;
    return col < a->K ? _cvtsh_ss(s16[col >> a->log2G]) : 0.0f;
}

/* Prefetch distance of the decode pass, in bytes of each plane stream. On AMD Zen 3 (2 vCPUs) this
 * stream prefetch beat bd_prefetch_rows (whole rows ahead): 2 threads, k = 3..4, ~10 -> ~14 GB/s
 * (docs/kernels.md); 1024-4096 bytes were within noise of each other. */
#ifndef BD_AVX2_PREFETCH
#define BD_AVX2_PREFETCH 2048
#endif

/* R rows, one token (k fixed). d32 / q32: d_u and Q (int32) per 32-column block, written by prepare. */
BD_INLINE void decode_tile(const bd_gemv *a, int64_t n, const int R, const int k) {
    const int64_t RB = a->RB, ps = a->pstride, nsb = RB >> 5;
    const float *d32 = a->dxv;
    const int32_t *q32 = (const int32_t *)a->dxt;
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < nsb; s++) {
        const __m256i qv = _mm256_slli_epi32(_mm256_load_si256((const __m256i *)(q32 + 8 * s)), k - 1);
        const __m256 dv = _mm256_load_ps(d32 + 8 * s);
#pragma GCC unroll 1
        for (int r = 0; r < R; r++) { /* not unrolled: one row's slices already fill the registers */
            const uint8_t *p = a->planes + (n + r) * RB + 32 * s;
            if (!(s & 1)) /* each plane is one sequential stream over the rows: prefetch it ahead */
                for (int q = 0; q < k; q++) __builtin_prefetch(p + q * ps + BD_AVX2_PREFETCH, 0, 3);
            const __m256i I = _mm256_sub_epi32(sb_dot(p, ps, k, a->xq + 256 * s), qv);
            const __m256 f = _mm256_mul_ps(sb_scales(a, a->scales + (n + r) * a->ng, s), dv);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), f, acc[r]);
        }
    }
    __m256 tacc = _mm256_setzero_ps(); /* 4-row tails: lanes 2r, 2r + 1 belong to row n + r */
    for (int64_t o = 32 * nsb; o < RB;) { /* the tail: pieces of 16 or 8 bytes */
        const int64_t rem = RB - o;
        const int W = tail_width(rem), nb = rem < W ? (int)rem : W, nbk = W / 4;
        const int64_t b0 = o / 4; /* first 32-column block of the piece */
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
        const __m256i idx = W == 16 ? lane : _mm256_and_si256(lane, _mm256_set1_epi32(1));
        const __m256 dv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(d32 + b0), idx);
        if (R == 4 && W == 8 && nb == 8) { /* the usual tail of K = 64 (mod 256), e.g. K = 576: 4 rows at once */
            const __m256i qv4 = _mm256_slli_epi32(_mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(q32 + b0)), idx), k - 1);
            float sv[8];
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 2; l++) sv[2 * r + l] = block_scale(a, a->scales + (n + r) * a->ng, b0 + l);
            const __m256i I = _mm256_sub_epi32(tail4_dot(a->planes + n * RB + o, RB, ps, k, a->xq + 8 * o), qv4);
            tacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(_mm256_loadu_ps(sv), dv), tacc);
            o += W;
            continue;
        }
        /* a block's dot product is spread over 32 / W lanes: subtract its centering term in one of them */
        const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(nbk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256i qv = _mm256_and_si256(first, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(q32 + b0)), k - 1));
        for (int r = 0; r < R; r++) {
            float sv[8] = {0};
            for (int l = 0; l < nbk; l++) sv[l] = block_scale(a, a->scales + (n + r) * a->ng, b0 + l);
            const __m256 f = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(sv), idx), dv);
            const uint8_t *p = a->planes + (n + r) * RB + o;
            const __m256i I = _mm256_sub_epi32(W == 16 ? piece_dot(p, ps, k, 16, nb, a->xq + 8 * o)
                                                       : piece_dot(p, ps, k, 8, nb, a->xq + 8 * o), qv);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), f, acc[r]);
        }
        o += W;
    }
    const __m256 L = _mm256_set1_ps(a->L);
    if (R == 4) { /* y = L (main + tails) + offset, the 4 rows reduced together */
        __m256 t[4];
        for (int r = 0; r < 4; r++)
            t[r] = _mm256_fmadd_ps(acc[r], L, offset_vec(a, a->scales + (n + r) * a->ng, a->offsets + (n + r) * a->ng, a->xs));
        const __m256 th = _mm256_hadd_ps(tacc, tacc); /* lanes 0, 1 | 4, 5: the row pairs */
        const __m128 tails = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(th, _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5)));
        _mm_storeu_ps(a->y + n, _mm_fmadd_ps(tails, _mm256_castps256_ps128(L), hsum4(t[0], t[1], t[2], t[3])));
        return;
    }
    for (int r = 0; r < R; r++) {
        const uint16_t *s16 = a->scales + (n + r) * a->ng, *m16 = a->offsets + (n + r) * a->ng;
        a->y[n + r] = hsum256(_mm256_fmadd_ps(acc[r], L, offset_vec(a, s16, m16, a->xs)));
    }
}

#define DEF_DECODE(K)                                                                 \
    static void decode_k##K(const bd_gemv *a, int64_t n0, int64_t n1) {               \
        int64_t n = n0;                                                               \
        for (; n + 4 <= n1; n += 4) decode_tile(a, n, 4, K);                          \
        for (; n < n1; n++) decode_tile(a, n, 1, K);                                  \
    }
DEF_DECODE(1) DEF_DECODE(2) DEF_DECODE(3) DEF_DECODE(4)
DEF_DECODE(5) DEF_DECODE(6) DEF_DECODE(7) DEF_DECODE(8)

typedef void (*rows_fn)(const bd_gemv *, int64_t, int64_t);
static const rows_fn decode_fns[9] = {0, decode_k1, decode_k2, decode_k3, decode_k4,
                                      decode_k5, decode_k6, decode_k7, decode_k8};

#define DEF_MULTI(T) \
    static void multi_t##T(const bd_gemv *a, int64_t n, int m0) { tile_avx2(a, n, 1, m0, T); }
DEF_MULTI(1) DEF_MULTI(2) DEF_MULTI(3) DEF_MULTI(4) DEF_MULTI(5) DEF_MULTI(6) DEF_MULTI(7) DEF_MULTI(8)
typedef void (*multi_fn)(const bd_gemv *, int64_t, int);
static const multi_fn multi_fns[9] = {0, multi_t1, multi_t2, multi_t3, multi_t4, multi_t5, multi_t6, multi_t7, multi_t8};

static void rows_avx2(const bd_gemv *a, int64_t n0, int64_t n1) {
    if (a->M == 1) {
        decode_fns[a->k](a, n0, n1);
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

/* One token (M = 1): d_u and Q per 32-column block into dxv / dxt (int32), then xq reordered in place
 * into the slice layout of the decode kernel (see "decode (M = 1)" above). */
static void permute_single(bd_gemv *a) {
    const int64_t nblk = a->Kp / 32, RB8 = a->Kp / 8; /* Kp / 8 = RB rounded up to 8 bytes */
    const int sh = a->QB == 64 ? 1 : 0;
    float *d32 = a->dxv;
    int32_t *q32 = (int32_t *)a->dxt;
    int8_t *xq = a->xq, tmp[256];
    for (int64_t b = 0; b < nblk; b++) {
        int32_t q = 0;
        for (int j = 0; j < 32; j++) q += xq[32 * b + j];
        q32[b] = q;
        d32[b] = a->dx[b >> sh];
    }
    for (int64_t b = nblk; b < nblk + 8; b++) q32[b] = 0, d32[b] = 0.0f;
    const int64_t nsb = a->RB >> 5;
    for (int64_t s = 0; s < nsb; s++) {
        int8_t *x = xq + 256 * s;
        memcpy(tmp, x, 256);
        for (int i = 0; i < 8; i++)
            for (int b = 0; b < 32; b++) x[32 * i + b] = tmp[8 * b + i];
    }
    for (int64_t o = 32 * nsb; o < RB8;) { /* tail pieces: the same widths as decode_tile picks */
        const int W = tail_width(a->RB - o);
        int8_t *x = xq + 8 * o;
        memcpy(tmp, x, (size_t)(8 * W));
        for (int i = 0; i < 8; i++)
            for (int b = 0; b < W; b++) x[W * i + b] = tmp[8 * b + i];
        o += W;
    }
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
    if (a->M == 1) permute_single(a);
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
