"""Trainer: models, heads, early stopping, resume, outputs, export, predict."""

import contextlib
import csv
import dataclasses
import io
import json
import os

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.records_to_batches import augment_config
from pipelines.folder_to_records import builder
from pipelines import sample_data
from pipelines.common.errors import UserError
from tests import helpers
from tests import ram_store
from trainer import callbacks as callbacks_lib
from trainer import export as export_lib
from trainer import models
from trainer import predict
from trainer import train_lib
import tfrecords_schema
from tfrecords_schema import schema


@pytest.mark.parametrize('name,size', [('small_cnn', 28), ('dense', 28),
                                       ('cats_dogs', 48), ('horses_humans', 96)])
def test_each_model_builds_and_trains_a_step_on_grey_images(name, size):
  # 3 channels and 3 classes of every entry: tests/trainer/test_model_table.py.
  channels = 1
  for num_classes in (2, 3):
    model = models.build_model(name, input_shape=(size, size, channels),
                               num_classes=num_classes)
    binary = num_classes == 2
    model.compile('adam', 'binary_crossentropy' if binary else
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((4, size, size, channels), np.float32)
    y = np.array([[0], [1], [0], [1]], np.float32) if binary else np.array(
        [0, 1, 2, 1])
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.output_shape == (None, 1 if binary else num_classes)


def test_transfer_model_loads_local_weights_and_freezes_base(tmp_path):
  base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                        input_shape=(32, 32, 3))
  weights = str(tmp_path / 'mobilenet_notop.weights.h5')
  base.save_weights(weights)
  model = models.build_model(
      'transfer', input_shape=(32, 32, 1), num_classes=3,
      base_model='mobilenet_v2', base_weights=weights,
      base_cutoff_layer='block_13_expand_relu')
  frozen = model.get_layer('mobilenet_v2_base')
  assert not frozen.trainable
  np.testing.assert_array_equal(frozen.get_layer('Conv1').get_weights()[0],
                                base.get_layer('Conv1').get_weights()[0])
  model.compile('adam', keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  model.train_on_batch(np.zeros((2, 32, 32, 1), np.float32), np.array([0, 2]))
  np.testing.assert_array_equal(frozen.get_layer('Conv1').get_weights()[0],
                                base.get_layer('Conv1').get_weights()[0])


def test_transfer_reads_the_course_legacy_h5_and_cuts_inception_at_mixed7(
    tmp_path):
  import tf_keras  # pylint: disable=g-import-not-at-top
  # The course downloads Keras 2 notop .h5 files; write one the same way.
  legacy = tf_keras.applications.MobileNetV2(include_top=False, weights=None,
                                             input_shape=(64, 64, 3))
  path = str(tmp_path / 'mobilenet_v2_notop.h5')
  legacy.save_weights(path)
  model = models.build_model('transfer', input_shape=(64, 64, 3),
                             num_classes=2, base_model='mobilenet_v2',
                             base_weights=path)
  np.testing.assert_array_equal(
      model.get_layer('mobilenet_v2_base').get_layer('Conv1').get_weights()[0],
      legacy.get_layer('Conv1').get_weights()[0])
  inception = models.build_model(
      'transfer', input_shape=(150, 150, 3), num_classes=2,
      base_model='inception_v3', base_weights='none',
      base_cutoff_layer='mixed7')
  assert inception.get_layer('inception_v3_base').output.shape == (
      None, 7, 7, 768)  # As in the course's cats-vs-dogs transfer notebook.


def test_transfer_fine_tunes_from_a_layer_and_resumes_there(binary_data,
                                                           tmp_path, capsys):
  """The course's fine-tuning: the base frozen for --epochs, then trainable
  from --fine_tune_from for --fine_tune_epochs more; a longer rerun resumes
  inside the fine-tuning phase (its optimizer state), a rerun of a finished
  one trains nothing."""
  run = tmp_path / 'run'
  config = train_lib.TrainConfig(
      data_dir=binary_data, model_dir=str(run), model='transfer',
      base_model='mobilenet_v2', base_weights='none', epochs=1,
      base_cutoff_layer='block_2_add',  # A small base: a fast test.
      fine_tune_from='block_2_expand', fine_tune_epochs=1,
      fine_tune_learning_rate=1e-4, batch_size=8, early_stopping_patience=0)
  metrics = train_lib.train_and_evaluate(config)
  err = capsys.readouterr().err
  assert 'fine-tuning from block_2_expand: epochs 2-2' in err
  assert metrics['epochs_run'] == 2 and metrics['fine_tune_start'] == 1
  state = json.loads((run / 'checkpoint' / 'state.json').read_text())
  # The best epoch of both phases is kept (and restored at the end).
  assert state['fine_tune_start'] == 1 and state['best_epoch'] in (1, 2)
  # The same command again: nothing is trained or written.
  assert train_lib.train_and_evaluate(config) == metrics
  assert 'nothing left to train' in capsys.readouterr().err
  # One more fine-tuning epoch: the run resumes inside the fine-tuning phase
  # (its trainable set and optimizer state restored; the frozen phase's
  # would not load) and trains epoch 3. (Training only: the export and
  # results are the first run's tests.)
  config = dataclasses.replace(config, fine_tune_epochs=2)
  spec = tfrecords_schema.read_dataset_spec(binary_data)
  resumed = train_lib._prepare(config, spec, None, None)  # pylint: disable=protected-access
  base = resumed.model.get_layer('mobilenet_v2_base')
  trainable = {l.name: l.trainable for l in base.layers}
  assert trainable['block_2_expand'] and trainable['block_2_add']
  assert not trainable['Conv1'] and not trainable['block_1_project']
  train_lib._fit(config, resumed, None)  # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert 'resuming after epoch 2' in err and 'fine-tuning from' not in err
  state = json.loads((run / 'checkpoint' / 'state.json').read_text())
  assert len(state['rows']) == 3 and state['fine_tune_start'] == 1
  with pytest.raises(models.ModelError, match='--fine_tune_from=block_99 is '
                     'not a layer of the base mobilenet_v2_base'):
    models.fine_tune_layers(resumed.model, 'block_99')


@pytest.mark.parametrize('kwargs,message', [
    (dict(name='resnet'), 'is not a model; choose one of small_cnn'),
    (dict(name='horses_humans', input_shape=(32, 32, 1)),
     'needs images of at least 94x94'),
    (dict(name='transfer'), 'cannot be downloaded'),
    (dict(name='transfer', base_weights='/nope.h5'), 'is not a file'),
])
def test_model_errors_say_what_to_do(kwargs, message):
  kwargs = {'input_shape': (64, 64, 3), 'num_classes': 2, **kwargs}
  with pytest.raises(models.ModelError, match=message):
    models.build_model(kwargs.pop('name'), **kwargs)




def test_early_stopping_stops_and_restores_the_best_weights(tmp_path):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile('sgd', 'mse')
  model.stop_training = False  # What fit() sets before the first epoch.
  callback = callbacks_lib.ResumableTraining(str(tmp_path), patience=2)
  callback.prepare()
  callback.set_model(model)
  weights_at = {}
  for epoch, val_loss in enumerate([1.0, 0.5, 0.7, 0.8, 0.1]):
    model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
    weights_at[epoch + 1] = model.get_weights()
    callback.on_epoch_end(epoch, {'loss': 1.0, 'val_loss': val_loss})
    if model.stop_training:
      break
  assert model.stop_training and callback.stopped_early
  assert len(callback.rows) == 4  # Epochs 3 and 4 did not improve.
  assert callback.best_epoch == 2
  callback.on_train_end()
  for got, want in zip(model.get_weights(), weights_at[2]):
    np.testing.assert_array_equal(got, want)
  with open(tmp_path / 'history.csv') as f:
    assert [int(r['epoch']) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_target_accuracy_stops_training(tmp_path):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.stop_training = False
  callback = callbacks_lib.ResumableTraining(str(tmp_path), target_accuracy=0.9)
  callback.prepare()
  callback.set_model(model)
  callback.on_epoch_end(0, {'accuracy': 0.5, 'val_loss': 1.0})
  assert not model.stop_training
  callback.on_epoch_end(1, {'accuracy': 0.95, 'val_loss': 1.0})
  assert model.stop_training and 'target_accuracy' in callback.stop_reason


@pytest.fixture(scope='module')
def binary_data(tmp_path_factory):
  """Two classes of real photo crops, 32x32 JPEG, with a test split.

  Written directly (no Beam build): these tests need a dataset, not the
  build's exact output.
  """
  return helpers.write_tiny_dataset(
      tmp_path_factory.mktemp('binary') / 'data',
      classes={'cats': 'chelsea', 'rockets': 'rocket'},
      per_class={'train': 12, 'validation': 6, 'test': 5}, size=32,
      shards={'train': 2}).path


@pytest.fixture(scope='module')
def trained(binary_data, tmp_path_factory):
  """A finished run (model_dir, metrics), trained once for several tests."""
  model_dir = str(tmp_path_factory.mktemp('trained') / 'run')
  metrics = train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=binary_data, model_dir=model_dir, model='small_cnn', epochs=2,
      batch_size=8, augment=augment_config.COURSE,
      early_stopping_patience=0))
  return model_dir, metrics


@pytest.fixture(scope='module')
def trained_run(trained):
  return trained[0]


def test_train_and_evaluate_writes_every_output(trained):
  model_dir, metrics = trained
  for name in ('best.keras', 'history.csv', 'metrics.json', 'model_config.json',
               'training_curves.png', 'confusion_matrix.png', 'train_samples.png',
               'classification_report.txt', 'export/saved_model.pb',
               'model_summary.txt', 'mistakes.png', 'predictions.csv',
               'suspect_labels.json'):
    assert os.path.exists(os.path.join(model_dir, name)), name
  assert 'small_cnn' in open(os.path.join(model_dir, 'model_summary.txt')).read()
  assert os.listdir(os.path.join(model_dir, 'tensorboard'))
  saved = json.load(open(os.path.join(model_dir, 'metrics.json')))
  for key in ('val_accuracy', 'val_loss', 'best_epoch', 'epochs_run',
              'stopped_early', 'test_accuracy', 'class_names', 'per_class'):
    assert key in saved, key
  assert saved == metrics
  assert saved['epochs_run'] == 2 and saved['class_names'] == ['cats', 'rockets']
  model = keras.models.load_model(os.path.join(model_dir, 'best.keras'))
  assert model.output_shape == (None, 1)  # Binary head.
  assert model.loss.__class__.__name__ == 'BinaryCrossentropy'


def test_predictions_csv_lists_every_evaluation_record_by_file(
    binary_data, trained):
  model_dir, metrics = trained
  spec = tfrecords_schema.read_dataset_spec(binary_data)
  expected = []  # (file, split, label) of every record, in record order.
  for split in ('validation', 'test'):
    for record in tf.data.TFRecordDataset(spec.shard_paths(binary_data, split)):
      example = schema.parse_examples(record)
      expected.append((example[schema.FILENAME].numpy().decode(), split,
                       spec.class_names[int(example[schema.LABEL])]))
  with open(os.path.join(model_dir, 'predictions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert [(r['file'], r['split'], r['given']) for r in rows] == expected
  for row in rows:
    p = [float(row[name]) for name in spec.class_names]
    assert sum(p) == pytest.approx(1, abs=1e-5)
    assert row['predicted'] == spec.class_names[int(np.argmax(p))]
    assert row['correct'] == str(row['predicted'] == row['given']).lower()
  # The test accuracy of metrics.json is the CSV's, file by file.
  test_rows = [r for r in rows if r['split'] == 'test']
  assert metrics['test_accuracy'] == pytest.approx(
      np.mean([r['correct'] == 'true' for r in test_rows]), abs=1e-6)
  suspects = json.load(open(os.path.join(model_dir, 'suspect_labels.json')))
  assert suspects['evaluated'] == len(rows)
  assert metrics['suspect_labels'] == suspects['suspects']
  assert {e['file'] for e in suspects['files']} <= {
      r['file'] for r in rows if r['correct'] == 'false'}


def test_export_matches_keras_model_on_the_same_bytes(binary_data, trained_run):
  model_dir = trained_run
  spec = tfrecords_schema.read_dataset_spec(binary_data)
  encoded = [schema.parse_examples(r)[schema.IMAGE].numpy() for r in
             tf.data.TFRecordDataset(spec.shard_paths(binary_data, 'test'))]
  served, config = predict.load(model_dir)
  out = served.serve(tf.constant(encoded))
  model = keras.models.load_model(os.path.join(model_dir, 'best.keras'))
  images = tf.stack([tf.io.decode_jpeg(  # Decoded as training does.
      e, channels=3, dct_method='INTEGER_ACCURATE') for e in encoded])
  p = model(tf.cast(images, tf.float32) / 255.0).numpy()[:, 0]
  np.testing.assert_allclose(out['probabilities'].numpy()[:, 1], p, atol=1e-5)
  assert config.class_names == ('cats', 'rockets')


def test_predict_prints_a_line_per_file_and_fails_on_bad_ones(trained_run,
                                                               tmp_path):
  model_dir = trained_run
  big = tmp_path / 'big_cat.webp'
  Image.fromarray(helpers.photo('chelsea')).save(big)  # Any size, any format.
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not a picture')
  misnamed = helpers.write(tmp_path / 'x.png', helpers.jpeg_bytes(
      helpers.photo('rocket')))  # PNG name, JPEG content: still predicted.
  result = helpers.run_cli('trainer.predict', f'--model_dir={model_dir}',
                           str(big), str(bad), str(misnamed))
  assert result.returncode == 1
  lines = result.stdout.strip().splitlines()
  assert lines[1].startswith(f'{bad}\terror: not a readable image')
  # Each line is the model's answer for that file: the exported model's
  # probabilities on the same bytes (its own TF decoder and resize, within
  # the 0.02 the serving parity tests allow), the top class when it leads
  # by more than that.
  served, config = predict.load(model_dir)
  for line, path in ((lines[0], big), (lines[2], misnamed)):
    probabilities = served.serve(tf.constant([path.read_bytes()]))[
        'probabilities'].numpy()[0]
    shown_path, cls, probability = line.split('\t')
    assert shown_path == str(path)
    assert float(probability) == pytest.approx(
        probabilities[config.class_names.index(cls)], abs=0.02)
    first, second = np.sort(probabilities)[::-1][:2]
    if first - second > 0.04:
      assert cls == config.class_names[int(np.argmax(probabilities))]
  result = helpers.run_main_in_process('trainer.predict',
                                      f'--model_dir={model_dir}', '--json',
                                      str(big))
  assert result.returncode == 0
  assert set(json.loads(result.stdout)) == {'path', 'class', 'probability'}


def test_predict_reads_a_run_and_images_on_an_object_store(trained_run,
                                                           tmp_path):
  """A finished run copied to a bucket serves from there (tests/ram_store:
  TensorFlow's ram:// as an object store), images there are read too."""
  bucket = f'{ram_store.SCHEME}://bucket-{tmp_path.name}'
  ram_store.copy_in(trained_run, f'{bucket}/run')
  cat = helpers.write(tmp_path / 'cat.jpg',
                      helpers.jpeg_bytes(helpers.photo('chelsea')))
  ram_store.copy_in(str(tmp_path), f'{bucket}/images')
  local = helpers.run_main_in_process(
      'trainer.predict', f'--model_dir={trained_run}', str(cat))
  remote = helpers.run_main_in_process(
      'trainer.predict', f'--model_dir={bucket}/run', str(cat),
      f'{bucket}/images/cat.jpg')
  assert (local.returncode, remote.returncode) == (0, 0), remote.stderr[-2000:]
  first, second = remote.stdout.splitlines()
  assert first == local.stdout.strip()
  assert second.split('\t')[1:] == first.split('\t')[1:]
  missing = helpers.run_main_in_process('trainer.predict',
                                        f'--model_dir={bucket}/nope', str(cat))
  assert missing.returncode == 1
  assert helpers.error_lines(missing.stderr) == [
      f'error: --model_dir={bucket}/nope does not exist; pass the '
      '--model_dir of a finished `python -m trainer.main` run']


def test_predict_top_k_and_csv(trained_run, tmp_path):
  model_dir = trained_run
  cat = helpers.write(tmp_path / 'cat.jpg',
                      helpers.jpeg_bytes(helpers.photo('chelsea')))
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not a picture')
  # Over the class count (2): every class, most probable first.
  result = helpers.run_main_in_process('trainer.predict',
                                      f'--model_dir={model_dir}', '--top_k=5',
                                      str(cat))
  assert result.returncode == 0, result.stderr[-2000:]
  path, *pairs = result.stdout.strip().split('\t')
  classes, probabilities = pairs[0::2], [float(p) for p in pairs[1::2]]
  assert path == str(cat) and sorted(classes) == ['cats', 'rockets']
  assert probabilities == sorted(probabilities, reverse=True)
  assert sum(probabilities) == pytest.approx(1, abs=2e-4)
  result = helpers.run_main_in_process('trainer.predict',
                                      f'--model_dir={model_dir}', '--json',
                                      '--top_k=2', str(cat))
  entry = json.loads(result.stdout)
  assert entry['top_k'] == [
      {'class': c, 'probability': p} for c, p in zip(classes, probabilities)]
  assert (entry['class'], entry['probability']) == (classes[0],
                                                    probabilities[0])
  # CSV: every class's probability; a failed file's row has the reason.
  result = helpers.run_main_in_process('trainer.predict',
                                      f'--model_dir={model_dir}', '--csv',
                                      str(cat), str(bad))
  assert result.returncode == 1
  header, good, failed = csv.reader(io.StringIO(result.stdout))
  assert header == ['path', 'class', 'probability', 'cats', 'rockets',
                    'error']
  assert good[:3] == [str(cat), classes[0], f'{probabilities[0]:.4f}']
  assert [float(p) for p in good[3:5]] == [
      probabilities[classes.index(c)] for c in ('cats', 'rockets')]
  assert sum(float(p) for p in good[3:5]) == pytest.approx(1, abs=2e-4)
  assert good[5] == ''
  assert failed[:5] == [str(bad), '', '', '', '']
  assert failed[5].startswith('not a readable image')
  # Class names that need quoting survive (the csv module quotes them).
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    predict._CsvOut(['a, "b"', 'c']).write(  # pylint: disable=protected-access
        {'path': 'x,y.jpg', 'class': 'c', 'probability': 0.75,
         'probabilities': [0.25, 0.75]})
  assert list(csv.reader(io.StringIO(out.getvalue()))) == [
      ['path', 'class', 'probability', 'a, "b"', 'c', 'error'],
      ['x,y.jpg', 'c', '0.7500', '0.2500', '0.7500', '']]
  for flags, message in ((['--top_k=0'], '--top_k=0 is out of range'),
                         (['--csv', '--json'], '--csv and --json'),
                         (['--csv', '--top_k=2'], 'drop --top_k')):
    result = helpers.run_main_in_process(
        'trainer.predict', f'--model_dir={model_dir}', *flags, str(cat))
    assert result.returncode == 1 and result.stdout == ''
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith('error: ') and message in line, line


def test_export_error_reason_is_the_refusal_without_graph_noise(trained_run):
  # What README's "Serving the export" shows: a refused input fails the
  # whole request; error_reason is the line that says which and why.
  served, _ = predict.load(trained_run)
  good_bytes = helpers.jpeg_bytes(helpers.photo('chelsea'))
  for refused, reason in (
      (b'not a picture', 'image_bytes[1]: not a JPEG, PNG, GIF, BMP or WebP '
       'image (13 bytes): send the bytes of an image file'),
      (good_bytes[:300], 'image_bytes[1]: corrupt JPEG header (libjpeg '
       'cannot read it)')):
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
      served.serve(tf.constant([good_bytes, refused]))
    assert raised.value.message.startswith('Graph execution error')
    assert export_lib.error_reason(raised.value) == reason


@pytest.mark.parametrize('args,message', [
    (['--data_dir={tmp}/nope'], 'does not exist'),
    (['--data_dir={data}', '--model=resnet'], 'choose one of small_cnn'),
    (['--data_dir={data}', '--model=horses_humans'], 'at least 94x94'),
    (['--data_dir={data}', '--augment=rotaton_range=3'], 'unknown augmentation'),
    # A run renames files into place: an object store cannot.
    (['--data_dir={data}', '--model_dir=gs://bucket/run'],
     'is on an object store, which cannot rename files'),
])
def test_cli_user_errors_are_one_line(binary_data, tmp_path, args, message):
  # Each is answered before TensorFlow loads (at once, not after ~5 s).
  args = [a.format(tmp=tmp_path, data=binary_data) for a in args]
  error, loaded = helpers.refusal('trainer.main',
                                  f'--model_dir={tmp_path / "run"}',
                                  '--batch_size=8', *args)
  assert message in error and '\n' not in error, error
  assert loaded == [], error
  assert not (tmp_path / 'run').exists()
  # Not a local folder named "gs:" either (what os.makedirs makes of it).
  assert not os.path.exists(os.path.join(helpers.REPO_ROOT, 'gs:'))


def test_empty_validation_split_is_a_clear_error(tmp_path):
  data = helpers.write_tiny_dataset(tmp_path / 'data', classes=('a', 'b'),
                                    per_class={'train': 3}, size=16)
  assert data.spec.splits['validation'].num_examples == 0
  with pytest.raises(UserError, match='empty validation split'):
    train_lib.train_and_evaluate(train_lib.TrainConfig(
        data_dir=data.path, model_dir=str(tmp_path / 'run'), batch_size=2))
  assert not (tmp_path / 'run').exists()  # Refused before any write.


def test_parse_augment_flag():
  assert augment_config.parse('course') == augment_config.COURSE
  assert augment_config.parse('none') is None
  assert augment_config.parse(
      'rotation_range=40,horizontal_flip=true,zoom_range=0.8:1.2') == (
          augment_config.AugmentConfig(rotation_range=40.0,
                                       horizontal_flip=True,
                                       zoom_range=(0.8, 1.2)))
  with pytest.raises(ValueError, match='not key=value'):
    augment_config.parse('rotation')


def test_end_to_end_on_real_handwritten_digits_finds_planted_label_errors(
    tmp_path):
  """Slower: scikit-learn's digits, 40 of them moved into the wrong class
  folder -> build -> train -> >= 0.9 on the clean held-out images, and
  suspect_labels.json lists most planted files that were held out."""
  sample_data.export_digits(str(tmp_path / 'digits'))
  rng = np.random.default_rng(0)
  files = sorted((tmp_path / 'digits').rglob('*.png'))
  planted = set()
  for i in rng.choice(len(files), size=40, replace=False):
    wrong = str((int(files[i].parent.name) + rng.integers(1, 10)) % 10)
    files[i].rename(tmp_path / 'digits' / wrong / files[i].name)
    planted.add(f'{wrong}/{files[i].name}')
  builder.build(input_dir=str(tmp_path / 'digits'),
                output_dir=str(tmp_path / 'data'), image_size='32', channels=1,
                image_format='png', validation_fraction=0.2, test_fraction=0.1,
                quiet=True)
  metrics = train_lib.train_and_evaluate(train_lib.TrainConfig(
      data_dir=str(tmp_path / 'data'), model_dir=str(tmp_path / 'run'),
      epochs=6, early_stopping_patience=0))
  assert metrics['class_names'] == [str(d) for d in range(10)]
  with open(tmp_path / 'run' / 'predictions.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  clean = [r['correct'] == 'true' for r in rows if r['file'] not in planted]
  assert np.mean(clean) >= 0.9
  held_out = planted & {r['file'] for r in rows}
  suspects = {e['file'] for e in json.loads(
      (tmp_path / 'run' / 'suspect_labels.json').read_text())['files']}
  assert len(held_out) >= 5
  assert len(suspects & held_out) >= 0.7 * len(held_out)  # Most found.
  assert len(suspects - held_out) <= len(held_out) // 2  # Few clean ones.


def test_flagfile_mixed_precision_mirrored_and_read_time_resize(binary_data,
                                                                tmp_path):
  model_dir = tmp_path / 'run'
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text('\n'.join([
      f'--data_dir={binary_data}', f'--model_dir={model_dir}', '--epochs=1',
      '--batch_size=8', '--mixed_precision', '--distribution=mirrored',
      '--image_size=40', '--augment=rotation_range=10,zoom_range=0.9:1.1',
      '--class_weight=balanced', '--conv_filters=8,16', '--dense_units=24',
      '--verbosity=0']))  # INFO logs: the strategy names itself.
  result = helpers.run_cli('trainer.main', f'--flagfile={flagfile}')
  assert result.returncode == 0, result.stderr[-2000:]
  # Every flag of the file is a setting of the run.
  state = json.loads((model_dir / 'checkpoint' / 'state.json').read_text())
  settings = state['fingerprint']
  assert settings['mixed_precision'] is True
  assert settings['distribution'] == 'mirrored'
  assert settings['image_size'] == [40, 40] and settings['batch_size'] == 8
  assert settings['augment'] == 'rotation_range=10,zoom_range=0.9:1.1'
  assert settings['class_weight'] == 'balanced'
  assert settings['conv_filters'] == [8, 16] and settings['dense_units'] == 24
  assert state['epochs_done'] == 1
  # The shape says which side is which; the weights are said (12 and 12
  # training images: both 1).
  assert '40 high x 40 wide x 3 channels' in result.stderr
  assert '--class_weight=balanced: loss weights cats 1, rockets 1' in (
      result.stderr)
  # The model was built and trained under a MirroredStrategy.
  assert 'Using MirroredStrategy with devices' in result.stderr
  # Mixed precision: 16-bit compute (bfloat16 on CPU), float32 variables.
  model = keras.models.load_model(model_dir / 'best.keras')
  assert [l.filters for l in model.layers
          if isinstance(l, keras.layers.Conv2D)] == [8, 16]
  head = model.get_layer('probability')
  hidden = [l for l in model.layers if l.weights and l is not head]
  assert len(hidden) >= 3 and all(
      l.dtype_policy.name in ('mixed_float16', 'mixed_bfloat16') and
      l.compute_dtype in ('float16', 'bfloat16') for l in hidden)
  assert head.compute_dtype == 'float32'  # The output stays float32.
  assert all(w.dtype == 'float32' for w in model.weights)
  # Read-time resize: the model reads 40x40 images of a 32x32 dataset, and
  # the export serves stored bytes as training read them.
  assert model.input_shape == (None, 40, 40, 3)
  config = json.loads((model_dir / 'model_config.json').read_text())
  assert (config['height'], config['width']) == (40, 40)
  spec = tfrecords_schema.read_dataset_spec(binary_data)
  assert (spec.height, spec.width) == (32, 32)
  encoded = [schema.parse_examples(r)[schema.IMAGE].numpy() for r in
             tf.data.TFRecordDataset(spec.shard_paths(binary_data, 'test'))]
  served, model_config = predict.load(str(model_dir))
  model_input = model_config.model_input
  images = tf.stack([model_input.read_resize(model_input.decode(e))
                     for e in encoded])
  assert images.shape == (len(encoded), 40, 40, 3)
  want = tf.cast(model(model_input.to_model(images)), tf.float32).numpy()
  got = served.serve(tf.constant(encoded))['probabilities'].numpy()[:, 1]
  np.testing.assert_allclose(got, want[:, 0], atol=2e-2)
