/* Native sha256 Merkle hashing for proofs/merkle.py (optional accelerator).
 *
 * CPython spends ~0.3-0.5 us of call overhead per hashlib call, which dominates trees of small
 * leaves (2 hash calls per leaf). Here the loops run in C over OpenSSL's sha256 (SHA-NI where
 * the CPU has it), with the GIL released, so Python threads can hash batches in parallel.
 *
 * Hashing is exactly that of proofs/merkle.py:
 *   RFC 6962 section 2.1: leaf = sha256(0x00 || data), node = sha256(0x01 || left || right),
 *     a lone last node of a level is carried up unchanged;
 *   merkletools legacy: leaf = sha256(lowercase hex text of data), node = sha256(left || right),
 *     a lone last node carried up unchanged.
 *
 * Every input is taken through the buffer protocol (PyBUF_SIMPLE, as hashlib does: C-contiguous
 * raw bytes) without copying. Errors raise TypeError / ValueError; nothing here may crash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* The low-level SHA256_* calls are deprecated in OpenSSL 3 but are direct calls into the
 * assembly block function; the EVP route costs a provider dispatch per digest, which is the very
 * overhead this module exists to avoid. Builds of OpenSSL without the deprecated API use EVP. */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/crypto.h>
#include <openssl/opensslv.h>
#include <openssl/sha.h>

#if defined(OPENSSL_NO_DEPRECATED_3_0)
#include <openssl/evp.h>
#define VT_USE_EVP 1
#endif

#define DIGEST 32

#if defined(__GNUC__)
#define VT_PREFETCH(p) __builtin_prefetch(p)
#else
#define VT_PREFETCH(p) ((void)0)
#endif

/* ---- sha256 over a list of pieces ------------------------------------------------------- */

#ifndef VT_USE_EVP
typedef SHA256_CTX vt_ctx;
static int vt_init(vt_ctx *c) { return SHA256_Init(c); }
static int vt_update(vt_ctx *c, const void *p, size_t n) { return SHA256_Update(c, p, n); }
static int vt_final(vt_ctx *c, unsigned char *out) { return SHA256_Final(out, c); }
static void vt_done(vt_ctx *c) { OPENSSL_cleanse(c, sizeof(*c)); }
#else
typedef EVP_MD_CTX *vt_ctx;
static int vt_init(vt_ctx *c)
{
    *c = EVP_MD_CTX_new();
    return *c != NULL && EVP_DigestInit_ex(*c, EVP_sha256(), NULL);
}
static int vt_update(vt_ctx *c, const void *p, size_t n) { return EVP_DigestUpdate(*c, p, n); }
static int vt_final(vt_ctx *c, unsigned char *out) { return EVP_DigestFinal_ex(*c, out, NULL); }
static void vt_done(vt_ctx *c) { EVP_MD_CTX_free(*c); }
#endif

static const unsigned char LEAF_PREFIX = 0x00;
static const unsigned char NODE_PREFIX = 0x01;

/* sha256(prefix || p[0:n]); prefix omitted when NULL. Returns 0 on an OpenSSL failure. */
static int hash_prefixed(const unsigned char *prefix, const unsigned char *p, size_t n,
                         unsigned char *out)
{
    vt_ctx c;
    int ok = vt_init(&c);
    if (ok && prefix != NULL)
        ok = vt_update(&c, prefix, 1);
    if (ok)
        ok = vt_update(&c, p, n);
    if (ok)
        ok = vt_final(&c, out);
    vt_done(&c);
    return ok;
}

/* sha256 of the lowercase hex text of p[0:n], as merkletools' add_leaf(data.hex(), True). */
static int hash_hex_text(const unsigned char *p, size_t n, unsigned char *out)
{
    static const char digits[] = "0123456789abcdef";
    unsigned char text[4096];
    vt_ctx c;
    int ok = vt_init(&c);
    while (ok && n > 0) {
        size_t k = n < sizeof(text) / 2 ? n : sizeof(text) / 2;
        for (size_t i = 0; i < k; i++) {
            text[2 * i] = (unsigned char)digits[p[i] >> 4];
            text[2 * i + 1] = (unsigned char)digits[p[i] & 15];
        }
        ok = vt_update(&c, text, 2 * k);
        p += k;
        n -= k;
    }
    if (ok)
        ok = vt_final(&c, out);
    vt_done(&c);
    return ok;
}

typedef struct {
    const unsigned char *p;
    size_t n;
} span;

/* ---- SHA-NI, two messages at a time ------------------------------------------------------ */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(VT_NO_SHA_NI)
#include <cpuid.h>
#include <immintrin.h>
#define VT_HAVE_NI 1

static const uint32_t K256[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
static const uint32_t IV256[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                  0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static int have_sha_ni(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1; /* CPUID.(EAX=7,ECX=0):EBX.SHA[bit 29] */
}

/* FIPS 180-4 section 6.2.2 for one 64-byte block of each of two independent messages. The
 * instructions of the two are interleaved so that the CPU overlaps their latencies; the state
 * is kept as the (ABEF, CDGH) pairs that SHA256RNDS2 works on. */
__attribute__((target("sha,sse4.1,ssse3"))) static void
compress_x2(__m128i st[2][2], const unsigned char *block0, const unsigned char *block1)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    const unsigned char *blocks[2] = {block0, block1};
    __m128i w[2][4], s0[2], s1[2], save0[2], save1[2], m[2];
    for (int l = 0; l < 2; l++) {
        s0[l] = save0[l] = st[l][0];
        s1[l] = save1[l] = st[l][1];
        for (int q = 0; q < 4; q++)
            w[l][q] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(blocks[l] + 16 * q)),
                                       bswap);
    }
#pragma GCC unroll 16
    for (int q = 0; q < 16; q++) {
        const __m128i k = _mm_load_si128((const __m128i *)(K256 + 4 * q));
        for (int l = 0; l < 2; l++) {
            if (q >= 4) /* schedule: W[t] from W[t-16], W[t-15], W[t-7], W[t-2] */
                w[l][q & 3] = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(w[l][q & 3], w[l][(q + 1) & 3]),
                                  _mm_alignr_epi8(w[l][(q + 3) & 3], w[l][(q + 2) & 3], 4)),
                    w[l][(q + 3) & 3]);
            m[l] = _mm_add_epi32(w[l][q & 3], k);
            s1[l] = _mm_sha256rnds2_epu32(s1[l], s0[l], m[l]);
        }
        for (int l = 0; l < 2; l++)
            s0[l] = _mm_sha256rnds2_epu32(s0[l], s1[l], _mm_shuffle_epi32(m[l], 0x0e));
    }
    for (int l = 0; l < 2; l++) {
        st[l][0] = _mm_add_epi32(s0[l], save0[l]);
        st[l][1] = _mm_add_epi32(s1[l], save1[l]);
    }
}

__attribute__((target("sha,sse4.1,ssse3"))) static void state_init(__m128i st[2])
{
    __m128i abcd = _mm_loadu_si128((const __m128i *)IV256);
    __m128i efgh = _mm_loadu_si128((const __m128i *)(IV256 + 4));
    __m128i cdab = _mm_shuffle_epi32(abcd, 0xb1);
    efgh = _mm_shuffle_epi32(efgh, 0x1b);
    st[0] = _mm_alignr_epi8(cdab, efgh, 8);    /* ABEF */
    st[1] = _mm_blend_epi16(efgh, cdab, 0xf0); /* CDGH */
}

__attribute__((target("sha,sse4.1,ssse3"))) static void state_digest(__m128i st[2],
                                                                      unsigned char *out)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i feba = _mm_shuffle_epi32(st[0], 0x1b);
    __m128i dchg = _mm_shuffle_epi32(st[1], 0xb1);
    __m128i dcba = _mm_blend_epi16(feba, dchg, 0xf0);
    __m128i hgfe = _mm_alignr_epi8(dchg, feba, 8);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(dcba, bswap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(hgfe, bswap));
}

/* Pads msg[0:len] in place (msg has room for 128 bytes, len <= 119); returns the block count. */
static int pad_short(unsigned char *msg, size_t len)
{
    size_t total = len + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    memset(msg + len, 0, total - len);
    msg[len] = 0x80;
    for (int i = 0; i < 8; i++)
        msg[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    return (int)(total / 64);
}

/* sha256 of two padded messages of nblocks[0] and nblocks[1] blocks (1 or 2 each). */
__attribute__((target("sha,sse4.1,ssse3"))) static void
hash_padded_x2(const unsigned char *msg0, int nb0, const unsigned char *msg1, int nb1,
               unsigned char *out0, unsigned char *out1)
{
    __m128i st[2][2];
    state_init(st[0]);
    state_init(st[1]);
    compress_x2(st, msg0, msg1);
    if (nb0 == 2 || nb1 == 2) {
        /* a one-block message recomputes its block into a discarded copy of its state */
        __m128i keep[2] = {st[0][0], st[0][1]}, keep1[2] = {st[1][0], st[1][1]};
        compress_x2(st, msg0 + 64 * (nb0 - 1), msg1 + 64 * (nb1 - 1));
        if (nb0 == 1) {
            st[0][0] = keep[0];
            st[0][1] = keep[1];
        }
        if (nb1 == 1) {
            st[1][0] = keep1[0];
            st[1][1] = keep1[1];
        }
    }
    state_digest(st[0], out0);
    state_digest(st[1], out1);
}

#endif
/* Whether SHA-NI is used for short messages: set at import from CPUID, switchable for tests. */
static int use_ni = 0;

#ifdef VT_HAVE_NI

/* Builds the message of a short leaf or node into msg (room for 128 bytes) and pads it;
 * returns its block count, or 0 if it does not fit in two blocks. `kind`: 0 RFC 6962 leaf,
 * 1 merkletools leaf (hex text), 2 RFC 6962 node, 3 merkletools node (n = 64 for nodes). */
static int short_message(int kind, const unsigned char *p, size_t n, unsigned char *msg)
{
    static const char digits[] = "0123456789abcdef";
    size_t len;
    if (kind == 1) {
        if (n > 59)
            return 0;
        for (size_t i = 0; i < n; i++) {
            msg[2 * i] = (unsigned char)digits[p[i] >> 4];
            msg[2 * i + 1] = (unsigned char)digits[p[i] & 15];
        }
        len = 2 * n;
    } else if (kind == 3) {
        memcpy(msg, p, n);
        len = n;
    } else {
        if (n > 118)
            return 0;
        msg[0] = kind == 0 ? LEAF_PREFIX : NODE_PREFIX;
        memcpy(msg + 1, p, n);
        len = n + 1;
    }
    return pad_short(msg, len);
}
#endif /* SHA-NI */

/* sha256 of the message of `kind` (see short_message) over p[0:n], by the OpenSSL calls. */
static int hash_long(int kind, const unsigned char *p, size_t n, unsigned char *out)
{
    switch (kind) {
    case 0:
        return hash_prefixed(&LEAF_PREFIX, p, n, out);
    case 1:
        return hash_hex_text(p, n, out);
    case 2:
        return hash_prefixed(&NODE_PREFIX, p, n, out);
    default:
        return hash_prefixed(NULL, p, n, out);
    }
}

/* Hashes the messages of `kind` over spans[0:count] into out[32 * i]; short ones two at a time
 * with SHA-NI where available. The messages are copied before any digest is written, so `out`
 * may overlap the inputs of later spans only (see parent_level). Returns 0 on failure. */
static int hash_spans(int kind, const span *spans, Py_ssize_t count, unsigned char *out)
{
#ifdef VT_HAVE_NI
    if (use_ni) {
        unsigned char msg[2][128], spare[DIGEST];
        int blocks[2], pending = 0;
        Py_ssize_t where[2] = {0, 0};
        for (Py_ssize_t i = 0; i < count; i++) {
            if (i + 8 < count)
                VT_PREFETCH(spans[i + 8].p);
            int nb = short_message(kind, spans[i].p, spans[i].n, msg[pending]);
            if (nb == 0) {
                if (!hash_long(kind, spans[i].p, spans[i].n, out + DIGEST * i))
                    return 0;
                continue;
            }
            blocks[pending] = nb;
            where[pending++] = i;
            if (pending == 2) {
                hash_padded_x2(msg[0], blocks[0], msg[1], blocks[1], out + DIGEST * where[0],
                               out + DIGEST * where[1]);
                pending = 0;
            }
        }
        if (pending)
            hash_padded_x2(msg[0], blocks[0], msg[0], blocks[0], out + DIGEST * where[0], spare);
        return 1;
    }
#endif
    for (Py_ssize_t i = 0; i < count; i++)
        if (!hash_long(kind, spans[i].p, spans[i].n, out + DIGEST * i))
            return 0;
    return 1;
}

/* ---- leaves: a sequence of buffers held for the duration of a call ---------------------- */

typedef struct {
    PyObject *items; /* a tuple: the caller cannot drop a leaf while the GIL is released */
    Py_ssize_t count;
    span *spans;
    Py_buffer *views; /* for leaves other than exact bytes, which are immutable already */
    Py_ssize_t nviews;
} leafset;

static void leafset_release(leafset *s)
{
    for (Py_ssize_t i = 0; i < s->nviews; i++)
        PyBuffer_Release(&s->views[i]);
    PyMem_Free(s->views);
    PyMem_Free(s->spans);
    Py_XDECREF(s->items);
    memset(s, 0, sizeof(*s));
}

/* Holds the leaves of `leaves`. With `strict`, only bytes, bytearray and memoryview leaves are
 * accepted (the types proofs.merkle documents), else any C-contiguous buffer. */
static int leafset_acquire(leafset *s, PyObject *leaves, int strict)
{
    memset(s, 0, sizeof(*s));
    if (PyObject_CheckBuffer(leaves) || PyUnicode_Check(leaves)) {
        PyErr_Format(PyExc_TypeError,
                     "leaves must be a sequence of bytes-like objects, not one %.100s",
                     Py_TYPE(leaves)->tp_name);
        return -1;
    }
    s->items = PySequence_Tuple(leaves);
    if (s->items == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "leaves must be a sequence of bytes-like objects, got %.100s",
                         Py_TYPE(leaves)->tp_name);
        }
        return -1;
    }
    s->count = PyTuple_GET_SIZE(s->items);
    if (s->count > PY_SSIZE_T_MAX / DIGEST) {
        PyErr_SetString(PyExc_ValueError, "too many leaves");
        goto fail;
    }
    s->spans = PyMem_New(span, s->count > 0 ? s->count : 1);
    if (s->spans == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t capacity = 0;
    for (Py_ssize_t i = 0; i < s->count; i++) {
        PyObject *item = PyTuple_GET_ITEM(s->items, i);
        if (i + 16 < s->count) /* leaves are scattered over the heap: hide the cache misses */
            VT_PREFETCH(PyTuple_GET_ITEM(s->items, i + 16));
        if (PyBytes_CheckExact(item)) {
            s->spans[i].p = (const unsigned char *)PyBytes_AS_STRING(item);
            s->spans[i].n = (size_t)PyBytes_GET_SIZE(item);
            continue;
        }
        if (strict && !PyBytes_Check(item) && !PyByteArray_Check(item) &&
            !PyMemoryView_Check(item)) {
            PyErr_Format(PyExc_TypeError, "leaf %zd: expected bytes or memoryview, got %R", i,
                         (PyObject *)Py_TYPE(item));
            goto fail;
        }
        if (!PyObject_CheckBuffer(item)) {
            PyErr_Format(PyExc_TypeError, "leaf %zd: expected a bytes-like object, got %.100s", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        if (s->nviews == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            Py_buffer *grown = PyMem_Resize(s->views, Py_buffer, capacity);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            s->views = grown;
        }
        Py_buffer *view = &s->views[s->nviews];
        if (PyObject_GetBuffer(item, view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "leaf %zd: %.100s is not a C-contiguous buffer", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        s->nviews++;
        s->spans[i].p = (const unsigned char *)view->buf;
        s->spans[i].n = (size_t)view->len;
    }
    return 0;
fail:
    leafset_release(s);
    return -1;
}

/* Hash every leaf into out[32 * i]; legacy selects the merkletools leaf hash. GIL released. */
static int hash_leafset(const leafset *s, int legacy, unsigned char *out)
{
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = hash_spans(legacy ? 1 : 0, s->spans, s->count, out);
    Py_END_ALLOW_THREADS
    if (!ok)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL sha256 failed");
    return ok ? 0 : -1;
}

/* Parents of a level of `count` nodes: pairs hashed, a lone last node copied up. `dst` may
 * equal `src`: parent i is written after children 2i and 2i + 1 were read, and the children
 * of later parents lie beyond it. Returns the new count. */
static Py_ssize_t parent_level(const unsigned char *src, Py_ssize_t count, int legacy,
                               unsigned char *dst, int *ok)
{
    Py_ssize_t pairs = count / 2;
    span batch[256];
    for (Py_ssize_t i = 0; *ok && i < pairs; i += 256) {
        Py_ssize_t k = pairs - i < 256 ? pairs - i : 256;
        for (Py_ssize_t j = 0; j < k; j++) {
            batch[j].p = src + 2 * DIGEST * (i + j);
            batch[j].n = 2 * DIGEST;
        }
        /* in place, hash_spans writes parent i + j after reading children up to 2 (i + j) + 1 */
        *ok = hash_spans(legacy ? 3 : 2, batch, k, dst + DIGEST * i);
    }
    if (count % 2)
        memmove(dst + DIGEST * pairs, src + DIGEST * (count - 1), DIGEST);
    return pairs + count % 2;
}

/* ---- module functions ------------------------------------------------------------------- */

PyDoc_STRVAR(leaf_hashes_doc,
             "leaf_hashes(leaves, /, *, strict=False)\n--\n\n"
             "Concatenated RFC 6962 leaf hashes sha256(0x00 || leaf), 32 bytes per leaf.\n\n"
             "``leaves`` is a sequence of C-contiguous bytes-like objects (bytes, bytearray,\n"
             "memoryview, numpy arrays: their raw bytes). TypeError for a non-sequence or a\n"
             "non-buffer leaf, ValueError for a non-contiguous one; with strict=True, TypeError\n"
             "for any leaf but bytes, bytearray or memoryview. Releases the GIL.");

static char *leaves_kwlist[] = {"", "strict", NULL};

static PyObject *leaf_hashes(PyObject *module, PyObject *args, PyObject *kwargs)
{
    PyObject *leaves;
    int strict = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:leaf_hashes", leaves_kwlist, &leaves,
                                     &strict))
        return NULL;
    leafset s;
    if (leafset_acquire(&s, leaves, strict) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, DIGEST * s.count);
    if (out != NULL && hash_leafset(&s, 0, (unsigned char *)PyBytes_AS_STRING(out)) < 0)
        Py_CLEAR(out);
    leafset_release(&s);
    return out;
}

static int get_level0(PyObject *arg, Py_buffer *view)
{
    if (PyObject_GetBuffer(arg, view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "leaf hashes must be a C-contiguous bytes-like object, "
                                      "got %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    if (view->len % DIGEST != 0) {
        PyErr_Format(PyExc_ValueError, "leaf hashes: %zd bytes is not a multiple of 32",
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(tree_levels_doc,
             "tree_levels(leaf_hashes, /)\n--\n\n"
             "The RFC 6962 levels above ``leaf_hashes`` (concatenated 32-byte hashes), bottom-up\n"
             "and ending with the 32-byte root; [] for fewer than 2 leaves. Node =\n"
             "sha256(0x01 || left || right); a lone last node is carried up unchanged.\n"
             "TypeError if not bytes-like, ValueError if the length is not a multiple of 32.");

static PyObject *tree_levels(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (get_level0(arg, &view) < 0)
        return NULL;
    Py_ssize_t count = view.len / DIGEST, nlevels = 0;
    for (Py_ssize_t c = count; c > 1; c = (c + 1) / 2)
        nlevels++;
    PyObject *levels = PyList_New(nlevels);
    if (levels == NULL)
        goto done;
    Py_ssize_t c = count;
    for (Py_ssize_t k = 0; k < nlevels; k++) {
        c = (c + 1) / 2;
        PyObject *level = PyBytes_FromStringAndSize(NULL, DIGEST * c);
        if (level == NULL) {
            Py_CLEAR(levels);
            goto done;
        }
        PyList_SET_ITEM(levels, k, level);
    }
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *src = (const unsigned char *)view.buf;
    Py_ssize_t n = count;
    for (Py_ssize_t k = 0; ok && k < nlevels; k++) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(levels, k));
        n = parent_level(src, n, 0, dst, &ok);
        src = dst;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL sha256 failed");
        Py_CLEAR(levels);
    }
done:
    PyBuffer_Release(&view);
    return levels;
}

PyDoc_STRVAR(legacy_root_doc,
             "legacy_root(leaves, /, *, strict=False)\n--\n\n"
             "The merkletools (sha256) root of ``leaves``: leaf = sha256(hex text of the leaf),\n"
             "node = sha256(left || right), a lone last node carried up. ``leaves`` as for\n"
             "leaf_hashes; ValueError if there are none (merkletools has no root for them).");

static PyObject *legacy_root(PyObject *module, PyObject *args, PyObject *kwargs)
{
    PyObject *leaves;
    int strict = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$p:legacy_root", leaves_kwlist, &leaves,
                                     &strict))
        return NULL;
    leafset s;
    if (leafset_acquire(&s, leaves, strict) < 0)
        return NULL;
    PyObject *out = NULL;
    unsigned char *level = NULL;
    if (s.count == 0) {
        PyErr_SetString(PyExc_ValueError, "merkletools defines no root for an empty tree");
        goto done;
    }
    level = PyMem_Malloc((size_t)s.count * DIGEST);
    if (level == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (hash_leafset(&s, 1, level) < 0)
        goto done;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = s.count; ok && n > 1;)
        n = parent_level(level, n, 1, level, &ok); /* in place: see parent_level */
    Py_END_ALLOW_THREADS
    if (!ok)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL sha256 failed");
    else
        out = PyBytes_FromStringAndSize((const char *)level, DIGEST);
done:
    PyMem_Free(level);
    leafset_release(&s);
    return out;
}

PyDoc_STRVAR(legacy_root_from_hashes_doc,
             "legacy_root_from_hashes(hashes, /)\n--\n\n"
             "The merkletools root over a level of concatenated 32-byte node hashes: node =\n"
             "sha256(left || right), a lone last node carried up. TypeError if not bytes-like,\n"
             "ValueError if empty or the length is not a multiple of 32.");

static PyObject *legacy_root_from_hashes(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (get_level0(arg, &view) < 0)
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t count = view.len / DIGEST;
    unsigned char *level = NULL;
    if (count == 0) {
        PyErr_SetString(PyExc_ValueError, "merkletools defines no root for an empty tree");
        goto done;
    }
    level = PyMem_Malloc((size_t)view.len);
    if (level == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    memcpy(level, view.buf, (size_t)view.len);
    for (Py_ssize_t n = count; ok && n > 1;)
        n = parent_level(level, n, 1, level, &ok);
    Py_END_ALLOW_THREADS
    if (!ok)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL sha256 failed");
    else
        out = PyBytes_FromStringAndSize((const char *)level, DIGEST);
done:
    PyMem_Free(level);
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(set_sha_ni_doc,
             "set_sha_ni(enabled, /)\n--\n\n"
             "Hash short messages with SHA-NI (True, where the CPU has it) or through OpenSSL\n"
             "(False); results are identical. Returns whether SHA-NI is now used. For tests.");

static PyObject *set_sha_ni(PyObject *module, PyObject *arg)
{
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0)
        return NULL;
#ifdef VT_HAVE_NI
    use_ni = enabled && have_sha_ni();
#endif
    return PyBool_FromLong(use_ni);
}

static PyMethodDef methods[] = {
    {"set_sha_ni", set_sha_ni, METH_O, set_sha_ni_doc},
    {"legacy_root_from_hashes", legacy_root_from_hashes, METH_O, legacy_root_from_hashes_doc},
    {"leaf_hashes", (PyCFunction)(void (*)(void))leaf_hashes, METH_VARARGS | METH_KEYWORDS,
     leaf_hashes_doc},
    {"tree_levels", tree_levels, METH_O, tree_levels_doc},
    {"legacy_root", (PyCFunction)(void (*)(void))legacy_root, METH_VARARGS | METH_KEYWORDS,
     legacy_root_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proofs._sha256tree",
    .m_doc = "Native sha256 Merkle hashing (OpenSSL) for proofs.merkle; see _sha256tree.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__sha256tree(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
#ifdef VT_HAVE_NI
    use_ni = have_sha_ni();
#endif
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
