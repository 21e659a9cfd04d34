/* The portable scalar kernel of DDQ_SPEC.md Section 5, one output at a time.
 *
 * This file is compiled unchanged by the C library and, through CuPy's RawModule, for the GPU
 * (ddq.deploy.cupy_backend): ARM_REF_FN is the function qualifier ("static inline" in C, "__device__"
 * on the GPU) and ARM_REF_NO_STDINT lets the GPU build supply the fixed-width integer types. */
#ifndef ARM_REF_INT_GEMM_SCALAR_H
#define ARM_REF_INT_GEMM_SCALAR_H

#ifndef ARM_REF_FN
#define ARM_REF_FN static inline
#endif
#ifndef ARM_REF_NO_STDINT
#include <stdint.h>
#endif

/* Code k of a packed row: container width w, element k in the lowest bits of its byte first. */
ARM_REF_FN uint32_t arm_ref_weight_code(const uint8_t *row, uint32_t k, uint32_t width)
{
    uint32_t per_byte = 8u / width;
    uint32_t byte = row[k / per_byte];
    return (byte >> ((k % per_byte) * width)) & ((1u << width) - 1u);
}

ARM_REF_FN int32_t arm_ref_activation(const uint8_t *lut_x, int32_t lut_x_signed, uint32_t code)
{
    return lut_x_signed ? (int32_t)(int8_t)lut_x[code] : (int32_t)lut_x[code];
}

/* Σ_k lut_w[code_w(k)]·lut_x[codes_x[k]] over k in [k_begin, k_end). Each term is at most 128·255 in
 * magnitude and K ≤ 65536, so every partial sum fits int32. */
ARM_REF_FN int32_t arm_ref_dot_scalar(const uint8_t *codes_x_row, const uint8_t *lut_x, int32_t lut_x_signed,
                                      const uint8_t *packed_row, const int8_t *lut_w_row, uint32_t k_begin,
                                      uint32_t k_end, uint32_t width)
{
    int32_t acc = 0;
    for (uint32_t k = k_begin; k < k_end; ++k) {
        int32_t w = (int32_t)lut_w_row[arm_ref_weight_code(packed_row, k, width)];
        acc += w * arm_ref_activation(lut_x, lut_x_signed, codes_x_row[k]);
    }
    return acc;
}

/* Σ_k lut_w[code_w(k)] over k in [k_begin, k_end): the correction for activations stored with a bias. */
ARM_REF_FN int32_t arm_ref_weight_sum_scalar(const uint8_t *packed_row, const int8_t *lut_w_row, uint32_t k_begin,
                                             uint32_t k_end, uint32_t width)
{
    int32_t sum = 0;
    for (uint32_t k = k_begin; k < k_end; ++k)
        sum += (int32_t)lut_w_row[arm_ref_weight_code(packed_row, k, width)];
    return sum;
}

/* Spec §5 epilogue: z = acc·mult + offset in int64, one rounding with ties toward +∞, clamp to
 * [i_min, 255], keep the top bits_out bits. With |acc| < 2^31, mult < 2^30 and |offset| < 2^61,
 * z + 2^(shift−1) cannot overflow; it is non-negative where it is shifted. */
ARM_REF_FN uint8_t arm_ref_requantize(int32_t acc, int32_t mult, int64_t offset, int32_t shift, int32_t i_min,
                                      int32_t bits_out)
{
    int64_t z = (int64_t)acc * (int64_t)mult + offset;
    int64_t half = (int64_t)1 << (shift - 1);
    int64_t index = 0;
    if (z >= -half) {
        index = (z + half) >> shift;
        if (index > 255)
            index = 255;
    }
    if (index < i_min)
        index = i_min;
    return (uint8_t)(index >> (8 - bits_out));
}

#endif
