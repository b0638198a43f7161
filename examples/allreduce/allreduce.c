/* allreduce: every member of a group ends with the element-wise sum of all buffers.
 *
 * args: world float32 buffers (INOUT), buffer k held by rank k, all the same length.
 * Reduce-scatter: rank r sums slice r of every buffer into its own buffer. Barrier.
 * All-gather: rank r copies slice k of buffer k (now final) into its own buffer.
 * Ranks only ever write their own buffer, and read others' slices only after the
 * barrier that ends the phase in which those slices were written. */
#include <pto_kernel.h>

void allreduce(const pto_arg *args, int32_t nargs) {
    int32_t rank = pto_rank(), world = pto_world();
    if (nargs != world) {
        pto_fail("allreduce takes one buffer per rank: %d buffers for %d ranks", nargs, world);
        return;
    }
    int64_t n = args[0].nbytes / 4;
    for (int32_t k = 0; k < world; k++) {
        if (args[k].dtype != PTO_FLOAT32 || args[k].nbytes != args[0].nbytes) {
            pto_fail("allreduce buffers must be float32 of one length");
            return;
        }
    }
    float *mine = (float *)args[rank].data;
    int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
    for (int32_t k = 0; k < world; k++) {
        if (k == rank) continue;
        const float *other = (const float *)args[k].data;
        for (int64_t i = lo; i < hi; i++) mine[i] += other[i];
    }
    if (pto_barrier() != 0) return;
    for (int32_t k = 0; k < world; k++) {
        if (k == rank) continue;
        const float *other = (const float *)args[k].data;
        int64_t klo = n * k / world, khi = n * (k + 1) / world;
        for (int64_t i = klo; i < khi; i++) mine[i] = other[i];
    }
    pto_barrier(); /* no rank returns while another still reads its slice */
}
