"""The tf.data input layer over a small dataset of real photos.

The dataset is written directly (tests.helpers.write_tiny_dataset), not
built: these tests are about reading, and need no Beam run.
"""


import numpy as np
import pytest
import tensorflow as tf

from pipelines.preprocessing.model_input import ModelInput
from pipelines.records_to_batches import augment_config
from pipelines.records_to_batches import input_pipeline
from tests import helpers
import tfrecords_schema


# 3 classes x 6 train images in 3 shards of 6 records, 3 x 3 validation.
SHAPE = dict(per_class={'train': 6, 'validation': 3}, size=(32, 40),
             shards={'train': 3})


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Real-photo crops, 32x40 JPEG, written without a Beam build."""
  return helpers.write_tiny_dataset(tmp_path_factory.mktemp('input'), **SHAPE)


@pytest.fixture(scope='module')
def data_dir(tiny):
  return tiny.path


def _all(ds):
  images, labels = [], []
  for x, y in ds:
    images.append(x.numpy())
    labels.append(y.numpy())
  return np.concatenate(images), np.concatenate(labels)


def _stored(tiny, split):
  """The split's images decoded by Pillow (not TensorFlow), and labels."""
  examples = tiny.examples[split]
  return (np.stack([helpers.decode_with_pillow(e.encoded, tiny.spec)
                    for e in examples]).astype(np.float32),
          np.array([e.label for e in examples]))


def _tolerance(spec):
  """JPEG decoders may round differently by a level; PNG/raw are exact."""
  return 2.0 if spec.image_format == 'jpeg' else 0.0


def _match(images, tiny, split):
  """For each image (0..255 floats), the index of the stored example it is.

  Asserts that each one equals its stored image decoded independently
  (within the JPEG tolerance) and is closer to it than to any other.
  """
  stored, _ = _stored(tiny, split)
  diff = np.abs(images[:, None] - stored[None]).max(axis=(2, 3, 4))
  index = diff.argmin(axis=1)
  np.testing.assert_array_less(diff[np.arange(len(images)), index],
                               _tolerance(tiny.spec) + 1e-3)
  assert (np.sort(diff, axis=1)[:, 1] > 20).all()  # Unambiguous.
  return index


def test_eval_reads_every_example_once_in_order_without_randomness(tiny):
  spec = tiny.spec
  assert len(spec.splits['train'].shards) > 1
  ds = input_pipeline.make_dataset(tiny.path, 'train', batch_size=5,
                                   training=False, augment=augment_config.COURSE)
  images, labels = _all(ds)
  again, labels_again = _all(ds)
  assert images.shape == (spec.splits['train'].num_examples, 32, 40, 3)
  assert images.dtype == np.float32
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, labels_again)
  index = _match(images * 255, tiny, 'train')  # Not augmented.
  assert sorted(index) == list(range(len(images)))  # Each example once.
  np.testing.assert_array_equal(labels, _stored(tiny, 'train')[1][index])


@pytest.mark.parametrize('image_format', ['jpeg', 'png'])
def test_decoded_pixels_equal_the_stored_images(tmp_path, image_format):
  tiny = helpers.write_tiny_dataset(
      tmp_path / 'data', image_format=image_format, classes=('a', 'b'),
      per_class={'train': 3}, size=(24, 20), shards=2)
  images, labels = _all(input_pipeline.make_dataset(
      tiny.path, 'train', batch_size=4, training=False, normalize='none'))
  stored, stored_labels = _stored(tiny, 'train')
  index = _match(images, tiny, 'train')
  assert sorted(index) == list(range(len(stored)))
  np.testing.assert_array_equal(labels, stored_labels[index])
  if image_format == 'png':  # Lossless: the very pixels that were written.
    np.testing.assert_array_equal(
        images, np.stack([e.pixels for e in tiny.examples['train']])[index])


def test_training_batches_are_shuffled_augmented_and_seeded(data_dir):
  make = lambda seed: input_pipeline.make_dataset(  # pylint: disable=g-long-lambda
      data_dir, 'train', batch_size=4, training=True, augment=augment_config.COURSE,
      seed=seed)
  first, labels = _all(make(7))
  second, labels2 = _all(make(7))
  np.testing.assert_array_equal(first, second)
  np.testing.assert_array_equal(labels, labels2)
  ds = make(7)
  epoch1, epoch2 = _all(ds)[0], _all(ds)[0]
  assert not np.allclose(epoch1, epoch2)  # New order and augmentation.
  plain, _ = _all(input_pipeline.make_dataset(data_dir, 'train', batch_size=4,
                                              training=False))
  assert len(first) == len(plain) // 4 * 4  # drop_remainder when training.
  assert not any(np.allclose(first[0], p) for p in plain)


@pytest.mark.parametrize('mode,expected', [
    ('rescale', lambda p, spec: p / 255),
    ('[-1,1]', lambda p, spec: p / 127.5 - 1),
    ('none', lambda p, spec: p),
    ('standardize', lambda p, spec: (p - np.array(spec.mean)) /
     np.array(spec.std)),
])
def test_normalizations(tiny, mode, expected):
  images, _ = _all(input_pipeline.make_dataset(
      tiny.path, 'train', batch_size=8, training=False, normalize=mode))
  pixels, _ = _all(input_pipeline.make_dataset(
      tiny.path, 'train', batch_size=8, training=False, normalize='none'))
  _match(pixels, tiny, 'train')  # The pixels are the stored images.
  want = expected(pixels.astype(np.float64), tiny.spec)
  np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)


def test_label_modes_and_resize(data_dir):
  ds = input_pipeline.make_dataset(data_dir, 'validation', batch_size=4,
                                   training=False, label_mode='categorical',
                                   image_size=(16, 20))
  images, labels = _all(ds)
  assert images.shape[1:] == (16, 20, 3)
  assert labels.shape[1] == 3 and np.all(labels.sum(axis=1) == 1)
  with pytest.raises(ValueError, match='needs 2 classes'):
    input_pipeline.make_dataset(data_dir, 'train', batch_size=4,
                                training=False, label_mode='binary')
  with pytest.raises(tfrecords_schema.DatasetError, match="'test' of"):
    input_pipeline.make_dataset(data_dir, 'test', batch_size=4, training=False)


def test_cache_in_memory_and_to_file(data_dir, tmp_path, monkeypatch):
  cached, _ = _all(input_pipeline.make_dataset(
      data_dir, 'train', batch_size=8, training=False, cache=True))
  uncached, _ = _all(input_pipeline.make_dataset(
      data_dir, 'train', batch_size=8, training=False))
  np.testing.assert_array_equal(cached, uncached)
  file_cache = str(tmp_path / 'cache')
  on_disk, _ = _all(input_pipeline.make_dataset(
      data_dir, 'train', batch_size=8, training=False, cache=file_cache))
  np.testing.assert_array_equal(on_disk, uncached)
  assert list(tmp_path.glob('cache*'))
  monkeypatch.setattr(input_pipeline, '_available_memory_bytes', lambda: 1000)
  with pytest.raises(ValueError, match='cache=memory needs'):
    input_pipeline.make_dataset(data_dir, 'train', batch_size=8,
                                training=False, cache='memory')


def test_changed_shards_are_refused_before_reading(data_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'copy'
  shutil.copytree(data_dir, copy)
  spec = tfrecords_schema.read_dataset_spec(str(copy))
  shard = copy / spec.splits['train'].shards[1]
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(input_pipeline.DamagedShardError,
                     match='is damaged .cut short') as error:
    input_pipeline.make_dataset(str(copy), 'train', batch_size=4,
                                training=False)
  assert error.value.path == str(shard)
  shard.unlink()
  with pytest.raises(tfrecords_schema.DatasetError, match='is missing'):
    input_pipeline.make_dataset(str(copy), 'train', batch_size=4,
                                training=False)


def test_repeat_covers_every_example_each_epoch(tiny):
  n = tiny.spec.splits['train'].num_examples
  epochs, batch = 3, 4

  def stream(seed):
    ds = input_pipeline.make_dataset(tiny.path, 'train', batch_size=batch,
                                     training=True, repeat=True, seed=seed,
                                     normalize='none')
    images, _ = _all(ds.take(-(-epochs * n // batch)))
    return images[:epochs * n]

  images = stream(1)
  np.testing.assert_array_equal(images, stream(1))  # Seeded.
  orders = [_match(chunk, tiny, 'train') for chunk in np.split(images, epochs)]
  for order in orders:
    assert sorted(order) == list(range(n))  # Every example, once per epoch.
  assert len({tuple(o) for o in orders}) == epochs  # Reshuffled each time.


def _corrupt_copy(data_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'copy'
  shutil.copytree(data_dir, copy)
  spec = tfrecords_schema.read_dataset_spec(str(copy))
  shard = copy / spec.splits['train'].shards[0]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # One flipped byte inside a record.
  shard.write_bytes(bytes(data))
  return str(copy), shard, spec


def test_corrupt_shard_raises_an_error_naming_it(data_dir, tmp_path):
  copy, shard, _ = _corrupt_copy(data_dir, tmp_path)
  ds = input_pipeline.make_dataset(copy, 'train', batch_size=4, training=False)
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    _all(ds)
  assert f'corrupt shard {shard} (6 records expected)' in str(e.value)
  assert 'skip_bad_records=True' in str(e.value)


def test_corrupt_shard_records_can_be_skipped_and_are_counted(
    data_dir, tmp_path, capfd):
  copy, shard, spec = _corrupt_copy(data_dir, tmp_path)
  images, _ = _all(input_pipeline.make_dataset(
      copy, 'train', batch_size=4, training=False, skip_bad_records=True))
  total = spec.splits['train'].num_examples
  assert 0 < len(images) < total
  err = capfd.readouterr().err
  assert (f'corrupt shard "{shard}" has {total - len(images)} unreadable '
          'records of 6') in err


def test_batches_takes_a_model_input_and_options_as_make_dataset_does(tiny):
  model_input = input_pipeline.ModelInput.from_spec(
      tiny.spec, image_size=(16, 20), normalize='[-1,1]')
  options = input_pipeline.DatasetOptions(
      batch_size=4, training=True, seed=3, augment=augment_config.COURSE)
  images, labels = _all(input_pipeline.batches(tiny.path, 'train',
                                               model_input, options))
  again, again_labels = _all(input_pipeline.make_dataset(
      tiny.path, 'train', image_size=(16, 20), normalize='[-1,1]',
      batch_size=4, training=True, seed=3, augment=augment_config.COURSE))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, again_labels)
  assert images.shape[1:] == (16, 20, 3) and images.min() >= -1
  with pytest.raises(ValueError, match='batch_size=0 must be >= 1'):
    input_pipeline.DatasetOptions(batch_size=0, training=False)
  with pytest.raises(ValueError, match="label_mode='onehot' is not one of"):
    input_pipeline.DatasetOptions(batch_size=1, training=False,
                                  label_mode='onehot')
  with pytest.raises(TypeError, match="make_dataset.. got an unexpected "
                     "keyword argument 'shufle_buffer'"):
    input_pipeline.make_dataset(tiny.path, 'train', batch_size=1,
                                training=True, shufle_buffer=8)


def test_a_dataset_on_an_object_store_reads_as_the_local_one(tiny, tmp_path):
  """data_dir on a bucket (tests/ram_store: TensorFlow's ram:// standing in
  for gs://): metadata, shards and the training order are the local
  copy's."""
  from tests import ram_store  # pylint: disable=g-import-not-at-top
  remote = f'{ram_store.SCHEME}://bucket-{tmp_path.name}/tiny'
  ram_store.copy_in(tiny.path, remote)
  for split, training in (('train', True), ('validation', False)):
    local, there = (_all(input_pipeline.make_dataset(
        path, split, batch_size=4, training=training, seed=3))
                    for path in (tiny.path, remote))
    np.testing.assert_array_equal(local[0], there[0])
    np.testing.assert_array_equal(local[1], there[1])


def test_no_function_of_the_toolkit_goes_through_autograph(data_dir,
                                                          monkeypatch):
  """The input layer's tf.data functions use TensorFlow's control flow only
  and are marked so: AutoGraph's rewrite of them cost ~3 s of CPU per
  trainer process. A map added without the mark is converted, and fails
  this."""
  from tensorflow.python.autograph.impl import api  # pylint: disable=g-import-not-at-top
  converted = []
  convert = api._convert_actual  # pylint: disable=protected-access

  def counted(entity, program_ctx):
    converted.append(f'{getattr(entity, "__module__", "")}.'
                     f'{getattr(entity, "__qualname__", entity)}')
    return convert(entity, program_ctx)

  monkeypatch.setattr(api, '_convert_actual', counted)
  spec = tfrecords_schema.read_dataset_spec(data_dir)
  model_input = ModelInput.from_spec(spec)
  every_op = augment_config.AugmentConfig(
      rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
      shear_range=0.1, zoom_range=0.1, horizontal_flip=True,
      vertical_flip=True, fill_mode='reflect', brightness_range=(0.9, 1.1),
      channel_shift_range=5, crop_range=(0.8, 1.0), brightness_delta=0.1,
      contrast_range=(0.9, 1.1), saturation_range=(0.9, 1.1), hue_delta=0.1)
  for options in (dict(training=True, augment=augment_config.COURSE, seed=1),
                  dict(training=True, augment=every_op, seed=1),
                  dict(training=False),
                  dict(training=True, skip_bad_records=True, seed=1),
                  dict(training=True, cache='memory', seed=1)):
    for _ in input_pipeline.make_dataset(data_dir, 'train', batch_size=4,
                                         **options).take(1):
      pass
  for _ in input_pipeline.labelled_files(data_dir, 'validation', model_input,
                                         batch_size=4).take(1):
    pass
  assert input_pipeline.pictures(data_dir, 'validation', model_input, [0, 2])
  ours = [name for name in converted
          if name.startswith(('pipelines.', 'tfrecords_schema.', 'trainer.'))]
  assert not ours, ours
