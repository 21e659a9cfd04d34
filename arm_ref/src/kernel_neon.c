/* aarch64 path: LUT decode with tbl/tbx table lookups and sdot dot products (Armv8.2 dotprod),
 * compiled with a target attribute and chosen at run time from the HWCAP bits. */
#include "arm_ref_internal.h"

#if defined(__aarch64__) && defined(__GNUC__)

#include <arm_neon.h>
#include <string.h>
#include <sys/auxv.h>

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif

/* The target attribute has no spelling both compilers take: GCC's assembler accepts sdot only under an
 * Armv8.2 architecture ("+dotprod" alone keeps armv8-a), clang 14 rejects arch= strings and takes the feature. */
#if defined(__clang__)
#define NEON_TARGET __attribute__((target("dotprod")))
#else
#define NEON_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define NEON_INLINE NEON_TARGET __attribute__((always_inline)) static inline
#define ROW_BLOCK 4
/* Codes per K block: ROW_BLOCK·4 activation rows of it stay in L1 while every output column passes. */
#define K_BLOCK 2048u

int arm_ref_neon_supported(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}

typedef struct {
    int8x16x4_t table[4];
} lut_registers;

/* acc + the 4-way int8 dot products of a and b (sdot). Inline assembly, not vdotq_s32: clang before 16
 * declares that intrinsic only when the whole file is built for dotprod (__ARM_FEATURE_DOTPROD), which
 * a library that picks this path at run time is not. */
NEON_INLINE int32x4_t dot_s8(int32x4_t acc, int8x16_t a, int8x16_t b)
{
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}

NEON_INLINE lut_registers load_lut(const int8_t *lut_row, int bits)
{
    lut_registers lut;
    int8_t padded[256] = {0};
    memcpy(padded, lut_row, (size_t)1 << bits);
    for (int i = 0; i < 4; ++i)
        lut.table[i] = vld1q_s8_x4(padded + 64 * i);
    return lut;
}

/* The 16 int8 weights of slot `slot` of 16 packed bytes. */
NEON_INLINE int8x16_t decode_slot(uint8x16_t bytes, const lut_registers *lut, int width, int slot)
{
    if (width == 8) {
        /* tbl gives 0 for an index ≥ 64 and tbx leaves such lanes alone: four 64-entry lookups. */
        const uint8x16_t step = vdupq_n_u8(64);
        int8x16_t w = vqtbl4q_s8(lut->table[0], bytes);
        uint8x16_t index = vsubq_u8(bytes, step);
        w = vqtbx4q_s8(w, lut->table[1], index);
        index = vsubq_u8(index, step);
        w = vqtbx4q_s8(w, lut->table[2], index);
        index = vsubq_u8(index, step);
        return vqtbx4q_s8(w, lut->table[3], index);
    }
    uint8x16_t codes = vandq_u8(vshlq_u8(bytes, vdupq_n_s8((int8_t)(-slot * width))),
                                vdupq_n_u8((uint8_t)((1 << width) - 1)));
    return vqtbl1q_s8(lut->table[0].val[0], codes);
}

/* rows is 1 or ROW_BLOCK (a constant after inlining): named accumulators stay in registers. */
NEON_INLINE void row_block(const arm_ref_plan *plan, size_t col, size_t row0, int rows, int width,
                           size_t k_begin, size_t k_end, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const int per_byte = 8 / width;
    const size_t chunk_codes = ARM_REF_NEON_CHUNK * (size_t)per_byte;
    const uint8_t *packed_row = a->packed_w + col * plan->row_bytes;
    lut_registers lut = load_lut(a->lut_w + (col << a->bits_w), a->bits_w);
    const int8x16_t ones = vdupq_n_s8(1);
    int32x4_t sum0 = vdupq_n_s32(0), sum1 = sum0, sum2 = sum0, sum3 = sum0, weight_sum = sum0;
    const int8_t *x0 = (const int8_t *)(plan->x_arranged + row0 * plan->x_stride);
    const int8_t *x1 = x0 + (rows > 1 ? plan->x_stride : 0);
    const int8_t *x2 = x0 + (rows > 1 ? 2 * plan->x_stride : 0);
    const int8_t *x3 = x0 + (rows > 1 ? 3 * plan->x_stride : 0);
    for (size_t k0 = k_begin, byte = k_begin / (size_t)per_byte; k0 < k_end; k0 += chunk_codes, byte += ARM_REF_NEON_CHUNK) {
        uint8x16_t bytes = vld1q_u8(packed_row + byte);
        for (int slot = 0; slot < per_byte; ++slot) {
            int8x16_t w = decode_slot(bytes, &lut, width, slot);
            size_t at = k0 + (size_t)slot * ARM_REF_NEON_CHUNK;
            sum0 = dot_s8(sum0, w, vld1q_s8(x0 + at));
            if (rows > 1) {
                sum1 = dot_s8(sum1, w, vld1q_s8(x1 + at));
                sum2 = dot_s8(sum2, w, vld1q_s8(x2 + at));
                sum3 = dot_s8(sum3, w, vld1q_s8(x3 + at));
            }
            if (plan->x_base != 0)
                weight_sum = dot_s8(weight_sum, w, ones);
        }
    }
    int32_t correction = plan->x_base * vaddvq_s32(weight_sum);
    int32_t *out = acc + row0 * a->n + col;
    out[0] += vaddvq_s32(sum0) + correction;
    if (rows > 1) {
        out[a->n] += vaddvq_s32(sum1) + correction;
        out[2 * a->n] += vaddvq_s32(sum2) + correction;
        out[3 * a->n] += vaddvq_s32(sum3) + correction;
    }
}

NEON_INLINE void acc_width(const arm_ref_plan *plan, int width, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    /* K_BLOCK is a multiple of every chunk (at most 64 bytes · 8 codes). */
    for (size_t k_begin = 0; k_begin < plan->k_vector; k_begin += K_BLOCK) {
        size_t k_end = plan->k_vector - k_begin < K_BLOCK ? plan->k_vector : k_begin + K_BLOCK;
        for (size_t col = 0; col < a->n; ++col) {
            size_t row0 = 0;
            for (; row0 + ROW_BLOCK <= a->m; row0 += ROW_BLOCK)
                row_block(plan, col, row0, ROW_BLOCK, width, k_begin, k_end, acc);
            for (; row0 < a->m; ++row0)
                row_block(plan, col, row0, 1, width, k_begin, k_end, acc);
        }
    }
}

NEON_TARGET void arm_ref_acc_neon(const arm_ref_plan *plan, int32_t *acc)
{
    if (plan->k_vector == 0)
        return;
    switch (arm_ref_container_bits(plan->args->bits_w)) {
    case 1: acc_width(plan, 1, acc); break;
    case 2: acc_width(plan, 2, acc); break;
    case 4: acc_width(plan, 4, acc); break;
    default: acc_width(plan, 8, acc); break;
    }
}

#else

int arm_ref_neon_supported(void) { return 0; }

void arm_ref_acc_neon(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

#endif
