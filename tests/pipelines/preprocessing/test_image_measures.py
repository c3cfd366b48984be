"""The compiled measures (image_measures, _measures.c) equal the Pillow/numpy
reference bit for bit: hashes, every quality measure and the stored images'
channel sums, on real photos at every size class the build meets (tiny,
1-px strips, over 100:1, flat, mirror-symmetric, larger than any decode),
grey and colour; and the build uses them."""

import numpy as np
from PIL import Image
import pytest

from pipelines.preprocessing import image_measures
from pipelines.preprocessing import image_quality
from pipelines.preprocessing import perceptual_hash
from pipelines.preprocessing import source_image
from tests import helpers

compiled_only = pytest.mark.skipif(
    image_measures.compiled is None,
    reason='pipelines/preprocessing/_measures.c was not compiled at install '
    '(no C compiler?): the build runs the reference, which the other tests '
    'check')

# Sizes (width, height) that exercise each branch of Pillow's resampling and
# reduce: no shrink, crop shortcut, one axis only, partial edge blocks,
# 1-px strips, Image.resize's two-step path for images over 100:1, and the
# colour measure's reduce factors 1 to 31.
_SIZES = [(1, 1), (2, 3), (5, 1), (1, 7), (31, 32), (32, 32), (33, 31),
          (128, 111), (129, 128), (127, 300), (150, 174), (174, 151),
          (255, 256), (256, 255), (300, 2), (2, 300), (1, 400), (3, 129),
          (640, 427), (1000, 37), (1024, 768)]


@pytest.fixture(scope='module')
def photos():
  """Real photos, 'RGB'."""
  return [Image.fromarray(helpers.photo(name)).convert('RGB')
          for name in ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera')]


def _cases(photos):
  rng = np.random.default_rng(0)
  for photo in photos:
    for size in _SIZES:
      yield photo.resize(size, Image.Resampling.BILINEAR)
    for _ in range(12):  # random sizes and crops
      w, h = photo.size
      left, top = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
      crop = photo.crop((left, top, w - int(rng.integers(0, w // 3)),
                         h - int(rng.integers(0, h // 3))))
      yield crop.resize((int(rng.integers(1, 500)), int(rng.integers(1, 500))))
  for level in (0, 128, 255):  # flat: all-equal levels and DCT coefficients
    yield Image.new('RGB', (200, 150), (level, level, level))
  mirror = np.asarray(photos[0].resize((160, 120)))
  yield Image.fromarray(np.concatenate([mirror, mirror[:, ::-1]], axis=1))
  # Larger than Pillow's 16 MB block: not exported through Arrow, read as
  # bytes.
  yield photos[2].resize((4000, 2100))


def _views(image):
  """(channels, image) as the build meets them: colour, grey, an RGB image
  in a grey dataset, and a grey image sharing a numpy array's memory
  (Image.fromarray of a 2-D array: Pillow crashes exporting such an image
  through Arrow, so the bytes are read)."""
  grey = image.convert('L')
  shared = Image.fromarray(np.asarray(grey))
  assert shared.readonly
  return ((3, image), (1, grey), (1, image), (1, shared))


@compiled_only
def test_compiled_measures_equal_the_reference(photos):
  count = 0
  for image in _cases(photos):
    size = (image.height, image.width)
    for channels, view in _views(image):
      compiled = image_measures.measure(view, original_size=size,
                                        channels=channels)
      reference = image_measures.measure(view, original_size=size,
                                         channels=channels,
                                         use_compiled=False)
      assert compiled == reference, (image.size, view.mode, channels)
      count += 1
  assert count > 400


def test_reference_is_the_hash_and_measures_the_build_always_stored(photos):
  # The reference is build_hashes(working_copy) and image_quality.measure,
  # which the calibration tables and every stored dataset were made with.
  image = photos[1].resize((300, 200))
  luma = image_quality.working_copy(image)
  assert image_measures.measure(
      image, original_size=(200, 300), channels=3, use_compiled=False) == (
          perceptual_hash.build_hashes(luma),
          image_quality.measure(image, original_size=(200, 300), channels=3))


@compiled_only
def test_compiled_channel_sums_equal_the_histogram(photos):
  levels = np.arange(256, dtype=np.float64)
  for image in (photos[0].resize((150, 150)), photos[2].convert('L'),
                Image.new('RGB', (1, 1), (255, 0, 7)),
                Image.fromarray(np.asarray(photos[1].convert('L'))),
                photos[2].resize((4000, 2100))):
    total, squares, count = image_measures.channel_sums(image)
    hists = np.asarray(image.histogram(), np.float64).reshape(-1, 256)
    np.testing.assert_array_equal(total, hists @ levels)
    np.testing.assert_array_equal(squares, hists @ np.square(levels))
    assert count == image.width * image.height
    assert total.dtype == np.float64 and total.shape == (len(image.getbands()),)


@compiled_only
def test_compiled_measure_refuses_inconsistent_arguments():
  rows = perceptual_hash.dct_rows()
  with pytest.raises(ValueError, match='inconsistent'):  # buffer too short
    image_measures.compiled.measure(b'\0' * 10, 4, 4, 3, 4, 4, 0, 0, 0, rows)
  with pytest.raises(ValueError, match='inconsistent'):  # copy larger
    image_measures.compiled.measure(b'\0' * 48, 4, 4, 3, 5, 4, 0, 0, 0, rows)
  with pytest.raises(ValueError, match='dct_rows'):
    image_measures.compiled.measure(b'\0' * 48, 4, 4, 3, 4, 4, 0, 0, 0, b'')


def test_the_build_stores_the_same_measures_either_way(photos, monkeypatch):
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  photos[3].resize((420, 333)).save(buffer, format='JPEG', quality=90)
  options = source_image.ImageOptions(height=150, width=150, measure=True)
  first = source_image.process(buffer.getvalue(), extension='.jpg',
                               options=options)
  monkeypatch.setattr(image_measures, 'compiled', None)
  second = source_image.process(buffer.getvalue(), extension='.jpg',
                                options=options)
  assert (first.phashes, first.quality, first.encoded) == (
      second.phashes, second.quality, second.encoded)
  np.testing.assert_array_equal(first.pixel_sum, second.pixel_sum)
  np.testing.assert_array_equal(first.pixel_sumsq, second.pixel_sumsq)


@compiled_only
def test_padded_pillow_rows_give_the_same_measures():
  # PILLOW_ALIGNMENT pads Pillow's rows: the compiled path must read the
  # pixels, not Pillow's raw memory (its Arrow export gave the block's
  # start, not the first row: every value wrong, silently).
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = (
      'import numpy as np\n'
      'from PIL import Image\n'
      'from pipelines.preprocessing import image_measures as m\n'
      'rng = np.random.default_rng(0)\n'
      'for size in ((1, 1), (7, 5), (131, 97), (300, 200)):\n'
      '  image = Image.fromarray(rng.integers(0, 256, size[::-1] + (3,),\n'
      '                                       dtype=np.uint8))\n'
      '  for ch, view in ((3, image), (1, image.convert("L"))):\n'
      '    kw = dict(original_size=size[::-1], channels=ch)\n'
      '    assert m.measure(view, **kw) == m.measure(view, use_compiled=False,\n'
      '                                              **kw), size\n'
      '  hist = np.asarray(image.histogram(), float).reshape(3, 256)\n'
      '  assert (m.channel_sums(image)[0] == hist @ np.arange(256.)).all()\n'
      'print("ok")\n')
  result = subprocess.run(
      [sys.executable, '-c', script], capture_output=True, text=True,
      timeout=120, env={**__import__('os').environ, 'PILLOW_ALIGNMENT': '64'})
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr
