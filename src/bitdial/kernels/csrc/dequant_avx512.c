/* dequant.c compiled with AVX-512 flags (setup.py): the same code, its conversion loops 16 wide. */
#define DQ_NAME bd_dequant_rows_avx512
#include "dequant.c"
