/* A small thread pool for the GEMV kernels (plain pthreads, so no clash with torch's OpenMP runtime).
 *
 * n - 1 helper threads plus the calling thread. A job is published by bumping a generation counter;
 * helpers spin on it for a short while (so back-to-back GEMVs of a decode step cost well under a
 * microsecond to dispatch), yielding the CPU now and then, and after `spin_us` microseconds without
 * work they sleep on a futex (Linux) or condition variable until the next job. bd_pool_run jobs (work
 * taken from a shared counter) are joined by the helpers that arrive before the caller has finished its
 * own share; the caller waits only for those, so a helper whose core another process holds delays no job.
 * bd_pool_run_all jobs (static splits by tid) wait for every helper.
 */
#include "pool.h"

#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BD_USE_FUTEX 1
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() ((void)0)
#endif

static struct {
    pthread_t th[BD_POOL_MAX];
    int nworkers;              /* helper threads running */
    int want;                  /* threads requested (helpers + caller) */
    _Atomic uint32_t gen;      /* job generation */
    _Atomic int pending;       /* helpers still running the current job (bd_pool_run_all) */
    _Atomic uint64_t state;    /* gen << 32 | CLOSED | ALL | helpers that joined (bd_pool_run) */
    _Atomic int finished;      /* bd_pool_run: joined helpers done */
    _Atomic int quit;
    _Atomic int sleepers;
    bd_task fn;
    void *ctx;
    long spin_ns;
#ifndef BD_USE_FUTEX
    pthread_mutex_t mu;
    pthread_cond_t cv;
#endif
} P = {.want = 1, .spin_ns = 200000
#ifndef BD_USE_FUTEX
       , .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER
#endif
};

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Sleep until P.gen != seen (returns at once if it already changed). */
static void wait_gen(uint32_t seen) {
    atomic_fetch_add(&P.sleepers, 1);
#ifdef BD_USE_FUTEX
    while (atomic_load(&P.gen) == seen) syscall(SYS_futex, (uint32_t *)&P.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    pthread_mutex_lock(&P.mu);
    while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
    pthread_mutex_unlock(&P.mu);
#endif
    atomic_fetch_sub(&P.sleepers, 1);
}

static void wake_all(void) {
    if (atomic_load(&P.sleepers) == 0) return;
#ifdef BD_USE_FUTEX
    syscall(SYS_futex, (uint32_t *)&P.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
#endif
}

#define CLOSED ((uint64_t)1 << 31)
#define ALL ((uint64_t)1 << 30)

typedef struct { int tid; uint32_t gen0; } worker_arg;
static worker_arg ARGS[BD_POOL_MAX];

static void *worker(void *arg_) {
    const worker_arg *arg = arg_;
    const int tid = arg->tid;
    uint32_t seen = arg->gen0;
    for (;;) {
        uint32_t g;
        long t0 = now_ns();
        unsigned it = 0;
        while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if ((++it & 255) == 0) {
                long dt = now_ns() - t0;
                if (dt > P.spin_ns) {
                    wait_gen(seen);
                    t0 = now_ns();
                } else if (dt > 20000) {
                    sched_yield(); /* let a runnable thread (e.g. torch's) have this core */
                }
            }
        }
        seen = g;
        if (atomic_load(&P.quit)) return NULL;
        uint64_t s = atomic_load(&P.state);
        if ((uint32_t)(s >> 32) != g) continue; /* already replaced by a newer job: the loop sees that one */
        if (s & ALL) { /* bd_pool_run_all: every thread, and the caller waits for each */
            P.fn(P.ctx, tid, P.nworkers + 1);
            atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
            continue;
        }
        /* join the job unless the caller has closed it */
        int joined = 0;
        while ((uint32_t)(s >> 32) == g && !(s & CLOSED)) {
            if (atomic_compare_exchange_weak(&P.state, &s, s + 1)) {
                joined = 1;
                break;
            }
        }
        if (!joined) continue;
        P.fn(P.ctx, tid, P.nworkers + 1);
        atomic_fetch_add_explicit(&P.finished, 1, memory_order_release);
    }
}

static void stop_workers(void) {
    if (!P.nworkers) return;
    atomic_store(&P.quit, 1);
    atomic_fetch_add(&P.gen, 1);
    wake_all();
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.th[i], NULL);
    P.nworkers = 0;
    atomic_store(&P.quit, 0);
}

static int start_workers(int n) {
    uint32_t g = atomic_load(&P.gen);
    for (int i = 0; i < n; i++) {
        ARGS[i].tid = i + 1;
        ARGS[i].gen0 = g;
        if (pthread_create(&P.th[i], NULL, worker, &ARGS[i]) != 0) return i;
        P.nworkers = i + 1;
    }
    return n;
}

/* After fork() only the forking thread exists in the child: forget the helpers, restart them lazily. */
static void after_fork_child(void) {
    P.nworkers = 0;
    atomic_store(&P.pending, 0);
    atomic_store(&P.quit, 0);
    atomic_store(&P.sleepers, 0);
}

static pthread_once_t ONCE = PTHREAD_ONCE_INIT;
static void init_once(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int bd_pool_set_threads(int n) {
    pthread_once(&ONCE, init_once);
    if (n < 1) n = 1;
    if (n > BD_POOL_MAX) n = BD_POOL_MAX;
    stop_workers();
    P.want = n;
    return 1 + start_workers(n - 1);
}

int bd_pool_threads(void) { return P.want; }

void bd_pool_set_spin_us(long us) { P.spin_ns = us < 0 ? 0 : us * 1000L; }

/* Common start of a job: helpers running, fn/ctx published to them; a single thread runs fn at once. */
static int begin_job(bd_task fn, void *ctx) {
    pthread_once(&ONCE, init_once);
    if (P.nworkers + 1 < P.want) start_workers(P.want - 1 - P.nworkers); /* e.g. after fork */
    const int nth = P.nworkers + 1;
    if (nth == 1) {
        fn(ctx, 0, 1);
        return 1;
    }
    P.fn = fn;
    P.ctx = ctx;
    return nth;
}

/* A job whose task takes its work from a shared counter: helpers that have not joined by the time the
 * caller has finished its own share are left out (their core may be held by another process: waiting for
 * them would stall every job of a decode step). The caller then waits only for the helpers that joined. */
int bd_pool_run(bd_task fn, void *ctx) {
    const int nth = begin_job(fn, ctx);
    if (nth == 1) return 1;
    atomic_store(&P.finished, 0);
    const uint32_t g = atomic_load(&P.gen) + 1;
    atomic_store(&P.state, (uint64_t)g << 32);
    atomic_store(&P.gen, g); /* seq_cst: publishes fn/ctx/state, ordered before the sleepers check */
    wake_all();
    fn(ctx, 0, nth);
    const uint64_t s = atomic_fetch_or(&P.state, CLOSED);
    const int joined = (int)(s & (ALL - 1));
    unsigned it = 0;
    while (atomic_load_explicit(&P.finished, memory_order_acquire) < joined) {
        cpu_relax();
        if ((++it & 4095) == 0) sched_yield();
    }
    return 1 + joined;
}

/* A job that needs every thread (a static split by tid): waits for all helpers. */
int bd_pool_run_all(bd_task fn, void *ctx) {
    const int nth = begin_job(fn, ctx);
    if (nth == 1) return 1;
    atomic_store(&P.pending, nth - 1);
    const uint32_t g = atomic_load(&P.gen) + 1;
    atomic_store(&P.state, ((uint64_t)g << 32) | ALL);
    atomic_store(&P.gen, g); /* seq_cst: publishes fn/ctx/state, ordered before the sleepers check */
    wake_all();
    fn(ctx, 0, nth);
    unsigned it = 0;
    while (atomic_load_explicit(&P.pending, memory_order_acquire) > 0) {
        cpu_relax();
        if ((++it & 4095) == 0) sched_yield(); /* a helper was descheduled: give it the core */
    }
    return nth;
}
