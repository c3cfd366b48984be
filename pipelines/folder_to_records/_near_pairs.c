/* The near-duplicate search's group step over one bucket, compiled:
 * near_duplicates._bucket_slots_reference holds the same computation in
 * Python and numpy, the reference this module must equal exactly (tests/
 * pipelines/folder_to_records/test_near_duplicates.py compares the two on
 * random and capped buckets).
 *
 * A bucket holds band entries (near_duplicates: _ENTRY then _PACKED, the
 * path's bytes and the class's bytes), grouped here by band key. A group is
 * compared among its first `cap` members (first by crc32 of the path, then
 * the path's bytes, then which hash). For members i < j of a group, a
 * candidate is a pair of two images (not one image's two hashes) within
 * `distance` bits of which at least one hash is a whole one. Every
 * candidate counts: per image, the nearest partner in each slot (the
 * partner's split: train, validation, test; and slot 3, a partner of
 * another class), least bits, then the first path (bytes order), over all
 * the bucket's groups.
 *
 * Why compiled: in Python each entry cost an object, a rank and a sort
 * (~3 µs; 540,000 entries at 30,000 photo-like images), and in numpy a
 * group costs a dozen calls and their temporaries, which made most of the
 * group step (BUILD_NOTES.md, issue 19). Built by setup.py as an optional
 * extension: where it cannot be compiled the build uses the reference (same
 * output, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#endif

#define NEVER 65 /* near_duplicates.NEVER: HASH_BITS + 1. */
#define SLOTS 4  /* near_duplicates.SLOTS: three splits, another class. */
#define OTHER_CLASS 3
#define HEAD 11  /* _ENTRY: band u8, bits u64, length u16 (big-endian). */
/* _PACKED: which u8, whole u64, centre u64, chunk u32, offset u64, split u8,
 * crc u32, path length u16 (big-endian). */
#define FIXED 36

static inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* The scan is compiled twice on x86-64 with GCC, with the POPCNT instruction
 * and without, and the loader picks one per machine. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define HOT __attribute__((noinline, target_clones("popcnt", "default")))
#else
#define HOT __attribute__((noinline))
#endif

static uint64_t be(const uint8_t *p, int n) {
  uint64_t v = 0;
  for (int k = 0; k < n; k++) v = v << 8 | p[k];
  return v;
}

typedef struct {
  uint64_t bits, hash, crc; /* hash: the one this entry is keyed by. */
  const uint8_t *path, *cls;
  Py_ssize_t path_len, cls_len;
  int64_t chunk, image;
  uint8_t band, which, split;
} Entry;

static int bytes_cmp(const uint8_t *a, Py_ssize_t na, const uint8_t *b,
                     Py_ssize_t nb) {
  const int c = memcmp(a, b, (size_t)(na < nb ? na : nb));
  if (c) return c;
  return (na > nb) - (na < nb);
}

/* qsort's comparisons (the GIL is held throughout: one call at a time). */
static const Entry *sorted_entries;

static int by_path(const void *x, const void *y) {
  const Entry *a = &sorted_entries[*(const int64_t *)x];
  const Entry *b = &sorted_entries[*(const int64_t *)y];
  return bytes_cmp(a->path, a->path_len, b->path, b->path_len);
}

static int by_class(const void *x, const void *y) {
  const Entry *a = &sorted_entries[*(const int64_t *)x];
  const Entry *b = &sorted_entries[*(const int64_t *)y];
  return bytes_cmp(a->cls, a->cls_len, b->cls, b->cls_len);
}

#define CMP(x, y) \
  if ((x) != (y)) return (x) < (y) ? -1 : 1;

static int by_member(const void *x, const void *y) {
  const Entry *a = &sorted_entries[*(const int64_t *)x];
  const Entry *b = &sorted_entries[*(const int64_t *)y];
  CMP(a->band, b->band);
  CMP(a->bits, b->bits);
  CMP(a->crc, b->crc);
  CMP(a->image, b->image);
  CMP(a->which, b->which);
  return 0;
}

/* A group's kept members, gathered from the entries into arrays (the scan
 * reads them in order, not through the entries' scattered records). */
typedef struct {
  uint64_t *hash;
  uint64_t *whole; /* All ones for a whole hash, 0 for a centre one. */
  int32_t *image, *cls;
  uint8_t *split;
  int32_t *candidates; /* The scan's scratch: one row's candidates. */
} Group;

/* The members y of a group from `from` to m that are candidates with
 * member x (within `distance` bits, one hash at least a whole one) into
 * cand, in order; returns how many. Plain C, one member at a time without
 * a branch. */
static Py_ssize_t row_candidates(Py_ssize_t x, Py_ssize_t from, Py_ssize_t m,
                                 const Group *g, int distance,
                                 int32_t *cand) {
  const uint64_t hi = g->hash[x], whole_i = g->whole[x];
  Py_ssize_t k = 0;
  for (Py_ssize_t y = from; y < m; y++) {
    cand[k] = (int32_t)y;
    k += (popcount64(hi ^ g->hash[y]) <= distance) &
         ((whole_i | g->whole[y]) != 0);
  }
  return k;
}

#ifdef HAVE_AVX512_PATH
/* row_candidates from x + 1, 8 members at a time with AVX-512 (VPOPCNTQ,
 * and the candidates' indices compressed), the last few in plain C:
 * the same result. */
__attribute__((target("avx512f,avx512vl,avx512vpopcntdq"))) static Py_ssize_t
row_candidates_avx512(Py_ssize_t x, Py_ssize_t m, const Group *g,
                      int distance, int32_t *cand) {
  const __m512i hi = _mm512_set1_epi64((long long)g->hash[x]);
  const __m512i most = _mm512_set1_epi64(distance);
  const __m512i whole_i = _mm512_set1_epi64((long long)g->whole[x]);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  Py_ssize_t k = 0, y = x + 1;
  for (; y + 8 <= m; y += 8) {
    const __m512i bits = _mm512_popcnt_epi64(
        _mm512_xor_si512(_mm512_loadu_si512(g->hash + y), hi));
    const __m512i whole = _mm512_or_si512(_mm512_loadu_si512(g->whole + y),
                                          whole_i);
    const __mmask8 near = _mm512_cmple_epu64_mask(bits, most) &
                          _mm512_test_epi64_mask(whole, whole);
    /* Compressed in a register, then all 8 lanes stored (cand has 8 spare
     * slots): a compress straight to memory (VPCOMPRESSD m256) is
     * microcoded on AMD Zen 4, where it made this pass 2x slower than
     * plain C (BUILD_NOTES, "What the build says"). */
    _mm256_storeu_si256(
        (__m256i *)(cand + k),
        _mm256_maskz_compress_epi32(
            near, _mm256_add_epi32(_mm256_set1_epi32((int)y), lanes)));
    k += __builtin_popcount(near);
  }
  return k + row_candidates(x, y, m, g, distance, cand + k);
}
#endif

/* One group's m kept members into best (see the top of the file):
 * best[image * SLOTS + slot] = bits * scale + the partner's image index,
 * the least kept. Each row is done in two passes: its candidates found
 * without a branch (on a folder of near copies about half the pairs are
 * candidates, and a branch on each mispredicts), then only they update
 * the slots, the row's own slots kept in registers. */
HOT static void scan(Py_ssize_t m, const Group *g, int distance,
                     int64_t scale, int64_t *best, int vector) {
  const uint64_t *hash = g->hash;
  int32_t *cand = g->candidates;
  for (Py_ssize_t x = 0; x < m; x++) {
    const uint64_t hi = hash[x];
#ifdef HAVE_AVX512_PATH
    const Py_ssize_t k = vector
                             ? row_candidates_avx512(x, m, g, distance, cand)
                             : row_candidates(x, x + 1, m, g, distance, cand);
#else
    const Py_ssize_t k = row_candidates(x, x + 1, m, g, distance, cand);
#endif
    if (!k) continue;
    const int64_t ri = g->image[x];
    const int si = g->split[x], ci = g->cls[x];
    int64_t mine[SLOTS];
    for (int s = 0; s < SLOTS; s++) mine[s] = best[ri * SLOTS + s];
    for (Py_ssize_t t = 0; t < k; t++) {
      const Py_ssize_t y = cand[t];
      const int64_t rj = g->image[y];
      if (ri == rj) continue; /* One image's two hashes. */
      const int64_t at = popcount64(hi ^ hash[y]) * scale;
      const int sj = g->split[y];
      if (at + rj < mine[sj]) mine[sj] = at + rj;
      int64_t *slot = &best[rj * SLOTS + si];
      if (at + ri < *slot) *slot = at + ri;
      if (ci != g->cls[y]) {
        if (at + rj < mine[OTHER_CLASS]) mine[OTHER_CLASS] = at + rj;
        slot = &best[rj * SLOTS + OTHER_CLASS];
        if (at + ri < *slot) *slot = at + ri;
      }
    }
    for (int s = 0; s < SLOTS; s++) best[ri * SLOTS + s] = mine[s];
  }
}

static PyObject *int64_bytes(const int64_t *v, Py_ssize_t n) {
  return PyBytes_FromStringAndSize((const char *)v, n * 8);
}

/* Whether this CPU runs row_candidates_avx512 (checked once). */
static int avx512_path(void) {
#ifdef HAVE_AVX512_PATH
  static int known = -1;
  if (known < 0) {
    __builtin_cpu_init();
    known = __builtin_cpu_supports("avx512f") &&
            __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vpopcntdq");
  }
  return known;
#else
  return 0;
#endif
}

/* bucket_slots(data, distance, cap[, vector])
 *   data: a bucket's entries, one after another (see the top of the file);
 *   vector: 0 to scan with plain C even where AVX-512 runs (the tests
 *   compare both with the reference).
 * Returns (paths, ends, splits, chunks, image, slot, partner, d,
 *          capped_band, capped_members, capped_example):
 *   the bucket's images in path (bytes) order: paths, their bytes end to
 *   end; ends, bytes of native int64 (where each ends); splits, bytes (one
 *   each); chunks, native int64;
 *   one entry per filled slot, in (image, slot) order: image, slot, its
 *   nearest partner (image indices), their bits: native int64 each;
 *   per group of over `cap` members, in key order: its band, its number of
 *   members, its first member's image: native int64 each.
 * ValueError for a bad entry; OSError where one runs past the end. */
static PyObject *bucket_slots(PyObject *self, PyObject *args) {
  Py_buffer db;
  int distance, vector = 1;
  Py_ssize_t cap;
  if (!PyArg_ParseTuple(args, "y*in|p", &db, &distance, &cap, &vector))
    return NULL;
  vector = vector && avx512_path();
  PyObject *result = NULL, *paths = NULL;
  Entry *e = NULL;
  int64_t *order = NULL, *first_of = NULL, *best = NULL, *out = NULL;
  int64_t *capped = NULL, *ends = NULL, *chunks = NULL, *kept = NULL;
  int32_t *class_of = NULL;
  uint8_t *splits = NULL;
  Group group = {NULL, NULL, NULL, NULL, NULL, NULL};
  const uint8_t *data = (const uint8_t *)db.buf;
  const Py_ssize_t end = db.len;
  if (distance < 0 || distance > 64 || cap < 1) {
    PyErr_SetString(PyExc_ValueError, "bucket_slots: bad distance or cap");
    goto done;
  }
  /* Entries: count, then parse. */
  Py_ssize_t n = 0;
  for (Py_ssize_t at = 0; at < end; n++) {
    if (at + HEAD > end || at + HEAD + (Py_ssize_t)be(data + at + 9, 2) > end) {
      PyErr_Format(PyExc_OSError,
                   "a band entry runs past the end of its range (%zd bytes): "
                   "a file of this build was cut short", end);
      goto done;
    }
    at += HEAD + (Py_ssize_t)be(data + at + 9, 2);
  }
  e = PyMem_Malloc(sizeof(Entry) * (n + 1));
  order = PyMem_Malloc(sizeof(int64_t) * (n + 1));
  kept = PyMem_Malloc(sizeof(int64_t) * 3 * (n + 1));
  if (!e || !order || !kept) {
    PyErr_NoMemory();
    goto done;
  }
  Py_ssize_t at = 0;
  for (Py_ssize_t i = 0; i < n; i++) {
    const uint8_t *p = data + at;
    const Py_ssize_t length = (Py_ssize_t)be(p + 9, 2);
    const uint8_t *f = p + HEAD;
    Entry *x = &e[i];
    if (length < FIXED) { /* Its fields would run past it (and the data). */
      PyErr_SetString(PyExc_ValueError, "bucket_slots: a bad band entry");
      goto done;
    }
    x->band = p[0];
    x->bits = be(p + 1, 8);
    x->which = f[0];
    const uint64_t whole = be(f + 1, 8), centre = be(f + 9, 8);
    x->chunk = (int64_t)be(f + 17, 4);
    x->split = f[29];
    x->crc = be(f + 30, 4);
    x->path_len = (Py_ssize_t)be(f + 34, 2);
    if (x->path_len > length - FIXED || x->which > 1 || x->split > 2) {
      PyErr_SetString(PyExc_ValueError, "bucket_slots: a bad band entry");
      goto done;
    }
    x->hash = x->which ? centre : whole;
    x->path = f + FIXED;
    x->cls = x->path + x->path_len;
    x->cls_len = length - FIXED - x->path_len;
    order[i] = i;
    at += HEAD + length;
  }
  sorted_entries = e;
  /* Images: the distinct paths, in bytes order. */
  qsort(order, (size_t)n, sizeof(int64_t), by_path);
  Py_ssize_t images = 0, path_bytes = 0;
  first_of = PyMem_Malloc(sizeof(int64_t) * (n + 1));
  if (!first_of) {
    PyErr_NoMemory();
    goto done;
  }
  for (Py_ssize_t k = 0; k < n; k++) {
    Entry *x = &e[order[k]];
    if (k == 0 || by_path(&order[k - 1], &order[k])) {
      first_of[images++] = order[k];
      path_bytes += x->path_len;
    }
    x->image = images - 1;
  }
  /* Classes: an int per distinct class bytes. */
  class_of = PyMem_Malloc(sizeof(int32_t) * (images + 1));
  ends = PyMem_Malloc(sizeof(int64_t) * (images + 1));
  chunks = PyMem_Malloc(sizeof(int64_t) * (images + 1));
  splits = PyMem_Malloc(images + 1);
  if (!class_of || !ends || !chunks || !splits) {
    PyErr_NoMemory();
    goto done;
  }
  memcpy(kept, first_of, sizeof(int64_t) * images);
  qsort(kept, (size_t)images, sizeof(int64_t), by_class);
  int32_t classes = 0;
  for (Py_ssize_t k = 0; k < images; k++) {
    if (k > 0 && by_class(&kept[k - 1], &kept[k])) classes++;
    class_of[e[kept[k]].image] = classes;
  }
  paths = PyBytes_FromStringAndSize(NULL, path_bytes);
  if (!paths) goto done;
  char *to = PyBytes_AS_STRING(paths);
  for (Py_ssize_t r = 0, used = 0; r < images; r++) {
    const Entry *x = &e[first_of[r]];
    memcpy(to + used, x->path, (size_t)x->path_len);
    used += x->path_len;
    ends[r] = used, chunks[r] = x->chunk, splits[r] = x->split;
  }

  /* Groups: members in (band, bits, crc, path, which) order. */
  qsort(order, (size_t)n, sizeof(int64_t), by_member);
  const int64_t scale = images, none = NEVER * scale;
  best = PyMem_Malloc(sizeof(int64_t) * SLOTS * (images + 1));
  capped = PyMem_Malloc(sizeof(int64_t) * 3 * (n + 1));
  if (!best || !capped) {
    PyErr_NoMemory();
    goto done;
  }
  for (Py_ssize_t r = 0; r < SLOTS * images; r++) best[r] = none;
  /* The scan's arrays: room for the largest group it compares. */
  Py_ssize_t widest = 0;
  for (Py_ssize_t lo = 0, hi; lo < n; lo = hi) {
    for (hi = lo + 1; hi < n && e[order[hi]].band == e[order[lo]].band &&
                      e[order[hi]].bits == e[order[lo]].bits;)
      hi++;
    if (hi - lo > widest) widest = hi - lo;
  }
  if (widest > cap) widest = cap;
  group.hash = PyMem_Malloc(sizeof(uint64_t) * (widest + 1));
  group.whole = PyMem_Malloc(sizeof(uint64_t) * (widest + 1));
  group.image = PyMem_Malloc(sizeof(int32_t) * (widest + 1));
  group.cls = PyMem_Malloc(sizeof(int32_t) * (widest + 1));
  /* 8 spare: row_candidates_avx512 stores 8 lanes at a time. */
  group.candidates = PyMem_Malloc(sizeof(int32_t) * (widest + 1 + 8));
  group.split = PyMem_Malloc(widest + 1);
  if (!group.hash || !group.whole || !group.image || !group.cls ||
      !group.candidates || !group.split) {
    PyErr_NoMemory();
    goto done;
  }
  Py_ssize_t num_capped = 0;
  for (Py_ssize_t lo = 0; lo < n;) {
    Py_ssize_t hi = lo + 1;
    while (hi < n && e[order[hi]].band == e[order[lo]].band &&
           e[order[hi]].bits == e[order[lo]].bits)
      hi++;
    Py_ssize_t m = hi - lo;
    if (m > cap) {
      capped[3 * num_capped] = e[order[lo]].band;
      capped[3 * num_capped + 1] = m;
      capped[3 * num_capped + 2] = e[order[lo]].image;
      num_capped++;
      m = cap;
    }
    for (Py_ssize_t x = 0; x < m; x++) {
      const Entry *a = &e[order[lo + x]];
      group.hash[x] = a->hash;
      group.whole[x] = a->which == 0 ? ~(uint64_t)0 : 0;
      group.image[x] = (int32_t)a->image, group.split[x] = a->split;
      group.cls[x] = class_of[a->image];
    }
    scan(m, &group, distance, scale, best, vector);
    lo = hi;
  }

  Py_ssize_t filled = 0;
  for (Py_ssize_t r = 0; r < SLOTS * images; r++) filled += best[r] < none;
  out = PyMem_Malloc(sizeof(int64_t) * 4 * (filled + 1));
  if (!out) {
    PyErr_NoMemory();
    goto done;
  }
  int64_t *image = out, *slot = out + filled, *partner = out + 2 * filled;
  int64_t *d = out + 3 * filled, k = 0;
  for (Py_ssize_t r = 0; r < SLOTS * images; r++) {
    if (best[r] >= none) continue;
    image[k] = r / SLOTS, slot[k] = r % SLOTS;
    partner[k] = best[r] % scale, d[k] = best[r] / scale;
    k++;
  }
  /* The capped groups' columns, one after another. */
  for (Py_ssize_t c = 0; c < num_capped; c++)
    kept[c] = capped[3 * c], kept[num_capped + c] = capped[3 * c + 1],
    kept[2 * num_capped + c] = capped[3 * c + 2];
  result = Py_BuildValue(
      "(ONy#NNNNNNNN)", paths, int64_bytes(ends, images), (const char *)splits,
      images, int64_bytes(chunks, images), int64_bytes(image, filled),
      int64_bytes(slot, filled), int64_bytes(partner, filled),
      int64_bytes(d, filled), int64_bytes(kept, num_capped),
      int64_bytes(kept + num_capped, num_capped),
      int64_bytes(kept + 2 * num_capped, num_capped));

done:
  Py_XDECREF(paths);
  PyMem_Free(e), PyMem_Free(order), PyMem_Free(first_of), PyMem_Free(best);
  PyMem_Free(out), PyMem_Free(capped), PyMem_Free(ends), PyMem_Free(chunks);
  PyMem_Free(kept), PyMem_Free(class_of), PyMem_Free(splits);
  PyMem_Free(group.hash), PyMem_Free(group.image), PyMem_Free(group.cls);
  PyMem_Free(group.candidates), PyMem_Free(group.whole);
  PyMem_Free(group.split);
  PyBuffer_Release(&db);
  return result;
}

static PyMethodDef methods[] = {
    {"bucket_slots", bucket_slots, METH_VARARGS,
     "A bucket's images and each one's nearest partner per slot (see the "
     "file)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_near_pairs",
                                    NULL, -1, methods};

PyMODINIT_FUNC PyInit__near_pairs(void) { return PyModule_Create(&module); }
