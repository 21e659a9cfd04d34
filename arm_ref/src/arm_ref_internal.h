/* Shared between arm_ref.c and the vector paths: the activation layouts the vector kernels read. */
#ifndef ARM_REF_INTERNAL_H
#define ARM_REF_INTERNAL_H

#include "arm_ref.h"

/* A vector path consumes packed weights CHUNK bytes at a time. Within the chunk starting at code k0,
 * slot j (0 ≤ j < 8/w) of byte t holds code k0 + t·(8/w) + j; the kernels see codes in "arranged
 * order" (all slot-0 codes of the chunk, then slot 1, ...), so one decoded weight vector per slot meets
 * a contiguous run of activations. Codes past k_vector (less than one chunk) go to the scalar kernel.
 *
 * Row layout (AVX-512, NEON): row m of the activations at x_arranged + m·x_stride, in arranged order,
 * as bytes x − x_base.
 * Tile layout (AMX): rows in blocks of AMX_ROWS (the last block may be shorter, r rows); a block starts
 * at x_arranged + m0·k_vector and holds, per 64 arranged positions, a 16 × 4r byte tile: tile row g,
 * bytes 4·i .. 4·i+3 are the activations of row m0 + i at positions 4g .. 4g+3 (raw x, x_base = 0).
 * decoded (AMX only) is scratch for ARM_REF_AMX_PANEL_COLS output columns of decoded weights
 * (ARM_REF_AMX_PANEL_COLS · k_vector bytes, in 1 KiB tiles: kernel_avx512.c). */
typedef struct {
    const arm_ref_gemm_args *args;
    uint8_t *x_arranged;
    size_t x_stride;
    size_t k_vector;
    size_t row_bytes;
    int32_t x_base;
    int8_t *decoded;
    /* Prepared weights (decoded tile layout, arm_ref.h), else NULL: the 1 KiB block of column tile t
     * and step s at prepared_w + (t·k_vector/64 + s)·1 KiB; column sums prepared_sums[n]. */
    const int8_t *prepared_w;
    const int32_t *prepared_sums;
} arm_ref_plan;

#define ARM_REF_AVX512_CHUNK 64u
#define ARM_REF_NEON_CHUNK 16u
#define ARM_REF_AMX_ROWS 16u
#define ARM_REF_AMX_PANEL_COLS 64u

int arm_ref_avx512_supported(void);
int arm_ref_amx_supported(void);
int arm_ref_neon_supported(void);
/* acc[m·N + n] += Σ over k < k_vector of lut_w·x, the stored-activation bias already corrected. The
 * NEON kernel reads activations that arm_ref.c arranged; the x86 kernels arrange them themselves. */
void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc);
void arm_ref_acc_amx(const arm_ref_plan *plan, int32_t *acc);
void arm_ref_acc_neon(const arm_ref_plan *plan, int32_t *acc);
/* acc[m·N + n] = (not +=) the same sums over prepared weights (decoded tile layout, k_vector = K
 * rounded up to 64): the kernels arrange the activations themselves, zero past K. */
void arm_ref_acc_avx512_prepared(const arm_ref_plan *plan, int32_t *acc);
void arm_ref_acc_amx_prepared(const arm_ref_plan *plan, int32_t *acc);

/* arm_ref.c helpers shared with prepared.c. */
int arm_ref_check_layer_args(const arm_ref_gemm_args *a);
/* Checks `*path` (available on this machine), resolves ARM_REF_PATH_AUTO for args->m, checks the workspace. */
int arm_ref_resolve_path(const arm_ref_gemm_args *args, int *path, const void *workspace, size_t workspace_size);
uint8_t *arm_ref_aligned_workspace(void *workspace);
size_t arm_ref_workspace_stride(size_t k);
void arm_ref_run_checked(const arm_ref_gemm_args *args, int path, void *workspace, int32_t *acc, uint8_t *codes_out);
void arm_ref_requantize_all(const arm_ref_gemm_args *a, const int32_t *restrict acc, uint8_t *restrict codes_out);

/* The spec §5 epilogue over all outputs, bit-exact with arm_ref_requantize (AVX-512 only). */
void arm_ref_requantize_avx512(const arm_ref_gemm_args *a, const int32_t *restrict acc, uint8_t *restrict codes_out);

#endif
