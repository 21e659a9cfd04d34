/* Bounds-checked reader for the safetensors files written by ddq.deploy.export: an 8-byte
 * little-endian header length, a JSON header mapping tensor names to dtype, shape and data offsets,
 * then the tensor bytes. Nothing is copied or allocated; every offset is checked against the buffer. */
#include <string.h>

#include "arm_ref.h"

#define MAX_DEPTH 32

typedef struct {
    const char *text;
    size_t size;
    size_t pos;
} cursor;

typedef struct {
    size_t start;
    size_t length;
} span;

static void skip_space(cursor *c)
{
    while (c->pos < c->size &&
           (c->text[c->pos] == ' ' || c->text[c->pos] == '\n' || c->text[c->pos] == '\r' || c->text[c->pos] == '\t'))
        ++c->pos;
}

static int expect(cursor *c, char ch)
{
    skip_space(c);
    if (c->pos >= c->size || c->text[c->pos] != ch)
        return 0;
    ++c->pos;
    return 1;
}

static int peek(cursor *c, char ch)
{
    skip_space(c);
    return c->pos < c->size && c->text[c->pos] == ch;
}

/* A JSON string; the span is its raw bytes between the quotes (escapes kept as written). */
static int parse_string(cursor *c, span *out)
{
    if (!expect(c, '"'))
        return 0;
    out->start = c->pos;
    while (c->pos < c->size) {
        unsigned char ch = (unsigned char)c->text[c->pos];
        if (ch == '"') {
            out->length = c->pos - out->start;
            ++c->pos;
            return 1;
        }
        if (ch < 0x20)
            return 0;
        c->pos += ch == '\\' ? 2 : 1;
    }
    return 0;
}

static int parse_uint(cursor *c, uint64_t *out)
{
    skip_space(c);
    uint64_t value = 0;
    size_t begin = c->pos;
    while (c->pos < c->size && c->text[c->pos] >= '0' && c->text[c->pos] <= '9') {
        uint64_t digit = (uint64_t)(c->text[c->pos] - '0');
        if (value > (UINT64_MAX - digit) / 10)
            return 0;
        value = value * 10 + digit;
        ++c->pos;
    }
    *out = value;
    return c->pos > begin;
}

static int skip_value(cursor *c, int depth);

static int skip_container(cursor *c, int depth, char open, char close, int keyed)
{
    span key;
    if (depth > MAX_DEPTH || !expect(c, open))
        return 0;
    if (expect(c, close))
        return 1;
    do {
        if (keyed && (!parse_string(c, &key) || !expect(c, ':')))
            return 0;
        if (!skip_value(c, depth + 1))
            return 0;
    } while (expect(c, ','));
    return expect(c, close);
}

static int skip_literal(cursor *c, const char *word)
{
    size_t length = strlen(word);
    if (c->size - c->pos < length || memcmp(c->text + c->pos, word, length) != 0)
        return 0;
    c->pos += length;
    return 1;
}

static int skip_value(cursor *c, int depth)
{
    span ignored;
    skip_space(c);
    if (c->pos >= c->size)
        return 0;
    char ch = c->text[c->pos];
    if (ch == '"')
        return parse_string(c, &ignored);
    if (ch == '{')
        return skip_container(c, depth, '{', '}', 1);
    if (ch == '[')
        return skip_container(c, depth, '[', ']', 0);
    if (ch == 't')
        return skip_literal(c, "true");
    if (ch == 'f')
        return skip_literal(c, "false");
    if (ch == 'n')
        return skip_literal(c, "null");
    size_t begin = c->pos;
    while (c->pos < c->size && strchr("+-.eE0123456789", c->text[c->pos]) != NULL && c->text[c->pos] != '\0')
        ++c->pos;
    return c->pos > begin;
}

static int span_equals(const cursor *c, span s, const char *word)
{
    return s.length == strlen(word) && memcmp(c->text + s.start, word, s.length) == 0;
}

static size_t dtype_size(const char *dtype)
{
    static const struct {
        const char *name;
        size_t size;
    } table[] = {{"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"U16", 2}, {"I16", 2}, {"F16", 2}, {"BF16", 2},
                 {"U32", 4},  {"I32", 4}, {"F32", 4}, {"U64", 8}, {"I64", 8}, {"F64", 8}};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i)
        if (strcmp(dtype, table[i].name) == 0)
            return table[i].size;
    return 0;
}

/* One tensor entry {"dtype": ..., "shape": [...], "data_offsets": [begin, end]}, checked against the data. */
static int parse_tensor(cursor *c, const arm_ref_file *file, arm_ref_tensor *tensor)
{
    span key, value;
    int seen_dtype = 0, seen_shape = 0, seen_offsets = 0;
    uint64_t begin = 0, end = 0;
    memset(tensor, 0, sizeof *tensor);
    if (!expect(c, '{'))
        return ARM_REF_ERR_FILE_HEADER;
    do {
        if (!parse_string(c, &key) || !expect(c, ':'))
            return ARM_REF_ERR_FILE_HEADER;
        if (span_equals(c, key, "dtype")) {
            if (!parse_string(c, &value) || value.length == 0 || value.length >= sizeof tensor->dtype)
                return ARM_REF_ERR_FILE_TENSOR;
            memcpy(tensor->dtype, c->text + value.start, value.length);
            tensor->dtype[value.length] = '\0';
            seen_dtype = 1;
        } else if (span_equals(c, key, "shape")) {
            if (!expect(c, '['))
                return ARM_REF_ERR_FILE_TENSOR;
            if (!expect(c, ']')) {
                do {
                    if (tensor->ndim >= ARM_REF_MAX_DIMS || !parse_uint(c, &tensor->shape[tensor->ndim]))
                        return ARM_REF_ERR_FILE_TENSOR;
                    ++tensor->ndim;
                } while (expect(c, ','));
                if (!expect(c, ']'))
                    return ARM_REF_ERR_FILE_TENSOR;
            }
            seen_shape = 1;
        } else if (span_equals(c, key, "data_offsets")) {
            if (!expect(c, '[') || !parse_uint(c, &begin) || !expect(c, ',') || !parse_uint(c, &end) || !expect(c, ']'))
                return ARM_REF_ERR_FILE_TENSOR;
            seen_offsets = 1;
        } else if (!skip_value(c, 1)) {
            return ARM_REF_ERR_FILE_HEADER;
        }
    } while (expect(c, ','));
    if (!expect(c, '}'))
        return ARM_REF_ERR_FILE_HEADER;
    if (!seen_dtype || !seen_shape || !seen_offsets)
        return ARM_REF_ERR_FILE_TENSOR;
    size_t element_size = dtype_size(tensor->dtype);
    uint64_t count = 1;
    for (int32_t d = 0; d < tensor->ndim; ++d) {
        if (tensor->shape[d] != 0 && count > UINT64_MAX / tensor->shape[d])
            return ARM_REF_ERR_FILE_TENSOR;
        count *= tensor->shape[d];
    }
    size_t data_size = file->size - 8 - file->header_size;
    if (element_size == 0 || begin > end || count > UINT64_MAX / element_size || end - begin != count * element_size)
        return ARM_REF_ERR_FILE_TENSOR;
    if (end > data_size)
        return ARM_REF_ERR_FILE_TRUNCATED;
    tensor->data = file->data + 8 + file->header_size + begin;
    tensor->nbytes = (size_t)(end - begin);
    return ARM_REF_OK;
}

/* Walks the header's members; stops at `name` when given (status OK and *found = 1). */
static int walk_header(const arm_ref_file *file, const char *name, arm_ref_tensor *tensor, size_t *count, int *found)
{
    cursor c = {(const char *)file->data + 8, file->header_size, 0};
    span key;
    arm_ref_tensor scratch;
    *count = 0;
    *found = 0;
    if (!expect(&c, '{'))
        return ARM_REF_ERR_FILE_HEADER;
    if (!peek(&c, '}')) {
        do {
            if (!parse_string(&c, &key) || !expect(&c, ':'))
                return ARM_REF_ERR_FILE_HEADER;
            if (span_equals(&c, key, "__metadata__")) {
                if (!peek(&c, '{') || !skip_value(&c, 1))
                    return ARM_REF_ERR_FILE_HEADER;
                continue;
            }
            int status = parse_tensor(&c, file, &scratch);
            if (status != ARM_REF_OK)
                return status;
            ++*count;
            if (name != NULL && span_equals(&c, key, name)) {
                *tensor = scratch;
                *found = 1;
                return ARM_REF_OK;
            }
        } while (expect(&c, ','));
    }
    if (!expect(&c, '}'))
        return ARM_REF_ERR_FILE_HEADER;
    skip_space(&c);
    return c.pos == c.size ? ARM_REF_OK : ARM_REF_ERR_FILE_HEADER;
}

int arm_ref_file_parse(const uint8_t *data, size_t size, arm_ref_file *file)
{
    if (data == NULL || file == NULL)
        return ARM_REF_ERR_NULL;
    memset(file, 0, sizeof *file);
    if (size < 8)
        return ARM_REF_ERR_FILE_TRUNCATED;
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i)
        header_size = (header_size << 8) | data[i];
    if (header_size > size - 8)
        return ARM_REF_ERR_FILE_TRUNCATED;
    arm_ref_file parsed = {data, size, (size_t)header_size, 0};
    arm_ref_tensor unused;
    int found = 0;
    int status = walk_header(&parsed, NULL, &unused, &parsed.tensor_count, &found);
    if (status != ARM_REF_OK)
        return status;
    *file = parsed;
    return ARM_REF_OK;
}

int arm_ref_file_tensor(const arm_ref_file *file, const char *name, arm_ref_tensor *tensor)
{
    if (file == NULL || name == NULL || tensor == NULL || file->data == NULL)
        return ARM_REF_ERR_NULL;
    size_t count = 0;
    int found = 0;
    int status = walk_header(file, name, tensor, &count, &found);
    if (status != ARM_REF_OK)
        return status;
    return found ? ARM_REF_OK : ARM_REF_ERR_NOT_FOUND;
}
