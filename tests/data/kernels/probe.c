/* Kernels that report what they see, for the L2 and L3 tests. */
#include <pthread.h>
#include <pto_kernel.h>
#include <time.h>

/* out (int64, >= 6 * block_num): block b writes, at 6*b: idx, num, rank, world, chip,
 * and what pto_barrier() returned. */
void where_am_i(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    int64_t *out = (int64_t *)args[0].data + 6 * pto_block_idx();
    out[0] = pto_block_idx();
    out[1] = pto_block_num();
    out[2] = pto_rank();
    out[3] = pto_world();
    out[4] = pto_chip_id();
    out[5] = pto_barrier();
}

/* Sleep args[0].scalar.i milliseconds in every block. */
void sleep_ms(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    struct timespec ts = {args[0].scalar.i / 1000, (args[0].scalar.i % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The last argument (int64, nargs long) receives every argument's data pointer. */
void pointers(const pto_arg *args, int32_t nargs) {
    int64_t *out = (int64_t *)args[nargs - 1].data;
    for (int32_t i = 0; i < nargs; i++) out[i] = (int64_t)(intptr_t)args[i].data;
}

/* out (int64, >= 8 * nargs) receives, per argument: kind, dtype, ndim, nbytes, shape[0],
 * shape[1], scalar.i, and the scalar as a float times 1000 (rounded). */
void describe(const pto_arg *args, int32_t nargs) {
    int64_t *out = (int64_t *)args[nargs - 1].data;
    for (int32_t i = 0; i < nargs; i++) {
        int64_t *o = out + 8 * i;
        o[0] = args[i].kind;
        o[1] = args[i].dtype;
        o[2] = args[i].ndim;
        o[3] = args[i].nbytes;
        o[4] = args[i].ndim > 0 ? args[i].shape[0] : -1;
        o[5] = args[i].ndim > 1 ? args[i].shape[1] : -1;
        o[6] = args[i].kind == PTO_SCALAR ? args[i].scalar.i : 0;
        o[7] = args[i].kind == PTO_SCALAR && args[i].dtype == PTO_FLOAT64
                   ? (int64_t)(args[i].scalar.f * 1000.0 + (args[i].scalar.f < 0 ? -0.5 : 0.5))
                   : 0;
    }
}

/* Fail block args[0].scalar.i (every block if it is -1) with a recognisable message. */
void fail_with(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    int64_t which = args[0].scalar.i;
    if (which == -1 || which == pto_block_idx())
        pto_fail("probe-3c1e: block %d refused value %lld", pto_block_idx(), (long long)which);
}

/* f16 -> f32 and f32 -> f16 through the header's converters (args: h in, f out, h2 out). */
void half_roundtrip(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    const pto_half *h = (const pto_half *)args[0].data;
    float *f = (float *)args[1].data;
    pto_half *back = (pto_half *)args[2].data;
    int64_t n = args[0].nbytes / 2;
    for (int64_t i = 0; i < n; i++) {
        f[i] = pto_half_to_float(h[i]);
        back[i] = pto_float_to_half(f[i] * 3.0f);
    }
}

/* A ticket per block, so the test can see how many threads ran blocks at once:
 * out[0] counts blocks, out[1] is the most that were running at the same time. */
static int64_t running;
void concurrency(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    int64_t *out = (int64_t *)args[0].data;
    int64_t now = __atomic_add_fetch(&running, 1, __ATOMIC_SEQ_CST);
    int64_t seen = __atomic_load_n(&out[1], __ATOMIC_SEQ_CST);
    while (now > seen && !__atomic_compare_exchange_n(&out[1], &seen, now, 0, __ATOMIC_SEQ_CST,
                                                      __ATOMIC_SEQ_CST)) {
    }
    struct timespec ts = {0, 20 * 1000000L};
    nanosleep(&ts, NULL);
    __atomic_add_fetch(&out[0], 1, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&running, 1, __ATOMIC_SEQ_CST);
}

/* out (int64[4]): what two pto_barrier() calls returned, then pto_rank(), pto_world(). */
void barrier_twice(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    int64_t *out = (int64_t *)args[0].data;
    out[0] = pto_barrier();
    out[1] = pto_barrier();
    out[2] = pto_rank();
    out[3] = pto_world();
}
