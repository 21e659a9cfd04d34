/* arm_ref core: argument checks, packing, activation layout, path dispatch and the scalar path
 * (DDQ_SPEC.md Section 5). */
#include "arm_ref.h"

#include <string.h>

#include "arm_ref_internal.h"
#include "int_gemm_scalar.h"

#define MAX_MULT ((int64_t)1 << 30)
#define MAX_OFFSET ((int64_t)1 << 61)
#define MAX_SHIFT 61
#define WORKSPACE_ALIGN_CODES 512u
/* The kernels use the workspace from its first 64-byte boundary: AMX tile loads that straddle cache
 * lines run several times slower, and vector loads split in two. */
#define WORKSPACE_ALIGN_BYTES 64u
/* Below this many activation rows AUTO keeps AMX's work on AVX-512 (measured crossover, docs/deploy.md). */
#define AMX_MIN_ROWS 5u

const char *arm_ref_status_string(int status)
{
    switch (status) {
    case ARM_REF_OK: return "ok";
    case ARM_REF_ERR_NULL: return "a required pointer is NULL";
    case ARM_REF_ERR_SHAPE: return "bad shape: M, N and K must be positive and M·K, N·row bytes must fit in memory";
    case ARM_REF_ERR_K_LIMIT: return "K exceeds 65536, the int32 accumulator limit";
    case ARM_REF_ERR_BITS: return "bits_x, bits_w and bits_out must be in 1..8";
    case ARM_REF_ERR_CODE_X_RANGE: return "an activation code is >= 2^bits_x";
    case ARM_REF_ERR_CODE_W_RANGE: return "a weight code is >= 2^bits_w (corrupt packed weights)";
    case ARM_REF_ERR_PADDING: return "padding bits at the end of a packed row are not zero (corrupt packed weights)";
    case ARM_REF_ERR_SHIFT: return "shift must be in 1..61";
    case ARM_REF_ERR_MULT: return "mult must be in [0, 2^30)";
    case ARM_REF_ERR_OFFSET: return "offset must satisfy |offset| < 2^61";
    case ARM_REF_ERR_I_MIN: return "i_min must be in [0, 255]";
    case ARM_REF_ERR_WORKSPACE: return "workspace is NULL or smaller than arm_ref_workspace_bytes(M, K)";
    case ARM_REF_ERR_PATH: return "the requested kernel path is unknown or not supported by this CPU/build";
    case ARM_REF_ERR_PACKED_SIZE: return "packed weight size is not N·ceil(K·w/8) bytes";
    case ARM_REF_ERR_FILE_TRUNCATED: return "file truncated: header or tensor data extends past the end";
    case ARM_REF_ERR_FILE_HEADER: return "corrupt file header: not a valid safetensors JSON header";
    case ARM_REF_ERR_FILE_TENSOR: return "corrupt tensor entry: bad dtype, shape or data offsets";
    case ARM_REF_ERR_NOT_FOUND: return "tensor not found in file";
    case ARM_REF_ERR_DTYPE: return "bad dtype flag (lut_x_signed must be 0 or 1)";
    case ARM_REF_ERR_PREPARED:
        return "not a valid arm_ref prepared-weights buffer (bad magic, version, layout or checksum: corrupt or "
               "never prepared)";
    case ARM_REF_ERR_PREPARED_MISMATCH:
        return "prepared weights do not match this call (prepared for another N, K or bits_w, or buffer size "
               "differs from arm_ref_prepared_weights_bytes)";
    case ARM_REF_ERR_ALIGNMENT: return "prepared-weights buffer must start on a 64-byte boundary";
    default: return "unknown arm_ref status";
    }
}

const char *arm_ref_path_name(int path)
{
    switch (path) {
    case ARM_REF_PATH_AUTO: return "auto";
    case ARM_REF_PATH_SCALAR: return "scalar";
    case ARM_REF_PATH_NEON: return "neon";
    case ARM_REF_PATH_AVX512: return "avx512";
    case ARM_REF_PATH_AMX: return "amx";
    default: return "unknown";
    }
}

int arm_ref_path_available(int path)
{
    switch (path) {
    case ARM_REF_PATH_AUTO:
    case ARM_REF_PATH_SCALAR: return 1;
    case ARM_REF_PATH_NEON: return arm_ref_neon_supported();
    case ARM_REF_PATH_AVX512: return arm_ref_avx512_supported();
    case ARM_REF_PATH_AMX: return arm_ref_amx_supported();
    default: return 0;
    }
}

int arm_ref_best_path(void)
{
    if (arm_ref_amx_supported())
        return ARM_REF_PATH_AMX;
    if (arm_ref_avx512_supported())
        return ARM_REF_PATH_AVX512;
    if (arm_ref_neon_supported())
        return ARM_REF_PATH_NEON;
    return ARM_REF_PATH_SCALAR;
}

int arm_ref_auto_path(size_t m)
{
    int best = arm_ref_best_path();
    return best == ARM_REF_PATH_AMX && m < AMX_MIN_ROWS ? ARM_REF_PATH_AVX512 : best;
}

int arm_ref_container_bits(int bits)
{
    static const int width[9] = {0, 1, 2, 4, 4, 8, 8, 8, 8};
    return bits >= 1 && bits <= 8 ? width[bits] : 0;
}

size_t arm_ref_packed_row_bytes(size_t k, int bits)
{
    int width = arm_ref_container_bits(bits);
    if (width == 0 || k > ARM_REF_MAX_K)
        return 0;
    return (k * (size_t)width + 7u) / 8u;
}

static int checked_product(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static int check_packed_shape(size_t packed_size, size_t n, size_t k, int bits, size_t *row_bytes)
{
    size_t total;
    if (arm_ref_container_bits(bits) == 0)
        return ARM_REF_ERR_BITS;
    if (n == 0 || k == 0)
        return ARM_REF_ERR_SHAPE;
    if (k > ARM_REF_MAX_K)
        return ARM_REF_ERR_K_LIMIT;
    *row_bytes = arm_ref_packed_row_bytes(k, bits);
    if (!checked_product(n, *row_bytes, &total))
        return ARM_REF_ERR_SHAPE;
    return packed_size == total ? ARM_REF_OK : ARM_REF_ERR_PACKED_SIZE;
}

int arm_ref_pack(const uint8_t *codes, size_t n, size_t k, int bits, uint8_t *packed, size_t packed_size)
{
    size_t row_bytes = 0;
    int status = check_packed_shape(packed_size, n, k, bits, &row_bytes);
    if (status != ARM_REF_OK)
        return status;
    if (codes == NULL || packed == NULL)
        return ARM_REF_ERR_NULL;
    uint32_t width = (uint32_t)arm_ref_container_bits(bits);
    uint32_t per_byte = 8u / width;
    for (size_t i = 0; i < n * k; ++i)
        if (codes[i] >> bits)
            return ARM_REF_ERR_CODE_W_RANGE;
    memset(packed, 0, packed_size);
    for (size_t row = 0; row < n; ++row)
        for (size_t col = 0; col < k; ++col)
            packed[row * row_bytes + col / per_byte] |=
                (uint8_t)(codes[row * k + col] << ((col % per_byte) * width));
    return ARM_REF_OK;
}

int arm_ref_check_packed(const uint8_t *packed, size_t packed_size, size_t n, size_t k, int bits)
{
    size_t row_bytes = 0;
    int status = check_packed_shape(packed_size, n, k, bits, &row_bytes);
    if (status != ARM_REF_OK)
        return status;
    if (packed == NULL)
        return ARM_REF_ERR_NULL;
    uint32_t width = (uint32_t)arm_ref_container_bits(bits);
    size_t used_bits = k * width - (row_bytes - 1) * 8u;
    uint8_t padding_mask = used_bits >= 8 ? 0 : (uint8_t)(0xFFu << used_bits);
    /* Rows without padding bits skip this pass: it touches one cache line (and page) per row. */
    for (size_t row = 0; padding_mask != 0 && row < n; ++row)
        if (packed[row * row_bytes + row_bytes - 1] & padding_mask)
            return ARM_REF_ERR_PADDING;
    if ((int)width == bits)
        return ARM_REF_OK;
    for (size_t row = 0; row < n; ++row)
        for (size_t col = 0; col < k; ++col)
            if (arm_ref_weight_code(packed + row * row_bytes, (uint32_t)col, width) >> bits)
                return ARM_REF_ERR_CODE_W_RANGE;
    return ARM_REF_OK;
}

int arm_ref_unpack(const uint8_t *packed, size_t packed_size, size_t n, size_t k, int bits, uint8_t *codes)
{
    int status = arm_ref_check_packed(packed, packed_size, n, k, bits);
    if (status != ARM_REF_OK)
        return status;
    if (codes == NULL)
        return ARM_REF_ERR_NULL;
    size_t row_bytes = arm_ref_packed_row_bytes(k, bits);
    uint32_t width = (uint32_t)arm_ref_container_bits(bits);
    for (size_t row = 0; row < n; ++row)
        for (size_t col = 0; col < k; ++col)
            codes[row * k + col] = (uint8_t)arm_ref_weight_code(packed + row * row_bytes, (uint32_t)col, width);
    return ARM_REF_OK;
}

/* Rows a multiple of 4 KiB apart would share L1 sets and evict each other: one cache line of padding. */
static size_t workspace_stride(size_t k)
{
    return (k + WORKSPACE_ALIGN_CODES - 1) / WORKSPACE_ALIGN_CODES * WORKSPACE_ALIGN_CODES + 64u;
}

/* Alignment slack, then M activation rows and ARM_REF_AMX_PANEL_COLS rows of decoded weights (AMX
 * path), one stride each. */
size_t arm_ref_workspace_bytes(size_t m, size_t k)
{
    size_t total;
    if (k > ARM_REF_MAX_K || m > SIZE_MAX - ARM_REF_AMX_PANEL_COLS ||
        !checked_product(m + ARM_REF_AMX_PANEL_COLS, workspace_stride(k), &total) ||
        total > SIZE_MAX - WORKSPACE_ALIGN_BYTES)
        return SIZE_MAX;
    return total + WORKSPACE_ALIGN_BYTES;
}

/* The OR of count bytes, eight at a time in four independent words (one branch-free pass instead of
 * a branch per code; memcpy keeps the word loads free of alignment and aliasing assumptions). */
static uint8_t or_of_bytes(const uint8_t *bytes, size_t count)
{
    uint64_t words[4] = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + sizeof words <= count; i += sizeof words)
        for (size_t w = 0; w < 4; ++w) {
            uint64_t word;
            memcpy(&word, bytes + i + w * sizeof word, sizeof word);
            words[w] |= word;
        }
    uint64_t all = words[0] | words[1] | words[2] | words[3];
    uint8_t result = 0;
    for (size_t b = 0; b < sizeof all; ++b)
        result |= (uint8_t)(all >> (8 * b));
    for (; i < count; ++i)
        result |= bytes[i];
    return result;
}

/* Every argument except the weights (packed_w, lut_w, packed_size), which the caller checks. */
int arm_ref_check_layer_args(const arm_ref_gemm_args *a)
{
    size_t total;
    if (a->m == 0 || a->n == 0 || a->k == 0)
        return ARM_REF_ERR_SHAPE;
    if (a->k > ARM_REF_MAX_K)
        return ARM_REF_ERR_K_LIMIT;
    if (!checked_product(a->m, a->k, &total) || !checked_product(a->m, a->n, &total))
        return ARM_REF_ERR_SHAPE;
    if (arm_ref_container_bits(a->bits_x) == 0 || arm_ref_container_bits(a->bits_w) == 0 || a->bits_out < 1 ||
        a->bits_out > 8)
        return ARM_REF_ERR_BITS;
    if (a->lut_x_signed != 0 && a->lut_x_signed != 1)
        return ARM_REF_ERR_DTYPE;
    if (a->codes_x == NULL || a->lut_x == NULL || a->mult == NULL || a->offset == NULL || a->i_min == NULL)
        return ARM_REF_ERR_NULL;
    if (a->shift < 1 || a->shift > MAX_SHIFT)
        return ARM_REF_ERR_SHIFT;
    for (size_t col = 0; col < a->n; ++col) {
        if (a->mult[col] < 0 || a->mult[col] >= MAX_MULT)
            return ARM_REF_ERR_MULT;
        if (a->offset[col] <= -MAX_OFFSET || a->offset[col] >= MAX_OFFSET)
            return ARM_REF_ERR_OFFSET;
        if (a->i_min[col] < 0 || a->i_min[col] > 255)
            return ARM_REF_ERR_I_MIN;
    }
    if (or_of_bytes(a->codes_x, a->m * a->k) >> a->bits_x)
        return ARM_REF_ERR_CODE_X_RANGE;
    return ARM_REF_OK;
}

static int check_args(const arm_ref_gemm_args *a)
{
    size_t row_bytes = 0;
    int status = arm_ref_check_layer_args(a);
    if (status != ARM_REF_OK)
        return status;
    if (a->packed_w == NULL || a->lut_w == NULL)
        return ARM_REF_ERR_NULL;
    status = check_packed_shape(a->packed_size, a->n, a->k, a->bits_w, &row_bytes);
    if (status != ARM_REF_OK)
        return status;
    return arm_ref_check_packed(a->packed_w, a->packed_size, a->n, a->k, a->bits_w);
}

/* Activation x = lut_x[code] stored as the byte x − x_base in the row layout of arm_ref_plan. */
static void arrange_rows(const arm_ref_gemm_args *a, size_t chunk_bytes, int32_t x_base, uint8_t *out,
                         size_t stride, size_t k_vector)
{
    size_t per_byte = 8u / (size_t)arm_ref_container_bits(a->bits_w);
    size_t chunk_codes = chunk_bytes * per_byte;
    uint8_t table[256];
    for (size_t code = 0; code < 256; ++code)
        table[code] = (uint8_t)(arm_ref_activation(a->lut_x, a->lut_x_signed, (uint32_t)code & ((1u << a->bits_x) - 1u)) -
                                x_base);
    for (size_t row = 0; row < a->m; ++row) {
        const uint8_t *codes = a->codes_x + row * a->k;
        uint8_t *dst = out + row * stride;
        for (size_t k0 = 0; k0 < k_vector; k0 += chunk_codes)
            for (size_t slot = 0; slot < per_byte; ++slot)
                for (size_t t = 0; t < chunk_bytes; ++t)
                    dst[k0 + slot * chunk_bytes + t] = table[codes[k0 + t * per_byte + slot]];
    }
}

static void acc_scalar_range(const arm_ref_gemm_args *a, size_t row_bytes, size_t k_begin, int32_t *acc)
{
    uint32_t width = (uint32_t)arm_ref_container_bits(a->bits_w);
    size_t lut_w_size = (size_t)1 << a->bits_w;
    for (size_t row = 0; row < a->m; ++row)
        for (size_t col = 0; col < a->n; ++col)
            acc[row * a->n + col] += arm_ref_dot_scalar(a->codes_x + row * a->k, a->lut_x, a->lut_x_signed,
                                                        a->packed_w + col * row_bytes, a->lut_w + col * lut_w_size,
                                                        (uint32_t)k_begin, (uint32_t)a->k, width);
}

uint8_t *arm_ref_aligned_workspace(void *workspace)
{
    uint8_t *unaligned = (uint8_t *)workspace;
    return unaligned + (WORKSPACE_ALIGN_BYTES - (uintptr_t)unaligned % WORKSPACE_ALIGN_BYTES) % WORKSPACE_ALIGN_BYTES;
}

size_t arm_ref_workspace_stride(size_t k) { return workspace_stride(k); }

static void acc_vector(const arm_ref_gemm_args *a, int path, size_t row_bytes, void *unaligned, int32_t *acc)
{
    uint8_t *workspace = arm_ref_aligned_workspace(unaligned);
    size_t chunk_bytes = path == ARM_REF_PATH_NEON ? ARM_REF_NEON_CHUNK : ARM_REF_AVX512_CHUNK;
    size_t chunk_codes = chunk_bytes * (8u / (size_t)arm_ref_container_bits(a->bits_w));
    size_t stride = workspace_stride(a->k);
    /* AVX-512 VNNI multiplies unsigned by signed bytes, NEON sdot signed by signed; AMX has both kinds. */
    int32_t x_base = path == ARM_REF_PATH_AVX512 ? (a->lut_x_signed ? -128 : 0)
                     : path == ARM_REF_PATH_NEON ? (a->lut_x_signed ? 0 : 128)
                                                 : 0;
    arm_ref_plan plan = {a,        workspace, stride, a->k / chunk_codes * chunk_codes, row_bytes, x_base,
                         (int8_t *)(workspace + a->m * stride), NULL, NULL};
    if (path == ARM_REF_PATH_AMX) {
        arm_ref_acc_amx(&plan, acc);
    } else if (path == ARM_REF_PATH_AVX512) {
        arm_ref_acc_avx512(&plan, acc);
    } else {
        arrange_rows(a, chunk_bytes, x_base, workspace, plan.x_stride, plan.k_vector);
        arm_ref_acc_neon(&plan, acc);
    }
    if (plan.k_vector < a->k)
        acc_scalar_range(a, row_bytes, plan.k_vector, acc);
}

/* The spec §5 epilogue over all outputs (locals and restrict: the byte stores cannot alias the
 * arguments, so nothing is reloaded per output). */
void arm_ref_requantize_all(const arm_ref_gemm_args *a, const int32_t *restrict acc, uint8_t *restrict codes_out)
{
    const size_t m = a->m, n = a->n;
    const int32_t *restrict mult = a->mult;
    const int64_t *restrict offset = a->offset;
    const int32_t *restrict i_min = a->i_min;
    const int32_t shift = a->shift, bits_out = a->bits_out;
    for (size_t row = 0; row < m; ++row)
        for (size_t col = 0; col < n; ++col)
            codes_out[row * n + col] =
                arm_ref_requantize(acc[row * n + col], mult[col], offset[col], shift, i_min[col], bits_out);
}

/* Runs path (AUTO resolved by the caller) on checked arguments; the workspace is large enough. */
void arm_ref_run_checked(const arm_ref_gemm_args *args, int path, void *workspace, int32_t *acc, uint8_t *codes_out)
{
    size_t row_bytes = arm_ref_packed_row_bytes(args->k, args->bits_w);
    memset(acc, 0, args->m * args->n * sizeof(int32_t));
    if (path == ARM_REF_PATH_SCALAR)
        acc_scalar_range(args, row_bytes, 0, acc);
    else
        acc_vector(args, path, row_bytes, workspace, acc);
    if (path == ARM_REF_PATH_AVX512 || path == ARM_REF_PATH_AMX)
        arm_ref_requantize_avx512(args, acc, codes_out);
    else
        arm_ref_requantize_all(args, acc, codes_out);
}

int arm_ref_resolve_path(const arm_ref_gemm_args *args, int *path, const void *workspace, size_t workspace_size)
{
    if (!arm_ref_path_available(*path))
        return ARM_REF_ERR_PATH;
    if (*path == ARM_REF_PATH_AUTO)
        *path = arm_ref_auto_path(args->m);
    if (workspace == NULL || workspace_size < arm_ref_workspace_bytes(args->m, args->k))
        return ARM_REF_ERR_WORKSPACE;
    return ARM_REF_OK;
}

int arm_ref_int_gemm(const arm_ref_gemm_args *args, int path, void *workspace, size_t workspace_size,
                     int32_t *acc, uint8_t *codes_out)
{
    if (args == NULL || acc == NULL || codes_out == NULL)
        return ARM_REF_ERR_NULL;
    int status = check_args(args);
    if (status != ARM_REF_OK)
        return status;
    status = arm_ref_resolve_path(args, &path, workspace, workspace_size);
    if (status != ARM_REF_OK)
        return status;
    arm_ref_run_checked(args, path, workspace, acc, codes_out);
    return ARM_REF_OK;
}
