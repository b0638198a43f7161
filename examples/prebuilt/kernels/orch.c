/* The orchestration: z = add_custom(x, y) from the prebuilt object, then w = square(z)
 * from source, each launch split into 4 blocks.  args: x, y (inputs), z, w (outputs). */
#include <pto_kernel.h>

int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    if (nargs != 4) {
        pto_fail("the prebuilt example takes x, y, z, w; got %d arguments", nargs);
        return PTO_ERR_INVALID;
    }
    int rc = pto_launch(chip, "add_custom", args, 3, 4);
    if (rc != PTO_OK) return rc;
    pto_arg square_args[2] = {args[2], args[3]};
    square_args[0].kind = PTO_INPUT; /* square reads what add_custom wrote */
    return pto_launch(chip, "square", square_args, 2, 4);
}
