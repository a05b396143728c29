/* The NEON path again, compiled with the dot-product extension (-march=armv8.2-a+dotprod): SDOT
 * replaces vmull_s8 + vpadal. Picked at run time when the CPU has it (module.c). */
#define BITDIAL_NEON_DOT 1
#include "gemv_neon.c"
