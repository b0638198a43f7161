/* Kernels that kill their process, for the L3 crash tests. */
#include <pto_kernel.h>
#include <stdlib.h>

void segv(const pto_arg *args, int32_t nargs) {
    (void)args, (void)nargs;
    volatile int *nowhere = NULL;
    *nowhere = 1;
}

void abort_now(const pto_arg *args, int32_t nargs) {
    (void)args, (void)nargs;
    abort();
}
