"""The tf.data input layer over a dataset built from real photos."""

import collections

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.records_to_batches import augment_config
from pipelines.folder_to_records import builder
from pipelines.records_to_batches import input_pipeline
from tests import helpers
import tfrecords_schema


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """3 classes x 12 real-photo crops, 32x40 JPEG, several shards per split."""
  root = tmp_path_factory.mktemp('input')
  for cls, name in (('cat', 'chelsea'), ('coffee', 'coffee'),
                    ('rocket', 'rocket')):
    for i, crop in enumerate(helpers.variants(helpers.photo(name), 12)):
      helpers.save(root / 'images' / cls / f'{i}.png', Image.fromarray(crop))
  out = root / 'data'
  builder.build(input_dir=str(root / 'images'), output_dir=str(out),
                image_size='32,40', validation_fraction=0.25,
                shard_size_mb=0.01, quiet=True)
  return str(out)


def _all(ds):
  images, labels = [], []
  for x, y in ds:
    images.append(x.numpy())
    labels.append(y.numpy())
  return np.concatenate(images), np.concatenate(labels)


def test_eval_reads_every_example_once_in_order_without_randomness(data_dir):
  spec = tfrecords_schema.read_dataset_spec(data_dir)
  assert len(spec.splits['train'].shards) > 1
  ds = input_pipeline.make_dataset(data_dir, 'train', batch_size=5,
                                   training=False, augment=augment_config.COURSE)
  images, labels = _all(ds)
  again, labels_again = _all(ds)
  assert images.shape == (spec.splits['train'].num_examples, 32, 40, 3)
  assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, labels_again)
  assert collections.Counter(labels.tolist()) == dict(
      enumerate(spec.splits['train'].class_counts))


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


@pytest.mark.parametrize('mode,check', [
    ('rescale', lambda x: 0 <= x.min() and x.max() <= 1),
    ('[-1,1]', lambda x: -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1),
    ('none', lambda x: x.max() > 200),
])
def test_normalizations(data_dir, mode, check):
  images, _ = _all(input_pipeline.make_dataset(
      data_dir, 'train', batch_size=8, training=False, normalize=mode))
  assert check(images)


def test_standardize_uses_train_statistics(data_dir):
  images, _ = _all(input_pipeline.make_dataset(
      data_dir, 'train', batch_size=8, training=False, normalize='standardize'))
  # JPEG round trip moves the statistics a little from the build's.
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0, atol=0.05)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1, atol=0.05)


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


def test_repeat_with_steps(data_dir):
  ds = input_pipeline.make_dataset(data_dir, 'train', batch_size=4,
                                   training=True, repeat=True, seed=1)
  assert len(list(ds.take(50))) == 50


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
