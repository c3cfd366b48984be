/* The near-duplicate search's work inside one band group, compiled:
 * near_duplicates._pair_arrays_reference holds the same computation in numpy,
 * the reference this module must equal exactly (tests/pipelines/
 * folder_to_records/test_near_duplicates.py compares the two on random and
 * capped groups).
 *
 * For members i < j of a group (M members, each with the hash it is in the
 * group by), a candidate is a pair within `distance` bits of which at least
 * one hash is a whole one. Candidates are taken in (i, j) order: the first
 * max_pairs are examined (emitted when this group is the one to emit them:
 * near_duplicates._emitted_here), the rest only counted; every candidate
 * counts for the leaks (per evaluation image, its nearest train image: least
 * bits, then first path rank).
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
#define MAX_BANDS 64

static inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* The scan is compiled twice on x86-64 with GCC, with the POPCNT instruction
 * and without, and the loader picks one per machine. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define HOT __attribute__((noinline, target_clones("popcnt", "default")))
#else
#define HOT __attribute__((noinline))
#endif

/* The candidates of a group in (i, j) order (see the top of the file). */
HOT static void scan(Py_ssize_t m, const uint64_t *hashes, const uint8_t *which,
                     const int32_t *order, const uint8_t *train,
                     const uint8_t *usable, const uint64_t *group_hash,
                     const uint64_t *masks, Py_ssize_t num_bands, int band,
                     int distance, Py_ssize_t max_pairs, int64_t scale,
                     int64_t *best, int64_t *a, int64_t *b, int64_t *d,
                     int64_t *emitted_out, int64_t *skipped_out) {
  int64_t examined = 0, emitted = 0, skipped = 0;
  for (Py_ssize_t i = 0; i < m; i++) {
    const uint64_t hi = group_hash[i];
    const int whole_i = which[i] == 0;
    for (Py_ssize_t j = i + 1; j < m; j++) {
      const int bits = popcount64(hi ^ group_hash[j]);
      if (bits > distance || !(whole_i || which[j] == 0)) continue;
      if (train[i] != train[j]) { /* A leak candidate (_Leaks.add). */
        const Py_ssize_t e = train[i] ? j : i, t = train[i] ? i : j;
        const int64_t key = bits * scale + order[t];
        if (key < best[order[e]]) best[order[e]] = key;
      }
      if (examined >= max_pairs) {
        skipped++;
        continue;
      }
      examined++;
      /* _emitted: this group emits the pair when its hash pair is the first
       * combo at the least distance and this band the first they share. */
      if (order[i] == order[j]) continue; /* One image's two hashes. */
      const Py_ssize_t x = order[j] < order[i] ? j : i;
      const Py_ssize_t y = x == i ? j : i;
      static const int combos[3][2] = {{0, 0}, {0, 1}, {1, 0}};
      int least = NEVER + 1, first = -1;
      uint64_t first_xor = 0;
      for (int c = 0; c < 3; c++) {
        const int wa = combos[c][0], wbh = combos[c][1];
        const uint64_t xor_ = hashes[2 * x + wa] ^ hashes[2 * y + wbh];
        const int dist = (usable[2 * x + wa] && usable[2 * y + wbh])
                             ? popcount64(xor_)
                             : NEVER;
        if (dist < least) least = dist, first = c, first_xor = xor_;
      }
      if (combos[first][0] != which[x] || combos[first][1] != which[y] ||
          least > distance)
        continue;
      int shared = 0; /* numpy's argmax: the first band shared, else 0. */
      for (Py_ssize_t k = 0; k < num_bands; k++)
        if (!(first_xor & masks[k])) {
          shared = (int)k;
          break;
        }
      if (shared != band) continue;
      a[emitted] = x, b[emitted] = y, d[emitted] = least;
      emitted++;
    }
  }

  *emitted_out = emitted, *skipped_out = skipped;
}

/* pair_arrays(hashes, which, order, train, band, masks, distance, max_pairs,
 *             min_bits)
 *   hashes: bytes, M x 2 native uint64 (whole, centre) of each member;
 *   which: bytes, M (0 whole, 1 centre: the member's hash in this group);
 *   order: bytes, M native int32 (its path's rank; equal for an image's two
 *   hashes); train: bytes, M (1 for a train image); masks: bytes, native
 *   uint64 per band.
 * Returns (a, b, d, skipped, held, partner, leak_d): a, b, d bytes of native
 * int64 (the pairs emitted, member indices in path order, and distance);
 * held, partner, leak_d bytes of native int64 (per evaluation image with a
 * train candidate, by rank: its first member, that of its nearest train
 * image, their bits). */
static PyObject *pair_arrays(PyObject *self, PyObject *args) {
  Py_buffer hb, wb, ob, tb, mb;
  int band, distance, min_bits;
  Py_ssize_t max_pairs;
  if (!PyArg_ParseTuple(args, "y*y*y*y*iy*ini", &hb, &wb, &ob, &tb, &band, &mb,
                        &distance, &max_pairs, &min_bits))
    return NULL;
  PyObject *result = NULL;
  int64_t *a = NULL, *b = NULL, *d = NULL, *best = NULL, *member_of = NULL;
  int64_t *held = NULL, *partner = NULL, *leak_d = NULL;
  uint64_t *group_hash = NULL;
  uint8_t *usable = NULL;
  const Py_ssize_t m = wb.len;
  const Py_ssize_t num_bands = mb.len / (Py_ssize_t)sizeof(uint64_t);
  if (hb.len != m * 2 * (Py_ssize_t)sizeof(uint64_t) ||
      ob.len != m * (Py_ssize_t)sizeof(int32_t) || tb.len != m ||
      mb.len % (Py_ssize_t)sizeof(uint64_t) || num_bands < 1 ||
      num_bands > MAX_BANDS || max_pairs < 0 || m > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "pair_arrays: inconsistent sizes");
    goto done;
  }
  const uint64_t *hashes = (const uint64_t *)hb.buf;
  const uint8_t *which = (const uint8_t *)wb.buf;
  const int32_t *order = (const int32_t *)ob.buf;
  const uint8_t *train = (const uint8_t *)tb.buf;
  uint64_t masks[MAX_BANDS];
  memcpy(masks, mb.buf, mb.len);

  int64_t scale = 1; /* The number of ranks (ranks are below m). */
  for (Py_ssize_t i = 0; i < m; i++) {
    if (order[i] < 0 || order[i] >= m || which[i] > 1) {
      PyErr_SetString(PyExc_ValueError, "pair_arrays: bad order or which");
      goto done;
    }
    if (order[i] + (int64_t)1 > scale) scale = order[i] + (int64_t)1;
  }
  const int64_t none = NEVER * scale;
  /* Room for every pair examined: at most max_pairs and the pair count. */
  int64_t room = (int64_t)m * (m - 1) / 2;
  if (room > max_pairs) room = max_pairs;
  a = PyMem_Malloc(sizeof(int64_t) * (room + 1));
  b = PyMem_Malloc(sizeof(int64_t) * (room + 1));
  d = PyMem_Malloc(sizeof(int64_t) * (room + 1));
  best = PyMem_Malloc(sizeof(int64_t) * scale);
  member_of = PyMem_Malloc(sizeof(int64_t) * scale);
  group_hash = PyMem_Malloc(sizeof(uint64_t) * (m + 1));
  usable = PyMem_Malloc(2 * (m + 1));
  if (!a || !b || !d || !best || !member_of || !group_hash || !usable) {
    PyErr_NoMemory();
    goto done;
  }
  for (int64_t r = 0; r < scale; r++) best[r] = none, member_of[r] = -1;
  for (Py_ssize_t i = m - 1; i >= 0; i--) member_of[order[i]] = i;
  for (Py_ssize_t i = 0; i < m; i++) {
    group_hash[i] = hashes[2 * i + which[i]];
    usable[2 * i] = popcount64(hashes[2 * i]) >= min_bits;
    usable[2 * i + 1] = popcount64(hashes[2 * i + 1]) >= min_bits;
  }

  int64_t emitted = 0, skipped = 0;
  scan(m, hashes, which, order, train, usable, group_hash, masks, num_bands,
       band, distance, max_pairs, scale, best, a, b, d, &emitted, &skipped);

  int64_t leaks = 0;
  for (int64_t r = 0; r < scale; r++) leaks += best[r] < none;
  held = PyMem_Malloc(sizeof(int64_t) * (leaks + 1));
  partner = PyMem_Malloc(sizeof(int64_t) * (leaks + 1));
  leak_d = PyMem_Malloc(sizeof(int64_t) * (leaks + 1));
  if (!held || !partner || !leak_d) {
    PyErr_NoMemory();
    goto done;
  }
  int64_t k = 0;
  for (int64_t r = 0; r < scale; r++) {
    if (best[r] >= none) continue;
    held[k] = member_of[r];
    partner[k] = member_of[best[r] % scale];
    leak_d[k] = best[r] / scale;
    k++;
  }
  result = Py_BuildValue(
      "(y#y#y#Ly#y#y#)", (const char *)a, (Py_ssize_t)(emitted * 8),
      (const char *)b, (Py_ssize_t)(emitted * 8), (const char *)d,
      (Py_ssize_t)(emitted * 8), (long long)skipped, (const char *)held,
      (Py_ssize_t)(leaks * 8), (const char *)partner, (Py_ssize_t)(leaks * 8),
      (const char *)leak_d, (Py_ssize_t)(leaks * 8));

done:
  PyMem_Free(a), PyMem_Free(b), PyMem_Free(d), PyMem_Free(best);
  PyMem_Free(member_of), PyMem_Free(group_hash), PyMem_Free(usable);
  PyMem_Free(held), PyMem_Free(partner), PyMem_Free(leak_d);
  PyBuffer_Release(&hb), PyBuffer_Release(&wb), PyBuffer_Release(&ob);
  PyBuffer_Release(&tb), PyBuffer_Release(&mb);
  return result;
}

static PyMethodDef methods[] = {
    {"pair_arrays", pair_arrays, METH_VARARGS,
     "A band group's emitted pairs, skipped count and leaks (see the file)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_near_pairs",
                                    NULL, -1, methods};

PyMODINIT_FUNC PyInit__near_pairs(void) { return PyModule_Create(&module); }
