"""Pillow ops of the build on real bytes: modes, orientation, resize, rejects."""

import io

import numpy as np
from PIL import Image
import pytest

from pipelines.preprocessing import source_image
from tests import helpers


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _process(data: bytes, ext: str = '.png', **options) -> np.ndarray:
  opts = dict(height=8, width=8, image_format='png')
  opts.update(options)
  out = source_image.process(data, extension=ext,
                          options=source_image.ImageOptions(**opts))
  return np.asarray(Image.open(io.BytesIO(out.encoded)))


def test_sixteen_bit_grey_is_scaled_not_clipped():
  values = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
  data = _bytes(Image.fromarray(values), 'PNG')
  out = _process(data, channels=1)
  assert out.shape == (8, 8)
  np.testing.assert_array_equal(out, 128)


def test_sixteen_bit_full_range_maps_to_full_range():
  ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
  out = _process(_bytes(Image.fromarray(ramp), 'PNG'), channels=3)
  assert out[0, 0].tolist() == [0, 0, 0]
  assert out[-1, -1].tolist() == [255, 255, 255]


def test_rgba_alpha_is_composited_on_white():
  rgba = np.zeros((8, 8, 4), dtype=np.uint8)
  rgba[..., 0] = 255        # red...
  rgba[:4, :, 3] = 255      # ...opaque in the top half, transparent below
  out = _process(_bytes(Image.fromarray(rgba, 'RGBA'), 'PNG'))
  np.testing.assert_array_equal(out[:4].reshape(-1, 3), [[255, 0, 0]] * 32)
  np.testing.assert_array_equal(out[4:].reshape(-1, 3), [[255, 255, 255]] * 32)


def test_photo_with_transparent_half_is_white_there_not_hidden_rgb():
  photo = helpers.photo('coffee')
  alpha = np.full(photo.shape[:2], 255, dtype=np.uint8)
  alpha[:, :300] = 0  # Left half transparent; its hidden RGB is the photo.
  rgba = Image.fromarray(np.dstack([photo, alpha]), 'RGBA')
  out = _process(_bytes(rgba, 'PNG'), height=40, width=60)
  assert out[:, :28].min() == 255
  assert out[:, 32:].mean() < 200  # The opaque half is still the photo.


def test_palette_with_transparency_and_gif_first_frame():
  frames = [Image.new('P', (8, 8), color=i) for i in (1, 2)]
  palette = [0, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
  for frame in frames:
    frame.putpalette(palette)
  buffer = io.BytesIO()
  frames[0].save(buffer, format='GIF', save_all=True,
                 append_images=frames[1:])
  out = _process(buffer.getvalue(), ext='.gif')
  np.testing.assert_array_equal(out.reshape(-1, 3), [[0, 255, 0]] * 64)
  transparent = Image.new('P', (8, 8), color=1)
  transparent.putpalette(palette)
  out = _process(_bytes(transparent, 'PNG', transparency=1))
  np.testing.assert_array_equal(out.reshape(-1, 3), [[255, 255, 255]] * 64)


@pytest.mark.parametrize('fmt,ext', [('JPEG', '.jpg'), ('BMP', '.bmp'),
                                     ('WEBP', '.webp'), ('PNG', '.PNG')])
def test_formats_and_extension_case(fmt, ext):
  photo = helpers.photo('chelsea')
  out = _process(_bytes(Image.fromarray(photo), fmt), ext=ext, height=30,
                 width=45)
  assert out.shape == (30, 45, 3)
  # Mean colour of the photo survives the round trip.
  assert abs(out.mean() - photo.mean()) < 6


def test_cmyk_and_greyscale_become_rgb():
  cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))  # Pure red in CMYK.
  out = _process(_bytes(cmyk, 'JPEG', quality=100), ext='.jpg')
  assert out.shape == (8, 8, 3)
  assert out[..., 0].min() > 240 and out[..., 1:].max() < 15
  grey = _process(_bytes(Image.new('L', (8, 8), 77), 'PNG'))
  np.testing.assert_array_equal(grey, 77)
  assert grey.shape == (8, 8, 3)


def test_exif_orientation_is_applied():
  tall = np.zeros((40, 20, 3), dtype=np.uint8)
  tall[:10] = 255  # White band at the top of the upright image.
  # Store it rotated (as a camera held sideways does) with orientation 6.
  stored = Image.fromarray(tall).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _bytes(stored, 'JPEG', quality=100, exif=exif.tobytes())
  result = source_image.process(data, extension='.jpg', options=source_image.ImageOptions(
      height=40, width=20, image_format='png'))
  assert (result.original_height, result.original_width) == (40, 20)
  out = np.asarray(Image.open(io.BytesIO(result.encoded)))
  assert out[:8].mean() > 240 and out[12:].mean() < 15


def test_resize_modes_follow_keras_semantics():
  wide = np.zeros((10, 40, 3), dtype=np.uint8)
  wide[:, 15:25] = 255  # White centre block, black sides.
  image = Image.fromarray(wide)
  crop = np.asarray(source_image.resize(image, height=10, width=10, mode='crop'))
  assert crop.min() == 255  # Only the centre 10x10 region is kept.
  pad = np.asarray(source_image.resize(image, height=40, width=40, mode='pad'))
  assert pad.shape == (40, 40, 3)
  assert pad[:14].max() == 0 and pad[-14:].max() == 0  # Black bars.
  assert pad[20, 20].min() == 255
  stretch = np.asarray(source_image.resize(image, height=20, width=20,
                                        mode='stretch'))
  assert stretch[:, :6].max() < 40 and stretch[:, 9:11].min() > 200


def test_jpeg_draft_keeps_quality_of_downscale():
  photo = helpers.photo('astronaut')
  data = helpers.jpeg_bytes(photo, quality=95)
  fast = _process(data, ext='.jpg', height=128, width=128)
  exact = np.asarray(Image.fromarray(photo).resize(
      (128, 128), Image.Resampling.BILINEAR))
  assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4


@pytest.mark.parametrize('data,outcome', [
    (b'', source_image.EMPTY),
    (b'plain text, not an image', source_image.CORRUPT),
    (helpers.jpeg_bytes(np.zeros((64, 64, 3), np.uint8))[:200],
     source_image.CORRUPT),
])
def test_rejects_bad_bytes_with_reason(data, outcome):
  with pytest.raises(source_image.ImageRejected) as e:
    _process(data, ext='.jpg')
  assert e.value.outcome == outcome
  assert e.value.reason


def test_rejects_decompression_bomb_before_decoding():
  data = _bytes(Image.new('L', (400, 300)), 'PNG')
  with pytest.raises(source_image.ImageRejected) as e:
    _process(data, max_pixels=100_000)
  assert e.value.outcome == source_image.TOO_LARGE
  assert '400x300' in e.value.reason


def test_rejects_unsupported_content_format():
  data = _bytes(Image.new('RGB', (8, 8)), 'TIFF')
  with pytest.raises(source_image.ImageRejected) as e:
    _process(data, ext='.jpg')
  assert e.value.outcome == source_image.UNSUPPORTED
  assert 'TIFF' in e.value.reason


def test_mislabelled_extension_is_used_with_a_warning():
  data = _bytes(Image.new('RGB', (8, 8), (10, 20, 30)), 'PNG')
  result = source_image.process(data, extension='.jpg', options=source_image.ImageOptions(
      height=8, width=8, image_format='raw'))
  assert result.warning == 'extension .jpg but content is PNG'
  assert result.encoded == bytes([10, 20, 30]) * 64


def test_pixel_sums_feed_mean_and_std():
  data = _bytes(Image.new('RGB', (4, 4), (10, 20, 30)), 'PNG')
  result = source_image.process(data, extension='.png', options=source_image.ImageOptions(
      height=4, width=4, image_format='raw'))
  assert result.num_pixels == 16
  np.testing.assert_allclose(result.pixel_sum, [160, 320, 480])
  np.testing.assert_allclose(result.pixel_sumsq, [1600, 6400, 14400])
