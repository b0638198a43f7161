/* compute: y = x * factor + sin(x), element-wise; the per-chip step of pipeline.py.
 *
 * args: x (input), y (output), factor (scalar float); x and y float32 or float64. */
#include <math.h>
#include <pto_kernel.h>

void compute(const pto_arg *args, int32_t nargs) {
    if (nargs != 3 || args[0].dtype != args[1].dtype || args[0].nbytes != args[1].nbytes) {
        pto_fail("compute takes x, y (same dtype and size) and a scalar factor");
        return;
    }
    double factor = args[2].dtype == PTO_FLOAT64 ? args[2].scalar.f : (double)args[2].scalar.i;
    if (args[0].dtype == PTO_FLOAT32) {
        const float *x = (const float *)args[0].data;
        float *y = (float *)args[1].data;
        float f = (float)factor;
        for (int64_t i = 0, n = args[0].nbytes / 4; i < n; i++) y[i] = x[i] * f + sinf(x[i]);
    } else if (args[0].dtype == PTO_FLOAT64) {
        const double *x = (const double *)args[0].data;
        double *y = (double *)args[1].data;
        for (int64_t i = 0, n = args[0].nbytes / 8; i < n; i++) y[i] = x[i] * factor + sin(x[i]);
    } else {
        pto_fail("compute supports float32 and float64, not dtype %d", args[0].dtype);
    }
}
