/* The near-duplicate search's work inside one band group, compiled:
 * near_duplicates._slots_reference holds the same computation in numpy, the
 * reference this module must equal exactly (tests/pipelines/
 * folder_to_records/test_near_duplicates.py compares the two on random and
 * capped groups).
 *
 * For members i < j of a group (M members, each with the hash it is in the
 * group by), a candidate is a pair of two images (not one image's two
 * hashes) within `distance` bits of which at least one hash is a whole one.
 * Every candidate counts: per image (its path rank), the nearest partner in
 * each slot (the partner's split: train, validation, test; and slot 3, a
 * partner of another class): least bits, then first path rank.
 *
 * Why compiled: in numpy a group costs a dozen calls and their temporaries
 * (~0.2 ms for the ~45 members of a group at 3,000 images), which made most
 * of the group step (BUILD_NOTES.md, issue 19). Built by setup.py as an
 * optional extension: where it cannot be compiled the build uses the
 * reference (same output, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NEVER 65 /* near_duplicates.NEVER: HASH_BITS + 1. */

static inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* The scan is compiled twice on x86-64 with GCC, with the POPCNT instruction
 * and without, and the loader picks one per machine. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define HOT __attribute__((noinline, target_clones("popcnt", "default")))
#else
#define HOT __attribute__((noinline))
#endif

#define SLOTS 4 /* near_duplicates.SLOTS: three splits, another class. */
#define OTHER_CLASS 3

/* Every candidate of a group (see the top of the file) into best[rank *
 * SLOTS + slot]: bits * scale + the partner's rank, the least kept. */
HOT static void scan(Py_ssize_t m, const uint64_t *group_hash,
                     const uint8_t *which, const int32_t *order,
                     const uint8_t *split, const int32_t *cls, int distance,
                     int64_t scale, int64_t *best) {
  for (Py_ssize_t i = 0; i < m; i++) {
    const uint64_t hi = group_hash[i];
    const int whole_i = which[i] == 0;
    const int64_t ri = order[i];
    for (Py_ssize_t j = i + 1; j < m; j++) {
      const int bits = popcount64(hi ^ group_hash[j]);
      if (bits > distance || !(whole_i || which[j] == 0)) continue;
      const int64_t rj = order[j];
      if (ri == rj) continue; /* One image's two hashes. */
      const int64_t at = bits * scale;
      int64_t *slot = &best[ri * SLOTS + split[j]];
      if (at + rj < *slot) *slot = at + rj;
      slot = &best[rj * SLOTS + split[i]];
      if (at + ri < *slot) *slot = at + ri;
      if (cls[i] != cls[j]) {
        slot = &best[ri * SLOTS + OTHER_CLASS];
        if (at + rj < *slot) *slot = at + rj;
        slot = &best[rj * SLOTS + OTHER_CLASS];
        if (at + ri < *slot) *slot = at + ri;
      }
    }
  }
}

/* slots(group_hash, which, order, split, cls, distance)
 *   group_hash: bytes, M native uint64 (the hash each member is in the group
 *   by); which: bytes, M (0 whole, 1 centre); order: bytes, M native int32
 *   (its path's rank, below M; equal for an image's two hashes); split:
 *   bytes, M (0 train, 1 validation, 2 test); cls: bytes, M native int32
 *   (equal for images of one class).
 * Returns (image, slot, partner, d): bytes of native int64 each, one entry
 * per filled slot, in (rank, slot) order: the image's first member, the
 * slot, its nearest partner's first member, their bits. */
static PyObject *slots(PyObject *self, PyObject *args) {
  Py_buffer hb, wb, ob, sb, cb;
  int distance;
  if (!PyArg_ParseTuple(args, "y*y*y*y*y*i", &hb, &wb, &ob, &sb, &cb,
                        &distance))
    return NULL;
  PyObject *result = NULL;
  int64_t *best = NULL, *member_of = NULL, *out = NULL;
  const Py_ssize_t m = wb.len;
  if (hb.len != m * (Py_ssize_t)sizeof(uint64_t) ||
      ob.len != m * (Py_ssize_t)sizeof(int32_t) || sb.len != m ||
      cb.len != m * (Py_ssize_t)sizeof(int32_t) || m > INT32_MAX ||
      distance < 0 || distance > 64) {
    PyErr_SetString(PyExc_ValueError, "slots: inconsistent sizes");
    goto done;
  }
  const uint64_t *group_hash = (const uint64_t *)hb.buf;
  const uint8_t *which = (const uint8_t *)wb.buf;
  const int32_t *order = (const int32_t *)ob.buf;
  const uint8_t *split = (const uint8_t *)sb.buf;
  const int32_t *cls = (const int32_t *)cb.buf;

  int64_t scale = 1; /* The number of ranks (ranks are below m). */
  for (Py_ssize_t i = 0; i < m; i++) {
    if (order[i] < 0 || order[i] >= m || which[i] > 1 || split[i] > 2) {
      PyErr_SetString(PyExc_ValueError, "slots: bad order, which or split");
      goto done;
    }
    if (order[i] + (int64_t)1 > scale) scale = order[i] + (int64_t)1;
  }
  const int64_t none = NEVER * scale;
  best = PyMem_Malloc(sizeof(int64_t) * scale * SLOTS);
  member_of = PyMem_Malloc(sizeof(int64_t) * scale);
  if (!best || !member_of) {
    PyErr_NoMemory();
    goto done;
  }
  for (int64_t r = 0; r < scale * SLOTS; r++) best[r] = none;
  for (int64_t r = 0; r < scale; r++) member_of[r] = -1;
  for (Py_ssize_t i = m - 1; i >= 0; i--) member_of[order[i]] = i;

  scan(m, group_hash, which, order, split, cls, distance, scale, best);

  int64_t filled = 0;
  for (int64_t r = 0; r < scale * SLOTS; r++) filled += best[r] < none;
  out = PyMem_Malloc(sizeof(int64_t) * 4 * (filled + 1));
  if (!out) {
    PyErr_NoMemory();
    goto done;
  }
  int64_t *image = out, *slot = out + filled, *partner = out + 2 * filled;
  int64_t *d = out + 3 * filled, k = 0;
  for (int64_t r = 0; r < scale * SLOTS; r++) {
    if (best[r] >= none) continue;
    image[k] = member_of[r / SLOTS];
    slot[k] = r % SLOTS;
    partner[k] = member_of[best[r] % scale];
    d[k] = best[r] / scale;
    k++;
  }
  const Py_ssize_t n = (Py_ssize_t)(filled * 8);
  result = Py_BuildValue("(y#y#y#y#)", (const char *)image, n,
                         (const char *)slot, n, (const char *)partner, n,
                         (const char *)d, n);

done:
  PyMem_Free(best), PyMem_Free(member_of), PyMem_Free(out);
  PyBuffer_Release(&hb), PyBuffer_Release(&wb), PyBuffer_Release(&ob);
  PyBuffer_Release(&sb), PyBuffer_Release(&cb);
  return result;
}

static PyMethodDef methods[] = {
    {"slots", slots, METH_VARARGS,
     "A band group's nearest partner of each image in each slot (see the "
     "file)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_near_pairs",
                                    NULL, -1, methods};

PyMODINIT_FUNC PyInit__near_pairs(void) { return PyModule_Create(&module); }
