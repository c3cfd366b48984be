"""Serving export on hostile and awkward input: `serve` vs `trainer.predict`.

`trainer.predict` runs the build's Pillow path (EXIF, alpha on white, 16-bit,
first frame, resize to the stored size, re-encode) before `serve`; raw
`serve` gets the source bytes and must reproduce that in TF ops. Each case
checks the acceptance (same class, probabilities within 0.02) and, so that a
test fails even on a model that happens to agree, the pixels the model gets
against the pixels training would have read for the file.
"""

import collections
import dataclasses
import io
import json
import os
import re
import time
import types
import zlib

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.folder_to_records import builder
from pipelines.preprocessing import image_formats
from pipelines.preprocessing import resize_modes
from pipelines.preprocessing import source_image
from pipelines.preprocessing import serving
from pipelines.records_to_batches import input_pipeline
from tests import helpers
from tfrecords_schema import schema
from trainer import export as export_lib
from trainer import predict
from trainer import train_lib

TOLERANCE = 0.02
STORED = 32  # builder image_size='32'.
TRAIN_SIZE = (24, 40)  # --image_size of another aspect ratio than stored.
PHOTOS = ('chelsea', 'coffee', 'rocket', 'astronaut')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One model (3 classes of real photos), served in each resize mode.

  The model is trained on the stretch build and exported by the training
  run (a real SavedModel, loaded as predict loads it). The other modes serve
  the same model through the export's own serving function
  (export.make_serving_fn, traced here, not saved and loaded again: 10 s
  each); they differ only in the serving config, which is what serve and
  predict both follow.
  """
  root = tmp_path_factory.mktemp('serve')
  helpers.make_photo_folder(root / 'images', per_class=8)
  builder.build(input_dir=str(root / 'images'), output_dir=str(root / 'data'),
                image_size=str(STORED), validation_fraction=0.25, seed=1,
                quiet=True, samples=False)
  model_dir = str(root / 'stretch')
  train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=str(root / 'data'), model_dir=model_dir, epochs=10,
      batch_size=8, image_size=TRAIN_SIZE, early_stopping_patience=0,
      optimizer='adam', learning_rate=3e-3))
  return root, model_dir


_MODELS = {}


def _served(run, mode):
  """(loaded SavedModel, config) of the export for resize mode `mode`."""
  if mode not in _MODELS:
    served, config = predict.load(run[1])
    if mode != 'stretch':
      config = dataclasses.replace(config, model_input=dataclasses.replace(
          config.model_input, resize_mode=mode))
      served = types.SimpleNamespace(serve=tf.function(
          export_lib.make_serving_fn(_keras_model(run), config),
          input_signature=[tf.TensorSpec([None], tf.string)]))
    _MODELS[mode] = served, config
  return _MODELS[mode]


def _keras_model(run):
  if 'keras' not in _MODELS:
    _MODELS['keras'] = keras.models.load_model(
        os.path.join(run[1], 'best.keras'))
  return _MODELS['keras']


def _serve(served, *datas):
  return served.serve(tf.constant(list(datas)))['probabilities'].numpy()


def _predict(served, config, data, ext):
  return _serve(served, predict.preprocess(data, ext, config))[0]


def _training_image(data, ext, config):
  """What training reads for a file: the record the build writes for it,
  through the input pipeline's own decode_example (uint8 [h, w, C])."""
  stored = predict.preprocess(data, ext, config)
  record = schema.encode_example(image=stored, label=0, filename='x',
                                 sha256='0' * 64, original_height=1, original_width=1)
  image, _ = input_pipeline.decode_example(tf.constant(record),
                                           config.model_input)
  return image


def _training_pixels(data, ext, config):
  return _training_image(data, ext, config).numpy().astype(np.float64)


_PIXEL_FNS = {}


def _serving_pixels(data, config):
  """The uint8 pixels `serve` feeds the model for these bytes."""
  key = config.model_input
  if key not in _PIXEL_FNS:
    _PIXEL_FNS[key] = tf.function(
        lambda d: serving.preprocess_image(d, 0, key),
        input_signature=[tf.TensorSpec([], tf.string)])
  return _PIXEL_FNS[key](tf.constant(data)).numpy().astype(np.float64)


def _check(run, data, ext, mode='stretch', pixel_mean=1.5):
  """Acceptance (class, probabilities) and pixel agreement for one file."""
  served, config = _served(run, mode)
  want = _predict(served, config, data, ext)
  got = _serve(served, data)[0]
  assert np.argmax(got) == np.argmax(want), (got, want)
  np.testing.assert_allclose(got, want, atol=TOLERANCE)
  reference = _training_pixels(data, ext, config)
  pixels = _serving_pixels(data, config)
  assert pixels.shape == reference.shape
  assert np.abs(pixels - reference).mean() <= pixel_mean
  return reference, pixels


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _error(served, *datas):
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    _serve(served, *datas)
  return error.value.message


def _bomb(data, at, fields):
  """data with little/big-endian integer fields (offset, size, value) set."""
  data = bytearray(data)
  for offset, size, value, order in fields:
    data[at + offset:at + offset + size] = value.to_bytes(size, order)
  return bytes(data)


def test_over_limit_headers_are_refused_before_decoding(run):
  """Real files whose header claims a huge size: the size error, not a
  decoder error (the pixel data no longer matches), so nothing decoded."""
  served, _ = _served(run, 'stretch')
  small = Image.fromarray(helpers.photo('chelsea')[:40, :60])
  jpeg = _encode(small, 'JPEG')
  sof = jpeg.index(b'\xff\xc0')
  bombs = {
      'PNG': _bomb(_encode(small, 'PNG'), 16, [(0, 4, 23000, 'big'),
                                              (4, 4, 23000, 'big')]),
      'JPEG': _bomb(jpeg, sof + 5, [(0, 2, 23000, 'big'),
                                    (2, 2, 23000, 'big')]),
      'GIF': _bomb(_encode(small, 'GIF'), 6, [(0, 2, 23000, 'little'),
                                             (2, 2, 23000, 'little')]),
      'BMP': _bomb(_encode(small, 'BMP'), 18, [(0, 4, 23000, 'little'),
                                              (4, 4, 23000, 'little')]),
      # VP8L: 14 bits width - 1, 14 bits height - 1.
      'WebP': _bomb(_encode(small, 'WEBP', lossless=True), 21, [
          (0, 4, 16383 << 14 | 16383, 'little')]),
  }
  assert bombs['WebP'][12:16] == b'VP8L'
  _serve(served, jpeg)  # Warm: the first call also optimizes the graph.
  for fmt, data in bombs.items():
    start = time.perf_counter()
    message = _error(served, jpeg, data)
    assert time.perf_counter() - start < 2, fmt
    size = '16384x16384' if fmt == 'WebP' else '23000x23000'
    assert (f'image_bytes[1]: {fmt} image of {size} = ' in message and
            'exceeds the serving limit of 89478485 pixels' in message), (
                fmt, message)
  # A real 12000x9000 PNG (108 Mpx, ~100 KB): refused fast, by size.
  big = _encode(Image.new('L', (12000, 9000)), 'PNG')
  start = time.perf_counter()
  message = _error(served, big)
  assert time.perf_counter() - start < 2
  assert 'PNG image of 12000x9000 = 108000000 pixels exceeds' in message
  with open(os.path.join(run[1], export_lib.MODEL_CONFIG)) as f:
    assert json.load(f)['max_pixels'] == source_image.DEFAULT_MAX_PIXELS


def test_the_limit_comes_from_the_config(run):
  _, config = _served(run, 'stretch')
  config = dataclasses.replace(config, model_input=dataclasses.replace(
      config.model_input, max_pixels=100 * 100))
  photo = Image.fromarray(helpers.photo('coffee'))
  assert _serving_pixels(_encode(photo.resize((100, 100)), 'PNG'),
                         config).shape == (*TRAIN_SIZE, 3)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='101x100 = 10100 pixels exceeds the serving limit '
                     'of 10000'):
    _serving_pixels(_encode(photo.resize((101, 100)), 'PNG'), config)


def test_garbage_is_refused_with_a_clear_error(run):
  served, _ = _served(run, 'stretch')
  good = helpers.jpeg_bytes(helpers.photo('rocket'))
  for bad in (b'', b'not a picture at all', b'\x89PNG\r\n\x1a\n' + b'\0' * 30,
              b'RIFF\0\0\0\0WEBPJUNK' + b'\0' * 30, b'GIF89a\1\0\1\0'):
    message = _error(served, good, bad)
    assert message.count('image_bytes[1]: ') == 1, message
    # The reason, without TensorFlow's "Graph execution error" and nodes.
    assert export_lib.error_reason(message).startswith('image_bytes[1]: ')
  assert 'not a JPEG, PNG, GIF, BMP or WebP image (20 bytes)' in _error(
      served, b'not a picture at all')
  # The whole request is checked before any image is read (a reader started
  # on such bytes could fail first, naming no input): the first one named.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'image_bytes\[1\]: not a JPEG.* \(0 bytes\)'):
    serving.known_formats(tf.constant([good, b'', b'junk']))
  # And the format dispatch is a Case op that runs only the reader it picks
  # (not lowered to Switch/Merge, where another reader was seen to run).
  graph = _served(run, 'crop')[0].serve.get_concrete_function().graph
  dispatch = [n for f in graph.as_graph_def().library.function
              for n in f.node_def if n.op in ('Case', 'StatelessCase') and
              len(n.attr['branches'].list.func) == len(image_formats.FORMATS) + 1]
  assert dispatch and not any(
      n.attr['_lower_using_switch_merge'].b for n in dispatch)


def _test_set():
  """(bytes, extension) of real photos the model never saw: other photos
  of scikit-image, landscape and portrait crops, as JPEG and PNG."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  files = []
  for i, name in enumerate(('astronaut', 'camera', 'moon', 'coins', 'page',
                            'horse', 'immunohistochemistry', 'cat')):
    try:
      array = np.asarray(getattr(data, name)())
    except (AttributeError, OSError):  # Not bundled in this version.
      continue
    if array.dtype == bool:
      array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    w, h = image.size
    if i % 2:
      image = image.crop((0, 0, max(1, w // 3), h))  # Portrait.
    files.append((helpers.jpeg_bytes(np.asarray(image.convert('RGB'))), '.jpg')
                 if i % 3 else (_encode(image, 'PNG'), '.png'))
  return files


@pytest.mark.parametrize('mode', resize_modes.names())
def test_serve_agrees_with_the_model_on_the_training_pipeline(run, mode):
  """Issue 8's acceptance: one preprocessing definition, no train/serve skew.

  serve(source bytes) vs the Keras model on the image the training pipeline
  (decode_example, then eval_parse) makes of the same file, for each resize
  mode, at a training --image_size of another aspect ratio than stored.
  """
  served, config = _served(run, mode)
  assert config.model_input.size != config.model_input.stored_size
  model = _keras_model(run)
  files = _test_set()
  assert len(files) >= 6
  for data, ext in files:
    image = _training_image(data, ext, config)
    inputs, _ = input_pipeline.eval_parse(
        image[None], tf.constant([0]), model_input=config.model_input,
        label_mode='int', num_classes=len(config.class_names))
    want = tf.nn.softmax(model(inputs, training=False)).numpy()[0]
    got = _serve(served, data)[0]
    assert np.argmax(got) == np.argmax(want), (got, want)
    np.testing.assert_allclose(got, want, atol=TOLERANCE)


@pytest.mark.parametrize('mode', resize_modes.names())
def test_each_resize_mode_agrees_with_predict_on_real_photos(run, mode):
  for i, name in enumerate(PHOTOS):
    array = helpers.photo(name)
    if i % 2:  # Also a portrait crop: the mode's geometry matters more.
      array = array[:, :array.shape[1] // 3]
      _check(run, _encode(Image.fromarray(array), 'PNG'), '.png', mode)
    else:
      _check(run, helpers.jpeg_bytes(array), '.jpg', mode)


def test_exif_rotated_jpeg_agrees_with_predict(run):
  upright = helpers.photo('chelsea')
  # Orientation 6: the viewer rotates 90 degrees clockwise to show it, so
  # the file holds the upright picture rotated counter-clockwise.
  exif = Image.Exif()
  exif[0x0112] = 6
  stored = np.ascontiguousarray(np.rot90(upright, 1))
  data = helpers.jpeg_bytes(stored, exif=exif.tobytes())
  reference, _ = _check(run, data, '.jpg')
  _, config = _served(run, 'stretch')
  sideways = _serving_pixels(helpers.jpeg_bytes(stored), config)
  assert np.abs(sideways - reference).mean() > 10  # The check has teeth.
  for fmt, ext in (('PNG', '.png'), ('WEBP', '.webp')):
    _check(run, _encode(Image.fromarray(stored), fmt, exif=exif.tobytes()),
           ext)


def test_transparent_png_composites_on_white_like_predict(run):
  photo = helpers.photo('coffee')
  alpha = np.full(photo.shape[:2], 255, np.uint8)
  alpha[:photo.shape[0] // 3] = 128  # Top third half transparent.
  alpha[:, :photo.shape[1] // 2] = 0  # Left half transparent.
  rgba = Image.fromarray(np.dstack([photo, alpha]), 'RGBA')
  reference, _ = _check(run, _encode(rgba, 'PNG'), '.png')
  assert reference[:, :TRAIN_SIZE[1] // 3].min() > 240  # White, not black.
  # Palette and grey with transparency, grey + alpha.
  _check(run, _encode(Image.fromarray(photo).convert('P'), 'PNG',
                      transparency=3), '.png')
  _check(run, _encode(rgba.convert('LA'), 'PNG'), '.png')


def test_16_bit_png_agrees_with_predict(run):
  photo = helpers.photo('astronaut').astype(np.uint16) * 257
  noise = np.random.default_rng(0).integers(0, 257, photo.shape[:2])
  grey = Image.fromarray((photo[..., 0] + noise).astype(np.uint16))
  assert grey.mode == 'I;16'
  data = _encode(grey, 'PNG')
  assert data[24] == 16  # Bit depth in IHDR.
  _check(run, data, '.png', pixel_mean=1.0)


def test_animated_webp_and_gif_use_the_first_frame(run):
  frames = [Image.fromarray(helpers.photo(name)).resize((300, 200))
            for name in ('rocket', 'coffee', 'chelsea')]
  _, config = _served(run, 'stretch')
  first, second = (_training_pixels(_encode(frame, 'PNG'), '.png', config)
                   for frame in frames[:2])
  for fmt, kwargs in (('WEBP', dict(quality=90)), ('GIF', {})):
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:],
                   duration=100, **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    _, pixels = _check(run, data, '.' + fmt.lower())
    # Frame 0, not another.
    assert (np.abs(pixels - first).mean() * 4 <
            np.abs(pixels - second).mean()), fmt


def test_one_pixel_wide_image_in_crop_mode(run):
  line = np.tile(helpers.photo('rocket')[200:201, :200], (1, 10, 1))
  for array in (line, np.ascontiguousarray(line.transpose(1, 0, 2))):
    _check(run, _encode(Image.fromarray(array), 'PNG'), '.png', 'crop')


def test_mutated_headers_never_crash_the_server(run):
  """Seeded byte flips in the headers: a prediction or a clear error."""
  served, _ = _served(run, 'stretch')
  frames = [Image.fromarray(helpers.photo(n)).resize((60, 40))
            for n in ('rocket', 'coffee')]
  seeds = [
      _encode(frames[0], 'GIF', save_all=True, append_images=frames[1:]),
      _encode(frames[0], 'WEBP', save_all=True, append_images=frames[1:]),
      _encode(frames[0].convert('RGBA'), 'PNG'),
      helpers.jpeg_bytes(np.asarray(frames[0])),
      _encode(frames[0], 'BMP'),
  ]
  rng = np.random.default_rng(0)
  for _ in range(60):
    data = bytearray(seeds[rng.integers(len(seeds))])
    for _ in range(rng.integers(1, 4)):
      data[rng.integers(min(len(data), 64))] = rng.integers(256)
    try:
      probabilities = _serve(served, bytes(data))
      assert probabilities.shape == (1, 3)
    except tf.errors.InvalidArgumentError:
      pass


# ------------------------------------------------ the build's strictness
#
# Issue 23, cases 10 and 13: serving refuses exactly what the build
# refuses (source_image.process: libjpeg strict, Pillow's warnings as
# errors), and every refusal names the input's index.


def _build_refusal(data, ext, config):
  """The build's reason for refusing the file, or None if it stores it."""
  try:
    source_image.process(data, extension=ext,
                         options=config.model_input.source_options())
  except source_image.ImageRejected as e:
    return e.reason
  return None


def _serve_refusal(served, data):
  try:
    _serve(served, data)
  except tf.errors.InvalidArgumentError as e:
    return e.message
  return None


def _chunk(kind, payload):
  body = kind + payload
  return (len(payload).to_bytes(4, 'big') + body +
          zlib.crc32(body).to_bytes(4, 'big'))


def _png_damage(data, rng):
  """A PNG cut, flipped and re-chunked where Pillow and libpng differ."""
  first = data.index(b'IDAT') - 4
  end = data.index(b'IEND') - 4
  cut_text = data[:end] + _chunk(b'tEXt', b'Comment\0hello')[:15]
  flipped = [bytearray(data) for _ in range(3)]
  flipped[0][int(rng.integers(12, first))] ^= 4  # Before the image data.
  flipped[1][int(rng.integers(first + 8, end - 4))] ^= 16  # Its zlib data.
  flipped[2][end - 1] ^= 1  # The IDAT CRC (libpng checks it, Pillow not).
  return ([data[:int(rng.integers(8, len(data)))] for _ in range(3)] +
          [bytes(f) for f in flipped] +
          [data[:-12], data[:-1] + b'\0', cut_text, data + b'junk'])


def _jpeg_damage(data, rng, *, sequential):
  """A JPEG cut short (with and without a new end marker), with bytes
  deleted or flipped in its scan data, and with odd headers."""
  start = data.index(b'\xff\xda')
  end = len(data) - 2
  cuts = [int(rng.integers(start + 20, end)) for _ in range(3)]
  cuts.append(int(rng.integers(end - 30, end)))
  files = [data[:c] + b'\xff\xd9' for c in cuts] + [data[:cuts[0]]]
  files.append(data[:2] + data[2:].replace(b'\xff\xdb', b'\0\xff\xdb', 1))
  if b'JFIF\0' in data:
    jfif = bytearray(data)
    jfif[data.index(b'JFIF\0') + 5] = 2
    files.append(bytes(jfif))
  scan = bytearray(data)  # Se = 62: progressive parameters.
  scan[start + 5 + 2 * data[start + 4] + 1] = 62
  files.append(bytes(scan))
  if sequential:  # Progressive scans: see the residual cases in serving.
    for _ in range(2):
      at = int(rng.integers(start + 20, end))
      files.append(data[:at] + data[at + int(rng.integers(1, 50)):])
    for _ in range(3):
      flip = bytearray(data)
      flip[int(rng.integers(start + 20, end))] ^= 1 << int(rng.integers(8))
      files.append(bytes(flip))
  return files


def _damaged_files():
  """(bytes, extension) of real photos damaged in every way the build
  refuses some of, from each format the build reads."""
  rng = np.random.default_rng(23)
  photo = Image.fromarray(helpers.photo('chelsea'))
  crop = Image.fromarray(helpers.photo('coffee')[:120, :301])  # Padded rows.
  files = []
  jpegs = {
      'baseline': (_encode(photo, 'JPEG', quality=90), True),
      'progressive': (_encode(photo, 'JPEG', quality=90, progressive=True),
                      False),
      'restarts': (_encode(photo, 'JPEG', quality=85,
                           restart_marker_blocks=4), True),
      'grey': (_encode(photo.convert('L'), 'JPEG', quality=80), True),
      '4:4:4': (_encode(photo, 'JPEG', quality=95, subsampling=0,
                        optimize=True), True),
  }
  for data, sequential in jpegs.values():
    files += [(d, '.jpg') for d in _jpeg_damage(data, rng,
                                                sequential=sequential)]
  restarts = jpegs['restarts'][0]
  rst = restarts.index(b'\xff\xd3', restarts.index(b'\xff\xda'))
  files.append((restarts[:rst] + restarts[rst + 2:], '.jpg'))
  for image in (crop, crop.convert('P')):
    files += [(d, '.png') for d in _png_damage(_encode(image, 'PNG'), rng)]
  for data in (_encode(crop, 'GIF'), _encode(crop, 'GIF', save_all=True,
                                             append_images=[photo])):
    for _ in range(3):
      cut = data[:int(rng.integers(13, len(data)))]
      files += [(cut, '.gif'), (cut + b';', '.gif')]
  for mode in ('RGB', 'L', 'RGBA'):
    data = _encode(crop.convert(mode), 'BMP')
    top_down = bytearray(data)
    top_down[22:26] = (-120).to_bytes(4, 'little', signed=True)
    files += [(d, '.bmp') for d in (
        data[:int(rng.integers(54, len(data)))], data[:-1], data[:-3],
        data + b'\0' * 7, bytes(top_down))]
  for data in (_encode(crop, 'WEBP', quality=80),
               _encode(crop, 'WEBP', lossless=True)):
    for _ in range(3):
      flip = bytearray(data)
      flip[int(rng.integers(40, len(data)))] ^= 1 << int(rng.integers(8))
      files += [(data[:int(rng.integers(12, len(data)))], '.webp'),
                (bytes(flip), '.webp')]
  return files


def _known_gap(reason):
  """The one refusal serving cannot match (see serving's JPEG strictness
  section): libjpeg finds fewer than 9 scan bytes never decoded, which its
  bit reader may or may not have fetched ahead."""
  found = re.search(r'(\d+) extraneous bytes', reason or '')
  return found is not None and int(found.group(1)) < 9


def test_serving_refuses_a_damaged_file_iff_the_build_does(run):
  """Issue 23 case 10's class: damage libjpeg only warns about (a JPEG cut
  and given a new end marker was accepted with p=0.936), PNG chunks Pillow
  checks but libpng does not and the reverse, BMP rows cut short or longer,
  GIF and WebP cut short: the build and serve agree on every file."""
  served, config = _served(run, 'stretch')
  files = _damaged_files()
  verdicts = collections.Counter()
  for data, ext in files:
    build = _build_refusal(data, ext, config)
    serve = _serve_refusal(served, data)
    if _known_gap(build):
      continue
    verdicts[build is not None] += 1
    assert (serve is not None) == (build is not None), (ext, build, serve)
    if serve is not None:
      assert serve.count('image_bytes[0]: ') == 1, serve
  assert verdicts[True] >= 60 and verdicts[False] >= 25, verdicts


def test_a_jpeg_cut_in_half_with_an_end_marker_is_refused(run):
  """The issue's file: the build, predict and serve refuse it."""
  served, config = _served(run, 'stretch')
  good = helpers.jpeg_bytes(helpers.photo('rocket'))
  for progressive in (False, True):
    data = _encode(Image.fromarray(helpers.photo('chelsea')), 'JPEG',
                   quality=90, progressive=progressive)
    cut = data[:len(data) // 2] + b'\xff\xd9'
    assert 'premature end of data segment' in _build_refusal(cut, '.jpg',
                                                             config)
    message = _error(served, good, good, cut)
    assert ('image_bytes[2]: corrupt JPEG data (a scan ends before its last '
            'block' in message), message
    _serve(served, data)  # The whole file is fine.


def test_every_refusal_names_the_input_index(run):
  """Also where a TensorFlow decoder refuses the data (its own error names
  no input): zlib data, a WebP bitstream, a JPEG without its end."""
  served, _ = _served(run, 'stretch')
  good = helpers.jpeg_bytes(helpers.photo('rocket'))
  image = Image.fromarray(helpers.photo('coffee')[:60, :80])
  png = bytearray(_encode(image, 'PNG'))
  png[png.index(b'IDAT') + 30] ^= 0xFF
  webp = _encode(image, 'WEBP')
  jpeg = helpers.jpeg_bytes(helpers.photo('coffee'))
  for bad, reason in ((bytes(png), 'corrupt PNG data'),
                      (webp[:len(webp) * 2 // 3], 'corrupt WebP data'),
                      (jpeg[:len(jpeg) // 2], 'corrupt JPEG data')):
    for index in (0, 3):
      batch = [good] * 4
      batch[index] = bad
      message = _error(served, *batch)
      assert message.count('image_bytes[') == 1, message
      assert f'image_bytes[{index}]: {reason}' in message, message


def test_bmp_sizes_are_read_signed_like_the_file_means_them(run):
  """Issue 23 case 13: a width of -5 is shown as -5 (not 4294967291) by
  serve and the build; a negative height is a top-down BMP, read by both."""
  served, config = _served(run, 'stretch')
  data = _encode(Image.fromarray(helpers.photo('coffee')[:40, :60]), 'BMP')
  wide = bytearray(data)
  wide[18:22] = (-5).to_bytes(4, 'little', signed=True)
  wanted = 'BMP header gives an invalid size -5x40 (corrupt or truncated file)'
  assert _build_refusal(bytes(wide), '.bmp', config) == wanted
  assert f'image_bytes[0]: {wanted}' in _error(served, bytes(wide))
  top_down = bytearray(data)
  top_down[22:26] = (-40).to_bytes(4, 'little', signed=True)
  flipped, _ = _check(run, bytes(top_down), '.bmp')
  upright, _ = _check(run, data, '.bmp')
  # The same rows in the other order: upside down.
  assert (np.abs(flipped - upright[::-1]).mean() * 3 <
          np.abs(flipped - upright).mean()), 'not read top-down'
