"""Every registered resize mode: its Pillow and TensorFlow halves agree.

The build (Pillow) and the serving export (TensorFlow) resize through the
same registry entry; this runs both halves of each entry on real photos of
awkward shapes, in process, without a model.
"""

import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.preprocessing import resize_modes
from pipelines.preprocessing import source_image
from tests import helpers

# The pixel tolerance of the serving-vs-predict checks
# (tests/pipelines/preprocessing/test_export_hostile.py: mean absolute difference on 0..255).
PIXEL_MEAN = 1.5
# And no pixel further off than resampling round-off: a geometry slip (a box
# or a border one pixel off) moves edges by far more.
ROUND_OFF = 2


def _sources():
  """(name, uint8 [h, w, 3]) real photos: landscape, portrait, odd sizes,
  1 pixel wide and 1 pixel high."""
  chelsea, coffee, rocket = (helpers.photo(n)
                             for n in ('chelsea', 'coffee', 'rocket'))
  return [
      ('chelsea', chelsea),                              # 300x451 landscape
      ('coffee portrait', coffee[:, 101:288]),           # 400x187
      ('rocket odd', rocket[3:404, 7:318]),              # 401x311
      ('rocket column', rocket[:, 200:201]),             # 1 pixel wide
      ('coffee row', coffee[150:151]),                   # 1 pixel high
      ('chelsea small', chelsea[100:113, 200:207]),      # 13x7: upscaled
  ]


_TARGETS = ((32, 32), (24, 40), (45, 17))
_CASES = [(name, array, target) for name, array in _sources()
          for target in _TARGETS]


@pytest.fixture(scope='module')
def served_halves():
  """mode -> its TensorFlow half traced as serving traces it (unknown
  input shape), one function per output size."""
  functions = {}

  def get(mode, height, width):
    key = (mode, height, width)
    if key not in functions:
      functions[key] = tf.function(
          lambda image: resize_modes.get(mode).tensorflow(
              image, height=height, width=width),
          input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    return functions[key]

  return get


@pytest.mark.parametrize('mode', resize_modes.names())
def test_pillow_and_tensorflow_halves_agree_on_real_photos(mode,
                                                           served_halves):
  for name, array, (height, width) in _CASES:
    pillow = np.asarray(resize_modes.get(mode).pillow(
        Image.fromarray(array), height=height, width=width))
    served = served_halves(mode, height, width)(tf.constant(array)).numpy()
    assert served.dtype == np.uint8, (name, height, width)
    assert served.shape == pillow.shape == (height, width, 3), (
        name, height, width, served.shape, pillow.shape)
    difference = np.abs(served.astype(np.float64) - pillow)
    assert difference.mean() <= PIXEL_MEAN, (name, height, width,
                                             difference.mean())
    assert difference.max() <= ROUND_OFF, (name, height, width,
                                           difference.max())


@pytest.mark.parametrize('mode', resize_modes.names())
def test_eager_tensorflow_half_matches_the_traced_one(mode, served_halves):
  _, array, (height, width) = _CASES[len(_TARGETS) + 1]
  eager = resize_modes.get(mode).tensorflow(tf.constant(array), height=height,
                                            width=width)
  traced = served_halves(mode, height, width)(tf.constant(array))
  np.testing.assert_array_equal(eager.numpy(), traced.numpy())


def test_the_build_offers_the_registered_modes():
  assert source_image.RESIZE_MODES == resize_modes.names()
  assert source_image.RESIZE_MODES[0] == 'stretch'  # The default.
  with pytest.raises(ValueError, match=r"resize mode 'nope' is not one of "
                     r"\('stretch', 'crop', 'pad'"):
    source_image.resize(Image.new('RGB', (4, 3)), height=2, width=2,
                        mode='nope')


def test_a_mode_needs_both_halves():
  pillow = resize_modes.get('stretch').pillow
  with pytest.raises(TypeError, match='tensorflow'):
    resize_modes.ResizeMode('half', pillow=pillow)  # pylint: disable=missing-kwoa
  with pytest.raises(TypeError, match="its tensorflow half is None"):
    resize_modes.ResizeMode('half', pillow=pillow, tensorflow=None)
  with pytest.raises(TypeError, match="its pillow half is None"):
    resize_modes.ResizeMode('half', pillow=None,
                            tensorflow=resize_modes.get('stretch').tensorflow)


def test_the_build_side_imports_no_tensorflow():
  """Beam workers import source_image (and so the registry) without TF."""
  out = subprocess.run(
      [sys.executable, '-c', 'import sys; '
       'import pipelines.preprocessing.source_image; '
       'print("tensorflow" in sys.modules)'],
      capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == 'False'
