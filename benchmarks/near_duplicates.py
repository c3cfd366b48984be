r"""Near-duplicate calibration of the perceptual hash on real photos.

  python -m benchmarks.near_duplicates --output=benchmarks/results/near_duplicates.md

Which Hamming distance between two `perceptual_hash.phash` values should
call two images near-duplicates? This builds a labelled set from the real
photos bundled with scikit-image and scikit-learn and prints a markdown
report (and writes it to --output):

  originals  every real photograph bundled (SKIMAGE_PHOTOS, the stereo pair
             motorcycle_left/right, sklearn's china and flower), the 100 LFW
             faces of skimage.data.lfw_subset() (25x25 grey: the same kind of
             scene 100 times), and from every photo of at least
             REGION_MIN_SIDE px its 4 quadrants and its centre at 50% size:
             different parts of one photo, each a separate original
             (quadrants do not overlap; the centre overlaps each by a quarter)
  positives  (original, transform(original)) for each of TRANSFORMS: resized,
             JPEG re-encoded, decoded at 1/2 JPEG DCT scale (as the build
             decodes large JPEGs), cropped, brightened, two combinations
  negatives  every pair of different originals: other photos, other parts of
             the same photo, the two views of the stereo pair, all face
             pairs. And, a stricter check with 36x more pairs: every
             transformed copy of one original against every other original.

For each hash in --hashes and each distance d in 0..--max_distance: precision
and recall of "distance <= d", recall per transform, the closest negatives by
name, and the recommended distance: the largest d without a false pair in
either negative set (recall only grows with d). Then the cost of each hash.

Hashes (--hashes); distances of hashes of more than 64 bits are divided by
bits / 64, so every table reads on the 64-bit scale:
  phash            perceptual_hash.phash: 64 bits
  phash256         the same pHash with hash_size=16 (64x64 grey, 16x16 DCT
                   block: 256 bits)
  phash_centre     phash of the central 80% x 80% only
  phash_and_dhash  phash and imagehash's dHash (9x8 grey, is each pixel
                   brighter than its right neighbour: 64 bits); a pair must
                   be close in both (distance = the larger)
  phash_or_centre  phash of the image and of its centre without CENTRE_CROP
                   of each side (2 x 64 bits); a pair is close when the
                   images are, or one image is close to the other's centre
                   (distance = the smallest of full-full, full-centre,
                   centre-full): a crop of a few % meets the other's centre
                   at almost the same scale
"""

import dataclasses
import datetime
import io
import itertools
import os
import platform
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from pipelines.folder_to_records import near_duplicates as build_search
from pipelines.preprocessing import image_quality
from pipelines.preprocessing import perceptual_hash

_HASHES = flags.DEFINE_list(
    'hashes', ['phash', 'phash256', 'phash_centre', 'phash_and_dhash',
               'phash_or_centre', 'build'],
    'Hashes to evaluate (phash is the module\'s; see the docstring).')
_MAX_DISTANCE = flags.DEFINE_integer(
    'max_distance', 16, 'Largest distance in the tables (64-bit scale).')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the report here.')
_STEREO_IS_COPY = flags.DEFINE_boolean(
    'stereo_is_copy', True,
    'Count the two views of skimage\'s stereo_motorcycle (one scene, one '
    'instant, a few pixels of parallax apart) as a near-duplicate pair, '
    'not as two different photos: for evaluation one view is a copy of the '
    'other, like a crop shifted sideways.')

# Real photographs among skimage.data's images that load without a download
# (the others need pooch). Left out: cat (the same file as chelsea), drawn or
# synthetic images (astronaut is a photo; colorwheel, logo, horse,
# checkerboard, binary_blobs, shepp_logan_phantom are not), 3-D stacks
# (cells3d, brain, kidney).
SKIMAGE_PHOTOS = (
    'astronaut', 'brick', 'camera', 'cell', 'chelsea', 'clock', 'coffee',
    'coins', 'grass', 'gravel', 'hubble_deep_field', 'immunohistochemistry',
    'microaneurysms', 'moon', 'page', 'retina', 'rocket', 'text')
# Photos with both sides at least this big also give 5 regions as originals.
REGION_MIN_SIDE = 128
LFW_FACES = 100  # lfw_subset(): 100 faces, then 100 non-faces
# The 1/2-scale JPEG decode keeps both sides at least this big (the build
# keeps them at least the stored size).
DRAFT_MIN_SIDE = 32
# Distances always shown in the per-transform table.
KEY_DISTANCES = (4, 6, 8, 10, 12)
# Photo sizes the cost is measured at (astronaut resized; the build hashes
# the decoded image, 28 px up to the source size).
TIMING_SIDES = (256, 384, 512)
# A transform whose recall is below this at the chosen d counts as missed.
GOOD_RECALL = 0.9


def _photos() -> list[tuple[str, np.ndarray]]:
  """(name, uint8 [h, w] or [h, w, 3]) real photos, in a fixed order."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = [(name, getattr(data, name)()) for name in SKIMAGE_PHOTOS]
  left, right, _ = data.stereo_motorcycle()
  photos += [('motorcycle_left', left), ('motorcycle_right', right)]
  sample = load_sample_images()
  photos += [(os.path.splitext(os.path.basename(path))[0], image)
             for path, image in zip(sample.filenames, sample.images)]
  faces = data.lfw_subset()[:LFW_FACES]  # float [100, 25, 25] in 0..1
  photos += [(f'lfw_{i:02d}', np.round(face * 255).astype(np.uint8))
             for i, face in enumerate(faces)]
  return photos


def _regions(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """The 4 quadrants and the centre at 50% size of a photo."""
  h, w = array.shape[:2]
  hh, hw = h // 2, w // 2
  corners = {'top-left': (0, 0), 'top-right': (0, w - hw),
             'bottom-left': (h - hh, 0), 'bottom-right': (h - hh, w - hw),
             'centre': ((h - hh) // 2, (w - hw) // 2)}
  return [(f'{name}[{where}]', array[top:top + hh, left:left + hw])
          for where, (top, left) in corners.items()]


def originals() -> list[tuple[str, Image.Image]]:
  """(name, PIL image) of every original: photos, faces, photo regions."""
  out = []
  for name, array in _photos():
    out.append((name, Image.fromarray(array)))
    if min(array.shape[:2]) >= REGION_MIN_SIDE:
      out += [(n, Image.fromarray(np.ascontiguousarray(a)))
              for n, a in _regions(name, array)]
  return out


def _resize(factor: float) -> Callable[[Image.Image], Image.Image]:
  def op(image):
    size = (max(1, round(image.width * factor)),
            max(1, round(image.height * factor)))
    # BILINEAR: the build's resize (pipelines/preprocessing/resize_modes.py).
    return image.resize(size, Image.Resampling.BILINEAR)
  return op


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
  def op(image):
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)
  return op


def _jpeg_half_scale(image: Image.Image) -> Image.Image:
  """JPEG q90 decoded at 1/2 DCT scale, as the build's `draft` decode does.

  Like the build, never below DRAFT_MIN_SIDE: smaller images (the faces)
  are decoded at full scale.
  """
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=90)
  decoded = Image.open(io.BytesIO(buffer.getvalue()))
  decoded.draft(image.mode, (max(DRAFT_MIN_SIDE, image.width // 2),
                             max(DRAFT_MIN_SIDE, image.height // 2)))
  return decoded.convert(image.mode)


def _crop(fraction: float, *, sides: str = 'ltrb'
          ) -> Callable[[Image.Image], Image.Image]:
  """Cuts `fraction` of the width (height) off each of `sides` (at least 1 px)."""
  def op(image):
    dx = max(1, round(image.width * fraction))
    dy = max(1, round(image.height * fraction))
    box = (dx if 'l' in sides else 0, dy if 't' in sides else 0,
           image.width - (dx if 'r' in sides else 0),
           image.height - (dy if 'b' in sides else 0))
    return image.crop(box)
  return op


def _brightness(factor: float) -> Callable[[Image.Image], Image.Image]:
  def op(image):
    scaled = np.asarray(image, dtype=np.float32) * factor
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
  return op


def _then(*ops):
  def op(image):
    for o in ops:
      image = o(image)
    return image
  return op


# What a near-duplicate detector should catch: name -> PIL -> PIL.
TRANSFORMS = {
    'resize 0.5x': _resize(0.5),
    'resize 0.75x': _resize(0.75),
    'resize 2x': _resize(2.0),
    'JPEG q50': _jpeg(50),
    'JPEG q70': _jpeg(70),
    'JPEG q95': _jpeg(95),
    'JPEG q90, 1/2 DCT scale': _jpeg_half_scale,
    'crop 2% each side': _crop(0.02),
    'crop 5% each side': _crop(0.05),
    'crop 5% left side': _crop(0.05, sides='l'),
    'brightness x0.8': _brightness(0.8),
    'brightness x1.2': _brightness(1.2),
    'resize 0.75x + JPEG q60': _then(_resize(0.75), _jpeg(60)),
    'crop 3% + brightness x1.1': _then(_crop(0.03), _brightness(1.1)),
}


# phash_or_centre: the share of each side its second hash cuts off; between
# the 2% and 5% crops a duplicate detector should catch (2.5% catches fewer
# 5% crops, 5% itself would only show that a crop meets its own twin).
# The phash_or_centre candidate as first measured (from the full image, not
# the working copy); the build's own crop is perceptual_hash.CENTRE_CROP.
CENTRE_CROP = 0.035


def _dct_matrix(n: int) -> np.ndarray:
  """Unnormalized DCT-II matrix, float64 [n, n] (scipy.fftpack.dct rows)."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT64 = _dct_matrix(64)[:16]  # [16, 64]


def _bits_to_int(bits: np.ndarray) -> int:
  """Bool array -> int, row-major, first bit most significant."""
  return int(''.join('1' if b else '0' for b in bits.ravel()), 2)


def _phash256(image: Image.Image) -> int:
  """imagehash.phash(image, hash_size=16): 256 bits."""
  grey = image.convert('L').resize((64, 64), Image.Resampling.LANCZOS)
  low = _DCT64 @ np.asarray(grey, dtype=np.float64) @ _DCT64.T  # [16, 16]
  return _bits_to_int(low > np.median(low))


def _dhash(image: Image.Image) -> int:
  """imagehash.dhash(image): 64 bits."""
  grey = np.asarray(image.convert('L').resize((9, 8), Image.Resampling.LANCZOS))
  return _bits_to_int(grey[:, 1:] > grey[:, :-1])


def _centre(image: Image.Image, fraction: float) -> Image.Image:
  """The image without `fraction` of its width (height) on each side."""
  w, h = image.size
  dx, dy = round(w * fraction), round(h * fraction)
  return image.crop((dx, dy, w - dx, h - dy))


@dataclasses.dataclass(frozen=True)
class Hash:
  """A hash under test.

  parts: image -> int functions; an image's hash is the tuple of them.
  distance: (tuple, tuple) -> distance, on the 64-bit scale.
  """
  parts: tuple[Callable[[Image.Image], int], ...]
  distance: Callable[[tuple[int, ...], tuple[int, ...]], float]

  def __call__(self, image: Image.Image) -> tuple[int, ...]:
    return tuple(part(image) for part in self.parts)


_d = perceptual_hash.distance
HASHES = {
    'phash': Hash((perceptual_hash.phash,), lambda a, b: _d(a[0], b[0])),
    'phash256': Hash((_phash256,), lambda a, b: _d(a[0], b[0]) / 4),
    'phash_centre': Hash(
        (lambda image: perceptual_hash.phash(_centre(image, 0.1)),),
        lambda a, b: _d(a[0], b[0])),
    'phash_and_dhash': Hash((perceptual_hash.phash, _dhash),
                        lambda a, b: max(_d(a[0], b[0]), _d(a[1], b[1]))),
    'phash_or_centre': Hash(
        (perceptual_hash.phash,
         lambda image: perceptual_hash.phash(_centre(image, CENTRE_CROP))),
        lambda a, b: min(_d(a[0], b[0]), _d(a[0], b[1]), _d(a[1], b[0]))),
    # What the build stores and searches: whole and centre hashes of the
    # 128-px working copy (perceptual_hash.build_hashes), compared with
    # near_duplicates.near_distance.
    'build': Hash(
        (lambda image: _build_hashes(image)[0],
         lambda image: _build_hashes(image)[1]),
        build_search.near_distance),
}


def _build_hashes(image: Image.Image) -> tuple[int, int]:
  rgb = image.convert('RGB') if image.mode not in ('RGB', 'L') else image
  return perceptual_hash.build_hashes(image_quality.working_copy(rgb))


def evaluate(hash_fn: Hash, images: list[tuple[str, Image.Image]]) -> dict:
  """Distances of every positive and negative pair under one hash.

  Returns a dict of float arrays: positive [n, t] (original vs its
  transform), negative [n * (n - 1) / 2] (original i vs original j, i < j,
  indices in pairs), cross [n, t, n] (transform of original a vs original b;
  inf where a == b), for n originals and t TRANSFORMS.
  """
  originals = [hash_fn(image) for _, image in images]
  copies = [[hash_fn(op(image)) for op in TRANSFORMS.values()]
            for _, image in images]
  n, t = len(images), len(TRANSFORMS)
  i, j = np.triu_indices(n, k=1)
  cross = np.full((n, t, n), np.inf)
  for a, b in itertools.permutations(range(n), 2):
    cross[a, :, b] = [hash_fn.distance(c, originals[b]) for c in copies[a]]
  return {
      'positive': np.array([[hash_fn.distance(originals[a], c) for c in row]
                            for a, row in enumerate(copies)]),
      'negative': np.array([hash_fn.distance(originals[a], originals[b])
                            for a, b in zip(i, j)]),
      'pairs': (i, j),
      'cross': cross,
  }


def _count_stereo_as_copy(result: dict, images) -> None:
  """Takes pairs of the two stereo views, and of the same region of both,
  out of the negatives (see --stereo_is_copy)."""
  scene = lambda name: name.replace('_left', '_').replace('_right', '_')
  names = [n for n, _ in images]
  views = [k for k, n in enumerate(names) if n.startswith('motorcycle_')]
  i, j = result['pairs']
  stereo = np.array([a in views and b in views and
                     scene(names[a]) == scene(names[b]) for a, b in zip(i, j)],
                    dtype=bool)
  result['negative'] = np.where(stereo, np.inf, result['negative'])
  for a in views:
    for b in views:
      if a != b and scene(names[a]) == scene(names[b]):
        result['cross'][a, :, b] = np.inf


def recommended(result: dict, max_distance: int) -> int:
  """Largest d <= max_distance with no negative pair within it (-1: none)."""
  closest = min(result['negative'].min(), result['cross'].min())
  return min(max_distance, int(np.ceil(closest)) - 1)


def _group(name: str) -> str:
  return 'face' if name.startswith('lfw_') else 'region' if '[' in name else 'photo'


def report_hash(name: str, result: dict, images, max_distance: int) -> list[str]:
  """Markdown lines for one hash."""
  positive, negative, cross = (result['positive'], result['negative'],
                               result['cross'])
  i, j = result['pairs']
  names = [n for n, _ in images]
  best = recommended(result, max_distance)
  lines = [f'### {name}', '',
           f'{positive.size} positive pairs ({positive.shape[0]} originals x '
           f'{positive.shape[1]} transforms); {negative.size} negative pairs of '
           f'originals; {np.isfinite(cross).sum()} of a transformed copy and '
           'another original. Precision counts the pairs of originals.', '',
           '| d | true pairs | false pairs | false pairs (copy vs other) | '
           'precision | recall |', '|---:|---:|---:|---:|---:|---:|']
  for d in range(max_distance + 1):
    tp, fp = int((positive <= d).sum()), int((negative <= d).sum())
    precision = tp / (tp + fp) if tp + fp else float('nan')
    lines.append(f'| {d} | {tp} | {fp} | {int((cross <= d).sum())} | '
                 f'{_format(precision)} | {_format(tp / positive.size)} |')
  shown = sorted((set(KEY_DISTANCES) | {best}) - {-1})
  lines += ['', 'Recall per transform:', '',
            '| transform | ' + ' | '.join(f'd<={d}' for d in shown)
            + ' | median d | max d |', '|---|' + '---:|' * (len(shown) + 2)]
  for t, transform in enumerate(TRANSFORMS):
    column = positive[:, t]
    lines.append(f'| {transform} | '
                 + ' | '.join(_format((column <= d).mean()) for d in shown)
                 + f' | {np.median(column):g} | {column.max():g} |')
  groups = np.array([_group(n) for n in names])
  lines += ['', f'Recall per transform at d<={best}, by kind of original:', '',
            '| transform | photos | regions | faces (25x25) |',
            '|---|---:|---:|---:|']
  for t, transform in enumerate(TRANSFORMS):
    lines.append(f'| {transform} | ' + ' | '.join(
        _format((positive[groups == g, t] <= best).mean())
        for g in ('photo', 'region', 'face')) + ' |')
  lines += ['', 'Closest negative pairs of originals:', '']
  lines += [f'- {negative[k]:g}: {names[i[k]]} vs {names[j[k]]}'
            for k in np.argsort(negative, kind='stable')[:6]]
  lines += ['', 'Closest transformed copy vs another original:', '']
  for k in np.argsort(cross, axis=None, kind='stable')[:4]:
    a, t, b = np.unravel_index(k, cross.shape)
    lines.append(f'- {cross[a, t, b]:g}: {list(TRANSFORMS)[t]} of {names[a]} '
                 f'vs {names[b]}')
  stereo = (names.index('motorcycle_left'), names.index('motorcycle_right'))
  base = np.array([n.split('[')[0] for n in names])
  same_photo = base[i] == base[j]
  faces = (groups[i] == 'face') & (groups[j] == 'face')
  lines += ['',
            '- stereo pair motorcycle_left vs motorcycle_right: '
            f'{negative[(i == min(stereo)) & (j == max(stereo))][0]:g}',
            f'- closest parts of one photo: {negative[same_photo].min():g} '
            f'(median {np.median(negative[same_photo]):g})',
            f'- closest faces: {negative[faces].min():g} '
            f'(median {np.median(negative[faces]):g})',
            f'- largest d without a false pair: {best}, recall '
            f'{_format((positive <= best).mean())}',
            f'- missed at d<={best} (recall below {GOOD_RECALL}): ' + (', '.join(
                f'{t} ({_format((positive[:, k] <= best).mean())})'
                for k, t in enumerate(TRANSFORMS)
                if (positive[:, k] <= best).mean() < GOOD_RECALL) or 'none'),
            '']
  return lines


def _format(value: float) -> str:
  return f'{value:.3f}' if value == value else '-'


def microseconds_per_image(hash_fn: Hash, mode: str = 'RGB', *,
                           repeats: int = 100) -> list[float]:
  """Median µs of one hash of astronaut resized to each of TIMING_SIDES."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  photo = Image.fromarray(data.astronaut()).convert(mode)
  out = []
  for side in TIMING_SIDES:
    image = photo.resize((side, side), Image.Resampling.BILINEAR)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      hash_fn(image)
      times.append(time.perf_counter() - start)
    out.append(float(np.median(times)) * 1e6)
  return out


def _machine() -> str:
  model = platform.processor() or '?'
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f
                   if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{os.cpu_count()} CPUs (nproc {_nproc()}), {model}'


def _nproc() -> str:
  try:
    return subprocess.run(['nproc'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return '?'


def main(argv):
  del argv
  unknown = sorted(set(_HASHES.value) - set(HASHES))
  if unknown:
    raise app.UsageError(f'--hashes: unknown {unknown}; choose from '
                         f'{sorted(HASHES)}')
  images = originals()
  photos = [n for n, _ in images if _group(n) == 'photo']
  header = [
      '# Near-duplicate calibration of perceptual_hash.phash', '',
      f'- date: {datetime.date.today().isoformat()}',
      f'- machine: {_machine()}',
      '- command: `python -m benchmarks.near_duplicates '
      + ' '.join(sys.argv[1:]) + '`',
      f'- originals: {len(images)}: {len(photos)} photos '
      f'({", ".join(photos)}), {LFW_FACES} LFW faces (lfw_NN, 25x25 grey), '
      f'and the 5 regions of each photo of at least {REGION_MIN_SIDE} px '
      '(name[top-left] ... name[centre])',
      '- pHash sets exactly 32 of its 64 bits (those above the median), so '
      'two pHashes differ in an even number of bits: d <= 2k+1 is d <= 2k',
      '- distances of hashes of more than 64 bits are divided by bits / 64: '
      'every table reads on the 64-bit scale', '']
  print('\n'.join(header), flush=True)
  big = np.array([_group(n) != 'face' for n, _ in images])
  body, summary = [], [
      '| hash | largest d, no false pair | recall there | recall, photos '
      '+ regions | crop 2% | crop 5% | crop 5% one side | closest negative '
      '| µs at ' + ' / '.join(f'{s}' for s in TIMING_SIDES) + ' px |',
      '|---|' + '---:|' * 8]
  for name in _HASHES.value:
    start = time.perf_counter()
    result = evaluate(HASHES[name], images)
    if _STEREO_IS_COPY.value:
      _count_stereo_as_copy(result, images)
    lines = report_hash(name, result, images, _MAX_DISTANCE.value)
    lines += [f'({time.perf_counter() - start:.0f} s to hash and compare)', '']
    print('\n'.join(lines), flush=True)
    body += lines
    best = recommended(result, _MAX_DISTANCE.value)
    caught = result['positive'] <= best
    crops = [_format(caught[big, list(TRANSFORMS).index(t)].mean())
             for t in ('crop 2% each side', 'crop 5% each side',
                       'crop 5% left side')]
    cost = microseconds_per_image(HASHES[name])
    summary.append(
        f'| {name} | {best} | {_format(caught.mean())} | '
        f'{_format(caught[big].mean())} | ' + ' | '.join(crops)
        + f' | {min(result["negative"].min(), result["cross"].min()):g} | '
        + ' / '.join(f'{c:.0f}' for c in cost) + ' |')
  grey = microseconds_per_image(HASHES['phash'], 'L')
  summary += ['', 'phash of a grey (L) image: '
              + ' / '.join(f'{c:.0f}' for c in grey) + ' µs at '
              + ' / '.join(f'{s}' for s in TIMING_SIDES) + ' px (median of 100 '
              'calls, astronaut resized; RGB in the table).',
              'Crop columns: photos and regions only. On a 25x25 face every '
              'crop of 2-5% is 1 px a side, the very crop of the second hash '
              'of phash_or_centre.', '']
  summary = ['## Summary (recall at the largest d without a false pair)', '',
             *summary]
  print('\n'.join(summary))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      f.write('\n'.join(header + summary + ['## Per hash', ''] + body) + '\n')


if __name__ == '__main__':
  app.run(main)
