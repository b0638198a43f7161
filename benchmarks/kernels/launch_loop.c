/* The benchmark's orchestration: launch `noop` N times with block_dim blocks each.
 *
 * args: N (scalar int), block_dim (scalar int). */
#include <pto_kernel.h>

int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    if (nargs != 2) return PTO_ERR_INVALID;
    int64_t n = args[0].scalar.i;
    int32_t block_dim = (int32_t)args[1].scalar.i;
    for (int64_t i = 0; i < n; i++) {
        int rc = pto_launch(chip, "noop", args, nargs, block_dim);
        if (rc != PTO_OK) return rc;
    }
    return PTO_OK;
}
