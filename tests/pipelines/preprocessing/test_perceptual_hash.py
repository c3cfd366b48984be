"""perceptual_hash: bit-identical to imagehash.phash, and what it tolerates.

imagehash (test-only) is the reference; the module re-implements its pHash
in numpy so the build's workers need neither scipy nor PyWavelets. The
distances below come from benchmarks/results/near_duplicates.md.
"""

import io
import itertools
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from pipelines.preprocessing import perceptual_hash
from tests import helpers

imagehash = pytest.importorskip('imagehash')

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'coins')
# The recommended --near_duplicate_distance: a copy is within it.
NEAR = 3
# Different photos: the closest two of PHOTOS are 22 bits apart.
FAR = 16


@pytest.fixture(scope='module')
def photos() -> dict[str, Image.Image]:
  """Real photos as PIL images: RGB, and 'L' for the grey ones."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return {name: Image.fromarray(getattr(data, name)()) for name in PHOTOS}


def _reference(image: Image.Image) -> str:
  return str(imagehash.phash(image))


def _crops(image: Image.Image) -> list[Image.Image]:
  """The image, odd-sized crops of it, a tiny one (upscaled) and its grey."""
  w, h = image.size
  return [image, image.crop((3, 7, w - 10, h - 1)),
          image.crop((w // 3, 0, w // 3 + 101, h)),
          image.crop((w // 2, h // 2, w // 2 + 13, h // 2 + 7)),
          image.convert('L')]


@pytest.mark.parametrize('name', PHOTOS)
def test_bit_identical_to_imagehash_on_photos(photos, name):
  for image in _crops(photos[name]):
    assert perceptual_hash.to_hex(perceptual_hash.phash(image)) == (
        _reference(image)), (name, image.size, image.mode)


def test_bit_identical_on_flat_and_symmetric_images():
  # Here most coefficients are exactly 0 in scipy's DCT; round-off of the
  # wrong sign would flip bits.
  ramp = np.arange(0, 240, 8, dtype=np.uint8)  # 30 values
  images = {
      'flat grey': Image.new('L', (40, 30), 128),
      'flat colour': Image.new('RGB', (17, 50), (10, 200, 90)),
      'black': Image.new('L', (32, 32), 0),
      'horizontal ramp': Image.fromarray(np.tile(ramp, (20, 1))),
      'vertical ramp': Image.fromarray(np.tile(ramp[:, None], (1, 45))),
      'mirror-symmetric': Image.fromarray(
          np.tile(np.concatenate([ramp, ramp[::-1]]), (33, 1))),
  }
  for name, image in images.items():
    assert perceptual_hash.to_hex(perceptual_hash.phash(image)) == (
        _reference(image)), name
  assert perceptual_hash.phash(images['flat grey']) == 1 << 63


def test_low_frequencies_are_scipys_dct(photos):
  fftpack = pytest.importorskip('scipy.fftpack')
  grey = photos['chelsea'].convert('L').resize((32, 32), Image.Resampling.LANCZOS)
  pixels = np.asarray(grey, dtype=np.float64)
  expected = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
  np.testing.assert_allclose(
      perceptual_hash.low_frequencies(photos['chelsea']), expected,
      rtol=1e-12, atol=1e-9)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return Image.open(io.BytesIO(buffer.getvalue()))


def _brightness(image: Image.Image, factor: float) -> Image.Image:
  scaled = np.asarray(image, dtype=np.float32) * factor
  return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


@pytest.mark.parametrize('name', PHOTOS)
def test_copies_are_near(photos, name):
  image = photos[name]
  w, h = image.size
  copies = {
      'resize 0.5x': image.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
      'resize 2x': image.resize((2 * w, 2 * h), Image.Resampling.BILINEAR),
      'JPEG q50': _jpeg(image, 50),
      'brightness x0.8': _brightness(image, 0.8),
      'brightness x1.2': _brightness(image, 1.2),
  }
  h0 = perceptual_hash.phash(image)
  for what, copy in copies.items():
    assert perceptual_hash.distance(h0, perceptual_hash.phash(copy)) <= NEAR, what


def test_different_photos_are_far(photos):
  hashes = {name: perceptual_hash.phash(image) for name, image in photos.items()}
  for a, b in itertools.combinations(PHOTOS, 2):
    assert perceptual_hash.distance(hashes[a], hashes[b]) >= FAR, (a, b)


def test_distance_counts_differing_bits():
  assert perceptual_hash.distance(0, 0) == 0
  assert perceptual_hash.distance(0b1011, 0b0001) == 2
  assert perceptual_hash.distance(0, (1 << 64) - 1) == 64


def test_hex_round_trip_is_imagehash_hex(photos):
  h = perceptual_hash.phash(photos['coffee'])
  text = perceptual_hash.to_hex(h)
  assert len(text) == 16
  assert perceptual_hash.from_hex(text) == h
  assert perceptual_hash.to_hex(0) == '0' * 16
  assert perceptual_hash.from_hex(text.upper()) == h
  reference = imagehash.hex_to_hash(text)
  assert reference == imagehash.phash(photos['coffee'])


@pytest.mark.parametrize('text', ['abc', '0x0123456789abcd', 'g' * 16,
                                  '0123456789abcdef0'])
def test_from_hex_refuses_other_text(text):
  with pytest.raises(ValueError, match='16 hex digits'):
    perceptual_hash.from_hex(text)


@pytest.mark.parametrize('value', [-1, 1 << 64])
def test_to_hex_refuses_out_of_range(value):
  with pytest.raises(ValueError, match='64-bit'):
    perceptual_hash.to_hex(value)


def test_imports_neither_tensorflow_nor_scipy():
  code = ('import sys; from pipelines.preprocessing import perceptual_hash; '
          "print(sorted({'tensorflow', 'scipy', 'imagehash', 'pywt'} "
          '& set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], cwd=helpers.REPO_ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == '[]', out.stdout
