/* The per-token draw, in C: right after a forward pass has flushed the CPU's caches, each numpy call costs
   10-50 us of cold code and data (a draw of five numpy steps took 180 us in the batch loop), where one loop
   over the logits takes 9 us. See sampling.py for what calls these and why the draw is exact. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 256 /* tokens per block sum: a drawn point is found among the blocks, then in one block */

/* splitmix64: a sequence's stream is its 8 bytes of state, so a seed repeats its draws exactly. */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double uniform(uint64_t *state) { return (double)(next_u64(state) >> 11) * 0x1.0p-53; } /* [0, 1) */

static Py_ssize_t below(uint64_t *state, Py_ssize_t n) {
    Py_ssize_t k = (Py_ssize_t)(uniform(state) * (double)n);
    return k < n ? k : n - 1;
}

static int get_logits(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    size_t length = strlen(format);
    if (view->itemsize != 4 || length == 0 || format[length - 1] != 'f' || view->len == 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "logits must be a non-empty contiguous float32 array");
        return -1;
    }
    return 0;
}

static int get_state(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the random state must be 8 writable bytes");
        return -1;
    }
    return 0;
}

/* A token drawn from softmax(x / t), exactly, exponentiating only the head: the tokens within ln n
   temperatures of the top. Rejection sampling: propose a head token by its weight, or any other token with
   the bound weight 1/n (relative to the top's), which no tail token exceeds; a proposed tail token is kept
   with probability (its weight) / (the bound), else the draw starts over. So each token is kept in
   proportion to its weight, the head's and the tail's alike; the bounds sum to at most the top's weight, so at
   most half the proposals go to the tail. -1: no finite top (every token banned); -2: out of memory. */
static Py_ssize_t draw_token(const float *x, Py_ssize_t n, double t, uint64_t *state) {
    float top = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++)
        if (x[i] > top)
            top = x[i];
    if (!isfinite(top))
        return -1;
    const double tail = log((double)n), bound = 1.0 / (double)n;
    const float cut = (float)((double)top - tail * t); /* one cut for the head's test and the tail's */
    const float inv = (float)(1.0 / t);
    const Py_ssize_t blocks = (n + BLOCK - 1) / BLOCK;
    double *sums = malloc(sizeof(double) * (size_t)blocks);
    if (sums == NULL)
        return -2;
    double head = 0.0;
    Py_ssize_t count = 0;
    for (Py_ssize_t b = 0; b < blocks; b++) {
        double sum = 0.0;
        Py_ssize_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (Py_ssize_t i = b * BLOCK; i < end; i++)
            if (x[i] >= cut) {
                sum += expf((x[i] - top) * inv);
                count++;
            }
        sums[b] = sum;
        head += sum;
    }
    const double total = head + (double)(n - count) * bound;
    Py_ssize_t token = -1;
    while (token < 0) {
        double point = uniform(state) * total;
        if (point < head) {
            Py_ssize_t b = 0, last = -1;
            double before = 0.0;
            for (; b < blocks; b++) {
                if (sums[b] <= 0.0)
                    continue;
                last = b;
                if (before + sums[b] > point)
                    break;
                before += sums[b];
            }
            if (b == blocks) { /* rounding put the point past the last block with weight */
                b = last;
                before -= sums[b];
            }
            Py_ssize_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
            double within = 0.0;
            for (Py_ssize_t i = b * BLOCK; i < end; i++)
                if (x[i] >= cut) {
                    token = i;
                    within += expf((x[i] - top) * inv);
                    if (before + within > point)
                        break;
                }
        } else if (count < n) {
            Py_ssize_t j;
            do
                j = below(state, n);
            while (x[j] >= cut); /* uniform over the tail: redrawn while it lands in the head */
            if (uniform(state) * bound < exp(((double)x[j] - (double)top) / t))
                token = j; /* NaN logits never pass this test */
        }
    }
    free(sums);
    return token;
}

static PyObject *draw(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "draw(logits, temperature, state)");
        return NULL;
    }
    double t = PyFloat_AsDouble(args[1]);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t > 0.0) || !isfinite(t)) {
        PyErr_SetString(PyExc_ValueError, "the temperature must be positive and finite");
        return NULL;
    }
    Py_buffer logits, state;
    if (get_logits(args[0], &logits) < 0)
        return NULL;
    if (get_state(args[2], &state) < 0) {
        PyBuffer_Release(&logits);
        return NULL;
    }
    uint64_t s;
    memcpy(&s, state.buf, 8);
    Py_ssize_t token = draw_token(logits.buf, logits.len / 4, t, &s);
    memcpy(state.buf, &s, 8);
    PyBuffer_Release(&state);
    PyBuffer_Release(&logits);
    if (token == -1) {
        PyErr_SetString(PyExc_ValueError, "no token is allowed");
        return NULL;
    }
    if (token == -2)
        return PyErr_NoMemory();
    return PyLong_FromSsize_t(token);
}

static PyObject *argmax(PyObject *module, PyObject *arg) {
    Py_buffer logits;
    if (get_logits(arg, &logits) < 0)
        return NULL;
    const float *x = logits.buf;
    Py_ssize_t n = logits.len / 4, best = 0;
    for (Py_ssize_t i = 1; i < n; i++) /* the first of equal maxima, as numpy's argmax */
        if (x[i] > x[best])
            best = i;
    PyBuffer_Release(&logits);
    return PyLong_FromSsize_t(best);
}

static PyObject *random_uniform(PyObject *module, PyObject *arg) {
    Py_buffer state;
    if (get_state(arg, &state) < 0)
        return NULL;
    uint64_t s;
    memcpy(&s, state.buf, 8);
    double u = uniform(&s);
    memcpy(state.buf, &s, 8);
    PyBuffer_Release(&state);
    return PyFloat_FromDouble(u);
}

static PyMethodDef methods[] = {
    {"draw", (PyCFunction)(void (*)(void))draw, METH_FASTCALL,
     "draw(logits, temperature, state) -> token drawn from softmax(logits / temperature); state: 8 bytes"},
    {"argmax", argmax, METH_O, "argmax(logits) -> the first index of the largest logit"},
    {"uniform", random_uniform, METH_O, "uniform(state) -> a float in [0, 1) from the 8-byte state"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_draw", NULL, 0, methods};

PyMODINIT_FUNC PyInit__draw(void) { return PyModule_Create(&module); }
