/* decode.c compiled with AVX2/FMA/F16C flags (setup.py): the fused step's float loops 8 wide. */
#define BD_DECODE_VARIANT 2
#define BD_DECODE_STEP bd_decode_step_avx2
#include "decode.c"
