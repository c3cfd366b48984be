r"""Calibration of the image-quality flags: ordinary photos vs planted defects.

  python -m benchmarks.quality_flags --out=benchmarks/results/quality_flags.md

Ordinary images (should get no flag):
  photos      the real colour photos bundled with scikit-image (astronaut,
              chelsea, coffee, rocket) and scikit-learn (china, flower), in
              an RGB dataset; camera (grey) in a 1-channel dataset
  regions     --regions views of those photos: a region 40-100% of each
              side, aspect 1:2 to 2:1, shrunk (bilinear, bicubic, Lanczos or
              box, in turn) to 64-512 px on the longer side (log-uniform, never
              enlarged), through a JPEG at quality 75-95: dataset-like images
  patches     --patches native-resolution crops, 64-512 px on the longer
              side, anywhere in the photos: often a piece of out-of-focus
              background or sky, so blurry / dark / flat by nature; shown for
              the rate a dataset of such close-ups would see
  faces 25px  scikit-image's lfw_subset faces (its first 100; the other 100
              are background patches) as they are, 25x25 grey: tiny sources,
              so `tiny` is expected there, nothing else
  faces x4    the same faces enlarged 4x (bicubic) to 100x100 and treated as
              100 px sources: an upscaled image is soft in its own pixels

Planted (each should get exactly its flag), at several strengths, made from
the photos plus --planted_regions regions of >= 128 px:
  blurry           Gaussian blur, radius r per 512 px of the longer side
  dark             pixels x k
  bright           255 - k (255 - pixels): toward white
  low_information  the photo's mean colour everywhere plus Gaussian noise
                   of sigma levels; or the photo faded to k of its contrast
  tiny             the photo shrunk to a shorter side of s px
  odd_aspect       a strip of the photo, longer side a times the shorter
  grayscale        the photo's luma in an RGB dataset (exact, or through a
                   JPEG), or the photo with only k of its saturation

Also: the sharpness of each photo decoded from a JPEG at full, 1/2, 1/4 and
1/8 DCT scale, the flags of the other images bundled with scikit-image
(not used to choose thresholds), and the time of `measure`.
"""

import collections
import datetime
import io
import os
import pathlib
import platform
import subprocess
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageFilter

from benchmarks import common
from pipelines.preprocessing import image_quality

_REGIONS = flags.DEFINE_integer('regions', 300, 'Ordinary shrunk photo regions.')
_PATCHES = flags.DEFINE_integer('patches', 200, 'Native-resolution patches.')
_PLANTED_REGIONS = flags.DEFINE_integer(
    'planted_regions', 40, 'Regions (>= 128 px) planted with each defect, '
    'besides the whole photos.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the crops and planted noise.')
_OUT = flags.DEFINE_string('out', None, 'Also write the Markdown report here.')

COLOUR_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')
GREY_PHOTOS = ('camera',)
# Other images bundled with scikit-image: scans, micrographs, textures, an
# astronomical and a medical image. Reported, not used for the defaults.
OTHER_IMAGES = ('hubble_deep_field', 'retina', 'immunohistochemistry',
                'colorwheel', 'moon', 'coins', 'page', 'text', 'horse', 'clock',
                'grass', 'gravel', 'brick', 'cell', 'microaneurysms')
# The Measures field each flag reads.
MEASURE_OF = {flag: rule[0] for flag, rule in image_quality.RULES.items()}
# Planted strengths, weakest first.
STRENGTHS = {
    'blurry': ('r=1', 'r=2', 'r=3', 'r=4'),
    'dark': ('k=0.35', 'k=0.25', 'k=0.15', 'k=0.1'),
    'bright': ('k=0.35', 'k=0.25', 'k=0.15', 'k=0.1'),
    'low_information': ('faded k=0.05', 'faded k=0.02', 'sigma=3',
                        'sigma=2', 'sigma=1', 'sigma=0'),
    'tiny': ('s=48', 's=31', 's=24', 's=8'),
    'odd_aspect': ('a=2.5', 'a=3.5', 'a=5', 'a=10'),
    'grayscale': ('k=0.1', 'k=0.05', 'k=0.02', 'JPEG q=90', 'exact'),
}
SHRINK_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                  Image.Resampling.LANCZOS, Image.Resampling.BOX)
FACES = 100  # lfw_subset: 100 faces, then 100 background patches.
# Strengths the unit test plants (tests/.../test_image_quality.py).
TESTED = {'blurry': 'r=3', 'dark': 'k=0.15', 'bright': 'k=0.15',
          'low_information': 'sigma=2', 'tiny': 's=24', 'odd_aspect': 'a=10',
          'grayscale': 'exact'}


class Sample:
  """One image as the build hands it to `measure`."""

  def __init__(self, name: str, image: Image.Image, *, original_size=None,
               channels: int = 3):
    self.name = name
    self.image = image
    self.original_size = original_size or (image.height, image.width)
    self.channels = channels
    self.measures = image_quality.measure(
        image, original_size=self.original_size, channels=channels)
    self.flags = image_quality.flags(self.measures)


def _photos() -> dict:
  """name -> uint8 [h, w, 3] colour photo or [h, w] grey photo."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = {name: getattr(data, name)() for name in COLOUR_PHOTOS + GREY_PHOTOS}
  sample = datasets.load_sample_images()
  for path, image in zip(sample.filenames, sample.images):
    photos[pathlib.Path(path).stem] = image
  return photos


def _pil(array: np.ndarray) -> Image.Image:
  return Image.fromarray(array, 'RGB' if array.ndim == 3 else 'L')


def _sample(name: str, image: Image.Image, **kwargs) -> Sample:
  """A Sample in a 1-channel dataset for 'L' images, RGB otherwise."""
  return Sample(name, image, channels=3 if image.mode == 'RGB' else 1, **kwargs)


def _through_jpeg(image: Image.Image, quality: int) -> Image.Image:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)


def _log_uniform(rng, low: float, high: float) -> float:
  return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _box(photo: np.ndarray, rng, *, height: float, width: float) -> np.ndarray:
  """A random height x width crop, shrunk to fit the photo (aspect kept)."""
  h, w = photo.shape[:2]
  scale = min(1.0, h / height, w / width)
  ch, cw = max(8, int(height * scale)), max(8, int(width * scale))
  top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  return np.ascontiguousarray(photo[top:top + ch, left:left + cw])


def _aspect_sides(longer: float, rng) -> tuple[float, float]:
  """(height, width) with that longer side, aspect 1:2 to 2:1."""
  aspect = _log_uniform(rng, 0.5, 2.0)  # height / width
  return (longer, longer / aspect) if aspect > 1 else (longer * aspect, longer)


def _patch(photo: np.ndarray, rng, *, min_longer: int) -> Image.Image:
  """A native-resolution crop, min_longer-512 px on its longer side."""
  height, width = _aspect_sides(_log_uniform(rng, min_longer, 512), rng)
  return _pil(_box(photo, rng, height=height, width=width))


def _region(photo: np.ndarray, rng, *, min_longer: int, index: int
            ) -> Image.Image:
  """A region 40-100% of each side, shrunk to min_longer-512 px."""
  h, w = photo.shape[:2]
  height, width = _aspect_sides(
      max(h, w) * rng.uniform(0.4, 1.0), rng)
  region = _pil(_box(photo, rng, height=height, width=width))
  target = min(_log_uniform(rng, min_longer, 512), max(region.size))
  scale = target / max(region.size)
  size = (max(1, round(region.width * scale)),
          max(1, round(region.height * scale)))
  return region.resize(size, SHRINK_FILTERS[index % len(SHRINK_FILTERS)])


def _crops(photos: dict, count: int, rng, *, kind: str,
           min_longer: int) -> list:
  """`count` (name, PIL image) regions or patches through a JPEG, the photos
  taken in turn."""
  names = sorted(photos)
  out = []
  for i in range(count):
    name = names[i % len(names)]
    if kind == 'region':
      crop = _region(photos[name], rng, min_longer=min_longer, index=i)
    else:
      crop = _patch(photos[name], rng, min_longer=min_longer)
    out.append((f'{name} {kind} {i} {crop.width}x{crop.height}',
                _through_jpeg(crop, int(rng.integers(75, 96)))))
  return out


def _faces() -> np.ndarray:
  """lfw_subset's faces: uint8 [100, 25, 25] grey."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return np.round(data.lfw_subset()[:FACES] * 255).astype(np.uint8)


def ordinary_groups(photos: dict, rng) -> dict:
  """Group name -> Samples that should get no flag (faces 25px: only tiny)."""
  faces = _faces()
  return {
      'photos': [_sample(n, _pil(a)) for n, a in sorted(photos.items())],
      'regions': [_sample(n, im) for n, im in _crops(
          photos, _REGIONS.value, rng, kind='region', min_longer=64)],
      'patches': [_sample(n, im) for n, im in _crops(
          photos, _PATCHES.value, rng, kind='patch', min_longer=64)],
      'faces 25px': [_sample(f'face {i}', _pil(f))
                     for i, f in enumerate(faces)],
      'faces x4': [_sample(f'face x4 {i}', _pil(f).resize(
          (100, 100), Image.Resampling.BICUBIC)) for i, f in enumerate(faces)],
  }


def _level(value: str) -> float:
  return float(value.split('=')[1])


def _blur(image, strength, rng):
  del rng
  radius = _level(strength) * max(image.size) / 512
  return image.filter(ImageFilter.GaussianBlur(radius))


def _scale(image, factor, offset):
  pixels = np.asarray(image, dtype=np.float64) * factor + offset
  return _pil(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _dark(image, strength, rng):
  del rng
  return _scale(image, _level(strength), 0.0)


def _bright(image, strength, rng):
  del rng
  k = _level(strength)
  return _scale(image, k, 255 * (1 - k))


def _low_information(image, strength, rng):
  """The photo's mean colour plus noise, or the photo faded toward it."""
  pixels = np.asarray(image, dtype=np.float64)
  mean = pixels.mean(axis=(0, 1))  # The photo's mean colour (or grey).
  if strength.startswith('faded'):
    out = mean + _level(strength) * (pixels - mean)
  else:
    out = mean + rng.normal(0, _level(strength), pixels.shape)
  return _pil(np.clip(np.round(out), 0, 255).astype(np.uint8))


def _tiny(image, strength, rng):
  del rng
  side = _level(strength)
  scale = side / min(image.size)
  size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
  return image.resize(size, Image.Resampling.LANCZOS)


def _odd_aspect(image, strength, rng):
  """A full-width strip, `a` times wider than high (from the middle)."""
  del rng
  height = max(1, round(image.width / _level(strength)))
  top = max(0, (image.height - height) // 2)
  return image.crop((0, top, image.width, top + height))


def _grayscale(image, strength, rng):
  del rng
  grey = image.convert('L').convert('RGB')
  if strength == 'exact':
    return grey
  if strength.startswith('JPEG'):
    return _through_jpeg(grey, 90)
  k = _level(strength)
  pixels = np.asarray(grey, np.float64) + k * (
      np.asarray(image, np.float64) - np.asarray(grey, np.float64))
  return _pil(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


PLANT = {'blurry': _blur, 'dark': _dark, 'bright': _bright,
         'low_information': _low_information, 'tiny': _tiny,
         'odd_aspect': _odd_aspect, 'grayscale': _grayscale}


def planted_groups(photos: dict, rng) -> dict:
  """(flag, strength) -> Samples planted with that defect."""
  bases = [(n, _pil(a)) for n, a in sorted(photos.items())]
  bases += _crops(photos, _PLANTED_REGIONS.value, rng, kind='region',
                  min_longer=128)
  groups = {}
  for flag, strengths in STRENGTHS.items():
    for strength in strengths:
      groups[flag, strength] = [
          _sample(f'{name} {flag} {strength}',
                  PLANT[flag](image, strength, rng))
          for name, image in bases
          if not (flag == 'grayscale' and image.mode != 'RGB')]
  return groups


def _value(sample: Sample, flag: str):
  return getattr(sample.measures, MEASURE_OF[flag])


def _others(samples: list, flag: str) -> str:
  """'name n, ...': how often each other flag came up."""
  counts = collections.Counter(f for s in samples for f in s.flags if f != flag)
  return ', '.join(f'{f} {n}' for f, n in sorted(counts.items())) or '-'


def _stats_row(label: str, samples: list, flag: str) -> list:
  """Distribution of flag's measure, flagged %, other flags seen."""
  values = np.array([_value(s, flag) for s in samples
                     if _value(s, flag) is not None], dtype=np.float64)
  if not values.size:
    return [label, 0] + ['-'] * 7
  pcts = np.percentile(values, [0, 5, 50, 95, 100])
  flagged = np.mean([flag in s.flags for s in samples]) * 100
  return [label, values.size] + [f'{v:.4g}' for v in pcts] + [
      f'{flagged:.1f}', _others(samples, flag)]


def flag_table(flag: str, ordinary: dict, planted: dict) -> str:
  """Markdown: the flag's measure on ordinary vs planted images."""
  threshold = getattr(image_quality.Thresholds(), flag)
  rows = [_stats_row(f'ordinary: {g}', s, flag) for g, s in ordinary.items()]
  rows += [_stats_row(f'planted {s}' + (' (tested)' if TESTED[flag] == s
                                          else ''), planted[flag, s], flag)
           for s in STRENGTHS[flag]]
  headers = ['images', 'n', 'min', '5th pct', 'median', '95th pct', 'max',
             f'flagged % ({flag})', 'other flags (count)']
  return (f'### {flag}: {MEASURE_OF[flag]}, default threshold {threshold}\n\n'
          + common.markdown_table(headers, rows))


def summary_table(ordinary: dict) -> str:
  """Markdown: per ordinary group, the % with any flag and each flag's %."""
  rows = []
  for group, samples in ordinary.items():
    counts = [np.mean([f in s.flags for s in samples]) * 100
              for f in image_quality.FLAGS]
    anything = np.mean([bool(s.flags) for s in samples]) * 100
    rows.append([group, len(samples), f'{anything:.1f}']
                + [f'{c:.1f}' for c in counts])
  return common.markdown_table(
      ['ordinary images', 'n', 'any flag %']
      + [f'{f} %' for f in image_quality.FLAGS], rows)


def flagged_list(samples: list, limit: int = 20) -> str:
  """Markdown bullets: ordinary samples that got a flag, with the measures."""
  lines = [f'- {s.name}: {", ".join(s.flags)} '
           f'({", ".join(f"{MEASURE_OF[f]}={_value(s, f)}" for f in s.flags)})'
           for s in samples if s.flags]
  more = len(lines) - limit
  return '\n'.join(lines[:limit] + ([f'- ... and {more} more'] if more > 0
                                    else [])) or '- none'


def scale_table(photos: dict) -> str:
  """Markdown: sharpness of each photo decoded at 1, 1/2, 1/4, 1/8 scale."""
  rows = []
  for name, array in sorted(photos.items()):
    image = _pil(array)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=90)
    row = [f'{name} {image.width}x{image.height}']
    for factor in (1, 2, 4, 8):
      decoded = Image.open(io.BytesIO(buffer.getvalue()))
      decoded.draft(image.mode, (image.width // factor, image.height // factor))
      sample = _sample(name, decoded.convert(image.mode),
                       original_size=(image.height, image.width))
      row.append(f'{sample.measures.sharpness:.3f} ({decoded.width}px)')
    rows.append(row)
  return common.markdown_table(
      ['photo', 'full', '1/2', '1/4', '1/8'], rows)


def others_table() -> str:
  """Markdown: measures and flags of the other scikit-image images."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  rows = []
  for name in OTHER_IMAGES:
    array = getattr(data, name)()
    if array.dtype == bool:
      array = array.astype(np.uint8) * 255
    if array.ndim == 3:
      array = np.ascontiguousarray(array[..., :3])  # No alpha.
    sample = _sample(name, _pil(array))
    m = sample.measures
    rows.append([f'{name} {array.shape[1]}x{array.shape[0]}',
                 sample.channels, m.sharpness, m.luma_p05, m.luma_p95,
                 m.luma_std, m.colour if m.colour is not None else '-',
                 ', '.join(sample.flags) or '-'])
  return common.markdown_table(
      ['image', 'channels', 'sharpness', 'luma_p05', 'luma_p95', 'luma_std',
       'colour', 'flags'], rows)


def timing() -> str:
  """Microseconds per `measure` of a 512x512 photo, RGB and L (best of 5)."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  rgb = Image.fromarray(data.astronaut())
  lines = []
  for image, channels in ((rgb, 3), (rgb.convert('L'), 1)):
    best = float('inf')
    for _ in range(5):
      start = time.perf_counter()
      for _ in range(200):
        image_quality.measure(image, original_size=(512, 512),
                              channels=channels)
      best = min(best, (time.perf_counter() - start) / 200)
    lines.append(f'- 512x512 {image.mode}: {best * 1e6:.0f} µs per image')
  return '\n'.join(lines)


def machine() -> str:
  cpu = next((line.split(':', 1)[1].strip()
              for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines()
              if line.startswith('model name')), platform.processor())
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True, check=False)
  return (f'- date: {datetime.date.today().isoformat()}; commit '
          f'{commit.stdout.strip() or "?"}\n'
          f'- machine: {os.cpu_count()} CPUs (nproc), {cpu}, load average '
          f'{os.getloadavg()[0]:.2f} at the start; Python '
          f'{platform.python_version()}, Pillow {Image.__version__}, numpy '
          f'{np.__version__}\n'
          f'- command: `python -m benchmarks.quality_flags '
          f'--regions={_REGIONS.value} --patches={_PATCHES.value} '
          f'--planted_regions={_PLANTED_REGIONS.value} --seed={_SEED.value}`')


def report() -> str:
  rng = np.random.default_rng(_SEED.value)
  photos = _photos()
  ordinary = ordinary_groups(photos, rng)
  planted = planted_groups(photos, rng)
  colour_photos = {n: a for n, a in photos.items() if a.ndim == 3}
  parts = [
      '# Image-quality flags: calibration', machine(),
      f'Thresholds (defaults): `{image_quality.Thresholds()}`',
      '## Ordinary images: flag rates', summary_table(ordinary),
      'Photos and regions that got a flag:',
      flagged_list(ordinary['photos'] + ordinary['regions']),
      '## Per flag: measure on ordinary vs planted images',
      *[flag_table(flag, ordinary, planted) for flag in STRENGTHS],
      '## Sharpness vs JPEG DCT decode scale',
      scale_table(colour_photos | {'camera': photos['camera']}),
      '## Other scikit-image images (not used for the defaults)',
      others_table(),
      '## Time of measure', timing(),
  ]
  return '\n\n'.join(parts) + '\n'


def main(argv):
  del argv
  text = report()
  print(text)
  if _OUT.value:
    pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUT.value).write_text(text, encoding='utf-8')
  return 0


if __name__ == '__main__':
  app.run(main)
