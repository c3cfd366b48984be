"""trainer.main --tfds: a TFDS image classification dataset trains through
the same input layer, export and predict as a built folder.

Nothing can be downloaded here, so the tests prepare TFDS datasets offline
with TFDS' own `store_as_tfds_dataset`: real handwritten digits (scikit-
learn), 28x28 grey, stored under the registered name `fashion_mnist`, which
`tfds.builder('fashion_mnist', data_dir=...)` then reads as prepared.
"""

import csv
import io
import json
import os
import pathlib
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pipelines import tfds_import
from pipelines.common.errors import UserError
from tests import helpers
from trainer import config as config_lib
from trainer import predict
from trainer import train_lib
import tfrecords_schema

TRAIN, TEST = 400, 100
# Fashion-MNIST's classes (from TFDS' code, which wins over stored names):
# the digits 0-9 stand in for them. 'T-shirt/top' has a '/'.
NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
         'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def _digits_28():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.stack([np.asarray(Image.fromarray(
      np.round(i * 255 / 16).astype(np.uint8)).resize(
          (28, 28), Image.Resampling.BILINEAR)) for i in digits.images])
  return images[..., None], digits.target.astype(np.int64)


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  images, labels = _digits_28()
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(28, 28, 1)),
      'label': tfds.features.ClassLabel(names=NAMES)})
  part = lambda a, b: tf.data.Dataset.from_tensor_slices(
      {'image': images[a:b], 'label': labels[a:b]})
  tfds.dataset_builders.store_as_tfds_dataset(
      name='fashion_mnist', version='3.0.1', features=features,
      split_datasets={'train': part(0, TRAIN),
                      'test': part(TRAIN, TRAIN + TEST)},
      data_dir=str(root))
  tfds.dataset_builders.store_as_tfds_dataset(
      name='no_images_here', version='1.0.0',
      features=tfds.features.FeaturesDict({
          'text': tfds.features.Text(),
          'label': tfds.features.ClassLabel(num_classes=2)}),
      split_datasets={'train': tf.data.Dataset.from_tensor_slices(
          {'text': ['a', 'b'], 'label': [0, 1]})}, data_dir=str(root))
  # A test split without labels (-1), as some TFDS datasets have.
  tfds.dataset_builders.store_as_tfds_dataset(
      name='unlabelled_test', version='1.0.0',
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(28, 28, 1)),
          'label': tfds.features.ClassLabel(names=['a', 'b'])}),
      split_datasets={
          'train': tf.data.Dataset.from_tensor_slices(
              {'image': images[:20], 'label': labels[:20] % 2}),
          'test': tf.data.Dataset.from_tensor_slices(
              {'image': images[20:26], 'label': np.full(6, -1)})},
      data_dir=str(root))
  return root


def test_the_dense_model_trains_on_fashion_mnist_from_tfds(tfds_dir, tmp_path,
                                                           capsys):
  run = tmp_path / 'run'
  # In this process (TensorFlow is loaded once per test file); the command
  # line's --tfds is tested below, up to where it needs TensorFlow.
  config = config_lib.TrainConfig(
      data_dir=None, model_dir=str(run), tfds='fashion_mnist',
      tfds_data_dir=str(tfds_dir), model='dense', epochs=3, batch_size=32,
      early_stopping_patience=0)
  metrics = train_lib.train_and_evaluate(config)
  assert '[tfds] fashion_mnist 3.0.1:' in capsys.readouterr().err
  data = tfds_dir / 'image_toolkit' / 'fashion_mnist' / '3.0.1'
  spec = tfrecords_schema.read_dataset_spec(str(data))
  assert (spec.height, spec.width, spec.channels) == (28, 28, 1)
  assert spec.class_names == tuple(NAMES)
  counts = {s: spec.splits[s].num_examples for s in spec.splits}
  # Validation carved from TFDS train (it has none), TFDS test kept.
  assert counts['train'] + counts['validation'] == TRAIN
  assert 0.1 * TRAIN < counts['validation'] < 0.3 * TRAIN
  assert counts['test'] == TEST
  assert json.loads((run / 'metrics.json').read_text()) == metrics
  assert metrics['evaluated_split'] == 'test'
  assert metrics['test_accuracy'] > 0.5  # Ten classes: chance is 0.1.
  with open(run / 'predictions.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  files = {r['split']: set() for r in rows}
  for r in rows:
    files[r['split']].add(r['file'])
  # Each file names its TFDS split and index: tfds.load(split='test[7:8]').
  assert files['test'] == {f'test[{i}]' for i in range(TEST)}
  assert all(f.startswith('train[') for f in files['validation'])
  summary = (run / 'model_summary.txt').read_text()
  assert 'Flatten' in summary and '(None, 128)' in summary
  assert 'Conv2D' not in summary
  # The export takes an uploaded picture's bytes: test[7] as a PNG, read
  # with the split syntax its file name gives.
  example = next(iter(tfds.as_numpy(tfds.load(
      'fashion_mnist', split='test[7:8]', data_dir=str(tfds_dir)))))
  buffer = io.BytesIO()
  Image.fromarray(example['image'][..., 0]).save(buffer, format='PNG')
  served, model_config = predict.load(str(run))
  out = served.serve(tf.constant([buffer.getvalue()]))
  probabilities = out['probabilities'].numpy()[0]
  test_row = next(r for r in rows if r['file'] == 'test[7]')
  np.testing.assert_allclose(
      probabilities, [float(test_row[n]) for n in spec.class_names],
      atol=1e-4)
  assert model_config.class_names[int(out['class_index'][0])] == (
      test_row['predicted'])
  assert test_row['given'] == NAMES[example['label']]
  # The same run again (in this process): the import is reused, nothing is
  # trained.
  capsys.readouterr()
  assert train_lib.train_and_evaluate(config) == metrics
  err = capsys.readouterr().err
  assert '[tfds]' not in err and 'nothing left to train' in err


@pytest.mark.parametrize('name, message', [
    ('no_images_here', '--tfds=no_images_here is not an image classification '
     'dataset: training needs an Image feature and a ClassLabel feature at '
     'its top level; it has label (ClassLabel), text (Text)'),
    ('Fashion MNIST', "--tfds='Fashion MNIST' is not a TFDS dataset name"),
    ('fashion_mnist\n', "--tfds='fashion_mnist\\n' is not a TFDS dataset "
     'name'),
    ('surely_not_a_dataset', '--tfds=surely_not_a_dataset: TFDS has no such '
     'dataset'),
])
def test_a_tfds_dataset_that_cannot_train_is_one_line(tfds_dir, tmp_path,
                                                     name, message):
  config = config_lib.TrainConfig(data_dir=None, model_dir=str(tmp_path),
                                  tfds=name, tfds_data_dir=str(tfds_dir))
  with pytest.raises(UserError) as raised:
    config_lib.with_tfds_data(config)
  assert message in str(raised.value)
  assert '\n' not in str(raised.value)


def test_the_command_takes_tfds_instead_of_data_dir(tfds_dir, tmp_path):
  # Its checks answer before TensorFlow loads: --tfds stands for --data_dir.
  error, loaded = helpers.refusal(
      'trainer.main', '--tfds=Fashion MNIST', f'--model_dir={tmp_path}/run')
  assert error.startswith("error: --tfds='Fashion MNIST' is not a TFDS "
                          'dataset name'), error
  assert loaded == []
  error, _ = helpers.refusal('trainer.main', f'--model_dir={tmp_path}/run')
  assert '--data_dir (or --tfds) are required' in error


def test_an_import_never_replaces_a_folder_it_did_not_write(tfds_dir,
                                                           tmp_path, capsys):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('keep me')
  with pytest.raises(UserError, match='is not a TFDS import'):
    tfds_import.import_dataset('fashion_mnist', tfds_data_dir=str(tfds_dir),
                               output_dir=str(mine))
  assert (mine / 'notes.txt').read_text() == 'keep me'
  assert [p.name for p in tmp_path.iterdir()] == ['mine']  # No leftovers.
  # A trailing slash names the same folder; its import is then reused.
  out = tfds_import.import_dataset('fashion_mnist', tfds_data_dir=str(
      tfds_dir), output_dir=f'{tmp_path}/imported/')
  assert out == str(tmp_path / 'imported')
  assert tfds_import.import_dataset('fashion_mnist', tfds_data_dir=str(
      tfds_dir), output_dir=out) == out
  # Another import (other settings, or another dataset) is not replaced.
  before = sorted(p.stat().st_mtime_ns for p in (tmp_path / 'imported').iterdir())
  for name, fraction in (('fashion_mnist', 0.5), ('unlabelled_test', 0.2)):
    with pytest.raises(UserError, match='holds the import of fashion_mnist'):
      tfds_import.import_dataset(name, tfds_data_dir=str(tfds_dir),
                                 output_dir=out, validation_fraction=fraction)
  assert sorted(p.stat().st_mtime_ns for p in (
      tmp_path / 'imported').iterdir()) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['imported', 'mine']
  # Examples without a label are left out, and said.
  capsys.readouterr()
  spec = tfrecords_schema.read_dataset_spec(tfds_import.import_dataset(
      'unlabelled_test', tfds_data_dir=str(tfds_dir),
      output_dir=str(tmp_path / 'unlabelled')))
  assert spec.splits['test'].num_examples == 0
  assert sum(spec.splits['train'].class_counts) + sum(
      spec.splits['validation'].class_counts) == 20
  assert ('unlabelled_test test: 6 examples without a class label' in
          capsys.readouterr().err)
  # A damaged import is imported again, not rebuilt from photos it never had.
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  version = json.loads((tmp_path / 'imported' / tfds_import.SOURCE_FILE
                        ).read_text())['version']
  assert input_pipeline.rebuild_hint(out) == (
      f'import it again: remove {out} and rerun trainer.main with '
      f'--tfds=fashion_mnist:{version} --data_dir={out}')
  # A source file that is a FIFO is not opened (a read would block): the
  # folder is refused as any other.
  fifo = tmp_path / 'fifo'
  fifo.mkdir()
  os.mkfifo(fifo / tfds_import.SOURCE_FILE)
  with pytest.raises(UserError, match='is not a regular file but a FIFO'):
    tfds_import.import_dataset('fashion_mnist', tfds_data_dir=str(tfds_dir),
                               output_dir=str(fifo))


def test_special_files_and_object_stores_are_refused_before_tfds_reads(
    tfds_dir, tmp_path):
  """TFDS opens its prepared files without looking first (a FIFO blocks it
  forever); an import writes a local folder and renames it, so a --data_dir
  on a store is refused (os.path made a local folder named 'gs:' of it)."""
  copy = pathlib.Path(shutil.copytree(tfds_dir, tmp_path / 'tfds'))
  (info,) = copy.glob('fashion_mnist/*/dataset_info.json')
  info.unlink()
  os.mkfifo(info)
  with pytest.raises(UserError, match=f'{info} is not a regular file but a '
                     'FIFO'):
    tfds_import.import_dataset('fashion_mnist', tfds_data_dir=str(copy),
                               output_dir=str(tmp_path / 'out'))
  for kwargs, what in (
      (dict(tfds_data_dir=str(tfds_dir), output_dir='gs://bucket/fm'),
       '--data_dir=gs://bucket/fm is on an object store'),
      (dict(tfds_data_dir='gs://bucket/tfds'),
       '--data_dir (by default inside --tfds_data_dir=gs://bucket/tfds) is '
       'on an object store')):
    with pytest.raises(UserError, match=re.escape(what)):
      tfds_import.import_dataset('fashion_mnist', **kwargs)
  assert not os.path.exists('gs:')
  assert not (tmp_path / 'out').exists()
