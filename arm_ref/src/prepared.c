/* Prepared weights (arm_ref.h): the packed codes and weight table of a layer turned once into the
 * layout the kernels read, the header that guards it, the scalar kernel over it and the dispatch
 * (DDQ_SPEC.md Section 5; results bit-identical with arm_ref_int_gemm). */
#include <string.h>

#include "arm_ref.h"
#include "arm_ref_internal.h"
#include "int_gemm_scalar.h"

#define PREPARED_MAGIC 0x5044514444ull /* "DDQDP" */
#define PREPARED_VERSION 1u
#define LAYOUT_CODES 1u
#define LAYOUT_DECODED_TILES 2u
#define HEADER_BYTES 64u
#define TILE_COLS 16u
#define TILE_POSITIONS 64u
#define TILE_BYTES (TILE_COLS * TILE_POSITIONS)

/* Eight little words; check is a hash of the other seven, so a flipped header byte is caught. */
typedef struct {
    uint64_t magic;
    uint64_t version;
    uint64_t layout;
    uint64_t bits_w;
    uint64_t n;
    uint64_t k;
    uint64_t total_bytes;
    uint64_t check;
} prepared_header;

typedef struct {
    size_t tiles, steps, weight_bytes, total;
} tile_shape;

static uint64_t header_check(const prepared_header *h)
{
    const uint64_t words[7] = {h->magic, h->version, h->layout, h->bits_w, h->n, h->k, h->total_bytes};
    uint64_t hash = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < 7; ++i) {
        hash ^= words[i];
        hash *= 0x100000001B3ull;
        hash ^= hash >> 29;
    }
    return hash;
}

static unsigned layout_for(int bits_w) { return arm_ref_container_bits(bits_w) == 8 ? LAYOUT_DECODED_TILES : LAYOUT_CODES; }

/* Codes layout: zero bytes after the tables, so that a code changed in the buffer after it was
 * prepared (up to 2^w − 1 with w > bits_w, bits_w = 3) still reads inside it. */
static size_t table_slack(int bits_w) { return ((size_t)1 << arm_ref_container_bits(bits_w)) - ((size_t)1 << bits_w); }

static int add_size(size_t a, size_t b, size_t *out)
{
    if (a > SIZE_MAX - b)
        return 0;
    *out = a + b;
    return 1;
}

static int mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

/* Tile layout: tiles × steps 1 KiB blocks, then one int32 weight sum per padded column. */
static int tiles_for(size_t n, size_t k, tile_shape *shape)
{
    size_t blocks, sums;
    shape->tiles = n / TILE_COLS + (n % TILE_COLS != 0);
    shape->steps = k / TILE_POSITIONS + (k % TILE_POSITIONS != 0);
    if (!mul_size(shape->tiles, shape->steps, &blocks) || !mul_size(blocks, TILE_BYTES, &shape->weight_bytes) ||
        !mul_size(shape->tiles, TILE_COLS * sizeof(int32_t), &sums))
        return 0;
    return add_size(HEADER_BYTES, shape->weight_bytes, &shape->total) && add_size(shape->total, sums, &shape->total);
}

size_t arm_ref_prepared_weights_bytes(size_t n, size_t k, int bits_w)
{
    size_t packed, table, total;
    if (arm_ref_container_bits(bits_w) == 0 || n == 0 || k == 0 || k > ARM_REF_MAX_K)
        return 0;
    if (layout_for(bits_w) == LAYOUT_DECODED_TILES) {
        tile_shape shape = {0, 0, 0, 0};
        return tiles_for(n, k, &shape) ? shape.total : 0;
    }
    if (!mul_size(n, arm_ref_packed_row_bytes(k, bits_w), &packed) || !mul_size(n, (size_t)1 << bits_w, &table) ||
        !add_size(HEADER_BYTES, packed, &total) || !add_size(total, table, &total) ||
        !add_size(total, table_slack(bits_w), &total))
        return 0;
    return total;
}

static void write_tiles(const uint8_t *packed_w, const int8_t *lut_w, size_t n, size_t k, int bits_w,
                        const tile_shape *shape, uint8_t *out)
{
    const size_t row_bytes = arm_ref_packed_row_bytes(k, bits_w);
    int8_t *weights = (int8_t *)(out + HEADER_BYTES);
    memset(weights, 0, shape->weight_bytes);
    for (size_t col = 0; col < shape->tiles * TILE_COLS; ++col) {
        int32_t sum = 0;
        for (size_t pos = 0; col < n && pos < k; ++pos) {
            const int8_t w = lut_w[(col << bits_w) + arm_ref_weight_code(packed_w + col * row_bytes, (uint32_t)pos, 8)];
            weights[((col / TILE_COLS) * shape->steps + pos / TILE_POSITIONS) * TILE_BYTES +
                    col % TILE_COLS * TILE_POSITIONS + pos % TILE_POSITIONS] = w;
            sum += w;
        }
        memcpy(out + HEADER_BYTES + shape->weight_bytes + col * sizeof(int32_t), &sum, sizeof sum);
    }
}

int arm_ref_prepare_weights(const uint8_t *packed_w, size_t packed_size, const int8_t *lut_w, size_t n, size_t k,
                            int bits_w, void *prepared, size_t prepared_size)
{
    int status = arm_ref_check_packed(packed_w, packed_size, n, k, bits_w);
    if (status != ARM_REF_OK)
        return status;
    if (lut_w == NULL || prepared == NULL)
        return ARM_REF_ERR_NULL;
    if ((uintptr_t)prepared % ARM_REF_PREPARED_ALIGN != 0)
        return ARM_REF_ERR_ALIGNMENT;
    const size_t total = arm_ref_prepared_weights_bytes(n, k, bits_w);
    if (total == 0)
        return ARM_REF_ERR_SHAPE;
    if (prepared_size != total)
        return ARM_REF_ERR_PREPARED_MISMATCH;
    uint8_t *out = (uint8_t *)prepared;
    prepared_header h = {PREPARED_MAGIC, PREPARED_VERSION, layout_for(bits_w), (uint64_t)bits_w, n, k, total, 0};
    h.check = header_check(&h);
    if (h.layout == LAYOUT_DECODED_TILES) {
        tile_shape shape = {0, 0, 0, 0};
        tiles_for(n, k, &shape);
        write_tiles(packed_w, lut_w, n, k, bits_w, &shape, out);
    } else {
        memcpy(out + HEADER_BYTES, packed_w, packed_size);
        memcpy(out + HEADER_BYTES + packed_size, lut_w, n << bits_w);
        memset(out + HEADER_BYTES + packed_size + (n << bits_w), 0, table_slack(bits_w));
    }
    memcpy(out, &h, sizeof h);
    return ARM_REF_OK;
}

/* The header must be intact and describe exactly this call's N, K, bits_w and buffer size. */
static int check_prepared(const arm_ref_gemm_args *a, const void *prepared, size_t prepared_size)
{
    prepared_header h;
    if (prepared == NULL)
        return ARM_REF_ERR_NULL;
    if ((uintptr_t)prepared % ARM_REF_PREPARED_ALIGN != 0)
        return ARM_REF_ERR_ALIGNMENT;
    if (prepared_size < HEADER_BYTES)
        return ARM_REF_ERR_PREPARED;
    memcpy(&h, prepared, sizeof h);
    if (h.magic != PREPARED_MAGIC || h.version != PREPARED_VERSION || h.check != header_check(&h) ||
        (h.layout != LAYOUT_CODES && h.layout != LAYOUT_DECODED_TILES))
        return ARM_REF_ERR_PREPARED;
    if (h.n != a->n || h.k != a->k || h.bits_w != (uint64_t)a->bits_w || h.layout != layout_for(a->bits_w) ||
        h.total_bytes != prepared_size || prepared_size != arm_ref_prepared_weights_bytes(a->n, a->k, a->bits_w))
        return ARM_REF_ERR_PREPARED_MISMATCH;
    return ARM_REF_OK;
}

/* acc[m·N + n] = Σ_k w·x over the decoded tile layout, the reference for the vector kernels. */
static void acc_scalar_tiles(const arm_ref_gemm_args *a, const int8_t *weights, size_t steps, int32_t *acc)
{
    for (size_t row = 0; row < a->m; ++row)
        for (size_t col = 0; col < a->n; ++col) {
            const int8_t *tile = weights + (col / TILE_COLS) * steps * TILE_BYTES + col % TILE_COLS * TILE_POSITIONS;
            const uint8_t *codes = a->codes_x + row * a->k;
            int32_t sum = 0;
            for (size_t pos = 0; pos < a->k; ++pos)
                sum += (int32_t)tile[pos / TILE_POSITIONS * TILE_BYTES + pos % TILE_POSITIONS] *
                       arm_ref_activation(a->lut_x, a->lut_x_signed, codes[pos]);
            acc[row * a->n + col] = sum;
        }
}

static void run_tiles(const arm_ref_gemm_args *a, const uint8_t *prepared, int path, void *workspace, int32_t *acc,
                      uint8_t *codes_out)
{
    tile_shape shape = {0, 0, 0, 0};
    tiles_for(a->n, a->k, &shape);
    const int8_t *weights = (const int8_t *)(prepared + HEADER_BYTES);
    if (path != ARM_REF_PATH_AVX512 && path != ARM_REF_PATH_AMX) {
        acc_scalar_tiles(a, weights, shape.steps, acc);
        arm_ref_requantize_all(a, acc, codes_out);
        return;
    }
    /* VNNI multiplies unsigned by signed bytes: signed activations are stored +128 and corrected with
     * the prepared column sums; AMX multiplies either kind directly. */
    const int32_t x_base = path == ARM_REF_PATH_AVX512 && a->lut_x_signed ? -128 : 0;
    arm_ref_plan plan = {a,      arm_ref_aligned_workspace(workspace), arm_ref_workspace_stride(a->k),
                         shape.steps * TILE_POSITIONS, 0, x_base, NULL, weights,
                         (const int32_t *)(prepared + HEADER_BYTES + shape.weight_bytes)};
    /* Both kernels write every acc element once, over all of K (no zeroing first). */
    if (path == ARM_REF_PATH_AMX)
        arm_ref_acc_amx_prepared(&plan, acc);
    else
        arm_ref_acc_avx512_prepared(&plan, acc);
    arm_ref_requantize_avx512(a, acc, codes_out);
}

int arm_ref_int_gemm_prepared(const arm_ref_gemm_args *args, const void *prepared, size_t prepared_size, int path,
                              void *workspace, size_t workspace_size, int32_t *acc, uint8_t *codes_out)
{
    if (args == NULL || acc == NULL || codes_out == NULL)
        return ARM_REF_ERR_NULL;
    int status = arm_ref_check_layer_args(args);
    if (status != ARM_REF_OK)
        return status;
    status = check_prepared(args, prepared, prepared_size);
    if (status != ARM_REF_OK)
        return status;
    status = arm_ref_resolve_path(args, &path, workspace, workspace_size);
    if (status != ARM_REF_OK)
        return status;
    const uint8_t *buffer = (const uint8_t *)prepared;
    if (layout_for(args->bits_w) == LAYOUT_DECODED_TILES) {
        run_tiles(args, buffer, path, workspace, acc, codes_out);
        return ARM_REF_OK;
    }
    /* Codes layout: the buffer's packed rows and table were checked when it was prepared. */
    arm_ref_gemm_args with_weights = *args;
    with_weights.packed_size = args->n * arm_ref_packed_row_bytes(args->k, args->bits_w);
    with_weights.packed_w = buffer + HEADER_BYTES;
    with_weights.lut_w = (const int8_t *)(buffer + HEADER_BYTES + with_weights.packed_size);
    arm_ref_run_checked(&with_weights, path, workspace, acc, codes_out);
    return ARM_REF_OK;
}
