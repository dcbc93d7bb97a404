/*
 * hsm._p256: verify a batch of ECDSA P-256 / SHA-256 signatures with libcrypto, GIL released.
 *
 * Why C: the batched verifier hands a whole batch to a worker thread. Verifying it item by
 * item through `cryptography` releases and re-acquires the GIL for every signature; with
 * two workers and the Trio thread that costs about a quarter of the machine (measured in
 * docs/discussion/performance.md). Here the whole batch runs without the GIL.
 *
 * Why EC_KEY and ECDSA_do_verify (deprecated in OpenSSL 3.0, still present in 3.x): the EVP
 * path builds a provider key and context per signature and measured 25% slower on this
 * machine. The formats stay in Python (hsm/ecdsa.py): callers pass validated inputs only.
 *
 * verify_batch(items) -> bytes
 *   items: a tuple of (point, message, signature) with point the 65-byte X9.62 uncompressed
 *   P-256 point, message any bytes (hashed here with SHA-256), signature the 64-byte r || s.
 *   Returns one byte per item: 1 valid, 0 invalid, 2 public key rejected by libcrypto.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/obj_mac.h>
#include <openssl/sha.h>

#define POINT_LENGTH 65
#define SIGNATURE_LENGTH 64
#define SCALAR_LENGTH 32

typedef struct {
    const unsigned char *point;
    const unsigned char *message;
    size_t message_length;
    const unsigned char *signature;
} item_t;

enum { INVALID = 0, VALID = 1, KEY_REJECTED = 2 };

/* Runs without the GIL. Returns 0 on success, -1 if libcrypto could not allocate. */
static int verify_items(const item_t *items, Py_ssize_t count, unsigned char *results) {
    EC_KEY *key = EC_KEY_new_by_curve_name(NID_X9_62_prime256v1);
    if (key == NULL) {
        return -1;
    }
    int status = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const item_t *item = &items[i];
        /* One EC_KEY per batch, its point replaced per item: the group is built once. */
        if (EC_KEY_oct2key(key, item->point, POINT_LENGTH, NULL) != 1) {
            results[i] = KEY_REJECTED;
            continue;
        }
        unsigned char digest[SHA256_DIGEST_LENGTH];
        SHA256(item->message, item->message_length, digest);
        ECDSA_SIG *signature = ECDSA_SIG_new();
        BIGNUM *r = BN_bin2bn(item->signature, SCALAR_LENGTH, NULL);
        BIGNUM *s = BN_bin2bn(item->signature + SCALAR_LENGTH, SCALAR_LENGTH, NULL);
        if (signature == NULL || r == NULL || s == NULL || ECDSA_SIG_set0(signature, r, s) != 1) {
            BN_free(r);
            BN_free(s);
            ECDSA_SIG_free(signature);
            status = -1;
            break;
        }
        results[i] = ECDSA_do_verify(digest, sizeof digest, signature, key) == 1 ? VALID : INVALID;
        ECDSA_SIG_free(signature);
    }
    EC_KEY_free(key);
    return status;
}

static PyObject *verify_batch(PyObject *module, PyObject *argument) {
    (void)module;
    if (!PyTuple_Check(argument)) {
        /* A tuple, not a list: nobody can resize it while the GIL is released. */
        PyErr_SetString(PyExc_TypeError, "verify_batch expects a tuple of items");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(argument);
    item_t *items = PyMem_Malloc(sizeof(item_t) * (size_t)(count > 0 ? count : 1));
    PyObject *results = PyBytes_FromStringAndSize(NULL, count);
    if (items == NULL || results == NULL) {
        PyMem_Free(items);
        Py_XDECREF(results);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyTuple_GET_ITEM(argument, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
            PyErr_SetString(PyExc_TypeError, "each item is a (point, message, signature) tuple");
            goto fail;
        }
        PyObject *point = PyTuple_GET_ITEM(entry, 0);
        PyObject *message = PyTuple_GET_ITEM(entry, 1);
        PyObject *signature = PyTuple_GET_ITEM(entry, 2);
        if (!PyBytes_Check(point) || PyBytes_GET_SIZE(point) != POINT_LENGTH ||
            !PyBytes_Check(message) || !PyBytes_Check(signature) ||
            PyBytes_GET_SIZE(signature) != SIGNATURE_LENGTH) {
            PyErr_SetString(PyExc_ValueError,
                            "expected (65-byte point, message bytes, 64-byte r || s)");
            goto fail;
        }
        items[i].point = (const unsigned char *)PyBytes_AS_STRING(point);
        items[i].message = (const unsigned char *)PyBytes_AS_STRING(message);
        items[i].message_length = (size_t)PyBytes_GET_SIZE(message);
        items[i].signature = (const unsigned char *)PyBytes_AS_STRING(signature);
    }
    /* The tuple holds the items and they hold the bytes, so the pointers stay valid. */
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(results);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = verify_items(items, count, out);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_SetString(PyExc_MemoryError, "libcrypto could not allocate");
        goto fail;
    }
    PyMem_Free(items);
    return results;
fail:
    PyMem_Free(items);
    Py_DECREF(results);
    return NULL;
}

static PyMethodDef methods[] = {
    {"verify_batch", verify_batch, METH_O,
     "verify_batch(items) -> bytes: 1 valid, 0 invalid, 2 key rejected, one byte per item"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "hsm._p256", "Batch ECDSA P-256 verification with libcrypto.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__p256(void) { return PyModule_Create(&module_definition); }
