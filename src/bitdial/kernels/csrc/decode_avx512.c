/* decode.c compiled with AVX-512 flags (setup.py): the fused step's float loops 16 wide. */
#define BD_DECODE_VARIANT 1
#define BD_DECODE_STEP bd_decode_step_avx512
#include "decode.c"
