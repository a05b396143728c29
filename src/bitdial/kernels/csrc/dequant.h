/* Row-range dequantization of a k-bit view into fp32 or bf16 (dequant.c): the prefill path. */
#ifndef BITDIAL_DEQUANT_H
#define BITDIAL_DEQUANT_H

#include "bitdial_kernels.h"

typedef struct {
    const uint8_t *planes;    /* [B, N, RB] */
    const uint16_t *scales;   /* fp16 [N, ng] */
    const uint16_t *offsets;  /* fp16 [N, ng] */
    int64_t N, K;
    int64_t pstride;          /* bytes between planes (>= N * ceil(K / 8)) */
    int G, B, k;
    int bf16;                 /* 0: out is fp32, 1: out is bf16 (uint16 bits) */
    void *out;                /* [n1 - row0, K] row-major */
    int64_t row0;             /* the weight row that out's row 0 holds */
} bd_dequant;

/* Rows n0 <= n < n1 into out[(n - row0) * K ...]. G must be a multiple of 32. */
void bd_dequant_rows(const bd_dequant *a, int64_t n0, int64_t n1);
#if defined(__x86_64__) || defined(_M_X64)
void bd_dequant_rows_avx512(const bd_dequant *a, int64_t n0, int64_t n1); /* AVX-512 F/BW/VL build */
void bd_dequant_rows_avx2(const bd_dequant *a, int64_t n0, int64_t n1);   /* AVX2/FMA/F16C build */
#endif

#endif
