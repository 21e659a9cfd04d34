/* x86-64 path: LUT decode with vpshufb (≤ 4-bit containers) or vpermi2b (8-bit containers) and
 * vpdpbusd dot products. Compiled with target attributes only and chosen at run time. */
#include "arm_ref_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>
#include <string.h>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi")))
#define AVX512_INLINE AVX512_TARGET __attribute__((always_inline)) static inline
#define ROW_BLOCK 4
/* Codes per K block: ROW_BLOCK·4 activation rows of it stay in L1 while every output column passes. */
#define K_BLOCK 2048u

int arm_ref_avx512_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

typedef struct {
    __m512i table[4];
} lut_registers;

AVX512_INLINE lut_registers load_lut(const int8_t *lut_row, int bits, int width)
{
    lut_registers lut;
    int8_t padded[256] = {0};
    memcpy(padded, lut_row, (size_t)1 << bits);
    if (width <= 4) {
        lut.table[0] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)padded));
    } else {
        for (int i = 0; i < 4; ++i)
            lut.table[i] = _mm512_loadu_si512((const void *)(padded + 64 * i));
    }
    return lut;
}

/* The 64 int8 weights of slot `slot` of 64 packed bytes. */
AVX512_INLINE __m512i decode_slot(__m512i bytes, const lut_registers *lut, int width, int slot)
{
    if (width == 8) {
        __m512i low_half = _mm512_permutex2var_epi8(lut->table[0], bytes, lut->table[1]);
        __m512i high_half = _mm512_permutex2var_epi8(lut->table[2], bytes, lut->table[3]);
        return _mm512_mask_blend_epi8(_mm512_movepi8_mask(bytes), low_half, high_half);
    }
    /* A 16-bit shift leaks the neighbour byte's bits into the top of each byte; the mask drops them. */
    __m512i codes = _mm512_and_si512(_mm512_srli_epi16(bytes, (unsigned)(slot * width)),
                                     _mm512_set1_epi8((char)((1 << width) - 1)));
    return _mm512_shuffle_epi8(lut->table[0], codes);
}

/* rows is 1 or ROW_BLOCK (a constant after inlining): named accumulators stay in registers. */
AVX512_INLINE void row_block(const arm_ref_plan *plan, size_t col, size_t row0, int rows, int width,
                             size_t k_begin, size_t k_end, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const int per_byte = 8 / width;
    const size_t chunk_codes = ARM_REF_AVX512_CHUNK * (size_t)per_byte;
    const uint8_t *packed_row = a->packed_w + col * plan->row_bytes;
    lut_registers lut = load_lut(a->lut_w + (col << a->bits_w), a->bits_w, width);
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i sum0 = _mm512_setzero_si512(), sum1 = sum0, sum2 = sum0, sum3 = sum0, weight_sum = sum0;
    const uint8_t *x0 = plan->x_arranged + row0 * plan->x_stride;
    const uint8_t *x1 = x0 + (rows > 1 ? plan->x_stride : 0);
    const uint8_t *x2 = x0 + (rows > 1 ? 2 * plan->x_stride : 0);
    const uint8_t *x3 = x0 + (rows > 1 ? 3 * plan->x_stride : 0);
    for (size_t k0 = k_begin, byte = k_begin / (size_t)per_byte; k0 < k_end; k0 += chunk_codes, byte += ARM_REF_AVX512_CHUNK) {
        __m512i bytes = _mm512_loadu_si512((const void *)(packed_row + byte));
        for (int slot = 0; slot < per_byte; ++slot) {
            __m512i w = decode_slot(bytes, &lut, width, slot);
            size_t at = k0 + (size_t)slot * ARM_REF_AVX512_CHUNK;
            sum0 = _mm512_dpbusd_epi32(sum0, _mm512_loadu_si512((const void *)(x0 + at)), w);
            if (rows > 1) {
                sum1 = _mm512_dpbusd_epi32(sum1, _mm512_loadu_si512((const void *)(x1 + at)), w);
                sum2 = _mm512_dpbusd_epi32(sum2, _mm512_loadu_si512((const void *)(x2 + at)), w);
                sum3 = _mm512_dpbusd_epi32(sum3, _mm512_loadu_si512((const void *)(x3 + at)), w);
            }
            if (plan->x_base != 0)
                weight_sum = _mm512_dpbusd_epi32(weight_sum, ones, w);
        }
    }
    int32_t correction = plan->x_base * _mm512_reduce_add_epi32(weight_sum);
    int32_t *out = acc + row0 * a->n + col;
    out[0] += _mm512_reduce_add_epi32(sum0) + correction;
    if (rows > 1) {
        out[a->n] += _mm512_reduce_add_epi32(sum1) + correction;
        out[2 * a->n] += _mm512_reduce_add_epi32(sum2) + correction;
        out[3 * a->n] += _mm512_reduce_add_epi32(sum3) + correction;
    }
}

AVX512_INLINE void acc_width(const arm_ref_plan *plan, int width, int32_t *acc)
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

AVX512_TARGET void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc)
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

int arm_ref_avx512_supported(void) { return 0; }

void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

#endif
