/*
 * fastpull._native: SHA-256 / SHA-512 on OpenSSL 3 libcrypto (EVP API), plus
 * hash_fd_range(), which feeds a byte range of an open file into a hasher without
 * holding the GIL. fastpull/hashing.py picks between this module and hashlib.
 *
 * ChunkWriter is a download worker's write callback: pwrite into a chunk's byte range
 * plus the running xxh3-128 checksum the resume journal keeps (libxxhash), with the GIL
 * released. fastpull/engine/sink.py picks between it and its Python twin.
 *
 * Locking follows CPython's hashlib: every hasher owns a PyThread lock that guards
 * its EVP_MD_CTX. Work done with the GIL released holds that lock for its whole
 * duration, so concurrent update()/digest()/copy() calls from several threads are
 * serialised and each update() is atomic.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include <errno.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include <xxhash.h>

/*
 * Debian's libxxhash also exports XXH3 entry points that pick SSE2, AVX2 or AVX-512 at run
 * time (xxh_x86dispatch.c); the plain ones use what the library was compiled for, SSE2 on
 * x86-64: 0.065 against 0.029 CPU s/GB on this project's AVX-512 VM. Declared weak, so a
 * libxxhash built without the dispatcher still loads, and the plain update is used.
 */
extern XXH_errorcode XXH3_128bits_update_dispatch(XXH3_state_t *, const void *, size_t)
    __attribute__((weak));

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "fastpull._native needs OpenSSL 3 (EVP_MD_get_size and friends)"
#endif

/* Byte ranges are offsets into files larger than 2 GiB. */
_Static_assert(sizeof(off_t) >= 8, "fastpull._native needs a 64-bit off_t");

/* Below this, releasing and re-taking the GIL costs more than hashing (hashlib's value). */
#define GIL_RELEASE_MINSIZE 2048

/* hash_fd_range() reads through one buffer of this size, reused for the whole range. */
#define READ_BUFFER_SIZE (1024 * 1024)

/* ... or, asked to map the file, maps at most this much of it at a time. */
#define MAP_WINDOW (64 * 1024 * 1024)

#ifndef MAP_POPULATE
#define MAP_POPULATE 0
#endif

typedef struct {
    const char *name;
    const EVP_MD *(*md)(void);
} Algorithm;

static const Algorithm SHA256_ALGORITHM = {"sha256", EVP_sha256};
static const Algorithm SHA512_ALGORITHM = {"sha512", EVP_sha512};

typedef struct {
    PyObject_HEAD
    const Algorithm *algorithm;
    EVP_MD_CTX *ctx;
    PyThread_type_lock lock;
} HasherObject;

static PyTypeObject SHA256Type;
static PyTypeObject SHA512Type;

static int
is_hasher(PyObject *obj)
{
    return Py_IS_TYPE(obj, &SHA256Type) || Py_IS_TYPE(obj, &SHA512Type);
}

/* Raise RuntimeError carrying OpenSSL's reason, and leave its error queue empty. */
static void
raise_openssl_error(const char *what)
{
    unsigned long code = ERR_get_error();
    char reason[256];

    if (code == 0) {
        PyErr_Format(PyExc_RuntimeError, "%s failed", what);
    }
    else {
        ERR_error_string_n(code, reason, sizeof(reason));
        PyErr_Format(PyExc_RuntimeError, "%s failed: %s", what, reason);
    }
    ERR_clear_error();
}

/*
 * Take an object's lock while holding the GIL. Try without blocking first; if another
 * thread owns the lock it is probably working with the GIL released, so wait for it
 * without the GIL, or that thread could never re-acquire the GIL to finish.
 */
static void
acquire_with_gil(PyThread_type_lock lock)
{
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static void
hasher_acquire(HasherObject *self)
{
    acquire_with_gil(self->lock);
}

static void
hasher_release(HasherObject *self)
{
    PyThread_release_lock(self->lock);
}

/* A hasher with its lock and context allocated but not initialised; NULL on error. */
static HasherObject *
hasher_alloc(PyTypeObject *type, const Algorithm *algorithm)
{
    HasherObject *self = (HasherObject *)type->tp_alloc(type, 0);

    if (self == NULL) {
        return NULL;
    }
    self->algorithm = algorithm;
    self->ctx = EVP_MD_CTX_new();
    if (self->ctx == NULL) {
        goto nomemory;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        goto nomemory;
    }
    return self;

nomemory:
    Py_DECREF(self);
    PyErr_NoMemory();
    return NULL;
}

static void
hasher_dealloc(HasherObject *self)
{
    if (self->ctx != NULL) {
        EVP_MD_CTX_free(self->ctx);
    }
    if (self->lock != NULL) {
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
hasher_feed(HasherObject *self, const void *data, Py_ssize_t len)
{
    int ok;

    if (len >= GIL_RELEASE_MINSIZE) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        ok = EVP_DigestUpdate(self->ctx, data, (size_t)len);
        PyThread_release_lock(self->lock);
        Py_END_ALLOW_THREADS
    }
    else {
        hasher_acquire(self);
        ok = EVP_DigestUpdate(self->ctx, data, (size_t)len);
        hasher_release(self);
    }
    if (!ok) {
        raise_openssl_error("EVP_DigestUpdate");
        return -1;
    }
    return 0;
}

/* Feed a bytes-like object; str is refused because it has no canonical encoding. */
static int
hasher_feed_object(HasherObject *self, PyObject *obj)
{
    Py_buffer view;
    int result;

    if (PyUnicode_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "strings must be encoded before hashing");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    result = hasher_feed(self, view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
hasher_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"", NULL};
    PyObject *data = NULL;
    const Algorithm *algorithm;
    HasherObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O", kwlist, &data)) {
        return NULL;
    }
    algorithm = type == &SHA256Type ? &SHA256_ALGORITHM : &SHA512_ALGORITHM;
    self = hasher_alloc(type, algorithm);
    if (self == NULL) {
        return NULL;
    }
    if (!EVP_DigestInit_ex(self->ctx, algorithm->md(), NULL)) {
        raise_openssl_error("EVP_DigestInit_ex");
        goto error;
    }
    if (data != NULL && hasher_feed_object(self, data) < 0) {
        goto error;
    }
    return (PyObject *)self;

error:
    Py_DECREF(self);
    return NULL;
}

PyDoc_STRVAR(hasher_update_doc,
             "update($self, data, /)\n--\n\n"
             "Hash the bytes of a bytes-like object. Large inputs are hashed with the GIL "
             "released.");

static PyObject *
hasher_update(HasherObject *self, PyObject *data)
{
    if (hasher_feed_object(self, data) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/*
 * Finish a copy of the context so that the hasher itself can keep going.
 * Writes EVP_MD_get_size() bytes to out; returns that size, or -1 with an exception.
 */
static int
hasher_final(HasherObject *self, unsigned char *out)
{
    EVP_MD_CTX *temp = EVP_MD_CTX_new();
    unsigned int size = 0;
    int ok;

    if (temp == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    hasher_acquire(self);
    ok = EVP_MD_CTX_copy_ex(temp, self->ctx);
    hasher_release(self);
    if (!ok) {
        raise_openssl_error("EVP_MD_CTX_copy_ex");
        goto error;
    }
    if (!EVP_DigestFinal_ex(temp, out, &size)) {
        raise_openssl_error("EVP_DigestFinal_ex");
        goto error;
    }
    EVP_MD_CTX_free(temp);
    return (int)size;

error:
    EVP_MD_CTX_free(temp);
    return -1;
}

PyDoc_STRVAR(hasher_digest_doc,
             "digest($self, /)\n--\n\nThe digest of the bytes hashed so far, as bytes.");

static PyObject *
hasher_digest(HasherObject *self, PyObject *Py_UNUSED(ignored))
{
    unsigned char out[EVP_MAX_MD_SIZE];
    int size = hasher_final(self, out);

    if (size < 0) {
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, size);
}

PyDoc_STRVAR(hasher_hexdigest_doc,
             "hexdigest($self, /)\n--\n\n"
             "The digest of the bytes hashed so far, as lowercase hexadecimal text.");

static PyObject *
hasher_hexdigest(HasherObject *self, PyObject *Py_UNUSED(ignored))
{
    static const char hexdigits[] = "0123456789abcdef";
    unsigned char out[EVP_MAX_MD_SIZE];
    char hex[2 * EVP_MAX_MD_SIZE];
    int size = hasher_final(self, out);

    if (size < 0) {
        return NULL;
    }
    for (int i = 0; i < size; i++) {
        hex[2 * i] = hexdigits[out[i] >> 4];
        hex[2 * i + 1] = hexdigits[out[i] & 0x0f];
    }
    return PyUnicode_DecodeASCII(hex, 2 * (Py_ssize_t)size, "strict");
}

PyDoc_STRVAR(hasher_copy_doc,
             "copy($self, /)\n--\n\nAn independent hasher in the same state as this one.");

static PyObject *
hasher_copy(HasherObject *self, PyObject *Py_UNUSED(ignored))
{
    HasherObject *clone = hasher_alloc(Py_TYPE(self), self->algorithm);
    int ok;

    if (clone == NULL) {
        return NULL;
    }
    hasher_acquire(self);
    ok = EVP_MD_CTX_copy_ex(clone->ctx, self->ctx);
    hasher_release(self);
    if (!ok) {
        raise_openssl_error("EVP_MD_CTX_copy_ex");
        Py_DECREF(clone);
        return NULL;
    }
    return (PyObject *)clone;
}

static PyObject *
hasher_get_name(HasherObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(self->algorithm->name);
}

static PyObject *
hasher_get_digest_size(HasherObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(EVP_MD_get_size(self->algorithm->md()));
}

static PyObject *
hasher_get_block_size(HasherObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(EVP_MD_get_block_size(self->algorithm->md()));
}

static PyMethodDef hasher_methods[] = {
    {"update", (PyCFunction)hasher_update, METH_O, hasher_update_doc},
    {"digest", (PyCFunction)hasher_digest, METH_NOARGS, hasher_digest_doc},
    {"hexdigest", (PyCFunction)hasher_hexdigest, METH_NOARGS, hasher_hexdigest_doc},
    {"copy", (PyCFunction)hasher_copy, METH_NOARGS, hasher_copy_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef hasher_getset[] = {
    {"name", (getter)hasher_get_name, NULL, "Algorithm name, as hashlib spells it.", NULL},
    {"digest_size", (getter)hasher_get_digest_size, NULL, "Digest length in bytes.", NULL},
    {"block_size", (getter)hasher_get_block_size, NULL, "Internal block length in bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(sha256_doc, "SHA256(data=b'', /)\n--\n\nSHA-256 hasher backed by OpenSSL.");
PyDoc_STRVAR(sha512_doc, "SHA512(data=b'', /)\n--\n\nSHA-512 hasher backed by OpenSSL.");

static PyTypeObject SHA256Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastpull._native.SHA256",
    .tp_basicsize = sizeof(HasherObject),
    .tp_dealloc = (destructor)hasher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = sha256_doc,
    .tp_methods = hasher_methods,
    .tp_getset = hasher_getset,
    .tp_new = hasher_new,
};

static PyTypeObject SHA512Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastpull._native.SHA512",
    .tp_basicsize = sizeof(HasherObject),
    .tp_dealloc = (destructor)hasher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = sha512_doc,
    .tp_methods = hasher_methods,
    .tp_getset = hasher_getset,
    .tp_new = hasher_new,
};

/*
 * Hash up to *remaining bytes of fd from *offset, advancing both as it goes.
 * Runs without the GIL. Returns 0 when done or at EOF, an errno value when pread
 * fails (EINTR included, so the caller can run signal handlers), -1 if OpenSSL fails.
 */
static int
feed_from_fd(EVP_MD_CTX *ctx, int fd, unsigned char *buf, size_t bufsize,
             long long *offset, long long *remaining)
{
    while (*remaining > 0) {
        size_t want = (unsigned long long)*remaining < bufsize ? (size_t)*remaining : bufsize;
        ssize_t got = pread(fd, buf, want, (off_t)*offset);

        if (got < 0) {
            return errno;
        }
        if (got == 0) {
            return 0;
        }
        if (!EVP_DigestUpdate(ctx, buf, (size_t)got)) {
            return -1;
        }
        *offset += got;
        *remaining -= got;
    }
    return 0;
}

/*
 * Hash bytes of fd from *offset up to *offset + *remaining or its end of file, whichever
 * comes first, through read-only mappings: the bytes are hashed where they lie in the page
 * cache instead of being copied out first. Advances *offset and *remaining past what it
 * hashed. Runs without the GIL. Returns 0, leaving whatever it could not map (a file type
 * without mmap, no read access, no address space) to pread; -1 if OpenSSL fails.
 *
 * A mapped page past the end of the file is SIGBUS, so the caller must own the file: no
 * one may shrink it while it is hashed.
 */
static int
feed_from_mapping(EVP_MD_CTX *ctx, int fd, long long *offset, long long *remaining)
{
    long long page = sysconf(_SC_PAGESIZE);
    long long end = *offset + *remaining;
    struct stat st;

    if (page <= 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        return 0;
    }
    if (end > (long long)st.st_size) {
        end = (long long)st.st_size;
    }
    while (*offset < end) {
        long long base = *offset - *offset % page;
        long long stop = end - *offset > MAP_WINDOW ? *offset + MAP_WINDOW : end;
        size_t span = (size_t)(stop - base);
        void *map = mmap(NULL, span, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)base);
        int ok;

        if (map == MAP_FAILED) {
            return 0;
        }
        ok = EVP_DigestUpdate(ctx, (const char *)map + (*offset - base), (size_t)(stop - *offset));
        munmap(map, span);
        if (!ok) {
            return -1;
        }
        *remaining -= stop - *offset;
        *offset = stop;
    }
    return 0;
}

PyDoc_STRVAR(hash_fd_range_doc,
             "hash_fd_range(hasher, fd, offset, length, mapped=False, /)\n--\n\n"
             "Feed bytes [offset, offset + length) of the open file descriptor fd into\n"
             "hasher (a SHA256 or SHA512 object), reading with pread() without the GIL.\n"
             "Stops early at end of file; returns the number of bytes hashed.\n"
             "mapped: hash through mmap() instead, without copying the bytes out of the\n"
             "page cache (pread() takes over where mapping fails). Only for a file no one\n"
             "shrinks meanwhile: a mapped page past its end is SIGBUS.");

static PyObject *
hash_fd_range(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *obj;
    HasherObject *hasher;
    int fd, mapped = 0;
    long long offset, length, remaining;
    unsigned char *buf = NULL;
    size_t bufsize;
    int status;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "OiLL|p:hash_fd_range", &obj, &fd, &offset, &length, &mapped)) {
        return NULL;
    }
    if (!is_hasher(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "hash_fd_range() needs a fastpull._native hasher, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (offset < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must not be negative");
        return NULL;
    }
    if (offset > LLONG_MAX - length) {
        PyErr_SetString(PyExc_ValueError, "offset + length is beyond the largest file offset");
        return NULL;
    }
    if (length == 0) {
        return PyLong_FromLong(0);
    }
    hasher = (HasherObject *)obj;
    remaining = length;
    if (mapped) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(hasher->lock, WAIT_LOCK);
        status = feed_from_mapping(hasher->ctx, fd, &offset, &remaining);
        PyThread_release_lock(hasher->lock);
        Py_END_ALLOW_THREADS
        if (status < 0) {
            raise_openssl_error("EVP_DigestUpdate");
            return NULL;
        }
        if (remaining == 0) {
            return PyLong_FromLongLong(length);
        }
    }
    /* Small ranges (the engine's typical increments) need no 1 MiB allocation. */
    bufsize = remaining < READ_BUFFER_SIZE ? (size_t)remaining : READ_BUFFER_SIZE;
    buf = PyMem_RawMalloc(bufsize);
    if (buf == NULL) {
        PyErr_NoMemory();
        return NULL;
    }

    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(hasher->lock, WAIT_LOCK);
        status = feed_from_fd(hasher->ctx, fd, buf, bufsize, &offset, &remaining);
        PyThread_release_lock(hasher->lock);
        Py_END_ALLOW_THREADS
        if (status != EINTR) {
            break;
        }
        /* PEP 475: run signal handlers, and stop if one raised (e.g. KeyboardInterrupt). */
        if (PyErr_CheckSignals() < 0) {
            goto done;
        }
    }
    if (status > 0) {
        errno = status;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (status < 0) {
        raise_openssl_error("EVP_DigestUpdate");
        goto done;
    }
    result = PyLong_FromLongLong(length - remaining);

done:
    PyMem_RawFree(buf);
    return result;
}

/* -- ChunkWriter ------------------------------------------------------------------ */

/*
 * The fields a write touches are guarded by lock, so a call writing with the GIL released
 * and a stop() or limit change from another thread never interleave: once stop() returns,
 * nothing more is written. writing and other are only used with the GIL held.
 */
typedef struct {
    PyObject_HEAD
    int fd;
    long long position;   /* next byte to write; everything before it is written */
    long long limit;      /* never write at or past it */
    int writing;          /* whether bodies handed over are the chunk's bytes */
    int stopped;          /* stop() was called, or a write failed */
    int error;            /* errno of the failed write, 0 if none */
    PyObject *other;      /* called with bodies that are not the chunk's bytes */
    XXH3_state_t *checksum;
    PyThread_type_lock lock;
} ChunkWriterObject;

static PyTypeObject ChunkWriterType;

static PyObject *
writer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "position", "limit", "other", NULL};
    int fd;
    long long position, limit;
    PyObject *other;
    ChunkWriterObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLLO:ChunkWriter", kwlist, &fd, &position,
                                     &limit, &other)) {
        return NULL;
    }
    if (fd < 0 || position < 0 || limit < position) {
        PyErr_SetString(PyExc_ValueError, "need fd >= 0 and 0 <= position <= limit");
        return NULL;
    }
    if (!PyCallable_Check(other)) {
        PyErr_SetString(PyExc_TypeError, "other must be callable");
        return NULL;
    }
    self = (ChunkWriterObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->fd = fd;
    self->position = position;
    self->limit = limit;
    self->other = Py_NewRef(other);
    self->checksum = XXH3_createState();
    self->lock = PyThread_allocate_lock();
    if (self->checksum == NULL || self->lock == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (XXH3_128bits_reset(self->checksum) != XXH_OK) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_RuntimeError, "XXH3_128bits_reset failed");
        return NULL;
    }
    return (PyObject *)self;
}

static int
writer_traverse(ChunkWriterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->other);
    return 0;
}

static int
writer_clear(ChunkWriterObject *self)
{
    Py_CLEAR(self->other);
    return 0;
}

static void
writer_dealloc(ChunkWriterObject *self)
{
    PyObject_GC_UnTrack(self);
    writer_clear(self);
    if (self->checksum != NULL) {
        XXH3_freeState(self->checksum);
    }
    if (self->lock != NULL) {
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static XXH_errorcode
checksum_update(XXH3_state_t *state, const void *data, size_t len)
{
    if (XXH3_128bits_update_dispatch != NULL) {
        return XXH3_128bits_update_dispatch(state, data, len);
    }
    return XXH3_128bits_update(state, data, len);
}

/*
 * Write buf[*done, end) at position, advancing *done, position and the checksum as bytes
 * land. Runs without the GIL, holding the lock. Returns 0 when all is written, else the
 * errno of the failed pwrite (EINTR included, so the caller can run signal handlers).
 */
static int
writer_pwrite(ChunkWriterObject *self, const char *buf, Py_ssize_t end, Py_ssize_t *done)
{
    while (*done < end) {
        ssize_t wrote = pwrite(self->fd, buf + *done, (size_t)(end - *done),
                               (off_t)self->position);

        if (wrote < 0) {
            return errno;
        }
        if (wrote == 0) {
            return EIO; /* a regular file never takes nothing; do not spin on it */
        }
        if (checksum_update(self->checksum, buf + *done, (size_t)wrote) != XXH_OK) {
            return EIO;
        }
        *done += wrote;
        self->position += wrote;
    }
    return 0;
}

/*
 * The libcurl write callback, as pycurl calls it with one received buffer: None when the
 * whole buffer was taken, 0 to make libcurl abort the transfer.
 */
static PyObject *
writer_call(ChunkWriterObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *data;
    Py_buffer view;
    Py_ssize_t done = 0;
    int status, stopped, taken_all;

    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "ChunkWriter takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "ChunkWriter", 1, 1, &data)) {
        return NULL;
    }
    acquire_with_gil(self->lock);
    stopped = self->stopped;
    PyThread_release_lock(self->lock);
    if (stopped) {
        return PyLong_FromLong(0);
    }
    if (!self->writing) {
        /* other is NULL only once the collector has cleared this writer: take nothing. */
        return self->other != NULL ? PyObject_CallOneArg(self->other, data) : PyLong_FromLong(0);
    }
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        status = 0;
        if (!self->stopped) {
            long long room = self->limit - self->position;
            Py_ssize_t left = view.len - done;
            Py_ssize_t end = done + ((long long)left < room ? left : (Py_ssize_t)room);

            status = writer_pwrite(self, view.buf, end, &done);
            if (status != 0 && status != EINTR) {
                self->error = status;
                self->stopped = 1;
            }
        }
        PyThread_release_lock(self->lock);
        Py_END_ALLOW_THREADS
        if (status != EINTR) {
            break;
        }
        /* PEP 475: run signal handlers; one that raises ends the call (libcurl aborts). */
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    taken_all = done == view.len;
    PyBuffer_Release(&view);
    /* A failed write, or bytes past the limit (another chunk's): make libcurl stop. */
    if (!taken_all) {
        return PyLong_FromLong(0);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writer_stop_doc,
             "stop($self, /)\n--\n\n"
             "Write nothing more: every later call returns 0. Waits for a write in progress.");

static PyObject *
writer_stop(ChunkWriterObject *self, PyObject *Py_UNUSED(ignored))
{
    acquire_with_gil(self->lock);
    self->stopped = 1;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writer_hexdigest_doc,
             "hexdigest($self, /)\n--\n\n"
             "The xxh3-128 of the bytes written so far, as xxhash.xxh3_128().hexdigest() "
             "spells it.");

static PyObject *
writer_hexdigest(ChunkWriterObject *self, PyObject *Py_UNUSED(ignored))
{
    static const char hexdigits[] = "0123456789abcdef";
    XXH128_canonical_t canonical;
    char hex[2 * sizeof(canonical.digest)];

    acquire_with_gil(self->lock);
    XXH128_canonicalFromHash(&canonical, XXH3_128bits_digest(self->checksum));
    PyThread_release_lock(self->lock);
    for (size_t i = 0; i < sizeof(canonical.digest); i++) {
        hex[2 * i] = hexdigits[canonical.digest[i] >> 4];
        hex[2 * i + 1] = hexdigits[canonical.digest[i] & 0x0f];
    }
    return PyUnicode_DecodeASCII(hex, sizeof(hex), "strict");
}

/* Read one long long field under the lock. */
static long long
writer_read(ChunkWriterObject *self, const long long *field)
{
    long long value;

    acquire_with_gil(self->lock);
    value = *field;
    PyThread_release_lock(self->lock);
    return value;
}

static PyObject *
writer_get_position(ChunkWriterObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(writer_read(self, &self->position));
}

static PyObject *
writer_get_limit(ChunkWriterObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(writer_read(self, &self->limit));
}

static int
writer_set_limit(ChunkWriterObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    long long limit;
    int below;

    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete limit");
        return -1;
    }
    limit = PyLong_AsLongLong(value);
    if (limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    acquire_with_gil(self->lock);
    below = limit < self->position;
    if (!below) {
        self->limit = limit;
    }
    PyThread_release_lock(self->lock);
    if (below) {
        PyErr_SetString(PyExc_ValueError, "limit must not be below what is already written");
        return -1;
    }
    return 0;
}

static PyObject *
writer_get_writing(ChunkWriterObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->writing);
}

static int
writer_set_writing(ChunkWriterObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    int truth;

    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete writing");
        return -1;
    }
    truth = PyObject_IsTrue(value);
    if (truth < 0) {
        return -1;
    }
    self->writing = truth;
    return 0;
}

static PyObject *
writer_get_stopped(ChunkWriterObject *self, void *Py_UNUSED(closure))
{
    int stopped;

    acquire_with_gil(self->lock);
    stopped = self->stopped;
    PyThread_release_lock(self->lock);
    return PyBool_FromLong(stopped);
}

static PyObject *
writer_get_error(ChunkWriterObject *self, void *Py_UNUSED(closure))
{
    int error;

    acquire_with_gil(self->lock);
    error = self->error;
    PyThread_release_lock(self->lock);
    return PyLong_FromLong(error);
}

static PyMethodDef writer_methods[] = {
    {"stop", (PyCFunction)writer_stop, METH_NOARGS, writer_stop_doc},
    {"hexdigest", (PyCFunction)writer_hexdigest, METH_NOARGS, writer_hexdigest_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef writer_getset[] = {
    {"position", (getter)writer_get_position, NULL,
     "Next byte to write: every byte from the start up to it is written.", NULL},
    {"limit", (getter)writer_get_limit, (setter)writer_set_limit,
     "Nothing is written at or past it; may be lowered, never below position.", NULL},
    {"writing", (getter)writer_get_writing, (setter)writer_set_writing,
     "Whether bodies are the chunk's bytes (written) or not (handed to other).", NULL},
    {"stopped", (getter)writer_get_stopped, NULL,
     "Whether stop() was called or a write failed.", NULL},
    {"error", (getter)writer_get_error, NULL,
     "The errno of the write that failed, 0 if none did.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(writer_doc,
             "ChunkWriter(fd, position, limit, other)\n--\n\n"
             "A libcurl write callback for one chunk: while writing is true, each buffer is\n"
             "written with pwrite() at position (never at or past limit) and added to an\n"
             "xxh3-128 checksum, without the GIL; otherwise other(buffer) answers.");

static PyTypeObject ChunkWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastpull._native.ChunkWriter",
    .tp_basicsize = sizeof(ChunkWriterObject),
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_call = (ternaryfunc)writer_call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = writer_doc,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
    .tp_new = writer_new,
};

static PyMethodDef module_methods[] = {
    {"hash_fd_range", hash_fd_range, METH_VARARGS, hash_fd_range_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc, "SHA-256 / SHA-512 hashing on OpenSSL libcrypto and a chunk write "
                         "callback with an xxh3-128 checksum, GIL released.");

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastpull._native",
    .m_doc = module_doc,
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *module;

    if (PyType_Ready(&SHA256Type) < 0 || PyType_Ready(&SHA512Type) < 0 ||
        PyType_Ready(&ChunkWriterType) < 0) {
        return NULL;
    }
    module = PyModule_Create(&native_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "SHA256", (PyObject *)&SHA256Type) < 0 ||
        PyModule_AddObjectRef(module, "SHA512", (PyObject *)&SHA512Type) < 0 ||
        PyModule_AddObjectRef(module, "ChunkWriter", (PyObject *)&ChunkWriterType) < 0 ||
        PyModule_AddStringConstant(module, "BACKEND_INFO", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
