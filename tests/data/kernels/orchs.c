/* Orchestrations that misbehave, one per entry name (compile with orch={"source": this
 * file, "name": ...}). Each launches kernels of probe.c. */
#include <pto_kernel.h>

int returns_42(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    (void)chip, (void)args, (void)nargs;
    pto_fail("orchs-9d2b: gave up before launching anything");
    return 42;
}

int launches_unknown(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    return pto_launch(chip, "no_such_kernel", args, nargs, 1);
}

int ignores_failure(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    pto_launch(chip, "fail_with", args, nargs, 4); /* return code dropped on purpose */
    return 0;
}

static pto_chip *saved_chip;

int nested_launch(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    saved_chip = chip;
    return pto_launch(chip, "launch_inside", args, nargs, 1);
}

/* A kernel (listed as one) that tries to launch on its own chip. */
void launch_inside(const pto_arg *args, int32_t nargs) {
    int rc = pto_launch(saved_chip, "launch_inside", args, nargs, 1);
    if (rc != PTO_OK) pto_fail("nested pto_launch returned %d", rc);
}

/* Many launches of different kernels and block counts; args: out (int64 >= 6*16). */
int many_launches(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    for (int32_t b = 1; b <= 16; b++) {
        int rc = pto_launch(chip, "where_am_i", args, nargs, b);
        if (rc != PTO_OK) return rc;
    }
    return PTO_OK;
}
