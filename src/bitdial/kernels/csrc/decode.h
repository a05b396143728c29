/* The fused decode step (decode.c): one token through every layer of the decoder in one call.
 *
 * Descriptor (int64 array, built by bitdial/runtime/fused.py; pointers are data_ptr() values):
 *   [0 .. DESC_HEAD)                      model: DESC_* below
 *   then L x DESC_PER_LAYER               attn_norm, ffn_norm, q_norm (0 = none), k_norm (0 = none),
 *                                         k cache, v cache (fp32 [Hk, S_max, Hd] of sequence 0)
 *   then (7L + 2) x DESC_PER_LIN          planes, scales, offsets, bias (0 = none), N, K, G, B,
 *                                         plane stride in bytes (0 = N * ceil(K / 8))
 *                                         for slots 7l+j (q,k,v,o,gate,up,down), 7L = lm_head, 7L+1 = embedding;
 *                                         B = 0: a dense fp32 weight [N, K] at `planes` (the fp32 decoder)
 * Shared arrays (owned by Python, read or written at every step):
 *   bits   int32 [7L + 2]                 static width of each slot
 *   chosen uint8 [7L + 2]                 width each slot ran at in the last step
 *   n_high int64 [7L + 2]                 steps at the high width (dynamic slots), counted up
 *   rules  float64 [7L + 2, BD_RULE_COLS] dynamic rule of each slot (on = 0: static width)
 *   gptr   int64 [7L + 2, 3]              (G pointer or 0, k, format BD_G_*) of each slot's estimator G [k, K]:
 *                                         fp32; fp16 (fp16-exact values: half the bytes); or int8: k rows of K codes
 *                                         q, then at bd_g_int8_scales_offset(k, K) bytes k fp32 row scales 2^e, for
 *                                         G = q * 2^e as calibrate stores it (a quarter of the fp32 bytes)
 */
#ifndef BITDIAL_DECODE_H
#define BITDIAL_DECODE_H

#include <stdint.h>

#include "bitdial_kernels.h"

enum {
    DESC_L, DESC_D, DESC_H, DESC_HK, DESC_HD, DESC_F, DESC_SMAX, DESC_EPS_BITS, DESC_COS, DESC_SIN,
    DESC_FINAL_NORM, DESC_BITS, DESC_CHOSEN, DESC_NHIGH, DESC_RULES, DESC_GPTR,
    DESC_HEAD
};
#define DESC_PER_LAYER 6
#define DESC_PER_LIN 9

enum { BD_G_FP32 = 0, BD_G_FP16 = 1, BD_G_INT8 = 2 };

/* byte offset of the row scales after the k x K int8 codes of an int8 G (64-byte aligned) */
static inline int64_t bd_g_int8_scales_offset(int64_t k, int64_t K) { return (k * K + 63) / 64 * 64; }

enum { BD_RULE_ON, BD_RULE_LOW, BD_RULE_HIGH, BD_RULE_THRESHOLD, BD_RULE_A, BD_RULE_C, BD_RULE_B, BD_RULE_COLS };

typedef struct {
    const uint8_t *planes;
    const uint16_t *scales, *offsets;
    const float *bias;
    int64_t N, K;
    int64_t pstride; /* bytes between planes */
    int G, log2G, B;
} bd_lin;

/* Parts of a decode step for the profile: the GEMV jobs of each layer (q/k/v, o, gate/up, down) and the
   output head. */
enum { BD_PART_QKV, BD_PART_O, BD_PART_GATE_UP, BD_PART_DOWN, BD_PART_HEAD, BD_PARTS };

typedef struct {
    const bd_isa *isa;
    int L, D, H, Hk, Hd, F, n_dec;
    int64_t S_max;
    float eps;
    const float *cos, *sin, *final_norm;
    const float **attn_norm, **ffn_norm, **q_norm, **k_norm;
    float **kc, **vc;
    bd_lin *lin;
    int32_t *bits;
    uint8_t *chosen;
    int64_t *n_high;
    double *rules;
    int64_t *gptr;
    double wb; /* sum over the decoder linears of weights x bits in this step */
    int64_t n_steps, t_total_ns, t_gemv_ns; /* profile since the last reset: steps, time in steps, in GEMV jobs */
    int64_t t_part_ns[BD_PARTS];           /* ... GEMV job time by part (BD_PART_*), incl. activation quantization */
    int64_t t_prep_ns, t_est_ns, n_bytes;  /* ... of which quantizing activations, dynamic estimates; bytes read */
    char *act[3];
    float *x, *hb, *q, *kn, *vn, *att, *g, *u, *scores;
} bd_decoder;

bd_decoder *bd_decoder_new(const int64_t *desc, int64_t n, const bd_isa *isa, const char **err);
void bd_decoder_free(bd_decoder *d);
/* Runs token at position pos (the KV cache holds positions < pos); writes logits [V]; returns the
   step's sum of weights x bits over the decoder linears. Caller holds the kernel call lock. */
double bd_decode_step(bd_decoder *d, int64_t token, int64_t pos, float *logits);
#if defined(__x86_64__) || defined(_M_X64)
double bd_decode_step_avx512(bd_decoder *d, int64_t token, int64_t pos, float *logits); /* AVX-512 build */
double bd_decode_step_avx2(bd_decoder *d, int64_t token, int64_t pos, float *logits);   /* AVX2 build */
#endif

#endif
