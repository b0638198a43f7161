/* noop: a kernel that does nothing, to time what a launch itself costs. */
#include <pto_kernel.h>

void noop(const pto_arg *args, int32_t nargs) {
    (void)args;
    (void)nargs;
}
