/* dequant.c compiled with AVX2/FMA/F16C flags (setup.py): the same code, its conversion loops 8 wide. */
#define DQ_NAME bd_dequant_rows_avx2
#include "dequant.c"
