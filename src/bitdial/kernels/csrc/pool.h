/* Thread pool used by the GEMV driver (see pool.c). Not reentrant: callers serialize jobs. */
#ifndef BITDIAL_POOL_H
#define BITDIAL_POOL_H

#define BD_POOL_MAX 64

/* A job: called once on every thread with tid = 0..nth-1 (tid 0 is the caller). */
typedef void (*bd_task)(void *ctx, int tid, int nth);

int bd_pool_set_threads(int n);   /* total threads incl. the caller; returns the number running */
int bd_pool_threads(void);
void bd_pool_set_spin_us(long us);
/* Tasks that take work from a shared counter: helpers that have not joined when the caller is done with
   its share are left out (returns the number of threads that took part). tid is unique per participant. */
int bd_pool_run(bd_task fn, void *ctx);
/* Tasks that split work statically by tid over nth threads: every thread runs it (returns nth). */
int bd_pool_run_all(bd_task fn, void *ctx);

#endif
