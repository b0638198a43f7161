/* The orchestration of vector_add: z = (x + y) * alpha, as two launches on the chip.
 *
 * args: x (input), y (input), z (output), alpha (scalar), and optionally block_dim
 * (scalar int, default 8): how many blocks each launch runs across the chip's cores. */
#include <pto_kernel.h>

int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    if (nargs != 4 && nargs != 5) {
        pto_fail("vector_add takes x, y, z, alpha[, block_dim]; got %d arguments", nargs);
        return PTO_ERR_INVALID;
    }
    int32_t blocks = nargs == 5 ? (int32_t)args[4].scalar.i : 8;

    pto_arg add_args[3] = {args[0], args[1], args[2]};
    int rc = pto_launch(chip, "add", add_args, 3, blocks);
    if (rc != PTO_OK) return rc;

    pto_arg scale_args[2] = {args[2], args[3]};
    scale_args[0].kind = PTO_INOUT; /* scale reads what add wrote, and writes it */
    return pto_launch(chip, "scale", scale_args, 2, blocks);
}
