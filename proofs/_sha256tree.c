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

/* ---- leaves: a sequence of buffers held for the duration of a call ---------------------- */

typedef struct {
    const unsigned char *p;
    size_t n;
} span;

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

static int leafset_acquire(leafset *s, PyObject *leaves)
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
    Py_ssize_t others = 0;
    for (Py_ssize_t i = 0; i < s->count; i++)
        others += !PyBytes_CheckExact(PyTuple_GET_ITEM(s->items, i));
    s->spans = PyMem_New(span, s->count > 0 ? s->count : 1);
    s->views = PyMem_New(Py_buffer, others > 0 ? others : 1);
    if (s->spans == NULL || s->views == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < s->count; i++) {
        PyObject *item = PyTuple_GET_ITEM(s->items, i);
        if (PyBytes_CheckExact(item)) {
            s->spans[i].p = (const unsigned char *)PyBytes_AS_STRING(item);
            s->spans[i].n = (size_t)PyBytes_GET_SIZE(item);
            continue;
        }
        if (!PyObject_CheckBuffer(item)) {
            PyErr_Format(PyExc_TypeError, "leaf %zd: expected a bytes-like object, got %.100s", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
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
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; ok && i < s->count; i++) {
        const span *sp = &s->spans[i];
        ok = legacy ? hash_hex_text(sp->p, sp->n, out + DIGEST * i)
                    : hash_prefixed(&LEAF_PREFIX, sp->p, sp->n, out + DIGEST * i);
    }
    Py_END_ALLOW_THREADS
    if (!ok)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL sha256 failed");
    return ok ? 0 : -1;
}

/* Parents of a level of `count` nodes: pairs hashed, a lone last node copied up. `dst` may
 * equal `src` (node i is written after nodes 2i and 2i + 1 are read). Returns the new count. */
static Py_ssize_t parent_level(const unsigned char *src, Py_ssize_t count, int legacy,
                               unsigned char *dst, int *ok)
{
    unsigned char digest[DIGEST];
    Py_ssize_t pairs = count / 2;
    for (Py_ssize_t i = 0; *ok && i < pairs; i++) {
        *ok = hash_prefixed(legacy ? NULL : &NODE_PREFIX, src + 2 * DIGEST * i, 2 * DIGEST,
                            digest);
        memcpy(dst + DIGEST * i, digest, DIGEST);
    }
    if (count % 2)
        memmove(dst + DIGEST * pairs, src + DIGEST * (count - 1), DIGEST);
    return pairs + count % 2;
}

/* ---- module functions ------------------------------------------------------------------- */

PyDoc_STRVAR(leaf_hashes_doc,
             "leaf_hashes(leaves, /)\n--\n\n"
             "Concatenated RFC 6962 leaf hashes sha256(0x00 || leaf), 32 bytes per leaf.\n\n"
             "``leaves`` is a sequence of C-contiguous bytes-like objects (bytes, bytearray,\n"
             "memoryview, numpy arrays: their raw bytes). TypeError for a non-sequence or a\n"
             "non-buffer leaf, ValueError for a non-contiguous one. Releases the GIL.");

static PyObject *leaf_hashes(PyObject *module, PyObject *leaves)
{
    leafset s;
    if (leafset_acquire(&s, leaves) < 0)
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
             "legacy_root(leaves, /)\n--\n\n"
             "The merkletools (sha256) root of ``leaves``: leaf = sha256(hex text of the leaf),\n"
             "node = sha256(left || right), a lone last node carried up. ``leaves`` as for\n"
             "leaf_hashes; ValueError if there are none (merkletools has no root for them).");

static PyObject *legacy_root(PyObject *module, PyObject *leaves)
{
    leafset s;
    if (leafset_acquire(&s, leaves) < 0)
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

static PyMethodDef methods[] = {
    {"leaf_hashes", leaf_hashes, METH_O, leaf_hashes_doc},
    {"tree_levels", tree_levels, METH_O, tree_levels_doc},
    {"legacy_root", legacy_root, METH_O, legacy_root_doc},
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
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
