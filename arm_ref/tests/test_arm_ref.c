/* arm_ref tests: every available path against the scalar path and an independent reference on
 * adversarial and random cases, every error status, and a bounded fuzz of the argument checks and
 * the file reader. Usage: test_arm_ref [fuzz_iterations]. Exit status 0 only if everything passed. */
#define _POSIX_C_SOURCE 200112L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arm_ref.h"

static int failures = 0;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

#define CHECK(cond, ...)                                                                                     \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            ++failures;                                                                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                             \
            fprintf(stderr, __VA_ARGS__);                                                                    \
            fprintf(stderr, "\n");                                                                           \
        }                                                                                                    \
    } while (0)

static uint64_t next_random(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static uint32_t random_below(uint32_t bound) { return (uint32_t)(next_random() % bound); }

static void *checked_malloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* A layer held unpacked, as the test builds it; packed before each call. */
typedef struct {
    size_t m, n, k;
    int bits_x, bits_w, bits_out, shift, lut_x_signed;
    uint8_t *codes_x, *codes_w, *lut_x;
    int8_t *lut_w;
    int32_t *mult, *i_min;
    int64_t *offset;
} layer;

static layer layer_new(size_t m, size_t n, size_t k, int bits_x, int bits_w)
{
    layer l = {m, n, k, bits_x, bits_w, 8, 20, 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    l.codes_x = checked_malloc(m * k);
    l.codes_w = checked_malloc(n * k);
    /* Tables sized for 8 bits: the argument fuzz may raise bits_x or bits_w, which (legitimately)
     * describes a larger table. */
    l.lut_x = checked_malloc(256);
    l.lut_w = checked_malloc(n * 256);
    memset(l.lut_x, 0, 256);
    memset(l.lut_w, 0, n * 256);
    l.mult = checked_malloc(n * sizeof(int32_t));
    l.i_min = checked_malloc(n * sizeof(int32_t));
    l.offset = checked_malloc(n * sizeof(int64_t));
    return l;
}

static void layer_free(layer *l)
{
    free(l->codes_x);
    free(l->codes_w);
    free(l->lut_x);
    free(l->lut_w);
    free(l->mult);
    free(l->i_min);
    free(l->offset);
}

static void layer_randomize(layer *l)
{
    for (size_t i = 0; i < l->m * l->k; ++i)
        l->codes_x[i] = (uint8_t)random_below(1u << l->bits_x);
    for (size_t i = 0; i < l->n * l->k; ++i)
        l->codes_w[i] = (uint8_t)random_below(1u << l->bits_w);
    for (size_t i = 0; i < ((size_t)1 << l->bits_x); ++i)
        l->lut_x[i] = (uint8_t)random_below(256);
    for (size_t i = 0; i < (l->n << l->bits_w); ++i)
        l->lut_w[i] = (int8_t)(random_below(256) - 128);
    l->lut_x_signed = (int)random_below(2);
    l->shift = 1 + (int)random_below(61);
    l->bits_out = 1 + (int)random_below(8);
    for (size_t c = 0; c < l->n; ++c) {
        l->mult[c] = (int32_t)random_below(1u << 30);
        int64_t magnitude = (int64_t)(next_random() >> 3);
        l->offset[c] = random_below(2) ? magnitude : -magnitude;
        l->i_min[c] = random_below(3) == 0 ? (int32_t)random_below(256) : 0;
    }
}

/* The spec written independently of the library: floor division instead of shifts. */
static void reference(const layer *l, int32_t *acc, uint8_t *codes)
{
    for (size_t r = 0; r < l->m; ++r)
        for (size_t c = 0; c < l->n; ++c) {
            int64_t sum = 0;
            for (size_t k = 0; k < l->k; ++k) {
                uint8_t xb = l->lut_x[l->codes_x[r * l->k + k]];
                int64_t x = l->lut_x_signed ? (int64_t)(int8_t)xb : (int64_t)xb;
                sum += x * l->lut_w[(c << l->bits_w) + l->codes_w[c * l->k + k]];
            }
            acc[r * l->n + c] = (int32_t)sum;
            int64_t scale = (int64_t)1 << l->shift;
            int64_t numerator = sum * l->mult[c] + l->offset[c] + scale / 2;
            int64_t index = numerator / scale - (numerator % scale < 0 ? 1 : 0);
            index = index < 0 ? 0 : index > 255 ? 255 : index;
            index = index < l->i_min[c] ? l->i_min[c] : index;
            codes[r * l->n + c] = (uint8_t)(index >> (8 - l->bits_out));
        }
}

typedef struct {
    uint8_t *packed;
    size_t packed_size;
    arm_ref_gemm_args args;
} packed_layer;

static packed_layer pack_layer(const layer *l)
{
    packed_layer p;
    p.packed_size = l->n * arm_ref_packed_row_bytes(l->k, l->bits_w);
    p.packed = checked_malloc(p.packed_size);
    int status = arm_ref_pack(l->codes_w, l->n, l->k, l->bits_w, p.packed, p.packed_size);
    CHECK(status == ARM_REF_OK, "pack: %s", arm_ref_status_string(status));
    arm_ref_gemm_args a = {l->codes_x, l->lut_x, p.packed, l->lut_w, l->mult, l->offset, l->i_min,
                           l->m, l->n, l->k, p.packed_size, l->bits_x, l->lut_x_signed, l->bits_w,
                           l->shift, l->bits_out};
    p.args = a;
    return p;
}

static int run_path(const arm_ref_gemm_args *a, int path, int32_t *acc, uint8_t *codes)
{
    size_t workspace_size = arm_ref_workspace_bytes(a->m, a->k);
    void *workspace = checked_malloc(workspace_size);
    int status = arm_ref_int_gemm(a, path, workspace, workspace_size, acc, codes);
    free(workspace);
    return status;
}

/* A prepared-weights buffer of exactly `size` bytes on a 64-byte boundary (ASan sees any read past it). */
static void *prepared_alloc(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, ARM_REF_PREPARED_ALIGN, size ? size : 1) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static int run_prepared(const arm_ref_gemm_args *a, const void *prepared, size_t prepared_size, int path, int32_t *acc,
                        uint8_t *codes)
{
    size_t workspace_size = arm_ref_workspace_bytes(a->m, a->k);
    void *workspace = checked_malloc(workspace_size == SIZE_MAX ? 1 : workspace_size);
    int status = arm_ref_int_gemm_prepared(a, prepared, prepared_size, path, workspace,
                                           workspace_size == SIZE_MAX ? 0 : workspace_size, acc, codes);
    free(workspace);
    return status;
}

static const int all_paths[] = {ARM_REF_PATH_SCALAR, ARM_REF_PATH_NEON, ARM_REF_PATH_AVX512, ARM_REF_PATH_AMX,
                                 ARM_REF_PATH_AUTO};
#define PATH_COUNT ((int)(sizeof all_paths / sizeof all_paths[0]))
static int path_runs[PATH_COUNT];
static int prepared_runs[PATH_COUNT];

/* Runs every available path and compares each with the reference; returns the number of mismatches. */
static int check_layer(const layer *l, const char *label)
{
    size_t outputs = l->m * l->n;
    int32_t *want_acc = checked_malloc(outputs * sizeof(int32_t));
    uint8_t *want_codes = checked_malloc(outputs);
    int32_t *acc = checked_malloc(outputs * sizeof(int32_t));
    uint8_t *codes = checked_malloc(outputs);
    int before = failures;
    reference(l, want_acc, want_codes);
    packed_layer p = pack_layer(l);
    size_t prepared_size = arm_ref_prepared_weights_bytes(l->n, l->k, l->bits_w);
    void *prepared = prepared_alloc(prepared_size);
    int prepared_status = arm_ref_prepare_weights(p.packed, p.packed_size, l->lut_w, l->n, l->k, l->bits_w, prepared,
                                                  prepared_size);
    CHECK(prepared_status == ARM_REF_OK, "%s prepare: %s", label, arm_ref_status_string(prepared_status));
    /* Every path on packed weights, then on prepared weights (packed_w and lut_w withheld). */
    arm_ref_gemm_args without_weights = p.args;
    without_weights.packed_w = NULL;
    without_weights.lut_w = NULL;
    without_weights.packed_size = 0;
    for (int run = 0; run < 2 * PATH_COUNT; ++run) {
        int i = run % PATH_COUNT, is_prepared = run >= PATH_COUNT;
        if (!arm_ref_path_available(all_paths[i]) || (is_prepared && prepared_status != ARM_REF_OK))
            continue;
        ++(is_prepared ? prepared_runs : path_runs)[i];
        int status = is_prepared ? run_prepared(&without_weights, prepared, prepared_size, all_paths[i], acc, codes)
                                 : run_path(&p.args, all_paths[i], acc, codes);
        CHECK(status == ARM_REF_OK, "%s [%s%s]: %s", label, arm_ref_path_name(all_paths[i]),
              is_prepared ? " prepared" : "", arm_ref_status_string(status));
        for (size_t o = 0; o < outputs && status == ARM_REF_OK; ++o)
            if (acc[o] != want_acc[o] || codes[o] != want_codes[o]) {
                CHECK(0, "%s [%s%s] M=%zu N=%zu K=%zu bx=%d bw=%d out %zu: acc %d want %d, code %u want %u", label,
                      arm_ref_path_name(all_paths[i]), is_prepared ? " prepared" : "", l->m, l->n, l->k, l->bits_x,
                      l->bits_w, o, acc[o], want_acc[o], codes[o], want_codes[o]);
                break;
            }
    }
    free(prepared);
    free(p.packed);
    free(want_acc);
    free(want_codes);
    free(acc);
    free(codes);
    return failures - before;
}

/* z + 2^(shift−1) landing exactly on multiples of 2^shift (ties go up), and z around −2^(shift−1); 11
 * columns, so the vector requantisation sees a full 8-lane block and a 3-lane tail. */
static void test_rounding_ties(void)
{
    /* Up to shift 53 every target, 256·2^shift included, stays below the offset limit 2^61. */
    for (int shift = 1; shift <= 53; shift += 4) {
        layer l = layer_new(3, 11, 1, 2, 1);
        int64_t half = (int64_t)1 << (shift - 1), scale = (int64_t)1 << shift;
        l.lut_x_signed = 1;
        l.shift = shift;
        const int8_t x_values[4] = {0, 1, -1, 5};
        memcpy(l.lut_x, x_values, 4);
        l.codes_x[0] = 0; /* acc 0 */
        l.codes_x[1] = 1; /* acc = lut_w */
        l.codes_x[2] = 2;
        const int64_t targets[11] = {-half - 1,         -half,       -half + 1,         scale - half,
                                     7 * scale - half,  255 * scale - half, 256 * scale - half, 3 * scale - half - 1,
                                     -half - 1,         2 * scale - half,   255 * scale - half - 1};
        for (size_t c = 0; c < 11; ++c) {
            l.codes_w[c] = 0;
            l.lut_w[2 * c] = 1;
            l.lut_w[2 * c + 1] = 0;
            l.mult[c] = shift > 31 ? 0 : 1;
            l.offset[c] = targets[c]; /* row 0 has acc = 0, so z is exactly the target */
            l.i_min[c] = 0;
        }
        l.bits_out = 8;
        check_layer(&l, "rounding ties");
        int32_t acc[33];
        uint8_t codes[33];
        packed_layer p = pack_layer(&l);
        const uint8_t expected_row0[11] = {0, 0, 0, 1, 7, 255, 255, 2, 0, 2, 254};
        for (int i = 0; i < PATH_COUNT; ++i) {
            if (!arm_ref_path_available(all_paths[i]))
                continue;
            CHECK(run_path(&p.args, all_paths[i], acc, codes) == ARM_REF_OK, "ties run");
            for (int c = 0; c < 11; ++c)
                CHECK(codes[c] == expected_row0[c], "tie shift=%d target %d: code %u want %u", shift, c, codes[c],
                      expected_row0[c]);
        }
        free(p.packed);
        layer_free(&l);
    }
}

/* |acc| at its maximum: K = 65536 and extreme tables, both activation signednesses, 4- and 8-bit
 * weights (the 8-bit codes reach the top quarter of the 256-entry table), and a row count past one AMX
 * tile with a partial second tile. */
static void test_extremes(void)
{
    const int8_t w_values[3] = {-128, 127, -127};
    for (int signedness = 0; signedness < 2; ++signedness)
        for (int wi = 0; wi < 3; ++wi) {
            int bits_w = wi == 1 ? 8 : 4;
            /* 65 columns: one full AMX group of 64 and a one-column group (partial tile, zero rows). */
            layer l = layer_new(wi == 0 ? 17 : 2, wi == 0 ? 65 : 3, ARM_REF_MAX_K, 1, bits_w);
            l.lut_x_signed = signedness;
            l.lut_x[0] = signedness ? (uint8_t)0x80 : 255; /* −128 or 255 */
            l.lut_x[1] = signedness ? 127 : 0;
            memset(l.codes_x, 0, l.m * l.k);
            uint8_t top = (uint8_t)((1u << bits_w) - 1);
            for (size_t i = 0; i < l.n * l.k; ++i)
                l.codes_w[i] = (uint8_t)(i % 3 == 0 ? top : top - (i % 2));
            for (size_t i = 0; i < (l.n << l.bits_w); ++i)
                l.lut_w[i] = w_values[wi];
            for (size_t c = 0; c < l.n; ++c) {
                l.mult[c] = (1 << 30) - 1;
                l.offset[c] = c % 3 == 0 ? ((int64_t)1 << 61) - 1 : c % 3 == 1 ? -((int64_t)1 << 61) + 1 : 0;
                l.i_min[c] = (int32_t)(c % 3 * 100);
            }
            l.shift = 61;
            check_layer(&l, "extreme K=65536");
            layer_free(&l);
        }
}

/* K = 1, odd M and N, every bitwidth pair, every bits_out, i_min > 0. */
static void test_bit_combinations(void)
{
    for (int bits_x = 1; bits_x <= 8; ++bits_x)
        for (int bits_w = 1; bits_w <= 8; ++bits_w) {
            size_t ks[3] = {1, 1 + random_below(300), 513 + random_below(700)};
            for (int t = 0; t < 3; ++t) {
                layer l = layer_new(1 + 2 * random_below(4), 1 + 2 * random_below(5), ks[t], bits_x, bits_w);
                layer_randomize(&l);
                l.bits_out = 1 + (bits_x + bits_w + t) % 8;
                l.i_min[0] = 1 + (int32_t)random_below(255);
                check_layer(&l, "bit combinations");
                layer_free(&l);
            }
        }
}

/* The x86 kernels block 4 activation rows × 2 columns or 1 row × 4 columns (AVX-512) and 16-row
 * activation tiles × groups of four 16-column weight tiles (AMX), decode weights in 512-position slices
 * and work on 64-byte chunks: shapes just below, at and past each block edge (partial tiles, partial
 * groups, a single tile in a group), every container width and table size (bits 5, 7, 8 use the three
 * 8-bit decoders), and 1-, 7- and 8-bit activation tables. */
static void test_blocking(void)
{
    const size_t rows[] = {1, 3, 4, 5, 15, 16, 17, 33};
    const size_t cols[] = {1, 2, 3, 5, 15, 16, 17, 33, 48, 63, 64, 65, 130};
    const int bits_w[] = {1, 2, 3, 4, 5, 7, 8};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; ++i)
        for (size_t j = 0; j < sizeof cols / sizeof cols[0]; ++j) {
            int bw = bits_w[(i + j) % 7];
            size_t chunk = 64 * 8 / (size_t)(bw <= 2 ? bw : bw <= 4 ? 4 : 8);
            /* One chunk plus a scalar tail, several decode slices plus a partial slice (one to three tile
             * steps past a slice edge), or exact. */
            size_t ks[3] = {chunk + 1 + random_below(63), 512 * 3 + chunk + random_below(3) * 64, chunk * 2};
            for (int t = 0; t < 3; ++t) {
                layer l = layer_new(rows[i], cols[j], ks[t], t == 0 ? 8 : t == 1 ? 7 : 1, bw);
                layer_randomize(&l);
                if (check_layer(&l, "blocking")) {
                    layer_free(&l);
                    return;
                }
                layer_free(&l);
            }
        }
}

static void test_random(int iterations)
{
    for (int it = 0; it < iterations; ++it) {
        /* Every tenth case spans several of the AVX-512 path's 4096-code K blocks and more than 16 rows. */
        size_t k = it % 10 == 0 ? 4000 + random_below(5000) : 1 + random_below(1500);
        layer l = layer_new(it % 10 == 0 ? 1 + random_below(40) : 1 + random_below(9), 1 + random_below(9), k, 1 + (int)random_below(8), 1 + (int)random_below(8));
        layer_randomize(&l);
        /* Small mult and offset near the grid so the output codes are not all saturated. */
        if (random_below(2)) {
            l.shift = 8 + (int)random_below(12);
            for (size_t c = 0; c < l.n; ++c) {
                l.mult[c] = (int32_t)random_below(1u << 8);
                l.offset[c] = (int64_t)random_below(1u << 24) - (1 << 23);
            }
        }
        if (check_layer(&l, "random"))
            break;
        layer_free(&l);
    }
}

static void expect_status(const arm_ref_gemm_args *a, int path, int want, const char *label)
{
    int32_t acc[64];
    uint8_t codes[64];
    size_t workspace_size = arm_ref_workspace_bytes(a->m, a->k);
    void *workspace = checked_malloc(workspace_size == SIZE_MAX ? 1 : workspace_size);
    int status = arm_ref_int_gemm(a, path, workspace, workspace_size == SIZE_MAX ? 0 : workspace_size, acc, codes);
    CHECK(status == want, "%s: got '%s', want '%s'", label, arm_ref_status_string(status), arm_ref_status_string(want));
    free(workspace);
}

static void test_errors(void)
{
    layer l = layer_new(2, 3, 37, 4, 3);
    layer_randomize(&l);
    l.shift = 20;
    packed_layer p = pack_layer(&l);
    arm_ref_gemm_args a;
    int32_t acc[6];
    uint8_t codes[6];

#define MUTATE(field, value, want)                                                                           \
    do {                                                                                                     \
        a = p.args;                                                                                          \
        a.field = value;                                                                                     \
        expect_status(&a, ARM_REF_PATH_AUTO, want, #field " = " #value);                                     \
    } while (0)

    MUTATE(k, ARM_REF_MAX_K + 1, ARM_REF_ERR_K_LIMIT);
    MUTATE(m, 0, ARM_REF_ERR_SHAPE);
    MUTATE(n, 0, ARM_REF_ERR_SHAPE);
    MUTATE(m, SIZE_MAX / 2, ARM_REF_ERR_SHAPE);
    MUTATE(bits_x, 0, ARM_REF_ERR_BITS);
    MUTATE(bits_w, 9, ARM_REF_ERR_BITS);
    MUTATE(bits_out, 0, ARM_REF_ERR_BITS);
    MUTATE(bits_out, 9, ARM_REF_ERR_BITS);
    MUTATE(lut_x_signed, 2, ARM_REF_ERR_DTYPE);
    MUTATE(codes_x, NULL, ARM_REF_ERR_NULL);
    MUTATE(lut_w, NULL, ARM_REF_ERR_NULL);
    MUTATE(packed_size, p.packed_size - 1, ARM_REF_ERR_PACKED_SIZE);
    MUTATE(shift, 0, ARM_REF_ERR_SHIFT);
    MUTATE(shift, 62, ARM_REF_ERR_SHIFT);
    MUTATE(bits_x, 3, ARM_REF_ERR_CODE_X_RANGE); /* codes drawn for 4 bits exceed 3 bits */
    MUTATE(bits_w, 2, ARM_REF_ERR_PACKED_SIZE);  /* 2-bit rows are shorter than 4-bit ones */
#undef MUTATE

    int32_t bad_mult[3] = {1, 1 << 30, 1};
    int64_t bad_offset[3] = {0, (int64_t)1 << 61, 0};
    int64_t min_offset[3] = {0, INT64_MIN, 0};
    int32_t bad_i_min[3] = {0, 256, 0};
    int32_t negative_i_min[3] = {-1, 0, 0};
    int32_t negative_mult[3] = {0, 0, -1};
    a = p.args;
    a.mult = bad_mult;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_MULT, "mult = 2^30");
    a.mult = negative_mult;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_MULT, "mult < 0");
    a = p.args;
    a.offset = bad_offset;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_OFFSET, "offset = 2^61");
    a.offset = min_offset;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_OFFSET, "offset = INT64_MIN");
    a = p.args;
    a.i_min = bad_i_min;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_I_MIN, "i_min = 256");
    a.i_min = negative_i_min;
    expect_status(&a, ARM_REF_PATH_AUTO, ARM_REF_ERR_I_MIN, "i_min < 0");

    uint8_t saved = p.packed[0];
    p.packed[0] |= 0x08; /* a 3-bit code stored in a 4-bit container with its top bit set */
    expect_status(&p.args, ARM_REF_PATH_AUTO, ARM_REF_ERR_CODE_W_RANGE, "weight code 8 at 3 bits");
    p.packed[0] = saved;
    size_t row_bytes = arm_ref_packed_row_bytes(l.k, l.bits_w);
    p.packed[row_bytes - 1] |= 0x80; /* K = 37 codes of 4 bits leave the top nibble of the last byte as padding */
    expect_status(&p.args, ARM_REF_PATH_AUTO, ARM_REF_ERR_PADDING, "padding bits");
    p.packed[row_bytes - 1] &= 0x7F;

    expect_status(&p.args, 99, ARM_REF_ERR_PATH, "unknown path");
#if defined(__x86_64__)
    expect_status(&p.args, ARM_REF_PATH_NEON, ARM_REF_ERR_PATH, "NEON on x86");
#endif
#if defined(__aarch64__)
    expect_status(&p.args, ARM_REF_PATH_AVX512, ARM_REF_ERR_PATH, "AVX-512 on aarch64");
#endif
    size_t workspace_size = arm_ref_workspace_bytes(l.m, l.k);
    void *workspace = checked_malloc(workspace_size);
    CHECK(arm_ref_int_gemm(&p.args, ARM_REF_PATH_AUTO, workspace, workspace_size - 1, acc, codes) ==
              ARM_REF_ERR_WORKSPACE, "small workspace");
    CHECK(arm_ref_int_gemm(&p.args, ARM_REF_PATH_AUTO, NULL, workspace_size, acc, codes) == ARM_REF_ERR_WORKSPACE,
          "NULL workspace");
    CHECK(arm_ref_int_gemm(NULL, ARM_REF_PATH_AUTO, workspace, workspace_size, acc, codes) == ARM_REF_ERR_NULL,
          "NULL args");
    CHECK(arm_ref_int_gemm(&p.args, ARM_REF_PATH_AUTO, workspace, workspace_size, NULL, codes) == ARM_REF_ERR_NULL,
          "NULL acc");
    free(workspace);

    uint8_t unpacked[3 * 37];
    CHECK(arm_ref_unpack(p.packed, p.packed_size, l.n, l.k, l.bits_w, unpacked) == ARM_REF_OK, "unpack");
    CHECK(memcmp(unpacked, l.codes_w, sizeof unpacked) == 0, "pack/unpack round trip");
    uint8_t too_big[4] = {0, 1, 2, 8};
    uint8_t packed_small[2];
    CHECK(arm_ref_pack(too_big, 1, 4, 3, packed_small, 2) == ARM_REF_ERR_CODE_W_RANGE, "pack code range");
    CHECK(arm_ref_pack(too_big, 1, 4, 4, packed_small, 1) == ARM_REF_ERR_PACKED_SIZE, "pack size");
    CHECK(arm_ref_packed_row_bytes(5, 1) == 1 && arm_ref_packed_row_bytes(9, 1) == 2 &&
              arm_ref_packed_row_bytes(3, 3) == 2 && arm_ref_packed_row_bytes(3, 5) == 3,
          "packed row bytes");
    CHECK(strcmp(arm_ref_status_string(12345), "unknown arm_ref status") == 0, "unknown status string");
    free(p.packed);
    layer_free(&l);
}

/* Prepare checks the weights like a call does; a call rejects any buffer that is not exactly the one
 * prepared for its N, K and bits_w (other shape, other width, other size, flipped header byte,
 * misaligned, never prepared). */
static void test_prepared_errors(void)
{
    for (int bits_w = 3; bits_w <= 8; bits_w += 5) {
        layer l = layer_new(2, 3, 37, 4, bits_w);
        layer_randomize(&l);
        packed_layer p = pack_layer(&l);
        size_t size = arm_ref_prepared_weights_bytes(l.n, l.k, l.bits_w);
        uint8_t *prepared = prepared_alloc(size + 64);
        int32_t acc[6];
        uint8_t codes[6];
        CHECK(size > 64, "prepared size %zu", size);
        CHECK(arm_ref_prepared_weights_bytes(0, 5, 8) == 0 && arm_ref_prepared_weights_bytes(5, ARM_REF_MAX_K + 1, 8) == 0 &&
                  arm_ref_prepared_weights_bytes(5, 5, 9) == 0 && arm_ref_prepared_weights_bytes(SIZE_MAX / 4, 64, 8) == 0,
              "prepared bytes of invalid shapes");
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, l.lut_w, l.n, l.k, l.bits_w, prepared, size - 1) ==
                  ARM_REF_ERR_PREPARED_MISMATCH, "prepare into a short buffer");
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, l.lut_w, l.n, l.k, l.bits_w, prepared + 1, size) ==
                  ARM_REF_ERR_ALIGNMENT, "prepare misaligned");
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, NULL, l.n, l.k, l.bits_w, prepared, size) ==
                  ARM_REF_ERR_NULL, "prepare NULL table");
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size - 1, l.lut_w, l.n, l.k, l.bits_w, prepared, size) ==
                  ARM_REF_ERR_PACKED_SIZE, "prepare packed size");
        if (bits_w == 3) {
            uint8_t saved = p.packed[0];
            p.packed[0] |= 0x08;
            CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, l.lut_w, l.n, l.k, l.bits_w, prepared, size) ==
                      ARM_REF_ERR_CODE_W_RANGE, "prepare weight code range");
            p.packed[0] = saved;
        }
        memset(prepared, 0, size);
        CHECK(run_prepared(&p.args, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED,
              "never-prepared buffer");
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, l.lut_w, l.n, l.k, l.bits_w, prepared, size) == ARM_REF_OK,
              "prepare");
        CHECK(run_prepared(&p.args, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_OK, "prepared run");
        arm_ref_gemm_args a = p.args;
        a.n = 2;
        CHECK(run_prepared(&a, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED_MISMATCH, "other N");
        a = p.args;
        a.k = 36;
        CHECK(run_prepared(&a, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED_MISMATCH, "other K");
        a = p.args;
        a.bits_w = bits_w == 8 ? 7 : 4;
        CHECK(run_prepared(&a, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED_MISMATCH,
              "other bits_w");
        CHECK(run_prepared(&p.args, prepared, size + 64, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED_MISMATCH,
              "other size");
        CHECK(run_prepared(&p.args, prepared, 10, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED,
              "truncated header");
        CHECK(run_prepared(&p.args, NULL, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_NULL, "NULL prepared");
        CHECK(run_prepared(&p.args, prepared, size, 99, acc, codes) == ARM_REF_ERR_PATH, "prepared unknown path");
        a = p.args;
        a.shift = 0;
        CHECK(run_prepared(&a, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_SHIFT, "prepared shift");
        memmove(prepared + 64, prepared, size);
        CHECK(run_prepared(&p.args, prepared + 1, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_ALIGNMENT,
              "misaligned prepared");
        memmove(prepared, prepared + 64, size);
        for (size_t byte = 0; byte < 64; ++byte) {
            prepared[byte] ^= (uint8_t)(1u << (byte % 8));
            CHECK(run_prepared(&p.args, prepared, size, ARM_REF_PATH_AUTO, acc, codes) == ARM_REF_ERR_PREPARED,
                  "header byte %zu flipped", byte);
            prepared[byte] ^= (uint8_t)(1u << (byte % 8));
        }
        free(prepared);
        free(p.packed);
        layer_free(&l);
    }
}

/* A buffer prepared for one random layer, given to a call with (possibly) other N, K and bits_w, with
 * random header or data bytes changed: the call answers a status and never reads outside the buffer
 * (ASan); data bytes are not checked per call, so changing them only changes the results. */
static void fuzz_prepared(int iterations)
{
    for (int it = 0; it < iterations; ++it) {
        layer l = layer_new(1 + random_below(5), 1 + random_below(40), 1 + random_below(200), 1 + (int)random_below(8),
                            1 + (int)random_below(8));
        layer_randomize(&l);
        packed_layer p = pack_layer(&l);
        size_t size = arm_ref_prepared_weights_bytes(l.n, l.k, l.bits_w);
        uint8_t *prepared = prepared_alloc(size);
        CHECK(arm_ref_prepare_weights(p.packed, p.packed_size, l.lut_w, l.n, l.k, l.bits_w, prepared, size) == ARM_REF_OK,
              "fuzz prepare");
        arm_ref_gemm_args a = p.args;
        size_t given = size;
        switch (random_below(6)) {
        case 0: a.n = 1 + random_below((uint32_t)l.n); break;
        case 1: a.k = 1 + random_below((uint32_t)l.k); break;
        case 2: a.bits_w = 1 + (int32_t)random_below(8); break;
        case 3: given = random_below((uint32_t)size + 1); break;
        case 4: prepared[random_below(64)] = (uint8_t)random_below(256); break;
        default: prepared[64 + random_below((uint32_t)(size - 64))] = (uint8_t)random_below(256); break;
        }
        int32_t *acc = checked_malloc(l.m * l.n * sizeof(int32_t));
        uint8_t *codes = checked_malloc(l.m * l.n);
        for (int i = 0; i < PATH_COUNT; ++i) {
            if (!arm_ref_path_available(all_paths[i]))
                continue;
            int status = run_prepared(&a, prepared, given, all_paths[i], acc, codes);
            CHECK(status >= ARM_REF_OK && status <= ARM_REF_ERR_ALIGNMENT, "fuzz prepared status %d", status);
            CHECK(status != ARM_REF_OK || (a.n == l.n && a.k == l.k && a.bits_w == l.bits_w && given == size),
                  "fuzz: a mismatched prepared buffer was accepted");
        }
        free(acc);
        free(codes);
        free(prepared);
        free(p.packed);
        layer_free(&l);
    }
}

/* Random field values over exactly-sized buffers: the library must answer a status, never read
 * outside what the (possibly wrong) fields describe; ASan reports any stray access. */
static void fuzz_arguments(int iterations)
{
    for (int it = 0; it < iterations; ++it) {
        layer l = layer_new(1 + random_below(5), 1 + random_below(5), 1 + random_below(200), 1 + (int)random_below(8),
                            1 + (int)random_below(8));
        layer_randomize(&l);
        packed_layer p = pack_layer(&l);
        arm_ref_gemm_args a = p.args;
        switch (random_below(8)) {
        case 0: a.bits_x = (int32_t)random_below(12) - 2; break;
        case 1: a.bits_w = (int32_t)random_below(12) - 2; break;
        case 2: a.shift = (int32_t)random_below(70) - 4; break;
        case 3: a.packed_size = random_below((uint32_t)p.packed_size * 2 + 2); break;
        case 4: a.k = random_below((uint32_t)l.k + 1); break;
        case 5: p.packed[random_below((uint32_t)p.packed_size)] = (uint8_t)random_below(256); break;
        case 6: l.codes_x[random_below((uint32_t)(l.m * l.k))] = (uint8_t)random_below(256); break;
        default: a.bits_out = (int32_t)random_below(12) - 2; break;
        }
        /* A smaller K or narrower bitwidth only shrinks what is read; anything else must be rejected. */
        int32_t *acc = checked_malloc(l.m * l.n * sizeof(int32_t));
        uint8_t *codes = checked_malloc(l.m * l.n);
        for (int i = 0; i < PATH_COUNT; ++i) {
            if (!arm_ref_path_available(all_paths[i]))
                continue;
            int status = run_path(&a, all_paths[i], acc, codes);
            CHECK(status >= ARM_REF_OK && status <= ARM_REF_ERR_DTYPE, "fuzz status %d", status);
        }
        free(acc);
        free(codes);
        free(p.packed);
        layer_free(&l);
    }
}

static size_t build_file(uint8_t *buffer, size_t capacity)
{
    const char *header = "{\"__metadata__\":{\"ddq\":\"{\\\"format\\\": 1}\"},"
                         "\"layers.0.lut_w\":{\"dtype\":\"I8\",\"shape\":[2,4],\"data_offsets\":[0,8]},"
                         "\"layers.0.mult\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                         "\"scalar\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[16,24]}}";
    size_t header_size = strlen(header);
    size_t total = 8 + header_size + 24;
    if (total > capacity)
        return 0;
    for (int i = 0; i < 8; ++i)
        buffer[i] = (uint8_t)((uint64_t)header_size >> (8 * i));
    memcpy(buffer + 8, header, header_size);
    for (size_t i = 0; i < 24; ++i)
        buffer[8 + header_size + i] = (uint8_t)i;
    return total;
}

static void test_file(int iterations)
{
    uint8_t original[512], buffer[512];
    size_t size = build_file(original, sizeof original);
    arm_ref_file file;
    arm_ref_tensor tensor;
    CHECK(size > 0 && arm_ref_file_parse(original, size, &file) == ARM_REF_OK, "parse valid file");
    CHECK(file.tensor_count == 3, "tensor count %zu", file.tensor_count);
    CHECK(arm_ref_file_tensor(&file, "layers.0.mult", &tensor) == ARM_REF_OK && tensor.ndim == 1 &&
              tensor.shape[0] == 2 && strcmp(tensor.dtype, "I32") == 0 && tensor.nbytes == 8 && tensor.data[0] == 8,
          "find tensor");
    CHECK(arm_ref_file_tensor(&file, "scalar", &tensor) == ARM_REF_OK && tensor.ndim == 0 && tensor.nbytes == 8,
          "0-d tensor");
    CHECK(arm_ref_file_tensor(&file, "missing", &tensor) == ARM_REF_ERR_NOT_FOUND, "missing tensor");
    for (size_t cut = 0; cut < size; ++cut) {
        /* Every truncation is an error: the header length or a tensor's end points past the data. */
        uint8_t *truncated = checked_malloc(cut);
        memcpy(truncated, original, cut);
        int status = arm_ref_file_parse(truncated, cut, &file);
        CHECK(status != ARM_REF_OK, "truncated at %zu parsed", cut);
        free(truncated);
    }
    for (int it = 0; it < iterations; ++it) {
        size_t length = size;
        memcpy(buffer, original, size);
        int edits = 1 + (int)random_below(4);
        for (int e = 0; e < edits; ++e) {
            uint32_t where = random_below((uint32_t)length);
            switch (random_below(4)) {
            case 0: buffer[where] = (uint8_t)random_below(256); break;
            case 1: buffer[where] = (uint8_t)"{}[]\",:0123456789"[random_below(17)]; break;
            case 2: buffer[where] ^= (uint8_t)(1u << random_below(8)); break;
            default: length = where + 1; break;
            }
        }
        uint8_t *exact = checked_malloc(length);
        memcpy(exact, buffer, length);
        if (arm_ref_file_parse(exact, length, &file) == ARM_REF_OK) {
            const char *names[3] = {"layers.0.lut_w", "layers.0.mult", "scalar"};
            for (int i = 0; i < 3; ++i)
                if (arm_ref_file_tensor(&file, names[i], &tensor) == ARM_REF_OK) {
                    CHECK(tensor.data >= exact && tensor.data + tensor.nbytes <= exact + length, "tensor bounds");
                    volatile uint8_t sink = 0;
                    for (size_t b = 0; b < tensor.nbytes; ++b)
                        sink ^= tensor.data[b];
                    (void)sink;
                }
        }
        free(exact);
    }
}

int main(int argc, char **argv)
{
    int fuzz = argc > 1 ? atoi(argv[1]) : 2000;
    printf("arm_ref tests: best path %s; available:", arm_ref_path_name(arm_ref_best_path()));
    for (int i = 0; i < PATH_COUNT; ++i)
        if (arm_ref_path_available(all_paths[i]))
            printf(" %s", arm_ref_path_name(all_paths[i]));
    printf("\n");
    test_rounding_ties();
    test_extremes();
    test_bit_combinations();
    test_blocking();
    test_random(300);
    test_errors();
    test_prepared_errors();
    fuzz_arguments(fuzz / 4);
    fuzz_prepared(fuzz / 4);
    test_file(fuzz * 10);
    printf("cases per path:");
    for (int i = 0; i < PATH_COUNT; ++i)
        printf(" %s=%d", arm_ref_path_name(all_paths[i]), path_runs[i]);
    printf("\nprepared cases per path:");
    for (int i = 0; i < PATH_COUNT; ++i)
        printf(" %s=%d", arm_ref_path_name(all_paths[i]), prepared_runs[i]);
    printf("\n%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
