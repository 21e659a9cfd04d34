/* x86-64 paths, compiled with target attributes only and chosen at run time.
 *
 * Weight decode (shared): vpshufb on a 16-entry table for ≤ 4-bit containers; for 8-bit containers
 * vpermb (≤ 64 entries, bits 5-6), vpermi2b (≤ 128 entries, bits 7) or two vpermi2b and a blend on the
 * code's top bit (256 entries, bits 8).
 * AVX-512: vpdpbusd dot products of decoded weights with activation rows, several output columns and
 * activation rows per decoded vector (the GEMV path).
 * AMX: groups of 64 output columns of weights are decoded once into a panel of 1 KiB tiles in the
 * (64-byte aligned) workspace, then tdpbssd / tdpbsud multiply the panel with 16-row activation tiles,
 * four accumulator tiles sharing each activation tile load; each weight is decoded once per call. */
#define _GNU_SOURCE
#include "arm_ref_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>
#include <stdatomic.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define AVX512_FEATURES "avx512f,avx512bw,avx512vnni,avx512vbmi"
#define AVX512_TARGET __attribute__((target(AVX512_FEATURES)))
#define AVX512_INLINE AVX512_TARGET __attribute__((always_inline)) static inline
#define AMX_TARGET __attribute__((target(AVX512_FEATURES ",amx-tile,amx-int8")))
#define AMX_INLINE AMX_TARGET __attribute__((always_inline)) static inline
/* GEMV blocking: ROW_BLOCK activation rows × COLS_WITH_ROWS columns per decoded vector, or one row ×
 * COLS_ALONE columns (independent accumulator chains hide vpdpbusd latency); 32 zmm registers hold
 * the tables, accumulators and operands of either shape. */
#define ROW_BLOCK 4
#define COLS_WITH_ROWS 2
#define COLS_ALONE 4
/* Codes per K block: ROW_BLOCK activation rows of it stay in L1 while every output column passes. */
#define K_BLOCK 4096u
/* Software prefetch distance for the packed weight streams (bytes ahead of the loads). */
#define PREFETCH_AHEAD 256
/* AMX: positions decoded per slice (a multiple of every chunk); a group of 64 columns of it fills
 * 32 KiB of L1. 256, 1,024 and 2,048 measured slower (docs/deploy.md). */
#define DECODE_SLICE 512u
/* Linux: request permission for the AMX tile state (arch/x86/include/uapi/asm/prctl.h). */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int arm_ref_avx512_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

static int amx_probe(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    unsigned eax, ebx, ecx, edx;
    if (!arm_ref_avx512_supported() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
        return 0;
    const unsigned amx_tile = 1u << 24, amx_int8 = 1u << 25;
    if ((edx & amx_tile) == 0 || (edx & amx_int8) == 0)
        return 0;
    /* The kernel grants the 8 KiB tile state per process, once asked. */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

/* Cached: under a hypervisor CPUID traps and costs tens of microseconds. 0 unknown, 1 no, 2 yes; racing
 * first calls store the same answer. */
int arm_ref_amx_supported(void)
{
    static atomic_int cached = 0;
    int known = atomic_load_explicit(&cached, memory_order_relaxed);
    if (known == 0) {
        known = amx_probe() ? 2 : 1;
        atomic_store_explicit(&cached, known, memory_order_relaxed);
    }
    return known == 2;
}

/* table_parts: 64-byte pieces of the weight table the decoder reads (1, 2 or 4; 1 for ≤ 4-bit containers). */
static int table_parts(int bits_w)
{
    return bits_w <= 6 ? 1 : bits_w == 7 ? 2 : 4;
}

typedef struct {
    __m512i table[4];
} lut_registers;

AVX512_INLINE __mmask64 first_bytes(size_t count)
{
    return count >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << count) - 1);
}

/* Masked loads read exactly the 2^bits table entries of this row. */
AVX512_INLINE lut_registers load_lut(const int8_t *lut_row, int bits, int width)
{
    lut_registers lut;
    const size_t size = (size_t)1 << bits;
    for (int i = 0; i < 4; ++i)
        lut.table[i] = _mm512_setzero_si512();
    if (width <= 4) {
        __m512i table = _mm512_maskz_loadu_epi8(first_bytes(size), lut_row);
        lut.table[0] = _mm512_broadcast_i32x4(_mm512_castsi512_si128(table));
        return lut;
    }
    for (size_t i = 0; i < 4 && 64 * i < size; ++i)
        lut.table[i] = _mm512_maskz_loadu_epi8(first_bytes(size - 64 * i), lut_row + 64 * i);
    return lut;
}

/* The 64 int8 weights of slot `slot` of 64 packed bytes. */
AVX512_INLINE __m512i decode_slot(__m512i bytes, const lut_registers *lut, int width, int parts, int slot)
{
    if (width == 8) {
        if (parts == 1)
            return _mm512_permutexvar_epi8(bytes, lut->table[0]);
        if (parts == 2)
            return _mm512_permutex2var_epi8(lut->table[0], bytes, lut->table[1]);
        /* Two merge-masked vpermi2b: codes ≥ 128 are looked up in the top half and the other lanes
         * keep their code, which the second lookup (the other lanes only) reads; no blend, no copies. */
        const __mmask64 high = _mm512_movepi8_mask(bytes);
        const __m512i partial = _mm512_mask2_permutex2var_epi8(lut->table[2], bytes, high, lut->table[3]);
        return _mm512_mask2_permutex2var_epi8(lut->table[0], partial, _knot_mask64(high), lut->table[1]);
    }
    /* A 16-bit shift leaks the neighbour byte's bits into the top of each byte; the mask drops them. */
    __m512i codes = _mm512_and_si512(_mm512_srli_epi16(bytes, (unsigned)(slot * width)),
                                     _mm512_set1_epi8((char)((1 << width) - 1)));
    return _mm512_shuffle_epi8(lut->table[0], codes);
}

/* Activations in arranged order (arm_ref_plan): slot s of the chunk at k0 is code k0 + t·p + s for
 * t < 64 (p = 8/w codes per byte), gathered from the chunk's p input vectors by vpermi2b pairs, then
 * looked up in lut_x with the weight decoder. */
typedef struct {
    __m512i index[8];
    __mmask64 lanes[4];
    lut_registers lut_x;
    int per_byte;
} arranger;

AVX512_INLINE arranger arranger_new(const arm_ref_gemm_args *a, int per_byte)
{
    arranger r;
    uint8_t index[64];
    r.per_byte = per_byte;
    for (int slot = 0; slot < 8; ++slot) {
        for (int t = 0; t < 64; ++t)
            index[t] = (uint8_t)((t * per_byte + slot) & 127);
        r.index[slot] = _mm512_loadu_si512((const void *)index);
    }
    /* Lanes of slot output that come from input pair q: t·p + slot in [128q, 128q + 128). */
    for (int q = 0; q < 4; ++q)
        r.lanes[q] = per_byte <= 2       ? ~(__mmask64)0
                     : 2 * q < per_byte ? first_bytes((size_t)(128 / per_byte)) << (128 / per_byte * q)
                                         : 0;
    r.lut_x = load_lut((const int8_t *)a->lut_x, a->bits_x, 8);
    return r;
}

/* The 64 activation bytes of slot `slot` of the chunk whose codes start at `codes`. */
AVX512_INLINE __m512i arranged_slot(const arranger *r, const uint8_t *codes, int x_parts, int slot)
{
    __m512i gathered = _mm512_loadu_si512((const void *)codes);
    for (int q = 0; 2 * q + 1 < r->per_byte; ++q) {
        __m512i pair = _mm512_permutex2var_epi8(_mm512_loadu_si512((const void *)(codes + 128 * q)), r->index[slot],
                                                _mm512_loadu_si512((const void *)(codes + 128 * q + 64)));
        gathered = _mm512_mask_blend_epi8(r->lanes[q], gathered, pair);
    }
    return decode_slot(gathered, &r->lut_x, 8, x_parts, 0);
}

/* Row layout for the GEMV path (bytes x − x_base: x_base = −128 flips the sign bit) or tile layout
 * for AMX (one dword scatter puts a row's 16 position quads into the 16 tile rows). */
AVX512_INLINE void arrange_width(const arm_ref_plan *plan, int width, int x_parts, int tiles)
{
    const arm_ref_gemm_args *a = plan->args;
    const int per_byte = 8 / width;
    const size_t chunk_codes = ARM_REF_AVX512_CHUNK * (size_t)per_byte;
    const arranger r = arranger_new(a, per_byte);
    const __m512i flip = _mm512_set1_epi8(plan->x_base != 0 ? (char)0x80 : 0);
    for (size_t row = 0; row < a->m; ++row) {
        const uint8_t *codes = a->codes_x + row * a->k;
        const size_t m0 = row / ARM_REF_AMX_ROWS * ARM_REF_AMX_ROWS;
        const size_t rows = a->m - m0 < ARM_REF_AMX_ROWS ? a->m - m0 : ARM_REF_AMX_ROWS;
        const __m512i quad_rows = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)rows));
        uint8_t *block = plan->x_arranged + m0 * plan->k_vector + (row - m0) * 4;
        uint8_t *out = plan->x_arranged + row * plan->x_stride;
        for (size_t k0 = 0; k0 < plan->k_vector; k0 += chunk_codes)
#pragma GCC unroll 8
            for (int slot = 0; slot < per_byte; ++slot) {
                const __m512i x = arranged_slot(&r, codes + k0, x_parts, slot);
                const size_t at = k0 + (size_t)slot * ARM_REF_AVX512_CHUNK;
                if (tiles)
                    _mm512_i32scatter_epi32((void *)(block + at * rows), quad_rows, x, 4);
                else
                    _mm512_storeu_si512((void *)(out + at), _mm512_xor_si512(x, flip));
            }
    }
}

AVX512_INLINE void arrange_x_parts(const arm_ref_plan *plan, int width, int tiles)
{
    switch (table_parts(plan->args->bits_x)) {
    case 1: arrange_width(plan, width, 1, tiles); break;
    case 2: arrange_width(plan, width, 2, tiles); break;
    default: arrange_width(plan, width, 4, tiles); break;
    }
}

AVX512_TARGET static void arrange_activations(const arm_ref_plan *plan, int tiles)
{
    switch (arm_ref_container_bits(plan->args->bits_w)) {
    case 1: arrange_x_parts(plan, 1, tiles); break;
    case 2: arrange_x_parts(plan, 2, tiles); break;
    case 4: arrange_x_parts(plan, 4, tiles); break;
    default: arrange_x_parts(plan, 8, tiles); break;
    }
}

/* GEMV path. rows (1 or ROW_BLOCK) and cols (≤ COLS_ALONE) are constants after inlining, so the
 * accumulator arrays live in registers. */
AVX512_INLINE void gemv_block(const arm_ref_plan *plan, size_t col0, int cols, size_t row0, int rows, int width,
                              int parts, size_t k_begin, size_t k_end, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const int per_byte = 8 / width;
    const size_t chunk_codes = ARM_REF_AVX512_CHUNK * (size_t)per_byte;
    const __m512i ones = _mm512_set1_epi8(1);
    lut_registers lut[COLS_ALONE];
    const uint8_t *packed[COLS_ALONE];
    const uint8_t *x[ROW_BLOCK];
    __m512i sum[COLS_ALONE][ROW_BLOCK], weight_sum[COLS_ALONE];
#pragma GCC unroll 4
    for (int c = 0; c < cols; ++c) {
        lut[c] = load_lut(a->lut_w + ((col0 + (size_t)c) << a->bits_w), a->bits_w, width);
        packed[c] = a->packed_w + (col0 + (size_t)c) * plan->row_bytes;
        weight_sum[c] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int r = 0; r < rows; ++r)
            sum[c][r] = _mm512_setzero_si512();
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r)
        x[r] = plan->x_arranged + (row0 + (size_t)r) * plan->x_stride;
    for (size_t k0 = k_begin, byte = k_begin / (size_t)per_byte; k0 < k_end;
         k0 += chunk_codes, byte += ARM_REF_AVX512_CHUNK) {
        __m512i bytes[COLS_ALONE];
#pragma GCC unroll 4
        for (int c = 0; c < cols; ++c) {
            bytes[c] = _mm512_loadu_si512((const void *)(packed[c] + byte));
            _mm_prefetch((const char *)(packed[c] + byte + PREFETCH_AHEAD), _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int slot = 0; slot < per_byte; ++slot) {
            const size_t at = k0 + (size_t)slot * ARM_REF_AVX512_CHUNK;
            __m512i xs[ROW_BLOCK];
#pragma GCC unroll 4
            for (int r = 0; r < rows; ++r)
                xs[r] = _mm512_loadu_si512((const void *)(x[r] + at));
#pragma GCC unroll 4
            for (int c = 0; c < cols; ++c) {
                __m512i w = decode_slot(bytes[c], &lut[c], width, parts, slot);
#pragma GCC unroll 4
                for (int r = 0; r < rows; ++r)
                    sum[c][r] = _mm512_dpbusd_epi32(sum[c][r], xs[r], w);
                if (plan->x_base != 0)
                    weight_sum[c] = _mm512_dpbusd_epi32(weight_sum[c], ones, w);
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < cols; ++c) {
        int32_t correction = plan->x_base * _mm512_reduce_add_epi32(weight_sum[c]);
#pragma GCC unroll 4
        for (int r = 0; r < rows; ++r)
            acc[(row0 + (size_t)r) * a->n + col0 + (size_t)c] += _mm512_reduce_add_epi32(sum[c][r]) + correction;
    }
}

AVX512_INLINE void gemv_columns(const arm_ref_plan *plan, size_t col0, int cols, int width, int parts,
                                size_t k_begin, size_t k_end, int32_t *acc)
{
    size_t row0 = 0;
    for (; row0 + ROW_BLOCK <= plan->args->m; row0 += ROW_BLOCK)
        gemv_block(plan, col0, cols, row0, ROW_BLOCK, width, parts, k_begin, k_end, acc);
}

AVX512_INLINE void gemv_width(const arm_ref_plan *plan, int width, int parts, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const size_t n = a->n, block_rows = a->m / ROW_BLOCK * ROW_BLOCK;
    /* K_BLOCK is a multiple of every chunk (at most 64 bytes · 8 codes). */
    for (size_t k_begin = 0; k_begin < plan->k_vector; k_begin += K_BLOCK) {
        size_t k_end = plan->k_vector - k_begin < K_BLOCK ? plan->k_vector : k_begin + K_BLOCK;
        size_t col0 = 0;
        for (; col0 + COLS_WITH_ROWS <= n; col0 += COLS_WITH_ROWS)
            gemv_columns(plan, col0, COLS_WITH_ROWS, width, parts, k_begin, k_end, acc);
        for (; col0 < n; ++col0)
            gemv_columns(plan, col0, 1, width, parts, k_begin, k_end, acc);
        for (size_t row = block_rows; row < a->m; ++row) {
            for (col0 = 0; col0 + COLS_ALONE <= n; col0 += COLS_ALONE)
                gemv_block(plan, col0, COLS_ALONE, row, 1, width, parts, k_begin, k_end, acc);
            for (; col0 < n; ++col0)
                gemv_block(plan, col0, 1, row, 1, width, parts, k_begin, k_end, acc);
        }
    }
}

/* Calls fn(plan, width, parts, acc) with the container width and LUT table parts of plan's weights as
 * constants, so each always-inline kernel is specialised per weight layout. */
#define FOR_WEIGHT_LAYOUT(fn, plan, acc)                                                                   \
    do {                                                                                                   \
        switch (arm_ref_container_bits((plan)->args->bits_w)) {                                            \
        case 1: fn(plan, 1, 1, acc); break;                                                                \
        case 2: fn(plan, 2, 1, acc); break;                                                                \
        case 4: fn(plan, 4, 1, acc); break;                                                                \
        default:                                                                                           \
            switch (table_parts((plan)->args->bits_w)) {                                                   \
            case 1: fn(plan, 8, 1, acc); break;                                                            \
            case 2: fn(plan, 8, 2, acc); break;                                                            \
            default: fn(plan, 8, 4, acc); break;                                                           \
            }                                                                                              \
        }                                                                                                  \
    } while (0)

AVX512_TARGET void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc)
{
    if (plan->k_vector == 0)
        return;
    arrange_activations(plan, 0);
    FOR_WEIGHT_LAYOUT(gemv_width, plan, acc);
}

/* Spec §5 epilogue, 8 outputs per vector. t = acc·mult + offset + 2^(shift−1) in int64 (vpmuldq of the
 * sign-extended lanes; |t| < 2^62). z < −2^(shift−1) exactly when t < 0, and then the arithmetic
 * t >> shift is negative, so min(t >> shift, 255) followed by max with i_min ≥ 0 gives the reference's
 * i without a branch. */
AVX512_TARGET void arm_ref_requantize_avx512(const arm_ref_gemm_args *a, const int32_t *restrict acc,
                                             uint8_t *restrict codes_out)
{
    const size_t m = a->m, n = a->n;
    const int32_t *restrict mult = a->mult;
    const int64_t *restrict offset = a->offset;
    const int32_t *restrict i_min = a->i_min;
    const __m512i half = _mm512_set1_epi64((int64_t)1 << (a->shift - 1)), top = _mm512_set1_epi64(255);
    const __m128i shift = _mm_cvtsi32_si128(a->shift), out_shift = _mm_cvtsi32_si128(8 - a->bits_out);
    for (size_t col = 0; col < n; col += 8) {
        const __mmask8 lanes = (__mmask8)(n - col >= 8 ? 0xFFu : (1u << (n - col)) - 1u);
        const __m512i col_mult = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(_mm512_maskz_loadu_epi32(lanes, mult + col)));
        const __m512i col_offset = _mm512_add_epi64(_mm512_maskz_loadu_epi64(lanes, offset + col), half);
        const __m512i col_min = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(_mm512_maskz_loadu_epi32(lanes, i_min + col)));
        for (size_t row = 0; row < m; ++row) {
            const __m512i x = _mm512_cvtepi32_epi64(
                _mm512_castsi512_si256(_mm512_maskz_loadu_epi32(lanes, acc + row * n + col)));
            const __m512i t = _mm512_add_epi64(_mm512_mul_epi32(x, col_mult), col_offset);
            const __m512i index = _mm512_max_epi64(_mm512_min_epi64(_mm512_sra_epi64(t, shift), top), col_min);
            _mm512_mask_cvtepi64_storeu_epi8(codes_out + row * n + col, lanes, _mm512_srl_epi64(index, out_shift));
        }
    }
}

/* AMX path. Output columns go in groups of up to AMX_GROUP_TILES × 16: tiles 0-3 accumulate C[n][m]
 * (int32) for the group's column tiles, tile 4 holds the activations B[16 position quads][m][4] of
 * one 64-position step, shared by the group's products, and tiles 5-7 take turns holding decoded
 * weights A[n][64 positions]. A column tile past the last column is not computed; the unused rows of
 * a partial one are zero in the panel. */
#define AMX_GROUP_TILES 4u
#define AMX_TILE_BYTES 1024u

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* rows: activation rows of the block (1..16), the N dimension of every product. */
AMX_INLINE void configure_tiles(size_t rows)
{
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = (uint16_t)(t <= 4 ? 4 * rows : ARM_REF_AVX512_CHUNK);
    }
    _tile_loadconfig(&config);
}

/* Starts the activation row block at m0: its row count (≤ 16), the tile configuration changed only when
 * that count changes (*configured_rows), and the four accumulator tiles zeroed. */
AMX_INLINE size_t begin_row_block(size_t m, size_t m0, size_t *configured_rows)
{
    const size_t rows = m - m0 < ARM_REF_AMX_ROWS ? m - m0 : ARM_REF_AMX_ROWS;
    if (rows != *configured_rows) {
        configure_tiles(rows);
        *configured_rows = rows;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    return rows;
}

/* One column's packed bytes [0, bytes) decoded into its tile rows of consecutive steps (out, out +
 * step_bytes, ...); each 64-byte load prefetches the line at the same offset of `prefetch` into L2
 * (NULL: none). With a constant `bytes` (a whole slice) the loop unrolls completely, which removes
 * most of the per-column cost (measured 830 -> 700 µs at 4 bits, M = 16). */
AMX_INLINE void decode_column(const uint8_t *restrict packed, const lut_registers *lut, int8_t *restrict out,
                              size_t bytes, const uint8_t *prefetch, int width, int parts)
{
    const int per_byte = 8 / width;
    const size_t step_bytes = AMX_GROUP_TILES * AMX_TILE_BYTES;
#pragma GCC unroll 16
    for (size_t byte = 0; byte < bytes; byte += ARM_REF_AVX512_CHUNK) {
        const __m512i packed_bytes = _mm512_loadu_si512((const void *)(packed + byte));
        if (prefetch != NULL)
            _mm_prefetch((const char *)(prefetch + byte), _MM_HINT_T2);
#pragma GCC unroll 8
        for (int slot = 0; slot < per_byte; ++slot)
            _mm512_storeu_si512((void *)(out + (byte / ARM_REF_AVX512_CHUNK * (size_t)per_byte + (size_t)slot) * step_bytes),
                                decode_slot(packed_bytes, lut, width, parts, slot));
    }
}

/* Positions [begin, end) of the group's columns col0 .. col0 + cols − 1 decoded into the panel, which
 * holds, per 64-position step s and column tile j, the 1 KiB A tile at decoded + ((s − first)·4 + j)·1 KiB
 * (tile row = column, 64 weights per row); first is 0 when later activation blocks reuse the whole
 * panel, else the slice's first step (the slice stays in L1). Rows of a partial last column tile are
 * zero. Meanwhile the next group's packed rows are prefetched into L2 in order (sequential streams:
 * prefetching each column's next slice, 64 interleaved streams, measured ~5-10 % slower). */
AMX_INLINE void decode_panel(const arm_ref_plan *plan, size_t col0, size_t cols, size_t begin, size_t end,
                             size_t first, int width, int parts)
{
    const arm_ref_gemm_args *a = plan->args;
    const int per_byte = 8 / width;
    const size_t padded_cols = (cols + ARM_REF_AMX_ROWS - 1) / ARM_REF_AMX_ROWS * ARM_REF_AMX_ROWS;
    const size_t bytes = (end - begin) / (size_t)per_byte, first_byte = begin / (size_t)per_byte;
    /* The next group's packed rows are one contiguous block as large as this group's: each load here
     * prefetches one line of it, in order, so the rows arrive in L2 as sequential streams. */
    const size_t next_group = col0 + AMX_GROUP_TILES * ARM_REF_AMX_ROWS;
    const size_t next_offset = next_group * plan->row_bytes + first_byte * AMX_GROUP_TILES * ARM_REF_AMX_ROWS;
    int8_t *const slice_out = plan->decoded + (begin / ARM_REF_AVX512_CHUNK - first) * AMX_GROUP_TILES * AMX_TILE_BYTES;
    for (size_t c = 0; c < padded_cols; ++c) {
        int8_t *out = slice_out + c / ARM_REF_AMX_ROWS * AMX_TILE_BYTES + c % ARM_REF_AMX_ROWS * ARM_REF_AVX512_CHUNK;
        if (c >= cols) {
            for (size_t s = 0; s < (end - begin) / ARM_REF_AVX512_CHUNK; ++s)
                _mm512_storeu_si512((void *)(out + s * AMX_GROUP_TILES * AMX_TILE_BYTES), _mm512_setzero_si512());
            continue;
        }
        const lut_registers lut = load_lut(a->lut_w + ((col0 + c) << a->bits_w), a->bits_w, width);
        const uint8_t *packed = a->packed_w + (col0 + c) * plan->row_bytes + first_byte;
        const size_t prefetch_at = next_offset + c * bytes;
        const uint8_t *prefetch = prefetch_at + bytes <= a->packed_size ? a->packed_w + prefetch_at : NULL;
        if (bytes == DECODE_SLICE / (size_t)per_byte)
            decode_column(packed, &lut, out, DECODE_SLICE / (size_t)per_byte, prefetch, width, parts);
        else
            decode_column(packed, &lut, out, bytes, prefetch, width, parts);
    }
}

#define TILE_PRODUCT(c, w, x, x_signed)                                                                    \
    do {                                                                                                   \
        if (x_signed)                                                                                      \
            _tile_dpbssd(c, w, x);                                                                         \
        else                                                                                               \
            _tile_dpbsud(c, w, x);                                                                         \
    } while (0)

/* One step: the activation tile at x (x_row_bytes per row) times `tiles` (≤ 4) weight tiles, tile t at
 * w + t·w_tile_stride with w_row_bytes per row, into accumulator tiles 0 .. tiles − 1 (tiles 5, 6, 7
 * stage the weights; 4 the activations). */
AMX_INLINE void tile_step(const uint8_t *x, size_t x_row_bytes, const int8_t *w, size_t w_tile_stride,
                          size_t w_row_bytes, size_t tiles, int x_signed)
{
    _tile_loadd(4, x, x_row_bytes);
    _tile_loadd(5, w, w_row_bytes);
    TILE_PRODUCT(0, 5, 4, x_signed);
    if (tiles > 1) {
        _tile_loadd(6, w + w_tile_stride, w_row_bytes);
        TILE_PRODUCT(1, 6, 4, x_signed);
    }
    if (tiles > 2) {
        _tile_loadd(7, w + 2 * w_tile_stride, w_row_bytes);
        TILE_PRODUCT(2, 7, 4, x_signed);
    }
    if (tiles > 3) {
        _tile_loadd(5, w + 3 * w_tile_stride, w_row_bytes);
        TILE_PRODUCT(3, 5, 4, x_signed);
    }
}

/* Steps [s_begin, s_end) of the activation block at m0 (rows rows) times the group's `tiles` column
 * tiles (panel from step `first`, decode_panel): one activation tile load per step serves every
 * column tile. */
AMX_INLINE void tile_steps(const arm_ref_plan *plan, size_t m0, size_t rows, size_t tiles, size_t s_begin,
                           size_t s_end, size_t first, int x_signed)
{
    const uint8_t *block = plan->x_arranged + m0 * plan->k_vector;
    const size_t x_tile_bytes = ARM_REF_AVX512_CHUNK * rows, x_row_bytes = 4 * rows;
    const size_t w_row_bytes = ARM_REF_AVX512_CHUNK;
    for (size_t s = s_begin; s < s_end; ++s)
        tile_step(block + s * x_tile_bytes, x_row_bytes, plan->decoded + (s - first) * AMX_GROUP_TILES * AMX_TILE_BYTES,
                  AMX_TILE_BYTES, w_row_bytes, tiles, x_signed);
}

/* acc rows m0 .. m0 + rows − 1, columns col0 .. col0 + cols − 1 += the accumulator tiles (C[n][m]), or
 * = them when `assign` (the tiles hold all of K, so acc need not be zeroed first: measured 1-2 % at
 * prepared 8-bit M = 16): one 16-lane gather reads a row's column sums out of a stored tile (the
 * transpose; an in-register 16 × 16 transpose measured no faster), one masked store writes them
 * (instead of a scalar loop over the group's 4,096 sums with 64-byte strided reads). */
AMX_INLINE void write_tiles(const arm_ref_plan *plan, size_t col0, size_t cols, size_t m0, size_t rows, int assign,
                            int32_t *acc)
{
    int32_t sums[AMX_GROUP_TILES][ARM_REF_AMX_ROWS][ARM_REF_AMX_ROWS];
    _tile_stored(0, sums[0], sizeof sums[0][0]);
    _tile_stored(1, sums[1], sizeof sums[0][0]);
    _tile_stored(2, sums[2], sizeof sums[0][0]);
    _tile_stored(3, sums[3], sizeof sums[0][0]);
    const __m512i column_index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                    _mm512_set1_epi32(ARM_REF_AMX_ROWS));
    for (size_t j = 0; j * ARM_REF_AMX_ROWS < cols; ++j) {
        const size_t tile_cols = cols - j * ARM_REF_AMX_ROWS < ARM_REF_AMX_ROWS ? cols - j * ARM_REF_AMX_ROWS : ARM_REF_AMX_ROWS;
        const __mmask16 lanes = (__mmask16)((1u << tile_cols) - 1u);
        for (size_t r = 0; r < rows; ++r) {
            int32_t *out = acc + (m0 + r) * plan->args->n + col0 + j * ARM_REF_AMX_ROWS;
            const __m512i column_sums =
                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, column_index, &sums[j][0][r], 4);
            _mm512_mask_storeu_epi32(
                out, lanes, assign ? column_sums : _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, out), column_sums));
        }
    }
}

/* Per group of output columns: the first activation block's tile products follow the decode slice by
 * slice (the slice is still in L1); later blocks reuse the whole decoded panel. */
AMX_INLINE void amx_width(const arm_ref_plan *plan, int width, int parts, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const size_t steps = plan->k_vector / ARM_REF_AVX512_CHUNK, group = AMX_GROUP_TILES * ARM_REF_AMX_ROWS;
    const size_t slice = DECODE_SLICE;
    const int reuse = a->m > ARM_REF_AMX_ROWS;
    size_t configured_rows = 0;
    for (size_t col0 = 0; col0 < a->n; col0 += group) {
        const size_t cols = a->n - col0 < group ? a->n - col0 : group;
        const size_t tiles = (cols + ARM_REF_AMX_ROWS - 1) / ARM_REF_AMX_ROWS;
        for (size_t m0 = 0; m0 < a->m; m0 += ARM_REF_AMX_ROWS) {
            const size_t rows = begin_row_block(a->m, m0, &configured_rows);
            if (m0 == 0) {
                for (size_t begin = 0; begin < plan->k_vector; begin += slice) {
                    const size_t end = plan->k_vector - begin < slice ? plan->k_vector : begin + slice;
                    const size_t s_begin = begin / ARM_REF_AVX512_CHUNK, first = reuse ? 0 : s_begin;
                    decode_panel(plan, col0, cols, begin, end, first, width, parts);
                    tile_steps(plan, m0, rows, tiles, s_begin, end / ARM_REF_AVX512_CHUNK, first, a->lut_x_signed);
                }
            } else {
                tile_steps(plan, m0, rows, tiles, 0, steps, 0, a->lut_x_signed);
            }
            write_tiles(plan, col0, cols, m0, rows, 0, acc);
        }
    }
    _tile_release();
}

AMX_TARGET void arm_ref_acc_amx(const arm_ref_plan *plan, int32_t *acc)
{
    if (plan->k_vector == 0)
        return;
    arrange_activations(plan, 1);
    FOR_WEIGHT_LAYOUT(amx_width, plan, acc);
}


/* Prepared weights (decoded tile layout, arm_ref.h): no weight decode at all. Activations are arranged
 * in natural order up to K rounded to 64, zero past K, so the zero-padded weight positions add nothing
 * whatever they hold. */
#define PREPARED_TILE_BYTES 1024u

AVX512_INLINE void arrange_prepared_parts(const arm_ref_plan *plan, int x_parts, int tiles)
{
    const arm_ref_gemm_args *a = plan->args;
    const lut_registers lut_x = load_lut((const int8_t *)a->lut_x, a->bits_x, 8);
    const __m512i flip = _mm512_set1_epi8(plan->x_base != 0 ? (char)0x80 : 0);
    for (size_t row = 0; row < a->m; ++row) {
        const uint8_t *codes = a->codes_x + row * a->k;
        const size_t m0 = row / ARM_REF_AMX_ROWS * ARM_REF_AMX_ROWS;
        const size_t rows = a->m - m0 < ARM_REF_AMX_ROWS ? a->m - m0 : ARM_REF_AMX_ROWS;
        const __m512i quad_rows = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)rows));
        uint8_t *block = plan->x_arranged + m0 * plan->k_vector + (row - m0) * 4;
        uint8_t *out = plan->x_arranged + row * plan->x_stride;
        for (size_t k0 = 0; k0 < plan->k_vector; k0 += ARM_REF_AVX512_CHUNK) {
            const __mmask64 lanes = first_bytes(a->k - k0);
            const __m512i decoded = decode_slot(_mm512_maskz_loadu_epi8(lanes, codes + k0), &lut_x, 8, x_parts, 0);
            const __m512i x = _mm512_maskz_mov_epi8(lanes, _mm512_xor_si512(decoded, flip));
            if (tiles)
                _mm512_i32scatter_epi32((void *)(block + k0 * rows), quad_rows, x, 4);
            else
                _mm512_storeu_si512((void *)(out + k0), x);
        }
    }
}

AVX512_INLINE void arrange_prepared(const arm_ref_plan *plan, int tiles)
{
    switch (table_parts(plan->args->bits_x)) {
    case 1: arrange_prepared_parts(plan, 1, tiles); break;
    case 2: arrange_prepared_parts(plan, 2, tiles); break;
    default: arrange_prepared_parts(plan, 4, tiles); break;
    }
}

/* One activation row times one 16-column weight tile over all of K: 16 independent accumulators read
 * the tile's 1 KiB blocks in address order (one sequential stream). */
AVX512_INLINE void gemv_prepared_tile(const arm_ref_plan *plan, size_t tile, size_t row, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const size_t steps = plan->k_vector / ARM_REF_AVX512_CHUNK;
    const int8_t *w = plan->prepared_w + tile * steps * PREPARED_TILE_BYTES;
    const uint8_t *x = plan->x_arranged + row * plan->x_stride;
    __m512i sum[ARM_REF_AMX_ROWS];
#pragma GCC unroll 16
    for (size_t c = 0; c < ARM_REF_AMX_ROWS; ++c)
        sum[c] = _mm512_setzero_si512();
    for (size_t s = 0; s < steps; ++s, w += PREPARED_TILE_BYTES) {
        const __m512i xs = _mm512_loadu_si512((const void *)(x + s * ARM_REF_AVX512_CHUNK));
#pragma GCC unroll 16
        for (size_t c = 0; c < ARM_REF_AMX_ROWS; ++c)
            sum[c] = _mm512_dpbusd_epi32(sum[c], xs, _mm512_load_si512((const void *)(w + c * ARM_REF_AVX512_CHUNK)));
    }
    const size_t col0 = tile * ARM_REF_AMX_ROWS;
    const size_t cols = a->n - col0 < ARM_REF_AMX_ROWS ? a->n - col0 : ARM_REF_AMX_ROWS;
    /* Wrapping arithmetic: exact for a buffer as prepared; a column sum changed in the buffer afterwards
     * (never checked per call) gives a wrong result but no undefined overflow. */
    for (size_t c = 0; c < cols; ++c)
        acc[row * a->n + col0 + c] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(sum[c]) +
                                               (uint32_t)plan->x_base * (uint32_t)plan->prepared_sums[col0 + c]);
}

AVX512_TARGET void arm_ref_acc_avx512_prepared(const arm_ref_plan *plan, int32_t *acc)
{
    const size_t tiles = (plan->args->n + ARM_REF_AMX_ROWS - 1) / ARM_REF_AMX_ROWS;
    arrange_prepared(plan, 0);
    for (size_t tile = 0; tile < tiles; ++tile)
        for (size_t row = 0; row < plan->args->m; ++row)
            gemv_prepared_tile(plan, tile, row, acc);
}

/* Column tiles t0 .. t0 + tiles − 1 (tiles ≤ 4) times the activation block at m0, straight from the
 * prepared blocks (4 sequential streams, one per column tile). */
AMX_INLINE void amx_prepared_steps(const arm_ref_plan *plan, size_t m0, size_t rows, size_t t0, size_t tiles,
                                   int x_signed)
{
    const size_t steps = plan->k_vector / ARM_REF_AVX512_CHUNK, tile_stride = steps * PREPARED_TILE_BYTES;
    const uint8_t *block = plan->x_arranged + m0 * plan->k_vector;
    const size_t x_tile_bytes = ARM_REF_AVX512_CHUNK * rows, x_row_bytes = 4 * rows;
    const int8_t *w = plan->prepared_w + t0 * tile_stride;
    for (size_t s = 0; s < steps; ++s, w += PREPARED_TILE_BYTES)
        tile_step(block + s * x_tile_bytes, x_row_bytes, w, tile_stride, ARM_REF_AVX512_CHUNK, tiles, x_signed);
}

AMX_TARGET void arm_ref_acc_amx_prepared(const arm_ref_plan *plan, int32_t *acc)
{
    const arm_ref_gemm_args *a = plan->args;
    const size_t total_tiles = (a->n + ARM_REF_AMX_ROWS - 1) / ARM_REF_AMX_ROWS;
    size_t configured_rows = 0;
    arrange_prepared(plan, 1);
    for (size_t t0 = 0; t0 < total_tiles; t0 += AMX_GROUP_TILES) {
        const size_t tiles = total_tiles - t0 < AMX_GROUP_TILES ? total_tiles - t0 : AMX_GROUP_TILES;
        const size_t col0 = t0 * ARM_REF_AMX_ROWS;
        const size_t cols = a->n - col0 < tiles * ARM_REF_AMX_ROWS ? a->n - col0 : tiles * ARM_REF_AMX_ROWS;
        for (size_t m0 = 0; m0 < a->m; m0 += ARM_REF_AMX_ROWS) {
            const size_t rows = begin_row_block(a->m, m0, &configured_rows);
            amx_prepared_steps(plan, m0, rows, t0, tiles, a->lut_x_signed);
            write_tiles(plan, col0, cols, m0, rows, 1, acc);
        }
    }
    _tile_release();
}

#else

int arm_ref_avx512_supported(void) { return 0; }

int arm_ref_amx_supported(void) { return 0; }

void arm_ref_acc_avx512(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

void arm_ref_acc_amx(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

void arm_ref_acc_avx512_prepared(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

void arm_ref_acc_amx_prepared(const arm_ref_plan *plan, int32_t *acc)
{
    (void)plan;
    (void)acc;
}

void arm_ref_requantize_avx512(const arm_ref_gemm_args *a, const int32_t *restrict acc, uint8_t *restrict codes_out)
{
    (void)a;
    (void)acc;
    (void)codes_out;
}

#endif
