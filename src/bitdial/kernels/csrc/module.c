/* bitdial.kernels._native: the CPython module, the ISA dispatcher and the GEMV driver.
 *
 * Arguments are plain integers (tensor.data_ptr(), sizes) so that no torch header is needed; the
 * Python wrapper (bitdial/kernels/__init__.py) validates dtypes, shapes and contiguity. Calls release
 * the GIL and are serialized by a mutex (the activation scratch and the thread pool are shared).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#include <stdlib.h>

#include "bitdial_kernels.h"
#include "pool.h"
#include "decode.h"
#include "dequant.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

/* ---- ISA table: preference order ------------------------------------------------------------- */

typedef struct {
    const char *name;    /* family, the BITDIAL_ISA value: avx512, avx2, neon, ref */
    const char *variant; /* kernel design within the family */
    const bd_isa *ops;
    int (*supported)(void);
} isa_entry;

static int always(void) { return 1; }

#if defined(__x86_64__) || defined(_M_X64)
static int has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
static int has_avx512_gfni(void) {
    return has_avx512() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
}
static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
}
#endif
#if defined(__aarch64__)
#ifdef BITDIAL_HAVE_NEON_DOT
static int has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    return 1; /* every Apple arm64 CPU has the dot product extension */
#else
    return 0;
#endif
}
#endif
#endif

/* Preference order: the first supported entry of a family is what that family name selects. */
static const isa_entry ISAS[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {"avx512", "avx512-gfni", &bd_isa_avx512_gfni, has_avx512_gfni}, /* + VBMI, GFNI: bit-matrix transpose */
    {"avx512", "avx512-mask", &bd_isa_avx512, has_avx512},           /* F, BW, VL, VNNI: mask registers */
    {"avx2", "avx2", &bd_isa_avx2, has_avx2},
#endif
#if defined(__aarch64__)
#ifdef BITDIAL_HAVE_NEON_DOT
    {"neon", "neon-dot", &bd_isa_neon_dot, has_dotprod},
#endif
    {"neon", "neon", &bd_isa_neon, always},
#endif
    {"ref", "ref", &bd_isa_ref, always},
};
#define NISA ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

static int ISA_OK[NISA];
static int DEFAULT_ISA = -1;

static pthread_mutex_t CALL_LOCK = PTHREAD_MUTEX_INITIALIZER;

/* ---- activation scratch (grows, never shrinks; only touched under CALL_LOCK) ------------------- */

static void *SCRATCH = NULL;
static size_t SCRATCH_CAP = 0;

static size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

static int reserve_scratch(size_t need) {
    if (need <= SCRATCH_CAP) return 0;
    void *p = NULL;
    need = round_up(need + need / 4, 4096);
    if (posix_memalign(&p, 64, need) != 0) return -1;
    free(SCRATCH);
    SCRATCH = p;
    SCRATCH_CAP = need;
    return 0;
}

/* Lay out the scratch for a call (64-byte aligned pieces); returns the bytes needed if SCRATCH is NULL. */
static size_t layout_scratch(bd_gemv *a, char *base) {
    size_t off = 0;
    a->xq = (int8_t *)(base + off);
    off += round_up((size_t)a->M * a->Kp, 64);
    a->dx = (float *)(base + off);
    off += round_up((size_t)a->M * a->nu_pad * 4, 64);
    a->qs = (float *)(base + off);
    off += round_up((size_t)a->M * a->nu_pad * 4, 64);
    a->xs = (float *)(base + off);
    off += round_up((size_t)a->M * a->ng_pad * 4, 64);
    a->dxv = (float *)(base + off);
    off += (size_t)a->M * (a->Kp / 64) * 64;
    a->dxt = (float *)(base + off);
    off += round_up((size_t)a->nu_pad * a->Mp * 4, 64) + 64;
    return off;
}

/* ---- driver --------------------------------------------------------------------------------- */

typedef struct {
    const bd_gemv *a;
    const bd_isa *isa;
    int64_t step;            /* rows per grab (a multiple of 4, the decode row tile) */
    _Atomic int64_t next;    /* first row not yet taken */
} gemv_job;

/* Rows are handed out in slices of `step` from a shared counter rather than split in fixed shares:
 * on a CPU shared with other processes, a thread that gets descheduled only delays its current
 * slice, the others take the rest. */
static void gemv_task(void *ctx, int tid, int nth) {
    (void)tid; (void)nth;
    gemv_job *j = ctx;
    const int64_t N = j->a->N;
    for (;;) {
        const int64_t n0 = atomic_fetch_add_explicit(&j->next, j->step, memory_order_relaxed);
        if (n0 >= N) break;
        j->isa->rows(j->a, n0, n0 + j->step < N ? n0 + j->step : N);
    }
}

/* Work below this many plane bytes runs on the calling thread only (a wake-up costs more). */
#define PARALLEL_MIN_BYTES (48 * 1024)

static int log2_exact(int64_t v) {
    int l = 0;
    while (((int64_t)1 << l) < v) l++;
    return ((int64_t)1 << l) == v ? l : -1;
}

/* Read exactly n integer arguments into v (TypeError naming `usage` otherwise). Returns 0 on success. */
static int int_args(PyObject *const *args, Py_ssize_t nargs, int n, long long *v, const char *usage) {
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s takes %d ints", usage, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static PyObject *py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long v[13];
    if (int_args(args, nargs, 13, v, "gemv(planes, scales, offsets, x, y, N, K, G, B, k, M, isa, pstride)")) return NULL;
    bd_gemv a;
    memset(&a, 0, sizeof a);
    a.planes = (const uint8_t *)(uintptr_t)v[0];
    a.scales = (const uint16_t *)(uintptr_t)v[1];
    a.offsets = (const uint16_t *)(uintptr_t)v[2];
    a.x = (const float *)(uintptr_t)v[3];
    a.y = (float *)(uintptr_t)v[4];
    a.N = v[5];
    a.K = v[6];
    a.G = (int)v[7];
    a.B = (int)v[8];
    a.k = (int)v[9];
    a.M = (int)v[10];
    int isa = (int)v[11];
    if (!a.planes || !a.scales || !a.offsets || !a.x || !a.y) {
        PyErr_SetString(PyExc_ValueError, "gemv: null data pointer");
        return NULL;
    }
    if (a.N < 1 || a.K < 1 || a.M < 1 || a.B < 1 || a.B > 8 || a.k < 1 || a.k > a.B) {
        PyErr_Format(PyExc_ValueError, "gemv: bad sizes N=%lld K=%lld M=%lld B=%lld k=%lld", v[5], v[6], v[10], v[8], v[9]);
        return NULL;
    }
    a.log2G = log2_exact(v[7]);
    if (v[7] < 32 || a.log2G < 0) {
        PyErr_Format(PyExc_ValueError, "gemv: group size %lld is not a power of two >= 32", v[7]);
        return NULL;
    }
    if (isa < 0) isa = DEFAULT_ISA;
    if (isa >= NISA || !ISA_OK[isa]) {
        PyErr_Format(PyExc_ValueError, "gemv: ISA #%d is not available on this CPU", isa);
        return NULL;
    }
    a.RB = (a.K + 7) / 8;
    a.ng = (a.K + a.G - 1) / a.G;
    a.pstride = v[12] ? v[12] : a.N * a.RB; /* bytes between planes (0: contiguous planes) */
    if (a.pstride < a.N * a.RB) {
        PyErr_Format(PyExc_ValueError, "gemv: plane stride %lld is below N * ceil(K / 8) = %lld", v[12], (long long)(a.N * a.RB));
        return NULL;
    }
    a.L = (float)(1 << (a.B - a.k));
    a.h = (a.L - 1.0f) * 0.5f;
    a.cmid = (float)(1 << (a.k - 1));
    a.hmid = a.h + a.L * a.cmid;
    a.QB = a.G % 64 == 0 ? 64 : 32;
    a.Kp = (int64_t)round_up((size_t)a.K, 64);
    a.nu = a.Kp / a.QB;
    a.nu_pad = (int64_t)round_up((size_t)a.nu, 16) + 16;
    a.ng_pad = (int64_t)round_up((size_t)a.ng, 16) + 16;
    a.Mp = (int64_t)round_up((size_t)a.M, 16);

    const bd_isa *ops = ISAS[isa].ops;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&CALL_LOCK);
    if (reserve_scratch(layout_scratch(&a, NULL) + 64) != 0) {
        err = 1;
    } else {
        layout_scratch(&a, (char *)SCRATCH);
        ops->prepare(&a);
        gemv_job job;
        job.a = &a;
        job.isa = ops;
        atomic_init(&job.next, 0);
        if ((int64_t)a.k * a.N * a.RB * (a.M > 1 ? 2 : 1) < PARALLEL_MIN_BYTES || a.N < 8) {
            ops->rows(&a, 0, a.N);
        } else {
            /* ~8 slices per thread, at least 16 rows (and 32 KiB of planes) each */
            const int nth = bd_pool_threads();
            int64_t step = a.N / ((int64_t)nth * 8);
            const int64_t min_rows = 32768 / ((int64_t)a.k * a.RB) + 1;
            if (step < min_rows) step = min_rows;
            if (step < 16) step = 16;
            job.step = (step + 3) & ~(int64_t)3;
            bd_pool_run(gemv_task, &job);
        }
    }
    pthread_mutex_unlock(&CALL_LOCK);
    Py_END_ALLOW_THREADS
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- bandwidth probe -------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t n;
    const bd_isa *isa;
    uint64_t part[BD_POOL_MAX];
} sum_job;

static void sum_task(void *ctx, int tid, int nth) {
    sum_job *j = ctx;
    size_t per = j->n / (size_t)nth / 256 * 256;
    size_t a = per * (size_t)tid, b = tid == nth - 1 ? j->n : a + per;
    j->part[tid] = j->isa->sum_bytes(j->p + a, b - a);
}

static PyObject *py_sum_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "sum_bytes(ptr, nbytes, isa) takes 3 ints");
        return NULL;
    }
    uintptr_t p = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    long long n = PyLong_AsLongLong(args[1]);
    int isa = (int)PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (isa < 0) isa = DEFAULT_ISA;
    if (isa >= NISA || !ISA_OK[isa] || !p || (p & 63) || n < 0 || (n & 255)) {
        PyErr_SetString(PyExc_ValueError, "sum_bytes: needs a 64-byte aligned pointer, a multiple of 256 bytes and an available ISA");
        return NULL;
    }
    sum_job job;
    memset(&job, 0, sizeof job);
    job.p = (const uint8_t *)p;
    job.n = (size_t)n;
    job.isa = ISAS[isa].ops;
    int nth;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&CALL_LOCK);
    nth = bd_pool_run_all(sum_task, &job);
    pthread_mutex_unlock(&CALL_LOCK);
    Py_END_ALLOW_THREADS
    uint64_t s = 0;
    for (int i = 0; i < nth; i++) s += job.part[i];
    return PyLong_FromUnsignedLongLong(s);
}

/* ---- dynamic precision: the per-token error estimate (bitdial.policies.dynamic) ------------------ */

/* e = a*||G x|| + c*||x|| + b  (G: fp32 [k, K] row-major, or none: e = a*||x|| + b).
   Plain C: one row of K floats and a k x K matrix at most; -O3 vectorizes the loops for the baseline ISA. */
static double dyn_estimate(const float *x, int64_t K, const float *G, int64_t k, double a, double c, double b) {
    float nx = 0.f;
    for (int64_t j = 0; j < K; j++) nx += x[j] * x[j];
    double n = sqrt((double)nx);
    if (!G) return a * n + b;
    double g2 = 0.0;
    for (int64_t r = 0; r < k; r++) {
        const float *row = G + r * K;
        float acc = 0.f;
        for (int64_t j = 0; j < K; j++) acc += row[j] * x[j];
        g2 += (double)acc * acc;
    }
    return a * sqrt(g2) + c * n + b;
}

static PyObject *py_dyn_estimate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "dyn_estimate(x_ptr, K, G_ptr, k, a, c, b) takes 7 arguments");
        return NULL;
    }
    uintptr_t xp = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    long long K = PyLong_AsLongLong(args[1]);
    uintptr_t gp = (uintptr_t)PyLong_AsUnsignedLongLong(args[2]);
    long long k = PyLong_AsLongLong(args[3]);
    double a = PyFloat_AsDouble(args[4]), c = PyFloat_AsDouble(args[5]), b = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (!xp || K < 1 || (gp && k < 1)) {
        PyErr_SetString(PyExc_ValueError, "dyn_estimate: needs a row pointer, K >= 1 and k >= 1 with a matrix");
        return NULL;
    }
    return PyFloat_FromDouble(dyn_estimate((const float *)xp, K, (const float *)gp, k, a, c, b));
}

/* ---- the fused decode step (decode.c) ----------------------------------------------------------- */

static void decoder_capsule_free(PyObject *cap) {
    bd_decoder_free((bd_decoder *)PyCapsule_GetPointer(cap, "bitdial.decoder"));
}

static PyObject *py_decoder_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long v[3];
    if (int_args(args, nargs, 3, v, "decoder_new(desc_ptr, n, isa)")) return NULL;
    const uintptr_t dp = (uintptr_t)v[0];
    const long long n = v[1];
    int isa = (int)v[2];
    if (isa < 0) isa = DEFAULT_ISA;
    if (!dp || isa >= NISA || !ISA_OK[isa]) {
        PyErr_SetString(PyExc_ValueError, "decoder_new: null descriptor or unavailable ISA");
        return NULL;
    }
    const char *err = NULL;
    bd_decoder *d = bd_decoder_new((const int64_t *)dp, n, ISAS[isa].ops, &err);
    if (!d) {
        PyErr_Format(PyExc_ValueError, "decoder_new: %s", err ? err : "failed");
        return NULL;
    }
    return PyCapsule_New(d, "bitdial.decoder", decoder_capsule_free);
}

static PyObject *py_decoder_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "decoder_step(decoder, token, pos, logits_ptr) takes 4 arguments");
        return NULL;
    }
    bd_decoder *d = (bd_decoder *)PyCapsule_GetPointer(args[0], "bitdial.decoder");
    if (!d) return NULL;
    long long tok = PyLong_AsLongLong(args[1]), pos = PyLong_AsLongLong(args[2]);
    uintptr_t lp = (uintptr_t)PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (pos < 0 || pos >= d->S_max || tok < 0 || tok >= d->lin[7 * d->L + 1].N || !lp) {
        PyErr_Format(PyExc_ValueError, "decoder_step: token %lld or position %lld out of range (cache holds %lld)",
                     tok, pos, (long long)d->S_max);
        return NULL;
    }
    for (int i = 0; i < 7 * d->L + 2; i++) {
        const int k = d->bits[i];
        if (d->lin[i].B && (k < 1 || k > d->lin[i].B)) {
            PyErr_Format(PyExc_ValueError, "decoder_step: slot %d has %d bits (stores 1..%d)", i, k, d->lin[i].B);
            return NULL;
        }
    }
    double wb;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&CALL_LOCK);
#if defined(__x86_64__) || defined(_M_X64)
    if (strcmp(d->isa->name, "avx512") == 0)
        wb = bd_decode_step_avx512(d, tok, pos, (float *)lp);
    else if (strcmp(d->isa->name, "avx2") == 0)
        wb = bd_decode_step_avx2(d, tok, pos, (float *)lp);
    else
#endif
        wb = bd_decode_step(d, tok, pos, (float *)lp);
    pthread_mutex_unlock(&CALL_LOCK);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(wb);
}

static PyObject *py_decoder_stats(PyObject *self, PyObject *arg) {
    (void)self;
    bd_decoder *d = (bd_decoder *)PyCapsule_GetPointer(arg, "bitdial.decoder");
    if (!d) return NULL;
    const int64_t *t = d->t_part_ns;
    PyObject *r = Py_BuildValue("(LLL(LLLLL)LLL)", (long long)d->n_steps, (long long)d->t_total_ns,
                                (long long)d->t_gemv_ns, (long long)t[BD_PART_QKV], (long long)t[BD_PART_O],
                                (long long)t[BD_PART_GATE_UP], (long long)t[BD_PART_DOWN], (long long)t[BD_PART_HEAD],
                                (long long)d->t_prep_ns, (long long)d->t_est_ns, (long long)d->n_bytes);
    d->n_steps = d->t_total_ns = d->t_gemv_ns = d->t_prep_ns = d->t_est_ns = d->n_bytes = 0;
    memset(d->t_part_ns, 0, sizeof d->t_part_ns);
    return r;
}

/* ---- prefill: dequantize a row range of a k-bit view (dequant.c) ---------------------------------- */

typedef struct {
    const bd_dequant *a;
    int64_t n0, n1, step;
    void (*rows)(const bd_dequant *, int64_t, int64_t);
    _Atomic int64_t next;
} dq_job;

static void (*dequant_impl(void))(const bd_dequant *, int64_t, int64_t) {
#if defined(__x86_64__) || defined(_M_X64)
    if (strcmp(ISAS[DEFAULT_ISA].name, "avx512") == 0) return bd_dequant_rows_avx512;
    if (strcmp(ISAS[DEFAULT_ISA].name, "avx2") == 0) return bd_dequant_rows_avx2;
#endif
    return bd_dequant_rows;
}

static void dq_task(void *ctx, int tid, int nth) {
    (void)tid; (void)nth;
    dq_job *j = ctx;
    for (;;) {
        const int64_t r = atomic_fetch_add_explicit(&j->next, j->step, memory_order_relaxed) + j->n0;
        if (r >= j->n1) break;
        j->rows(j->a, r, r + j->step < j->n1 ? r + j->step : j->n1);
    }
}

static PyObject *py_dequant(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long v[13];
    if (int_args(args, nargs, 13, v, "dequant(planes, scales, offsets, N, K, G, B, k, n0, n1, out, bf16, pstride)")) return NULL;
    bd_dequant a;
    a.planes = (const uint8_t *)(uintptr_t)v[0];
    a.scales = (const uint16_t *)(uintptr_t)v[1];
    a.offsets = (const uint16_t *)(uintptr_t)v[2];
    a.N = v[3]; a.K = v[4]; a.G = (int)v[5]; a.B = (int)v[6]; a.k = (int)v[7];
    const int64_t n0 = v[8], n1 = v[9];
    a.out = (void *)(uintptr_t)v[10];
    a.bf16 = v[11] != 0;
    a.row0 = n0;
    a.pstride = v[12] ? v[12] : a.N * ((a.K + 7) / 8);
    if (a.pstride < a.N * ((a.K + 7) / 8)) {
        PyErr_SetString(PyExc_ValueError, "dequant: plane stride below N * ceil(K / 8)");
        return NULL;
    }
    if (!a.planes || !a.scales || !a.offsets || !a.out || a.N < 1 || a.K < 1 || a.B < 1 || a.B > 8 || a.k < 1 ||
        a.k > a.B || a.G < 32 || a.G % 32 || n0 < 0 || n1 > a.N || n0 >= n1) {
        PyErr_SetString(PyExc_ValueError, "dequant: bad pointers, sizes, widths or row range");
        return NULL;
    }
    dq_job j;
    j.a = &a;
    j.n0 = n0;
    j.n1 = n1;
    j.rows = dequant_impl();
    atomic_init(&j.next, 0);
    const int64_t rows = n1 - n0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&CALL_LOCK);
    if (rows * a.K < 65536 || bd_pool_threads() == 1) {
        j.rows(&a, n0, n1);
    } else {
        int64_t step = rows / ((int64_t)bd_pool_threads() * 4);
        j.step = step < 8 ? 8 : step;
        bd_pool_run(dq_task, &j);
    }
    pthread_mutex_unlock(&CALL_LOCK);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- configuration ---------------------------------------------------------------------------- */

static PyObject *py_isas(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    /* ((family, variant, supported), ...) in preference order */
    PyObject *t = PyTuple_New(NISA);
    if (!t) return NULL;
    for (int i = 0; i < NISA; i++)
        PyTuple_SET_ITEM(t, i, Py_BuildValue("(ssO)", ISAS[i].name, ISAS[i].variant, ISA_OK[i] ? Py_True : Py_False));
    return t;
}

/* Index of the first supported entry whose family or variant is `name`. */
static PyObject *py_isa_id(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int known = 0;
    for (int i = 0; i < NISA; i++) {
        if (strcmp(ISAS[i].name, name) != 0 && strcmp(ISAS[i].variant, name) != 0) continue;
        known = 1;
        if (ISA_OK[i]) return PyLong_FromLong(i);
    }
    PyErr_Format(PyExc_ValueError, known ? "ISA %R is not supported by this CPU" : "ISA %R was not compiled into this build", arg);
    return NULL;
}

static PyObject *py_default_isa(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return Py_BuildValue("(iss)", DEFAULT_ISA, ISAS[DEFAULT_ISA].name, ISAS[DEFAULT_ISA].variant);
}

static PyObject *py_set_default_isa(PyObject *self, PyObject *arg) {
    PyObject *id = py_isa_id(self, arg);
    if (!id) return NULL;
    DEFAULT_ISA = (int)PyLong_AsLong(id);
    Py_DECREF(id);
    Py_RETURN_NONE;
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    int got;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&CALL_LOCK);
    got = bd_pool_set_threads((int)n);
    pthread_mutex_unlock(&CALL_LOCK);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(got);
}

static PyObject *py_threads(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLong(bd_pool_threads());
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
    bd_pool_set_spin_us(us);
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"gemv", (PyCFunction)(void (*)(void))py_gemv, METH_FASTCALL,
     "gemv(planes, scales, offsets, x, y, N, K, G, B, k, M, isa): y[M,N] = x[M,K] @ W_k^T (pointers as ints; isa -1 = default)"},
    {"sum_bytes", (PyCFunction)(void (*)(void))py_sum_bytes, METH_FASTCALL,
     "sum_bytes(ptr, nbytes, isa): reduce a buffer on the thread pool (read-bandwidth probe); returns a checksum"},
    {"dyn_estimate", (PyCFunction)(void (*)(void))py_dyn_estimate, METH_FASTCALL,
     "dyn_estimate(x_ptr, K, G_ptr or 0, k, a, c, b): a*||G x|| + c*||x|| + b for one fp32 row (G fp32 [k, K])"},
    {"decoder_new", (PyCFunction)(void (*)(void))py_decoder_new, METH_FASTCALL,
     "decoder_new(desc_ptr, n, isa): a fused decoder from an int64 descriptor (see csrc/decode.h)"},
    {"decoder_step", (PyCFunction)(void (*)(void))py_decoder_step, METH_FASTCALL,
     "decoder_step(decoder, token, pos, logits_ptr) -> sum of weights x bits: one token through the decoder"},
    {"decoder_stats", py_decoder_stats, METH_O,
     "decoder_stats(decoder) -> (steps, ns in steps, ns in GEMV jobs, (ns in q/k/v, o, gate/up, down, head jobs), "
     "ns quantizing activations, ns in dynamic estimates, plane + scale bytes read) since the last call (resets them)"},
    {"dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL,
     "dequant(planes, scales, offsets, N, K, G, B, k, n0, n1, out_ptr, bf16, pstride): rows n0..n1 of the k-bit view"},
    {"isas", py_isas, METH_NOARGS, "((family, variant, supported), ...) in preference order"},
    {"isa_id", py_isa_id, METH_O, "isa_id(family or variant) -> index of the best supported entry (ValueError if none)"},
    {"default_isa", py_default_isa, METH_NOARGS, "(index, family, variant) of the ISA used when isa = -1"},
    {"set_default_isa", py_set_default_isa, METH_O, "set_default_isa(name)"},
    {"set_threads", py_set_threads, METH_O, "set_threads(n) -> threads running (caller included)"},
    {"threads", py_threads, METH_NOARGS, "threads used per call (caller included)"},
    {"set_spin_us", py_set_spin_us, METH_O, "microseconds idle helpers spin before sleeping"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", "bitdial native GEMV kernels", -1, METHODS,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    for (int i = 0; i < NISA; i++) {
        ISA_OK[i] = ISAS[i].supported();
        if (ISA_OK[i] && DEFAULT_ISA < 0) DEFAULT_ISA = i;
    }
    return PyModule_Create(&MODULE);
}
