/* Batched BLAKE2b-64 (RFC 7693, unkeyed, 8-byte digest) for the expansion's
 * fractional-copy decisions.  One call hashes many `prefix || item` messages
 * with the GIL released, so Python pays one call per batch instead of one per
 * row.  The result for each message is the digest read as a big-endian
 * integer, exactly what the reference derives its roll from. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load_le64(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
#endif
}

#define MIX(a, b, c, d, x, y)            \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = rotr64(v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = rotr64(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];              \
        v[b] = rotr64(v[b] ^ v[c], 63);  \
    } while (0)

static void compress(uint64_t h[8], const uint8_t block[128], uint64_t counter, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load_le64(block + 8 * i);
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = IV[i]; }
    v[12] ^= counter; /* messages here are far below 2**64 bytes: high word stays 0 */
    if (last) v[14] = ~v[14];
#define ROUND(r)                                   \
    do {                                           \
        const uint8_t *s = SIGMA[r];               \
        MIX(0, 4, 8, 12, m[s[0]], m[s[1]]);        \
        MIX(1, 5, 9, 13, m[s[2]], m[s[3]]);        \
        MIX(2, 6, 10, 14, m[s[4]], m[s[5]]);       \
        MIX(3, 7, 11, 15, m[s[6]], m[s[7]]);       \
        MIX(0, 5, 10, 15, m[s[8]], m[s[9]]);       \
        MIX(1, 6, 11, 12, m[s[10]], m[s[11]]);     \
        MIX(2, 7, 8, 13, m[s[12]], m[s[13]]);      \
        MIX(3, 4, 9, 14, m[s[14]], m[s[15]]);      \
    } while (0)
    /* Fully unrolled so every message-word index is a compile-time constant. */
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* Digest of prefix||item, 8 bytes, returned as the big-endian integer of those bytes. */
static uint64_t blake2b64(const uint8_t *prefix, size_t plen, const uint8_t *item, size_t ilen) {
    uint64_t h[8];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ 8ULL;
    uint8_t block[128];
    size_t total = plen + ilen, done = 0, fill = 0;
    /* Feed bytes in order; keep the last (possibly full) block for finalisation. */
    while (done < total) {
        if (fill == 128) {
            compress(h, block, (uint64_t)done, 0);
            fill = 0;
        }
        size_t take;
        if (done < plen) {
            take = plen - done;
            if (take > 128 - fill) take = 128 - fill;
            memcpy(block + fill, prefix + done, take);
        } else {
            take = total - done;
            if (take > 128 - fill) take = 128 - fill;
            memcpy(block + fill, item + (done - plen), take);
        }
        fill += take;
        done += take;
    }
    memset(block + fill, 0, 128 - fill);
    compress(h, block, (uint64_t)total, 1);
    uint64_t out = 0;
    for (int i = 0; i < 8; i++) out = (out << 8) | ((h[0] >> (8 * i)) & 0xff);
    return out;
}

/* Hash rows[start:stop] into dst, one message at a time (a 4-lane AVX2 path was measured end to
 * end and removed: it saved under 0.1 % of a seed's run, see the README's Performance section). */
static void hash_rows(const uint8_t *pre, size_t plen, const uint8_t *base, const void *offsets, int width,
                      const int64_t *row, uint64_t *dst, Py_ssize_t start, Py_ssize_t stop) {
#define OFF(k) (width == 4 ? (int64_t)((const int32_t *)offsets)[k] : ((const int64_t *)offsets)[k])
    Py_ssize_t j = start;
    for (; j < stop; j++) {
        int64_t lo = OFF(row[j]), hi = OFF(row[j] + 1);
        dst[j] = blake2b64(pre, plen, base + lo, (size_t)(hi - lo));
    }
#undef OFF
}

/* hash_items(prefix, data, offsets, offset_width, rows, out, start, stop):
 * out[j] = digest(prefix || data[offsets[rows[j]] : offsets[rows[j] + 1]]) for start <= j < stop.
 * `offsets` are Arrow string offsets (int32 or int64 as `offset_width` says), so a string
 * column's own buffers are hashed in place, for just the rows that need it. */
static PyObject *hash_items(PyObject *self, PyObject *args) {
    Py_buffer prefix, data, offsets, rows, out;
    int width;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "y*y*y*iy*w*nn", &prefix, &data, &offsets, &width, &rows, &out, &start, &stop))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n_off = (width == 4 || width == 8) ? offsets.len / width : 0;
    Py_ssize_t n_rows = rows.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t n_out = out.len / (Py_ssize_t)sizeof(uint64_t);
    if (n_off == 0) {
        PyErr_SetString(PyExc_ValueError, "hash_items: offsets must be int32 or int64 and non-empty");
        goto done;
    }
    if (start < 0 || stop < start || stop > n_rows || stop > n_out) {
        PyErr_SetString(PyExc_ValueError, "hash_items: start/stop outside the rows or output buffer");
        goto done;
    }
    const int64_t *row = (const int64_t *)rows.buf;
    for (Py_ssize_t j = start; j < stop; j++) {
        if (row[j] < 0 || row[j] + 1 >= n_off) {
            PyErr_SetString(PyExc_IndexError, "hash_items: row index outside the offsets");
            goto done;
        }
        int64_t lo = width == 4 ? ((const int32_t *)offsets.buf)[row[j]] : ((const int64_t *)offsets.buf)[row[j]];
        int64_t hi = width == 4 ? ((const int32_t *)offsets.buf)[row[j] + 1] : ((const int64_t *)offsets.buf)[row[j] + 1];
        if (lo < 0 || hi < lo || hi > data.len) {
            PyErr_SetString(PyExc_ValueError, "hash_items: offsets point outside the data buffer");
            goto done;
        }
    }
    uint64_t *dst = (uint64_t *)out.buf;
    const uint8_t *base = (const uint8_t *)data.buf;
    const uint8_t *pre = (const uint8_t *)prefix.buf;
    size_t plen = (size_t)prefix.len;
    Py_BEGIN_ALLOW_THREADS
    hash_rows(pre, plen, base, offsets.buf, width, row, dst, start, stop);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef METHODS[] = {
    {"hash_items", hash_items, METH_VARARGS,
     "hash_items(prefix, data, offsets, offset_width, rows, out, start, stop): out[j] = BLAKE2b-64(prefix + item rows[j]) as a big-endian integer, for start <= j < stop; releases the GIL."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_blake2b", "Batched BLAKE2b-64 kernel.", -1, METHODS};

PyMODINIT_FUNC PyInit__blake2b(void) {
    return PyModule_Create(&MODULE);
}
