/* arm_ref: the integer layer of DDQ_SPEC.md Section 5 in portable C11, with NEON (aarch64), AVX-512
 * and AMX (x86-64) paths chosen at run time, plus a bounds-checked reader for exported files.
 *
 * Every entry point validates its arguments and returns an arm_ref_status; no function allocates
 * memory. Results are bit-identical across paths and to the NumPy golden (ddq.deploy.int_gemm). */
#ifndef ARM_REF_H
#define ARM_REF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ARM_REF_MAX_K 65536u

typedef enum {
    ARM_REF_OK = 0,
    ARM_REF_ERR_NULL = 1,
    ARM_REF_ERR_SHAPE = 2,
    ARM_REF_ERR_K_LIMIT = 3,
    ARM_REF_ERR_BITS = 4,
    ARM_REF_ERR_CODE_X_RANGE = 5,
    ARM_REF_ERR_CODE_W_RANGE = 6,
    ARM_REF_ERR_PADDING = 7,
    ARM_REF_ERR_SHIFT = 8,
    ARM_REF_ERR_MULT = 9,
    ARM_REF_ERR_OFFSET = 10,
    ARM_REF_ERR_I_MIN = 11,
    ARM_REF_ERR_WORKSPACE = 12,
    ARM_REF_ERR_PATH = 13,
    ARM_REF_ERR_PACKED_SIZE = 14,
    ARM_REF_ERR_FILE_TRUNCATED = 15,
    ARM_REF_ERR_FILE_HEADER = 16,
    ARM_REF_ERR_FILE_TENSOR = 17,
    ARM_REF_ERR_NOT_FOUND = 18,
    ARM_REF_ERR_DTYPE = 19,
    ARM_REF_ERR_PREPARED = 20,
    ARM_REF_ERR_PREPARED_MISMATCH = 21,
    ARM_REF_ERR_ALIGNMENT = 22
} arm_ref_status;

typedef enum {
    ARM_REF_PATH_AUTO = 0,
    ARM_REF_PATH_SCALAR = 1,
    ARM_REF_PATH_NEON = 2,
    ARM_REF_PATH_AVX512 = 3,
    ARM_REF_PATH_AMX = 4
} arm_ref_path;

/* One integer layer (spec §5). codes_x: uint8[M, K]; lut_x: 2^bits_x bytes, read as int8 when
 * lut_x_signed else uint8; packed_w: uint8[N, arm_ref_packed_row_bytes(K, bits_w)] (packed_size bytes);
 * lut_w: int8[N, 2^bits_w]; mult int32[N], offset int64[N], i_min int32[N]. */
typedef struct {
    const uint8_t *codes_x;
    const uint8_t *lut_x;
    const uint8_t *packed_w;
    const int8_t *lut_w;
    const int32_t *mult;
    const int64_t *offset;
    const int32_t *i_min;
    size_t m;
    size_t n;
    size_t k;
    size_t packed_size;
    int32_t bits_x;
    int32_t lut_x_signed;
    int32_t bits_w;
    int32_t shift;
    int32_t bits_out;
} arm_ref_gemm_args;

const char *arm_ref_status_string(int status);
const char *arm_ref_path_name(int path);
/* 1 when this CPU (and this build) can run `path`, else 0. */
int arm_ref_path_available(int path);
/* The fastest available path for many activation rows. */
int arm_ref_best_path(void);
/* What ARM_REF_PATH_AUTO runs for M activation rows: the best path, except that GEMVs with few rows
 * (M < 5) take AVX-512 instead of AMX (measured crossover at N = K = 4096: M = 4 runs 452 vs 562 µs at 4 bits,
 * M = 5 749 vs 566 µs, since the GEMV blocks 4 rows and takes a leftover row one at a time). */
int arm_ref_auto_path(size_t m);

/* Container width w for b-bit codes (1, 2, 4 or 8), 0 for b outside 1..8. */
int arm_ref_container_bits(int bits);
/* ceil(K·w/8), 0 for invalid bits. */
size_t arm_ref_packed_row_bytes(size_t k, int bits);
int arm_ref_pack(const uint8_t *codes, size_t n, size_t k, int bits, uint8_t *packed, size_t packed_size);
int arm_ref_unpack(const uint8_t *packed, size_t packed_size, size_t n, size_t k, int bits, uint8_t *codes);
/* Rejects codes ≥ 2^bits and non-zero padding bits. */
int arm_ref_check_packed(const uint8_t *packed, size_t packed_size, size_t n, size_t k, int bits);

/* Bytes of caller-provided scratch that arm_ref_int_gemm needs for an [M, K] activation. */
size_t arm_ref_workspace_bytes(size_t m, size_t k);
/* acc int32[M, N] and codes_out uint8[M, N]; path is an arm_ref_path. */
int arm_ref_int_gemm(const arm_ref_gemm_args *args, int path, void *workspace, size_t workspace_size,
                     int32_t *acc, uint8_t *codes_out);

/* Prepared weights: the layer's packed codes and weight table turned once (at model load, like ONNX
 * Runtime's prepacking) into the layout the kernels read, so a call no longer decodes them.
 *   8-bit containers (bits_w 5..8): the LUT-decoded int8 weights (as many bytes as the codes), zero-padded
 *   to whole 16-column × 64-position tiles and stored tile by tile (column tile t, 64-position step s:
 *   one 1 KiB block, row = column, 64 weights per row), plus each column's weight sum. Every path reads
 *   this one layout: AMX loads the blocks as tiles, AVX-512 runs 16 columns per pass, the scalar path
 *   (also used for NEON) reads it element by element.
 *   Narrower containers: the packed codes and the table, copied (their decode is cheap per call).
 * The buffer starts with a 64-byte header (magic, version, layout, N, K, bits_w, size, checksum) that
 * every call checks, so a buffer prepared for another shape or layout is rejected, never misread.
 * Buffers must start on a 64-byte boundary (tile loads). */
#define ARM_REF_PREPARED_ALIGN 64u

/* Bytes of a prepared buffer for N × K weights of bits_w bits; 0 for an invalid shape or bits. */
size_t arm_ref_prepared_weights_bytes(size_t n, size_t k, int bits_w);
/* Checks packed_w and lut_w exactly as arm_ref_int_gemm does and writes the prepared buffer. */
int arm_ref_prepare_weights(const uint8_t *packed_w, size_t packed_size, const int8_t *lut_w, size_t n, size_t k,
                            int bits_w, void *prepared, size_t prepared_size);
/* arm_ref_int_gemm with prepared weights: args->packed_w, lut_w and packed_size are ignored (may be
 * NULL / 0); args->n, k and bits_w must be those the buffer was prepared for. Same results, bit for
 * bit, on every path (NEON runs the scalar prepared kernel). */
int arm_ref_int_gemm_prepared(const arm_ref_gemm_args *args, const void *prepared, size_t prepared_size, int path,
                              void *workspace, size_t workspace_size, int32_t *acc, uint8_t *codes_out);

/* A safetensors file held in memory: parsed without copying; tensor lookups are bounds-checked. */
typedef struct {
    const uint8_t *data;
    size_t size;
    size_t header_size;
    size_t tensor_count;
} arm_ref_file;

#define ARM_REF_MAX_DIMS 8

typedef struct {
    char dtype[8];
    int32_t ndim;
    uint64_t shape[ARM_REF_MAX_DIMS];
    const uint8_t *data;
    size_t nbytes;
} arm_ref_tensor;

int arm_ref_file_parse(const uint8_t *data, size_t size, arm_ref_file *file);
int arm_ref_file_tensor(const arm_ref_file *file, const char *name, arm_ref_tensor *tensor);

#ifdef __cplusplus
}
#endif

#endif
