/* matmul: C = A @ B, tiled, for float32 and float64 row-major matrices.
 *
 * args: A (input, M x K), B (input, K x N), C (output, M x N), one dtype.
 * The rows of C are cut into tiles of TILE_M rows; block b of a launch computes tiles
 * b, b + block_num, b + 2 * block_num, ... so any block_dim divides the work. Within a
 * tile the loops run over K and N in cache-sized panels, innermost over contiguous
 * columns of B and C so the compiler vectorizes it. */
#include <pto_kernel.h>

#define TILE_M 16
#define TILE_K 128
#define TILE_N 512

#define MATMUL_AS(T)                                                                   \
    static void matmul_##T(const T *restrict a, const T *restrict b, T *restrict c,    \
                           int64_t m, int64_t n, int64_t k) {                          \
        int64_t tiles = (m + TILE_M - 1) / TILE_M;                                     \
        for (int64_t t = pto_block_idx(); t < tiles; t += pto_block_num()) {           \
            int64_t i0 = t * TILE_M, i1 = i0 + TILE_M < m ? i0 + TILE_M : m;           \
            for (int64_t i = i0; i < i1; i++)                                          \
                for (int64_t j = 0; j < n; j++) c[i * n + j] = 0;                      \
            for (int64_t k0 = 0; k0 < k; k0 += TILE_K) {                               \
                int64_t k1 = k0 + TILE_K < k ? k0 + TILE_K : k;                        \
                for (int64_t j0 = 0; j0 < n; j0 += TILE_N) {                           \
                    int64_t j1 = j0 + TILE_N < n ? j0 + TILE_N : n;                    \
                    for (int64_t i = i0; i < i1; i++) {                                \
                        T *restrict crow = c + i * n;                                  \
                        for (int64_t kk = k0; kk < k1; kk++) {                         \
                            T aik = a[i * k + kk];                                     \
                            const T *restrict brow = b + kk * n;                       \
                            for (int64_t j = j0; j < j1; j++) crow[j] += aik * brow[j]; \
                        }                                                              \
                    }                                                                  \
                }                                                                      \
            }                                                                          \
        }                                                                              \
    }

MATMUL_AS(float)
MATMUL_AS(double)

void matmul(const pto_arg *args, int32_t nargs) {
    if (nargs != 3) {
        pto_fail("matmul takes A, B, C; got %d arguments", nargs);
        return;
    }
    const pto_arg *a = &args[0], *b = &args[1], *c = &args[2];
    if (a->ndim != 2 || b->ndim != 2 || c->ndim != 2) {
        pto_fail("matmul needs 2-d A, B, C (got %d-d, %d-d, %d-d)", a->ndim, b->ndim, c->ndim);
        return;
    }
    int64_t m = a->shape[0], k = a->shape[1], n = b->shape[1];
    if (b->shape[0] != k || c->shape[0] != m || c->shape[1] != n) {
        pto_fail("matmul shapes do not agree: A %lldx%lld, B %lldx%lld, C %lldx%lld",
                 (long long)m, (long long)k, (long long)b->shape[0], (long long)n,
                 (long long)c->shape[0], (long long)c->shape[1]);
        return;
    }
    if (a->dtype != c->dtype || b->dtype != c->dtype) {
        pto_fail("matmul needs A, B, C of one dtype");
        return;
    }
    if (c->dtype == PTO_FLOAT32)
        matmul_float((const float *)a->data, (const float *)b->data, (float *)c->data, m, n, k);
    else if (c->dtype == PTO_FLOAT64)
        matmul_double((const double *)a->data, (const double *)b->data, (double *)c->data, m,
                      n, k);
    else
        pto_fail("matmul supports float32 and float64, not dtype %d", c->dtype);
}
