/* add_custom: z = x + y (float32), the kernel this example builds *outside* pto.compile.
 *
 * Like the original runtime's AscendC AddCustom, it is compiled on its own to an object
 * (build_kernel.sh) and handed to pto.compile as that object, linked as it is. It only
 * needs pto_kernel.h (pto.include_dir()) and the kernel signature. */
#include <pto_kernel.h>

void add_custom(const pto_arg *args, int32_t nargs) {
    if (nargs != 3) {
        pto_fail("add_custom takes x, y, z; got %d arguments", nargs);
        return;
    }
    const float *x = (const float *)args[0].data, *y = (const float *)args[1].data;
    float *z = (float *)args[2].data;
    int64_t n = args[2].nbytes / (int64_t)sizeof(float);
    int64_t lo = n * pto_block_idx() / pto_block_num(); /* this block's share */
    int64_t hi = n * (pto_block_idx() + 1) / pto_block_num();
    for (int64_t i = lo; i < hi; i++) z[i] = x[i] + y[i];
}
