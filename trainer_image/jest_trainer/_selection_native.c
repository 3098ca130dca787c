/*
 * Native CPU kernel for JEST's chunked joint sampling from a pairwise score matrix S (jest_trainer.selection).
 *
 * Why native: on CPU at JEST's shapes (B in the hundreds, chunks of a few items) the chunk loop is bound by
 * per-call dispatch, not arithmetic. Sixteen chunks cost ~190 us through NumPy (11 calls a chunk) and more
 * through torch; the same loop here is one call of ~30 us, which is what keeps the selection arithmetic a
 * small share of a training step. The semantics are exactly those of the NumPy and torch loops in
 * selection.py, which stay as the fallback (no compiler at install) and the accelerator path; tests check
 * that all three draw the same chunks (up to float rounding in near-ties and the choice among exact ties).
 *
 * pairwise_chunk_loop(scores, noise, per_chunk, out):
 *   scores  C-contiguous [B, B] float32 or float64, finite (the caller validates);
 *   noise   C-contiguous [n, B], same dtype: one row of Gumbel noise per chunk;
 *   out     C-contiguous writable [n * per_chunk] int64, filled chunk by chunk in selection order.
 * Chunk t is the per_chunk largest of c + noise[t] among the items not yet selected, with
 * c(k|A) = S_kk + sum_{j in A} (S_jk + S_kj). Order within a chunk is unspecified (as with
 * topk(sorted=False)); on exact ties the lower index wins (NumPy and torch may pick either).
 *
 * sigmoid_pair_prelude(first, second, magnitudes, hinge, limit) -> bool: the one pass over B^2 logits that the
 * pair-loss difference needs before its sigmoid and log (losses.sigmoid_pair_loss_difference). With a = z*L (z = +1 on
 * the positives, the diagonal; -1 elsewhere) each pair loss is softplus(-a) = -min(a, 0) - log sigmoid(|a|),
 * so S = M^first - M^second = [min(b, 0) - min(a, 0)] + log(sigmoid(|b|) / sigmoid(|a|)): exact for every
 * finite logit (the ratio lies in [1/2, 2]). One vectorised pass instead of torch's stack / negate-diagonal /
 * clamp / abs, plus the check that every |logit| <= limit (False otherwise, and for NaN or inf).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEFINE_CHUNK_LOOP(NAME, T)                                                                            \
    static void NAME(const T *scores, Py_ssize_t size, const T *noise, Py_ssize_t chunks, Py_ssize_t per_chunk,  \
                     int64_t *out, T *conditional, T *heap_value, unsigned char *taken) {                    \
        for (Py_ssize_t i = 0; i < size; i++) {                                                               \
            conditional[i] = scores[i * size + i];                                                            \
            taken[i] = 0;                                                                                     \
        }                                                                                                     \
        for (Py_ssize_t chunk = 0; chunk < chunks; chunk++) {                                                 \
            const T *gumbel = noise + chunk * size;                                                           \
            int64_t *chosen = out + chunk * per_chunk;                                                        \
            /* the per_chunk largest of c + noise: a min-heap of the best so far, root = the smallest */      \
            Py_ssize_t filled = 0;                                                                            \
            for (Py_ssize_t i = 0; i < size; i++) {                                                           \
                if (taken[i]) continue; /* selected items are skipped, not just scored -inf: unique even */  \
                T value = conditional[i] + gumbel[i]; /* if a sum overflowed, and a NaN ranks lowest */       \
                if (value != value) value = (T)(-INFINITY);                                                   \
                Py_ssize_t slot;                                                                              \
                if (filled < per_chunk) {                                                                     \
                    slot = filled++;                                                                          \
                    while (slot > 0) {                                                                        \
                        Py_ssize_t parent = (slot - 1) / 2;                                                   \
                        if (heap_value[parent] <= value) break;                                               \
                        heap_value[slot] = heap_value[parent];                                                \
                        chosen[slot] = chosen[parent];                                                        \
                        slot = parent;                                                                        \
                    }                                                                                         \
                } else if (value > heap_value[0]) {                                                           \
                    slot = 0;                                                                                 \
                    for (;;) {                                                                                \
                        Py_ssize_t left = 2 * slot + 1, right = left + 1, smallest = slot;                    \
                        T smallest_value = value;                                                             \
                        if (left < per_chunk && heap_value[left] < smallest_value) {                          \
                            smallest = left;                                                                  \
                            smallest_value = heap_value[left];                                                \
                        }                                                                                     \
                        if (right < per_chunk && heap_value[right] < smallest_value) smallest = right;        \
                        if (smallest == slot) break;                                                          \
                        heap_value[slot] = heap_value[smallest];                                              \
                        chosen[slot] = chosen[smallest];                                                      \
                        slot = smallest;                                                                      \
                    }                                                                                         \
                } else {                                                                                      \
                    continue;                                                                                 \
                }                                                                                             \
                heap_value[slot] = value;                                                                     \
                chosen[slot] = (int64_t)i;                                                                    \
            }                                                                                                 \
            if (chunk + 1 == chunks) break;                                                                   \
            /* c += the chunk's rows of S, then its columns (the order NumPy's fallback adds them in) */      \
            for (Py_ssize_t k = 0; k < size; k++) {                                                           \
                T total = scores[chosen[0] * size + k];                                                       \
                for (Py_ssize_t j = 1; j < per_chunk; j++) total += scores[chosen[j] * size + k];             \
                conditional[k] += total;                                                                      \
            }                                                                                                 \
            for (Py_ssize_t k = 0; k < size; k++) {                                                           \
                const T *row = scores + k * size;                                                             \
                T total = row[chosen[0]];                                                                     \
                for (Py_ssize_t j = 1; j < per_chunk; j++) total += row[chosen[j]];                           \
                conditional[k] += total;                                                                      \
            }                                                                                                 \
            for (Py_ssize_t j = 0; j < per_chunk; j++) taken[chosen[j]] = 1;                                  \
        }                                                                                                     \
    }

DEFINE_CHUNK_LOOP(chunk_loop_float32, float)
DEFINE_CHUNK_LOOP(chunk_loop_float64, double)

/* One row segment of the prelude, all of it with the same sign z (the diagonal is a segment of one): a = z*L
 * (and b = z*L* for two models) -> |a|, |b| and the hinge min(b, 0) - min(a, 0) (or -min(a, 0) for one model).
 * Returns nonzero if any |logit| exceeds `limit` or is NaN (NaN fails `<=`; inf exceeds any finite limit).
 * Written without branches so that gcc -O3 vectorises it; no -ffast-math, so the NaN test stays exact. */
#define DEFINE_PRELUDE_SEGMENT(NAME, T, ABS, FLAG)                                                            \
    __attribute__((noinline)) static int NAME(const T *restrict first, const T *restrict second,             \
                                              T *restrict first_magnitude, T *restrict second_magnitude,      \
                                              T *restrict hinge, Py_ssize_t n, T sign, T limit) {             \
        FLAG bad = 0; /* as wide as T, so the mask of each comparison vectorises */                           \
        if (second == NULL) {                                                                                 \
            for (Py_ssize_t j = 0; j < n; j++) {                                                              \
                T a = sign * first[j];                                                                        \
                T magnitude = ABS(a);                                                                         \
                first_magnitude[j] = magnitude;                                                               \
                T negative_part = a < 0 ? a : (T)0;                                                           \
                hinge[j] = -negative_part;                                                                    \
                bad |= !(magnitude <= limit);                                                                 \
            }                                                                                                 \
            return bad != 0;                                                                                  \
        }                                                                                                     \
        for (Py_ssize_t j = 0; j < n; j++) {                                                                  \
            T a = sign * first[j], b = sign * second[j];                                                      \
            T first_size = ABS(a), second_size = ABS(b);                                                      \
            first_magnitude[j] = first_size;                                                                  \
            second_magnitude[j] = second_size;                                                                \
            T first_negative = a < 0 ? a : (T)0;                                                              \
            T second_negative = b < 0 ? b : (T)0;                                                             \
            hinge[j] = second_negative - first_negative;                                                      \
            bad |= !(first_size <= limit);                                                                    \
            bad |= !(second_size <= limit);                                                                   \
        }                                                                                                     \
        return bad != 0;                                                                                      \
    }

#define OFFSET(pointer, offset) ((pointer) ? (pointer) + (offset) : NULL)

#define DEFINE_PRELUDE(NAME, SEGMENT, T)                                                                      \
    static int NAME(const T *first, const T *second, Py_ssize_t size, T *magnitudes, T *hinge, T limit) {     \
        int bad = 0;                                                                                          \
        T *second_magnitudes = second ? magnitudes + size * size : NULL;                                      \
        for (Py_ssize_t i = 0; i < size; i++) {                                                               \
            /* three segments of row i: before the diagonal (z = -1), the diagonal (z = +1), after it */      \
            Py_ssize_t starts[3] = {i * size, i * size + i, i * size + i + 1};                                \
            Py_ssize_t lengths[3] = {i, 1, size - i - 1};                                                     \
            for (int part = 0; part < 3; part++) {                                                            \
                Py_ssize_t at = starts[part];                                                                 \
                bad |= SEGMENT(first + at, OFFSET(second, at), magnitudes + at, OFFSET(second_magnitudes, at), \
                               hinge + at, lengths[part], part == 1 ? (T)1 : (T)-1, limit);                    \
            }                                                                                                 \
        }                                                                                                     \
        return !bad;                                                                                          \
    }

DEFINE_PRELUDE_SEGMENT(prelude_segment_float32, float, fabsf, int32_t)
DEFINE_PRELUDE_SEGMENT(prelude_segment_float64, double, fabs, int64_t)
DEFINE_PRELUDE(sigmoid_pair_prelude_float32, prelude_segment_float32, float)
DEFINE_PRELUDE(sigmoid_pair_prelude_float64, prelude_segment_float64, double)

static int get_buffer(PyObject *object, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) == 0) return 0;
    PyObject *type, *value, *traceback; /* name the argument, keep the reason the buffer was refused */
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s array (%S)", name, writable ? " writable" : "",
                 value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return -1;
}

/* The one-letter struct code of a native-byte-order buffer ('?' for anything else). */
static char format_code(const Py_buffer *view) {
    const char *format = view->format ? view->format : "B";
    const char native_order = PY_LITTLE_ENDIAN ? '<' : '>';
    if (format[0] == native_order || format[0] == '=' || format[0] == '@') format++;
    return format[0] != '\0' && format[1] == '\0' ? format[0] : '?';
}

static PyObject *pairwise_chunk_loop(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *scores_object, *noise_object, *out_object;
    Py_ssize_t per_chunk;
    if (!PyArg_ParseTuple(args, "OOnO", &scores_object, &noise_object, &per_chunk, &out_object)) return NULL;

    Py_buffer scores = {0}, noise = {0}, out = {0};
    PyObject *result = NULL;
    void *workspace = NULL;
    if (get_buffer(scores_object, &scores, 0, "scores") != 0) return NULL;
    if (get_buffer(noise_object, &noise, 0, "noise") != 0) goto done;
    if (get_buffer(out_object, &out, 1, "out") != 0) goto done;

    char code = format_code(&scores);
    if ((code != 'f' && code != 'd') || format_code(&noise) != code) {
        PyErr_SetString(PyExc_TypeError, "scores, noise: expected float32 or float64 arrays of the same dtype");
        goto done;
    }
    if (out.itemsize != 8 || (format_code(&out) != 'l' && format_code(&out) != 'q')) {
        PyErr_SetString(PyExc_TypeError, "out: expected an int64 array");
        goto done;
    }
    if (scores.ndim != 2 || scores.shape[0] != scores.shape[1] || scores.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "scores: expected a non-empty square [B, B] array");
        goto done;
    }
    Py_ssize_t size = scores.shape[0];
    if (noise.ndim != 2 || noise.shape[1] != size || noise.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "noise: expected an [n_chunks, B] array");
        goto done;
    }
    Py_ssize_t chunks = noise.shape[0];
    if (per_chunk < 1 || per_chunk > size || chunks > size / per_chunk) { /* no product that could overflow */
        PyErr_SetString(PyExc_ValueError, "per_chunk: expected 1 <= per_chunk and n_chunks * per_chunk <= B");
        goto done;
    }
    if (out.ndim != 1 || out.shape[0] != chunks * per_chunk) {
        PyErr_SetString(PyExc_ValueError, "out: expected n_chunks * per_chunk int64 slots");
        goto done;
    }

    workspace = malloc((size_t)(size + per_chunk) * (size_t)scores.itemsize + (size_t)size);
    if (workspace == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (code == 'f') {
        float *conditional = (float *)workspace;
        chunk_loop_float32((const float *)scores.buf, size, (const float *)noise.buf, chunks, per_chunk,
                           (int64_t *)out.buf, conditional, conditional + size,
                           (unsigned char *)(conditional + size + per_chunk));
    } else {
        double *conditional = (double *)workspace;
        chunk_loop_float64((const double *)scores.buf, size, (const double *)noise.buf, chunks, per_chunk,
                           (int64_t *)out.buf, conditional, conditional + size,
                           (unsigned char *)(conditional + size + per_chunk));
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);

done:
    free(workspace);
    if (out.obj) PyBuffer_Release(&out);
    if (noise.obj) PyBuffer_Release(&noise);
    if (scores.obj) PyBuffer_Release(&scores);
    return result;
}

static PyObject *sigmoid_pair_prelude(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *first_object, *second_object, *magnitudes_object, *hinge_object;
    double limit;
    if (!PyArg_ParseTuple(args, "OOOOd", &first_object, &second_object, &magnitudes_object, &hinge_object,
                          &limit)) {
        return NULL;
    }
    int models = second_object == Py_None ? 1 : 2;
    Py_buffer first = {0}, second = {0}, magnitudes = {0}, hinge = {0};
    PyObject *result = NULL;
    if (get_buffer(first_object, &first, 0, "first") != 0) return NULL;
    if (models == 2 && get_buffer(second_object, &second, 0, "second") != 0) goto done;
    if (get_buffer(magnitudes_object, &magnitudes, 1, "magnitudes") != 0) goto done;
    if (get_buffer(hinge_object, &hinge, 1, "hinge") != 0) goto done;
    char code = format_code(&first);
    if ((code != 'f' && code != 'd') || (models == 2 && format_code(&second) != code) ||
        format_code(&magnitudes) != code || format_code(&hinge) != code) {
        PyErr_SetString(PyExc_TypeError, "first, second, magnitudes, hinge: expected float32 or float64 arrays of "
                                         "one dtype");
        goto done;
    }
    Py_ssize_t size = first.ndim == 2 ? first.shape[0] : -1;
    if (size < 1 || first.shape[1] != size) {
        PyErr_SetString(PyExc_ValueError, "first: expected a non-empty square [B, B] array");
        goto done;
    }
    if (models == 2 && (second.ndim != 2 || second.shape[0] != size || second.shape[1] != size)) {
        PyErr_SetString(PyExc_ValueError, "second: expected the shape of first");
        goto done;
    }
    if (magnitudes.ndim != 3 || magnitudes.shape[0] != models || magnitudes.shape[1] != size ||
        magnitudes.shape[2] != size) {
        PyErr_SetString(PyExc_ValueError, "magnitudes: expected [models, B, B]");
        goto done;
    }
    if (hinge.ndim != 2 || hinge.shape[0] != size || hinge.shape[1] != size) {
        PyErr_SetString(PyExc_ValueError, "hinge: expected the shape of first");
        goto done;
    }
    int bounded;
    Py_BEGIN_ALLOW_THREADS
    if (code == 'f') {
        float single_limit = limit < FLT_MAX ? (float)limit : FLT_MAX;
        bounded = sigmoid_pair_prelude_float32((const float *)first.buf, (const float *)second.buf, size,
                                               (float *)magnitudes.buf, (float *)hinge.buf, single_limit);
    } else {
        bounded = sigmoid_pair_prelude_float64((const double *)first.buf, (const double *)second.buf, size,
                                               (double *)magnitudes.buf, (double *)hinge.buf, limit);
    }
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(bounded);

done:
    if (hinge.obj) PyBuffer_Release(&hinge);
    if (magnitudes.obj) PyBuffer_Release(&magnitudes);
    if (second.obj) PyBuffer_Release(&second);
    if (first.obj) PyBuffer_Release(&first);
    return result;
}

static PyMethodDef methods[] = {
    {"sigmoid_pair_prelude", sigmoid_pair_prelude, METH_VARARGS,
     "sigmoid_pair_prelude(first, second, magnitudes, hinge, limit) -> bool: with a = z*first, b = z*second\n"
     "(z = +1 on the diagonal, -1 elsewhere) writes |a|, |b| into magnitudes and min(b, 0) - min(a, 0) into\n"
     "hinge (second None: |a| and -min(a, 0)); False if any |logit| exceeds limit or is NaN."},
    {"pairwise_chunk_loop", pairwise_chunk_loop, METH_VARARGS,
     "pairwise_chunk_loop(scores, noise, per_chunk, out): JEST's chunked Gumbel top-k from a pairwise score\n"
     "matrix, written into out chunk by chunk (see jest_trainer.selection)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "jest_trainer._selection_native",
    .m_doc = "Native CPU kernels of JEST's selection (optional; selection.py and losses.py fall back to "
             "NumPy/torch).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__selection_native(void) { return PyModule_Create(&module); }
