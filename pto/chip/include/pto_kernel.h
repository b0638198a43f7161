/*
 * pto_kernel.h: the kernel ABI of pto's simulation platform ("sim").
 *
 * A kernel is any exported function with this signature; a package names it by its
 * symbol:
 *
 *     #include <pto_kernel.h>
 *
 *     void add(const pto_arg *args, int32_t nargs) {
 *         const float *x = (const float *)args[0].data, *y = (const float *)args[1].data;
 *         float *z = (float *)args[2].data;
 *         int64_t n = args[2].nbytes / (int64_t)sizeof(float);
 *         int64_t lo = n * pto_block_idx() / pto_block_num();     // this block's share
 *         int64_t hi = n * (pto_block_idx() + 1) / pto_block_num();
 *         for (int64_t i = lo; i < hi; i++) z[i] = x[i] + y[i];
 *     }
 *
 * An orchestration (the L2 entry, default name pto_orchestrate) launches kernels on the
 * chip it is given and returns 0, or non-zero to fail the run:
 *
 *     int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
 *         return pto_launch(chip, "add", args, nargs, 8);          // 8 blocks
 *     }
 *
 * C++ sources must declare kernels and the orchestration extern "C" (this header's
 * declarations already are).
 *
 * The numeric values below are shared with Python (pto.ParamType, pto.wire.dtypes): never
 * renumber them, only append.
 */
#ifndef PTO_KERNEL_H
#define PTO_KERNEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PTO_ABI_VERSION 1
#define PTO_MAX_DIMS 8

/* pto_arg.kind: how the task uses the argument (pto.ParamType). */
enum {
    PTO_SCALAR = 0,
    PTO_INPUT = 1,  /* read only */
    PTO_OUTPUT = 2, /* written */
    PTO_INOUT = 3,  /* read and written */
    PTO_NO_DEP = 4, /* read and written, but orders nothing (the orchestration does) */
    PTO_OUTPUT_EXISTING = 5 /* written over an existing tensor, whose other bytes stay */
};

/* pto_arg.dtype: the element type of a tensor (pto.wire.dtypes); for a scalar, the type of
 * the value (PTO_INT64, PTO_UINT64, PTO_FLOAT64 or PTO_BOOL). */
enum {
    PTO_BOOL = 1, /* one byte, 0 or 1 */
    PTO_INT8 = 2,
    PTO_INT16 = 3,
    PTO_INT32 = 4,
    PTO_INT64 = 5,
    PTO_UINT8 = 6,
    PTO_UINT16 = 7,
    PTO_UINT32 = 8,
    PTO_UINT64 = 9,
    PTO_FLOAT16 = 10,  /* IEEE half, raw 16-bit storage (pto_half) */
    PTO_BFLOAT16 = 11, /* bfloat16, raw 16-bit storage (pto_bf16) */
    PTO_FLOAT32 = 12,
    PTO_FLOAT64 = 13
};

/* Return codes of pto_launch, pto_barrier and the runtime. */
enum {
    PTO_OK = 0,
    PTO_ERR_UNKNOWN_KERNEL = -1, /* no kernel of that name in the package */
    PTO_ERR_INVALID = -2,        /* NULL chip or name, nargs < 0, block_dim < 1 */
    PTO_ERR_KERNEL = -3,         /* a block called pto_fail() */
    PTO_ERR_NESTED = -4,         /* pto_launch from inside a kernel */
    PTO_ERR_UNSUPPORTED = -5,    /* e.g. a group barrier with no group support */
    PTO_ERR_NO_MEMORY = -6,      /* could not start the chip's core threads */
    PTO_ERR_NO_ORCH = -7,        /* the package has no orchestration */
    PTO_ERR_BARRIER = -8         /* the group barrier was aborted (a member failed) */
};

/* One argument of a kernel or an orchestration. Tensors are passed by pointer into
 * the caller's memory (numpy arrays at L2, shared memory at L3): never copied. */
typedef struct {
    void *data;     /* NULL for a scalar */
    int64_t nbytes; /* bytes of the tensor; 0 for a scalar */
    int32_t kind;   /* PTO_SCALAR, PTO_INPUT, PTO_OUTPUT, PTO_INOUT */
    int32_t dtype;  /* PTO_FLOAT32, ... */
    int32_t ndim;   /* 0..PTO_MAX_DIMS */
    int64_t shape[PTO_MAX_DIMS];
    union {
        int64_t i;  /* int, bool (0/1) and uint64 (bit pattern) scalars */
        double f;   /* float scalars */
    } scalar;
} pto_arg;

/* A simulated chip: a pool of cores that runs the blocks of a launch. Opaque. */
typedef struct pto_chip pto_chip;

typedef void (*pto_kernel_fn)(const pto_arg *args, int32_t nargs);
typedef int (*pto_orch_fn)(pto_chip *chip, const pto_arg *args, int32_t nargs);

/* Run block_dim blocks of the kernel named `kernel` on the chip's cores and return when
 * all are done: PTO_OK, or a PTO_ERR_* code (the reason is kept for the host's error
 * message). Inside a block, pto_block_idx() is 0..block_dim-1. */
int pto_launch(pto_chip *chip, const char *kernel, const pto_arg *args, int32_t nargs,
               int32_t block_dim);

/* Where the calling code runs. Outside a launch: block 0 of 1. */
int32_t pto_block_idx(void);
int32_t pto_block_num(void);

/* The task's group: its rank among `world` members (a task outside a group, and every
 * L2 run, is rank 0 of 1), and a barrier across the group: PTO_OK at once for a group of
 * one; in a group, PTO_OK once every member reached it, or PTO_ERR_BARRIER if a member
 * failed (the launch then fails too). A group barrier needs a launch of one block. */
int32_t pto_rank(void);
int32_t pto_world(void);
int pto_barrier(void);

/* The device id of the chip running the calling code (-1 outside the runtime). */
int32_t pto_chip_id(void);

/* Fail the current launch (or orchestration) with a message; the first failure of a
 * launch wins. The kernel should return afterwards; pto_launch returns PTO_ERR_KERNEL
 * and the host raises pto.TaskError carrying the message. */
void pto_fail(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

/* ---- 16-bit float storage --------------------------------------------------------- */

typedef uint16_t pto_half; /* PTO_FLOAT16 elements */
typedef uint16_t pto_bf16; /* PTO_BFLOAT16 elements */

static inline float pto_bits_to_float(uint32_t bits) {
    union { uint32_t u; float f; } v;
    v.u = bits;
    return v.f;
}

static inline uint32_t pto_float_to_bits(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    return v.u;
}

static inline float pto_bf16_to_float(pto_bf16 h) { return pto_bits_to_float((uint32_t)h << 16); }

static inline pto_bf16 pto_float_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u = pto_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (pto_bf16)((u >> 16) | 0x40u);
    return (pto_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float pto_half_to_float(pto_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1fu) return pto_bits_to_float(sign | 0x7f800000u | (man << 13)); /* inf/NaN */
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    return pto_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline pto_half pto_float_to_half(float f) { /* round to nearest even */
    uint32_t u = pto_float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (pto_half)(sign | 0x7e00u);           /* NaN */
    if (a >= 0x477ff000u) return (pto_half)(sign | 0x7c00u);          /* overflow: inf */
    if (a < 0x38800000u) {                                            /* subnormal or 0 */
        float m = pto_bits_to_float(a) * 16777216.0f;                 /* in half ulps */
        uint32_t q = (uint32_t)m;
        float rest = m - (float)q;
        if (rest > 0.5f || (rest == 0.5f && (q & 1u))) q++;
        return (pto_half)(sign | q);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return (pto_half)(sign | (r >> 13));
}

/* ---- host side (used by pto's Python runtime, not by kernels) --------------------- */

/* What the host tells a chip about the task it runs next: its group rank and size,
 * and the group barrier. Group tasks (several chips) set rank/world and a barrier
 * over shared memory; a lone task is rank 0 of 1 with no barrier. */
typedef struct {
    int32_t rank;
    int32_t world;
    int (*barrier)(void *state); /* PTO_OK or PTO_ERR_BARRIER; NULL: no group support */
    void *barrier_state;
} pto_task_ctx;

#ifdef __cplusplus
}
#endif

#endif /* PTO_KERNEL_H */
