/* The build's per-image measures in one compiled pass (image_quality.py and
 * perceptual_hash.py hold the same computations in Pillow and numpy, the
 * reference this module must equal bit for bit; tests/pipelines/
 * preprocessing/test_image_measures.py checks it on real photos).
 *
 * Pillow's steps are reproduced exactly, not approximated: the luma of
 * Image.convert('L') (ITU-R 601-2, 16-bit fixed point), the BOX resampling
 * of Image.resize (Pillow's precompute_coeffs / normalize_coeffs_8bpc /
 * two-pass ImagingResampleInner, src/libImaging/Resample.c, and the crop
 * shortcut of _imaging.c's _resize) and the block means of Image.reduce
 * (src/libImaging/Reduce.c: ((sum + n / 2) * division_UINT32(n, 8)) >> 24
 * for every block, edge blocks included). Pillow is (c) Jeffrey A. Clark and
 * contributors, MIT-CMU licence. Everything after those steps is integer
 * sums, returned to Python, which does the final divisions exactly as the
 * reference does.
 *
 * Why compiled: the same steps through Pillow and numpy cost ~0.6 ms an image
 * in the build (a dozen calls and their temporaries), two thirds of what the
 * build spent on an image before it measured anything; here they are one
 * pass over a 128-px copy that stays in cache (BUILD_NOTES.md, issue 19).
 *
 * Built by setup.py as an optional extension: where it cannot be compiled
 * the build uses the reference (same output, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PRECISION_BITS (32 - 8 - 2)

/* The hot loops are compiled twice on x86-64 with GCC, for AVX2 and for the
 * baseline, and the loader picks one per machine (the integer sums are the
 * same either way). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define HOT __attribute__((noinline, target_clones("avx2", "default")))
#else
#define HOT __attribute__((noinline))
#endif

static inline uint8_t clip8(int in) {
  int v = in >> PRECISION_BITS;
  return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* Pillow's BOX filter: 1 on (-0.5, 0.5]. */
static inline double box_filter(double x) {
  return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
}

/* Resample.c precompute_coeffs + normalize_coeffs_8bpc for the BOX filter
 * (support 0.5). Returns ksize, or 0 when out of memory. */
static int precompute_coeffs(int in_size, float in0, float in1, int out_size,
                             int **boundsp, int32_t **kkp) {
  double scale, filterscale, support;
  int xx, x, ksize, xmin, xmax;
  filterscale = scale = (double)(in1 - in0) / out_size;
  if (filterscale < 1.0) filterscale = 1.0;
  support = 0.5 * filterscale;
  ksize = (int)ceil(support) * 2 + 1;
  double *prekk = malloc((size_t)out_size * ksize * sizeof(double));
  int32_t *kk = malloc((size_t)out_size * ksize * sizeof(int32_t));
  int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
  if (!prekk || !kk || !bounds) {
    free(prekk);
    free(kk);
    free(bounds);
    return 0;
  }
  double inv_filterscale = 1.0 / filterscale;
  for (xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    xmin = (int)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    xmax = (int)(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double *k = &prekk[xx * ksize];
    for (x = 0; x < xmax; x++) {
      double w = box_filter((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0) {
      for (x = 0; x < xmax; x++) k[x] /= ww;
    }
    for (; x < ksize; x++) k[x] = 0;
    bounds[xx * 2 + 0] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  for (x = 0; x < out_size * ksize; x++) {
    kk[x] = prekk[x] < 0 ? (int)(-0.5 + prekk[x] * (1 << PRECISION_BITS))
                         : (int)(0.5 + prekk[x] * (1 << PRECISION_BITS));
  }
  free(prekk);
  *boundsp = bounds;
  *kkp = kk;
  return ksize;
}

/* An 8-bit one-channel image: rows of `width` bytes, `stride` apart. */
typedef struct {
  uint8_t *data;
  int width, height, stride;
} Plane;

static int plane_new(Plane *p, int width, int height) {
  p->data = malloc((size_t)width * height > 0 ? (size_t)width * height : 1);
  p->width = width;
  p->height = height;
  p->stride = width;
  return p->data != NULL;
}

#if defined(__SSE2__)
/* One whole 16 x 16 tile of transpose() in SSE2 registers (x86-64's
 * baseline): four rounds of interleaving, rows 2 then 4, 8, 16 at a time.
 * The byte-by-byte loop below was a fifth of the measures' time. */
static inline void transpose16(const uint8_t *src, size_t src_stride,
                               uint8_t *dst, size_t dst_stride) {
  __m128i a[16], b[2][8], c[2][4][2], d[2][2][2][2];
  for (int i = 0; i < 16; i++)
    a[i] = _mm_loadu_si128((const __m128i *)(src + i * src_stride));
  /* b[h][p]: columns 8h..8h+7 of rows 2p, 2p+1, a byte of each in turn. */
  for (int p = 0; p < 8; p++) {
    b[0][p] = _mm_unpacklo_epi8(a[2 * p], a[2 * p + 1]);
    b[1][p] = _mm_unpackhi_epi8(a[2 * p], a[2 * p + 1]);
  }
  /* c[h][q][s]: columns 8h+4s..8h+4s+3 of rows 4q..4q+3. */
  for (int h = 0; h < 2; h++)
    for (int q = 0; q < 4; q++) {
      c[h][q][0] = _mm_unpacklo_epi16(b[h][2 * q], b[h][2 * q + 1]);
      c[h][q][1] = _mm_unpackhi_epi16(b[h][2 * q], b[h][2 * q + 1]);
    }
  /* d[h][s][o][t]: columns 8h+4s+2t, +1 of rows 8o..8o+7. */
  for (int h = 0; h < 2; h++)
    for (int s = 0; s < 2; s++)
      for (int o = 0; o < 2; o++) {
        d[h][s][o][0] = _mm_unpacklo_epi32(c[h][2 * o][s], c[h][2 * o + 1][s]);
        d[h][s][o][1] = _mm_unpackhi_epi32(c[h][2 * o][s], c[h][2 * o + 1][s]);
      }
  /* Column 8h+4s+2t+u, all 16 rows: row 8h+4s+2t+u of dst. */
  for (int h = 0; h < 2; h++)
    for (int s = 0; s < 2; s++)
      for (int t = 0; t < 2; t++) {
        size_t col = (size_t)(8 * h + 4 * s + 2 * t);
        _mm_storeu_si128((__m128i *)(dst + col * dst_stride),
                         _mm_unpacklo_epi64(d[h][s][0][t], d[h][s][1][t]));
        _mm_storeu_si128((__m128i *)(dst + (col + 1) * dst_stride),
                         _mm_unpackhi_epi64(d[h][s][0][t], d[h][s][1][t]));
      }
}
#endif

/* dst[x][y] = src[y][x] for a rows x cols block: 16 x 16 tiles. */
HOT static void transpose(const uint8_t *src, int src_stride, int rows, int cols,
                      uint8_t *dst, int dst_stride) {
  for (int y0 = 0; y0 < rows; y0 += 16) {
    int y1 = y0 + 16 < rows ? y0 + 16 : rows;
    for (int x0 = 0; x0 < cols; x0 += 16) {
      int x1 = x0 + 16 < cols ? x0 + 16 : cols;
#if defined(__SSE2__)
      if (y1 - y0 == 16 && x1 - x0 == 16) {
        transpose16(src + (size_t)y0 * src_stride + x0, (size_t)src_stride,
                    dst + (size_t)x0 * dst_stride + y0, (size_t)dst_stride);
        continue;
      }
#endif
      for (int x = x0; x < x1; x++)
        for (int y = y0; y < y1; y++)
          dst[(size_t)x * dst_stride + y] = src[(size_t)y * src_stride + x];
    }
  }
}

/* One resampling pass along the rows of `in` (Resample.c's vertical pass):
 * out row j = clip8(sum over taps i of kk[j][i] x in row (bounds[j] + i)),
 * summed a whole row at a time (same integer sums as Pillow's per-pixel
 * loop; the compiler vectorizes it). `acc` holds in->width ints. */
HOT static void pass_over_rows(const Plane *in, int ksize, const int *bounds,
                           const int32_t *kk, Plane *out, int *acc) {
  int width = in->width;
  for (int j = 0; j < out->height; j++) {
    const int32_t *k = &kk[j * ksize];
    int first = bounds[j * 2], count = bounds[j * 2 + 1];
    uint8_t *line_out = out->data + (size_t)j * out->stride;
    for (int x = 0; x < width; x++) acc[x] = 1 << (PRECISION_BITS - 1);
    for (int i = 0; i < count; i++) {
      const uint8_t *row = in->data + (size_t)(first + i) * in->stride;
      int32_t weight = k[i];
      for (int x = 0; x < width; x++) acc[x] += row[x] * weight;
    }
    for (int x = 0; x < width; x++) line_out[x] = clip8(acc[x]);
  }
}

/* Image.resize(size, BOX, box) of an 'L' image, as Pillow computes it
 * (_imaging.c _resize, then Resample.c ImagingResampleInner). `out` must be
 * out_w x out_h. Returns 0 when out of memory. */
static int resample_box(const Plane *in, int out_w, int out_h,
                        const float box[4], Plane *out) {
  int y, i;
  if (box[0] - (int)box[0] == 0 && box[2] - box[0] == out_w &&
      box[1] - (int)box[1] == 0 && box[3] - box[1] == out_h) {
    for (y = 0; y < out_h; y++)  /* _resize's crop shortcut */
      memcpy(out->data + (size_t)y * out->stride,
             in->data + (size_t)(y + (int)box[1]) * in->stride + (int)box[0],
             out_w);
    return 1;
  }
  int need_h = out_w != in->width || box[0] || box[2] != out_w;
  int need_v = out_h != in->height || box[1] || box[3] != out_h;
  int *bounds_v, *bounds_h;
  int32_t *kk_v, *kk_h;
  int ksize_v = precompute_coeffs(in->height, box[1], box[3], out_h,
                                  &bounds_v, &kk_v);
  if (!ksize_v) return 0;
  int ybox_first = bounds_v[0];
  int ybox_last = bounds_v[out_h * 2 - 2] + bounds_v[out_h * 2 - 1];
  /* Pillow's horizontal pass is a pass over the rows of the transposed
   * image: transpose the rows it reads, pass, transpose back. */
  Plane temp = {NULL, 0, 0, 0}, in_t = {NULL, 0, 0, 0}, temp_t = {NULL, 0, 0, 0};
  const Plane *src = in;
  int rows = ybox_last - ybox_first, ok = 0;
  int acc_len = need_h ? (rows > out_w ? rows : out_w) : in->width;
  int *acc = malloc((size_t)acc_len * sizeof(int));
  if (!acc) goto done;
  if (need_h) {
    int ksize_h = precompute_coeffs(in->width, box[0], box[2], out_w,
                                    &bounds_h, &kk_h);
    if (!ksize_h) goto done;
    for (i = 0; i < out_h; i++) bounds_v[i * 2] -= ybox_first;
    if (plane_new(&in_t, rows, in->width) && plane_new(&temp_t, rows, out_w) &&
        plane_new(&temp, out_w, rows)) {
      transpose(in->data + (size_t)ybox_first * in->stride, in->stride, rows,
                in->width, in_t.data, in_t.stride);
      pass_over_rows(&in_t, ksize_h, bounds_h, kk_h, &temp_t, acc);
      transpose(temp_t.data, temp_t.stride, out_w, rows, temp.data,
                temp.stride);
      src = &temp;
    }
    free(bounds_h);
    free(kk_h);
    if (src != &temp) goto done;
  }
  if (need_v) {
    pass_over_rows(src, ksize_v, bounds_v, kk_v, out, acc);
  } else {
    for (y = 0; y < out_h; y++)
      memcpy(out->data + (size_t)y * out->stride,
             src->data + (size_t)y * src->stride, out_w);
  }
  ok = 1;
done:
  free(acc);
  free(in_t.data);
  free(temp_t.data);
  free(temp.data);
  free(bounds_v);
  free(kk_v);
  return ok;
}

/* Image.resize(size, Resampling.BOX, box) as PIL/Image.py calls it: an
 * image over 100 times taller than wide that shrinks in height is resized
 * in two steps. */
static int pillow_resize(const Plane *in, int out_w, int out_h,
                         const float box[4], Plane *out) {
  if ((int64_t)in->height > (int64_t)in->width * 100 && out_h < in->height) {
    Plane step;
    float first[4] = {0, box[1], (float)in->width, box[3]};
    float second[4] = {box[0], 0, box[2], (float)out_h};
    if (!plane_new(&step, in->width, out_h)) return 0;
    int ok = resample_box(in, in->width, out_h, first, &step) &&
             resample_box(&step, out_w, out_h, second, out);
    free(step.data);
    return ok;
  }
  return resample_box(in, out_w, out_h, box, out);
}

/* The level histogram of `work` and (sum, sum of squares) of its levels and
 * of its edge-replicated 3x3 Laplacian, into sums[0..3]. */
HOT static void level_sums(const Plane *plane, uint64_t hist[256],
                           int64_t sums[4]) {
  Plane work = *plane;
  int work_w = work.width, work_h = work.height;
  int64_t s1 = 0, s2 = 0, l1 = 0, l2 = 0;
  uint32_t hists[4][256];
  memset(hists, 0, sizeof(hists));
  size_t total_pixels = (size_t)work_w * work_h, i4;
  const uint8_t *levels = work.data;  /* work.stride == work_w */
  for (i4 = 0; i4 + 4 <= total_pixels; i4 += 4) {
    hists[0][levels[i4]]++;
    hists[1][levels[i4 + 1]]++;
    hists[2][levels[i4 + 2]]++;
    hists[3][levels[i4 + 3]]++;
  }
  for (; i4 < total_pixels; i4++) hists[0][levels[i4]]++;
  for (int level = 0; level < 256; level++)
    hist[level] = (uint64_t)hists[0][level] + hists[1][level] +
                  hists[2][level] + hists[3][level];
  for (int y = 0; y < work_h; y++) {
    const uint8_t *row = work.data + (size_t)y * work.stride;
    const uint8_t *up = work.data + (size_t)(y > 0 ? y - 1 : 0) * work.stride;
    const uint8_t *down =
        work.data + (size_t)(y + 1 < work_h ? y + 1 : y) * work.stride;
    /* Per-row sums fit 32 bits (work_w <= 1024: 1024 x 1020^2 < 2^31). */
    int32_t row_s1 = 0, row_s2 = 0, row_l1 = 0, row_l2 = 0;
    for (int x = 1; x + 1 < work_w; x++) {
      int32_t c = row[x];
      int32_t lap = up[x] + down[x] + row[x - 1] + row[x + 1] - 4 * c;
      row_s1 += c;
      row_s2 += c * c;
      row_l1 += lap;
      row_l2 += lap * lap;
    }
    int edges[2] = {0, work_w - 1};
    for (int e = 0; e < (work_w > 1 ? 2 : 1); e++) {
      int x = edges[e];
      int32_t c = row[x];
      int32_t lap = up[x] + down[x] + row[x > 0 ? x - 1 : 0] +
          row[x + 1 < work_w ? x + 1 : x] - 4 * c;
      row_s1 += c;
      row_s2 += c * c;
      row_l1 += lap;
      row_l2 += lap * lap;
    }
    s1 += row_s1;
    s2 += row_s2;
    l1 += row_l1;
    l2 += row_l2;
  }
  sums[0] = s1, sums[1] = s2, sums[2] = l1, sums[3] = l2;
}

/* Image.convert('L') of packed RGB: ITU-R 601-2 in 16-bit fixed point. */
HOT static void to_luma(const uint8_t *rgb, size_t count, uint8_t *out) {
  for (size_t i = 0; i < count; i++) {
    const uint8_t *p = rgb + i * 3;
    out[i] = (uint8_t)((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >>
                       16);
  }
}

/* Reduce.c division_UINT32 (single-precision float, as Pillow computes). */
static inline uint32_t division_uint32(int divider, int result_bits) {
  uint32_t max_dividend = (1u << result_bits) * divider;
  float max_int = (1 << 30) * 4.0;
  return (uint32_t)(max_int / max_dividend);
}

/* Image.reduce(factor) of an RGB image, then the largest over channel pairs
 * of the summed absolute difference (image_quality._colour). */
HOT static int64_t colour_sum(const uint8_t *rgb, int width, int height,
                              int factor, int64_t *count) {
  int64_t sums[3] = {0, 0, 0};
  int out_w = (width + factor - 1) / factor, out_h = (height + factor - 1) / factor;
  size_t row_len = (size_t)width * 3;
  /* A block row's pixels summed down each column first (vectorized), then
   * across each block's columns: the block sums Pillow's loops add up. */
  uint32_t *columns = malloc(row_len * sizeof(uint32_t));
  if (!columns) return -1;
  for (int by = 0; by < out_h; by++) {
    int y0 = by * factor, y1 = y0 + factor < height ? y0 + factor : height;
    memset(columns, 0, row_len * sizeof(uint32_t));
    for (int y = y0; y < y1; y++) {
      const uint8_t *p = rgb + (size_t)y * row_len;
      for (size_t i = 0; i < row_len; i++) columns[i] += p[i];
    }
    for (int bx = 0; bx < out_w; bx++) {
      int x0 = bx * factor, x1 = x0 + factor < width ? x0 + factor : width;
      uint32_t n = (uint32_t)((y1 - y0) * (x1 - x0));
      int v[3];
      if (factor == 1) {
        for (int c = 0; c < 3; c++) v[c] = (int)columns[x0 * 3 + c];
      } else {
        uint32_t multiplier = division_uint32((int)n, 8), amend = n / 2;
        uint32_t s[3] = {amend, amend, amend};
        for (int x = x0; x < x1; x++)
          for (int c = 0; c < 3; c++) s[c] += columns[x * 3 + c];
        for (int c = 0; c < 3; c++) v[c] = (int)((s[c] * multiplier) >> 24);
      }
      sums[0] += abs(v[0] - v[1]);
      sums[1] += abs(v[1] - v[2]);
      sums[2] += abs(v[0] - v[2]);
    }
  }
  free(columns);
  *count = (int64_t)out_w * out_h;
  int64_t largest = sums[0];
  if (sums[1] > largest) largest = sums[1];
  if (sums[2] > largest) largest = sums[2];
  return largest;
}

/* An image's 8-bit pixels, packed (one byte a band). */
typedef struct {
  const uint8_t *data;
  Py_buffer view;
  int has_view;
} Pixels;

/* `source`: bytes-like packed pixels (Image.tobytes()). Returns 0 with
 * ValueError when it is not width x height x channels. */
static int get_pixels(PyObject *source, int width, int height, int channels,
                      Pixels *out) {
  int64_t count = (int64_t)width * height;
  out->has_view = 0;
  if (PyObject_GetBuffer(source, &out->view, PyBUF_SIMPLE) < 0) return 0;
  out->has_view = 1;
  if (out->view.len != count * channels) {
    PyBuffer_Release(&out->view);
    out->has_view = 0;
    PyErr_SetString(PyExc_ValueError, "pixels: inconsistent arguments");
    return 0;
  }
  out->data = out->view.buf;
  return 1;
}

static void release_pixels(Pixels *pixels) {
  if (pixels->has_view) PyBuffer_Release(&pixels->view);
  pixels->has_view = 0;
}

/* perceptual_hash._hash_of of 32x32 levels: the 8 x 8 lowest DCT-II
 * coefficients (rows @ pixels @ rows.T, `rows` the caller's float64 [8, 32]
 * table), rounded to 6 decimals as np.round does, each bit set when its
 * coefficient is above the median (the mean of the 32nd and 33rd smallest),
 * packed row-major, most significant first. The sums run in another order
 * than numpy's BLAS; the rounding to 6 decimals (the coefficients are
 * thousands) absorbs the ~1e-12 that makes, so both give the same bits
 * unless a coefficient lies within ~1e-10 of a rounding step and of the
 * median at once. */
static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static uint64_t dct_hash(const uint8_t *pixels, const double *rows) {
  double half[8][32], coefficients[64], sorted[64];
  for (int r = 0; r < 8; r++) {
    for (int j = 0; j < 32; j++) {
      double sum = 0.0;
      for (int i = 0; i < 32; i++) sum += rows[r * 32 + i] * pixels[i * 32 + j];
      half[r][j] = sum;
    }
  }
  for (int r = 0; r < 8; r++) {
    for (int c = 0; c < 8; c++) {
      double sum = 0.0;
      for (int j = 0; j < 32; j++) sum += half[r][j] * rows[c * 32 + j];
      coefficients[r * 8 + c] = nearbyint(sum * 1e6) / 1e6;
    }
  }
  memcpy(sorted, coefficients, sizeof(sorted));
  qsort(sorted, 64, sizeof(double), cmp_double);
  double median = (sorted[31] + sorted[32]) / 2;
  uint64_t bits = 0;
  for (int k = 0; k < 64; k++)
    bits |= (uint64_t)(coefficients[k] > median) << (63 - k);
  return bits;
}

static const char measure_doc[] =
    "measure(pixels, width, height, channels, work_width, work_height, dx, dy,"
    " colour_factor, dct_rows)\n"
    "-> ((whole hash, centre hash), sums, colour)\n\n"
    "pixels: the decoded 8-bit image, height x width x channels (1 or 3)\n"
    "bytes. work_width x work_height: the working copy's size (image_quality."
    "_shrunk's). dx, dy: the centre hash's crop (perceptual_hash.build_hashes)."
    " colour_factor: image_quality._colour's reduce factor, 0 for no colour."
    " dct_rows: perceptual_hash._LOW_ROWS as float64 bytes.\n"
    "hashes: perceptual_hash.build_hashes's two 64-bit ints.\n"
    "sums: (n, sum, sum of squares) of the working copy's levels and (sum, sum "
    "of squares) of its edge-replicated 3x3 Laplacian, then the lowest levels "
    "with at least 5% and 95% of pixels at or below them.\n"
    "colour: (largest channel-pair absolute difference sum, block count), or "
    "None.";

static PyObject *measure(PyObject *self, PyObject *args) {
  PyObject *source;
  Py_buffer rows_view;
  Pixels source_pixels;
  int width, height, channels, work_w, work_h, dx, dy, colour_factor;
  if (!PyArg_ParseTuple(args, "Oiiiiiiiiy*", &source, &width, &height,
                        &channels, &work_w, &work_h, &dx, &dy, &colour_factor,
                        &rows_view))
    return NULL;
  if (rows_view.len != 8 * 32 * (Py_ssize_t)sizeof(double)) {
    PyBuffer_Release(&rows_view);
    PyErr_SetString(PyExc_ValueError, "measure: dct_rows must be 8 x 32 float64");
    return NULL;
  }
  if ((channels != 1 && channels != 3) || width < 1 || height < 1 ||
      work_w < 1 || work_h < 1 || work_w > width || work_h > height ||
      dx < 0 || dy < 0 ||
      2 * dx >= work_w || 2 * dy >= work_h || colour_factor < 0 ||
      colour_factor > (width > height ? width : height) ||
      work_w > 1024 || work_h > 1024 ||
      (colour_factor && channels != 3)) {
    PyBuffer_Release(&rows_view);
    PyErr_SetString(PyExc_ValueError, "measure: inconsistent arguments");
    return NULL;
  }
  if (!get_pixels(source, width, height, channels, &source_pixels)) {
    PyBuffer_Release(&rows_view);
    return NULL;
  }
  const uint8_t *pixels = source_pixels.data;
  Plane luma = {NULL, width, height, width}, work = {NULL, 0, 0, 0};
  Plane whole = {NULL, 0, 0, 0}, centre = {NULL, 0, 0, 0};
  PyObject *result = NULL;
  int ok = 0;
  int64_t colour = 0, colour_count = 0;
  uint64_t hist[256];
  int64_t n = 0, s1 = 0, s2 = 0, l1 = 0, l2 = 0, sums5[4];
  int low = 0, high = 0;
  uint64_t whole_hash = 0, centre_hash = 0;

  Py_BEGIN_ALLOW_THREADS
  do {
    if (channels == 3) {
      if (!plane_new(&luma, width, height)) break;
      to_luma(pixels, (size_t)width * height, luma.data);
    } else {
      luma.data = (uint8_t *)pixels;
    }
    if (work_w == width && work_h == height) {
      work = luma;  /* _shrunk: never enlarged, the copy itself */
    } else {
      float full[4] = {0, 0, (float)width, (float)height};
      if (!plane_new(&work, work_w, work_h) ||
          !pillow_resize(&luma, work_w, work_h, full, &work))
        break;
    }
    float whole_box[4] = {0, 0, (float)work_w, (float)work_h};
    float centre_box[4] = {(float)dx, (float)dy, (float)(work_w - dx),
                           (float)(work_h - dy)};
    if (!plane_new(&whole, 32, 32) || !plane_new(&centre, 32, 32) ||
        !pillow_resize(&work, 32, 32, whole_box, &whole) ||
        !pillow_resize(&work, 32, 32, centre_box, &centre))
      break;
    level_sums(&work, hist, sums5);
    s1 = sums5[0], s2 = sums5[1], l1 = sums5[2], l2 = sums5[3];
    n = (int64_t)work_w * work_h;
    int64_t cumulative = 0;
    low = high = -1;
    for (int level = 0; level < 256; level++) {
      cumulative += (int64_t)hist[level];
      if (low < 0 && cumulative * 100 >= 5 * n) low = level;
      if (high < 0 && cumulative * 100 >= 95 * n) high = level;
    }
    whole_hash = dct_hash(whole.data, rows_view.buf);
    centre_hash = dct_hash(centre.data, rows_view.buf);
    if (colour_factor) {
      colour = colour_sum(pixels, width, height, colour_factor, &colour_count);
      if (colour < 0) break;
    }
    ok = 1;
  } while (0);
  Py_END_ALLOW_THREADS

  if (ok) {
    PyObject *colour_obj;
    if (colour_factor)
      colour_obj = Py_BuildValue("(LL)", (long long)colour,
                                 (long long)colour_count);
    else
      colour_obj = Py_NewRef(Py_None);
    if (colour_obj)
      result = Py_BuildValue(
          "((KK)(LLLLLii)N)", (unsigned long long)whole_hash,
          (unsigned long long)centre_hash, (long long)n,
          (long long)s1, (long long)s2, (long long)l1, (long long)l2, low,
          high, colour_obj);
  } else {
    PyErr_NoMemory();
  }
  if (work.data != luma.data) free(work.data);
  if (channels == 3) free(luma.data);
  free(whole.data);
  free(centre.data);
  release_pixels(&source_pixels);
  PyBuffer_Release(&rows_view);
  return result;
}

static const char channel_sums_doc[] =
    "channel_sums(pixels, width, height, channels) -> (sums, sums of squares)"
    "\n\nPer-channel exact sums of an 8-bit image (pixels as in measure).";

/* Sums of each band of packed 1- or 3-band pixels. */
HOT static void band_sums(const uint8_t *p, size_t count, int channels,
                          uint64_t sums[4],
                          uint64_t squares[4]) {
  /* Per-block 32-bit sums (a block of 2^14 pixels: 2^14 x 255^2 < 2^32),
   * one loop per layout so each vectorizes. */
  for (size_t start = 0; start < count; start += 1 << 14) {
    size_t end = start + (1 << 14) < count ? start + (1 << 14) : count;
    uint32_t s[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
    if (channels == 1) {
      for (size_t i = start; i < end; i++) {
        uint32_t v = p[i];
        s[0] += v, q[0] += v * v;
      }
    } else {
      for (size_t i = start; i < end; i++) {
        const uint8_t *px = p + i * 3;
        uint32_t r = px[0], g = px[1], b = px[2];
        s[0] += r, q[0] += r * r;
        s[1] += g, q[1] += g * g;
        s[2] += b, q[2] += b * b;
      }
    }
    for (int c = 0; c < channels; c++) sums[c] += s[c], squares[c] += q[c];
  }
}

static PyObject *channel_sums(PyObject *self, PyObject *args) {
  PyObject *source;
  Pixels pixels;
  int width, height, channels;
  if (!PyArg_ParseTuple(args, "Oiii", &source, &width, &height, &channels))
    return NULL;
  if ((channels != 1 && channels != 3) || width < 1 || height < 1) {
    PyErr_SetString(PyExc_ValueError, "channel_sums: inconsistent arguments");
    return NULL;
  }
  if (!get_pixels(source, width, height, channels, &pixels)) return NULL;
  uint64_t sums[4] = {0, 0, 0, 0}, squares[4] = {0, 0, 0, 0};
  Py_BEGIN_ALLOW_THREADS
  band_sums(pixels.data, (size_t)width * height, channels, sums, squares);
  Py_END_ALLOW_THREADS
  release_pixels(&pixels);
  PyObject *s = PyTuple_New(channels), *q = PyTuple_New(channels);
  if (!s || !q) {
    Py_XDECREF(s);
    Py_XDECREF(q);
    return NULL;
  }
  for (int c = 0; c < channels; c++) {
    PyTuple_SET_ITEM(s, c, PyLong_FromUnsignedLongLong(sums[c]));
    PyTuple_SET_ITEM(q, c, PyLong_FromUnsignedLongLong(squares[c]));
  }
  return Py_BuildValue("(NN)", s, q);
}

static PyMethodDef methods[] = {
    {"measure", measure, METH_VARARGS, measure_doc},
    {"channel_sums", channel_sums, METH_VARARGS, channel_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_measures",
    "The build's per-image measures, compiled (see _measures.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__measures(void) { return PyModule_Create(&module); }
