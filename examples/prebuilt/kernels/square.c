/* square: w = z * z (float32), compiled from source by pto.compile. */
#include <pto_kernel.h>

void square(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    const float *z = (const float *)args[0].data;
    float *w = (float *)args[1].data;
    int64_t n = args[1].nbytes / (int64_t)sizeof(float);
    int64_t lo = n * pto_block_idx() / pto_block_num();
    int64_t hi = n * (pto_block_idx() + 1) / pto_block_num();
    for (int64_t i = lo; i < hi; i++) w[i] = z[i] * z[i];
}
