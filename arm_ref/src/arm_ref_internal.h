/* Shared between arm_ref.c and the vector paths: the activation layout the vector kernels read. */
#ifndef ARM_REF_INTERNAL_H
#define ARM_REF_INTERNAL_H

#include "arm_ref.h"

/* A vector path consumes packed weights CHUNK bytes at a time. Within the chunk starting at code k0,
 * slot j (0 ≤ j < 8/w) of byte t holds code k0 + t·(8/w) + j; the workspace stores activations in
 * the same order (all slot-0 codes of the chunk, then slot 1, ...), as bytes x − x_base, so one
 * weight vector per slot meets a contiguous activation vector. Codes past k_vector (less than one
 * chunk) are handled by the scalar kernel. */
typedef struct {
    const arm_ref_gemm_args *args;
    const uint8_t *x_arranged;
    size_t x_stride;
    size_t k_vector;
    size_t row_bytes;
    int32_t x_base;
} arm_ref_plan;

#define ARM_REF_AVX512_CHUNK 64u
#define ARM_REF_NEON_CHUNK 16u

int arm_ref_avx512_supported(void);
int arm_ref_neon_supported(void);
/* acc[m·N + n] += Σ over k < k_vector of lut_w·x, the stored-activation bias already corrected. */
void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc);
void arm_ref_acc_neon(const arm_ref_plan *plan, int32_t *acc);

#endif
