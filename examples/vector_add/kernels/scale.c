/* scale: z *= alpha, element-wise, in place.
 *
 * args: z (inout, float32/float64/int32/int64), alpha (scalar: an int or a float).
 * Each block scales its own contiguous share. */
#include <pto_kernel.h>

#define SCALE_AS(T, A)                                                   \
    do {                                                                 \
        T *z = (T *)args[0].data;                                        \
        int64_t n = args[0].nbytes / (int64_t)sizeof(T);                 \
        int64_t lo = n * pto_block_idx() / pto_block_num();              \
        int64_t hi = n * (pto_block_idx() + 1) / pto_block_num();        \
        for (int64_t i = lo; i < hi; i++) z[i] = (T)(z[i] * (A));        \
    } while (0)

void scale(const pto_arg *args, int32_t nargs) {
    if (nargs != 2 || args[1].kind != PTO_SCALAR) {
        pto_fail("scale takes z and a scalar alpha");
        return;
    }
    int float_alpha = args[1].dtype == PTO_FLOAT64;
    double alpha = float_alpha ? args[1].scalar.f : (double)args[1].scalar.i;
    /* Integers times an integer wrap around like numpy's: multiply as unsigned. */
    uint64_t ialpha = (uint64_t)args[1].scalar.i;
    switch (args[0].dtype) {
    case PTO_FLOAT32: SCALE_AS(float, alpha); break;
    case PTO_FLOAT64: SCALE_AS(double, alpha); break;
    case PTO_INT32:
        if (float_alpha) SCALE_AS(int32_t, alpha);
        else SCALE_AS(uint32_t, (uint32_t)ialpha);
        break;
    case PTO_INT64:
        if (float_alpha) SCALE_AS(int64_t, alpha);
        else SCALE_AS(uint64_t, ialpha);
        break;
    default: pto_fail("scale does not support dtype %d", args[0].dtype);
    }
}
