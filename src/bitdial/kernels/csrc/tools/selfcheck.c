/* Standalone consistency check of the SIMD paths against the portable C path, without Python:
 * random planes/scales/offsets/x over odd shapes, every k, several batch sizes. Used to test the NEON
 * paths on x86 hosts (cross-compiled, run under qemu-aarch64; see tests/test_kernels_neon.py):
 *
 *   aarch64-linux-gnu-gcc -O2 -I.. -DBITDIAL_HAVE_NEON_DOT selfcheck.c ../gemv_neon.c \
 *       <(gemv_neon_dot.c built with -march=armv8.2-a+dotprod) ../gemv_ref.c -lm -static
 *
 * Different paths quantize x identically, so they may only differ by float rounding: the check is
 * |y_isa - y_ref| <= 1e-6 * sum_j |x_j| (|m| + s 2^B). Prints "N cases, F failures" and exits 1 on failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitdial_kernels.h"

static const bd_isa *const ISAS[] = {
#if defined(__aarch64__)
    &bd_isa_neon,
#ifdef BITDIAL_HAVE_NEON_DOT
    &bd_isa_neon_dot,
#endif
#else
    &bd_isa_avx2, &bd_isa_avx512, &bd_isa_avx512_gfni,
#endif
};
#define NISA ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

static uint16_t f2h(float f) { /* float -> fp16 bits (normal range, truncating) */
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t s = (b >> 16) & 0x8000, m = (b >> 13) & 0x3ff;
    const int e = (int)((b >> 23) & 0xff) - 127 + 15;
    if (e <= 0) return (uint16_t)s;
    if (e >= 31) return (uint16_t)(s | 0x7bff);
    return (uint16_t)(s | ((uint32_t)e << 10) | m);
}

static void *zalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    memset(p, 0, (n + 63) / 64 * 64);
    return p;
}

int main(void) {
#ifdef SELFCHECK_QUICK /* fewer rows and batch sizes (emulators) */
    const int Ks[] = {8, 40, 72, 200, 576, 1536}, Ns[] = {1, 17}, Gs[] = {32, 64, 128}, Bs[] = {8, 6}, Ms[] = {1, 5, 16};
#else
    const int Ks[] = {8, 40, 72, 200, 576, 1536}, Ns[] = {1, 3, 17, 64}, Gs[] = {32, 64, 128}, Bs[] = {8, 6},
              Ms[] = {1, 2, 5, 16};
#endif
    const int nK = sizeof Ks / sizeof *Ks, nN = sizeof Ns / sizeof *Ns, nM = sizeof Ms / sizeof *Ms;
    int fails = 0, cases = 0;
    double worst = 0.0;
    srand(1);
    for (int ki = 0; ki < nK; ki++) for (int ni = 0; ni < nN; ni++) for (int gi = 0; gi < 3; gi++) for (int bi = 0; bi < 2; bi++) {
        const int64_t K = Ks[ki], N = Ns[ni], RB = (K + 7) / 8;
        const int G = Gs[gi], B = Bs[bi];
        const int64_t ng = (K + G - 1) / G;
        uint8_t *pl = zalloc((size_t)(B * N * RB));
        for (int64_t i = 0; i < B * N * RB; i++) pl[i] = (uint8_t)rand();
        if (K % 8)
            for (int64_t r = 0; r < B * N; r++) pl[r * RB + RB - 1] &= (uint8_t)((1 << (K % 8)) - 1);
        uint16_t *sc = zalloc((size_t)(N * ng * 2)), *of = zalloc((size_t)(N * ng * 2));
        for (int64_t i = 0; i < N * ng; i++) {
            sc[i] = f2h(0.001f + 0.01f * (float)rand() / RAND_MAX);
            of[i] = f2h(-0.5f * (float)rand() / RAND_MAX);
        }
        for (int mi = 0; mi < nM; mi++) {
            const int M = Ms[mi];
            float *x = zalloc((size_t)(M * K * 4)), *yr = zalloc((size_t)(M * N * 4)), *yv = zalloc((size_t)(M * N * 4));
            for (int64_t i = 0; i < M * K; i++) x[i] = (float)(rand() % 20001 - 10000) / 5000.0f;
            double scale = 0.0; /* float-rounding scale of the outputs */
            for (int m = 0; m < M; m++)
                for (int64_t n = 0; n < N; n++) {
                    double t = 0.0;
                    for (int64_t j = 0; j < K; j++)
                        t += fabs(x[m * K + j]) * (fabs(bd_half_to_float(of[n * ng + j / G])) + bd_half_to_float(sc[n * ng + j / G]) * (1 << B));
                    scale = fmax(scale, t);
                }
            for (int k = 1; k <= B; k++) {
                bd_gemv a;
                memset(&a, 0, sizeof a);
                a.planes = pl; a.scales = sc; a.offsets = of;
                a.N = N; a.K = K; a.RB = RB; a.ng = ng; a.pstride = N * RB;
                a.G = G; a.log2G = __builtin_ctz((unsigned)G); a.B = B; a.k = k;
                a.L = (float)(1 << (B - k)); a.h = (a.L - 1) / 2; a.cmid = (float)(1 << (k - 1)); a.hmid = a.h + a.L * a.cmid;
                a.M = M; a.x = x; a.QB = G % 64 ? 32 : 64; a.Kp = (K + 63) / 64 * 64; a.nu = a.Kp / a.QB;
                a.nu_pad = (a.nu + 15) / 16 * 16 + 16; a.ng_pad = (ng + 15) / 16 * 16 + 16;
                a.xq = zalloc((size_t)(M * a.Kp)); a.dx = zalloc((size_t)(M * a.nu_pad * 4));
                a.qs = zalloc((size_t)(M * a.nu_pad * 4)); a.xs = zalloc((size_t)(M * a.ng_pad * 4));
                a.dxv = zalloc((size_t)(M * a.Kp * 4));
                a.y = yr;
                bd_isa_ref.prepare(&a);
                bd_isa_ref.rows(&a, 0, N);
                for (int v = 0; v < NISA; v++) {
                    for (int64_t i = 0; i < M * N; i++) yv[i] = NAN;
                    a.y = yv;
                    ISAS[v]->prepare(&a);
                    ISAS[v]->rows(&a, 0, N);
                    cases++;
                    for (int64_t i = 0; i < M * N; i++) {
                        const double e = fabs((double)yv[i] - yr[i]) / scale;
                        if (!(e <= 1e-6)) {
                            if (fails < 10)
                                printf("FAIL %s K=%ld N=%ld G=%d B=%d k=%d M=%d out=%ld ref=%g got=%g\n", ISAS[v]->name,
                                       (long)K, (long)N, G, B, k, M, (long)i, yr[i], yv[i]);
                            fails++;
                            break;
                        }
                        if (e > worst) worst = e;
                    }
                }
                free(a.xq); free(a.dx); free(a.qs); free(a.xs); free(a.dxv);
            }
            free(x); free(yr); free(yv);
        }
        free(pl); free(sc); free(of);
    }
    printf("%d cases, %d failures, worst difference %.2e of the rounding scale\n", cases, fails, worst);
    return fails != 0;
}
