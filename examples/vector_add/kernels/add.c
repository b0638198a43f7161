/* add: z = x + y, element-wise, for every integer and float dtype of pto_kernel.h.
 *
 * args: x (input), y (input), z (output), all of one dtype and size. Each of the
 * launch's blocks adds its own contiguous share of the elements. */
#include <pto_kernel.h>

#define ADD_AS(T)                                                                  \
    do {                                                                           \
        const T *x = (const T *)args[0].data, *y = (const T *)args[1].data;        \
        T *z = (T *)args[2].data;                                                  \
        for (int64_t i = lo; i < hi; i++) z[i] = (T)(x[i] + y[i]);                 \
    } while (0)

/* Integers wrap around like numpy's: add as unsigned (signed overflow is undefined in C). */
#define ADD_INT(T, UT)                                                             \
    do {                                                                           \
        const T *x = (const T *)args[0].data, *y = (const T *)args[1].data;        \
        T *z = (T *)args[2].data;                                                  \
        for (int64_t i = lo; i < hi; i++) z[i] = (T)((UT)x[i] + (UT)y[i]);         \
    } while (0)

/* 16-bit floats are stored raw: add in float, round back. */
#define ADD_VIA_FLOAT(T, TO_F, FROM_F)                                             \
    do {                                                                           \
        const T *x = (const T *)args[0].data, *y = (const T *)args[1].data;        \
        T *z = (T *)args[2].data;                                                  \
        for (int64_t i = lo; i < hi; i++) z[i] = FROM_F(TO_F(x[i]) + TO_F(y[i]));  \
    } while (0)

static int64_t item_size(int32_t dtype) {
    switch (dtype) {
    case PTO_BOOL: case PTO_INT8: case PTO_UINT8: return 1;
    case PTO_INT16: case PTO_UINT16: case PTO_FLOAT16: case PTO_BFLOAT16: return 2;
    case PTO_INT32: case PTO_UINT32: case PTO_FLOAT32: return 4;
    case PTO_INT64: case PTO_UINT64: case PTO_FLOAT64: return 8;
    default: return 0;
    }
}

void add(const pto_arg *args, int32_t nargs) {
    if (nargs != 3) {
        pto_fail("add takes x, y, z; got %d arguments", nargs);
        return;
    }
    int32_t dtype = args[2].dtype;
    if (args[0].dtype != dtype || args[1].dtype != dtype || args[0].nbytes != args[2].nbytes ||
        args[1].nbytes != args[2].nbytes) {
        pto_fail("add needs x, y, z of one dtype and size (dtypes %d %d %d, bytes %lld %lld %lld)",
                 args[0].dtype, args[1].dtype, dtype, (long long)args[0].nbytes,
                 (long long)args[1].nbytes, (long long)args[2].nbytes);
        return;
    }
    int64_t size = item_size(dtype);
    if (size == 0 || dtype == PTO_BOOL) {
        pto_fail("add does not support dtype %d", dtype);
        return;
    }
    int64_t n = args[2].nbytes / size;
    int64_t lo = n * pto_block_idx() / pto_block_num();
    int64_t hi = n * (pto_block_idx() + 1) / pto_block_num();
    switch (dtype) {
    case PTO_INT8: ADD_INT(int8_t, uint8_t); break;
    case PTO_INT16: ADD_INT(int16_t, uint16_t); break;
    case PTO_INT32: ADD_INT(int32_t, uint32_t); break;
    case PTO_INT64: ADD_INT(int64_t, uint64_t); break;
    case PTO_UINT8: ADD_INT(uint8_t, uint8_t); break;
    case PTO_UINT16: ADD_INT(uint16_t, uint16_t); break;
    case PTO_UINT32: ADD_INT(uint32_t, uint32_t); break;
    case PTO_UINT64: ADD_INT(uint64_t, uint64_t); break;
    case PTO_FLOAT32: ADD_AS(float); break;
    case PTO_FLOAT64: ADD_AS(double); break;
    case PTO_FLOAT16: ADD_VIA_FLOAT(pto_half, pto_half_to_float, pto_float_to_half); break;
    case PTO_BFLOAT16: ADD_VIA_FLOAT(pto_bf16, pto_bf16_to_float, pto_float_to_bf16); break;
    }
}
