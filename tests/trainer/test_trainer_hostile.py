"""Trainer and predict on hostile input: one `error:` line, nothing destroyed.

The promise (see pipelines/common/errors.py): a user mistake or a damaged file ends
`python -m trainer.main` / `python -m trainer.predict` with exactly one line
`error: ...` that names the bad value and the fix, never a traceback, and
nothing the user already has is overwritten. Cases that used to end in a
traceback run the real command line; the rest call train_lib directly.

One dataset (3 classes of real photos, 28x28) is built and one run trained
(1 epoch) for the whole module; each test copies what it damages.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import warnings

import keras
import numpy as np
import pytest

from pipelines.folder_to_records import builder
from pipelines.records_to_batches import input_pipeline
from pipelines.common.errors import UserError
from tests import helpers
import tfrecords_schema
from trainer import predict
from trainer import train_lib

TRAIN_SHARD = 'photos-train.tfrecord-00000-of-00001'
BATCH = 4


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('hostile_trainer')
  helpers.make_photo_folder(root / 'photos', per_class=6)
  builder.build(input_dir=str(root / 'photos'), output_dir=str(root / 'data'),
                image_size='28', validation_fraction=0.25, test_fraction=0.2,
                seed=1, quiet=True, samples=False)
  train_lib.train_and_evaluate(_config(root / 'data', root / 'run'))
  return types.SimpleNamespace(root=root, photos=root / 'photos',
                               data=root / 'data', run=root / 'run')


def _config(data_dir, model_dir, *, epochs=1, **kwargs):
  return train_lib.TrainConfig(
      data_dir=str(data_dir), model_dir=str(model_dir), epochs=epochs,
      batch_size=BATCH, early_stopping_patience=0, **kwargs)


def _train_args(data_dir, model_dir, *extra):
  return (f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--epochs=1',
          f'--batch_size={BATCH}', '--early_stopping_patience=0', *extra)


def _snapshot(folder: pathlib.Path) -> dict:
  """relative path -> (mtime_ns, sha256) of every file under folder."""
  out = {}
  for path in sorted(folder.rglob('*')):
    if path.is_file():
      out[str(path.relative_to(folder))] = (
          path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).digest())
  return out


def _one_error(result, *needles: str) -> str:
  """The single `error:` line of a failed command; it must hold the needles."""
  assert result.returncode not in (0, None), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = helpers.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def _one_line(error: UserError, *needles: str) -> str:
  text = str(error)
  assert '\n' not in text, text
  for needle in needles:
    assert needle in text, (needle, text)
  return text


def _copy_data(env, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(env.data, tmp_path / 'data'))


# Damaged datasets: the shard named, the rebuild command given.


def test_truncated_shard_names_the_shard_and_the_rebuild(env, tmp_path):
  data = _copy_data(env, tmp_path)
  shard = data / TRAIN_SHARD
  shard.write_bytes(shard.read_bytes()[:-700])  # Cut inside the last record.
  result = helpers.run_cli('trainer.main',
                           *_train_args(data, tmp_path / 'run'))
  _one_error(result, str(shard), 'damaged',
             f'python -m pipelines.build --input_dir={env.photos} '
             f'--output_dir={data} --overwrite')
  assert not (tmp_path / 'run').exists()


def test_flipped_byte_in_a_shard_names_the_shard(env, tmp_path):
  data = _copy_data(env, tmp_path)
  shard = data / TRAIN_SHARD
  content = bytearray(shard.read_bytes())
  content[len(content) // 2] ^= 0xFF  # Same size: only the CRC can tell.
  shard.write_bytes(bytes(content))
  # In process: the command prints this UserError as its one line (the
  # truncated shard above checks the command line itself).
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(data, tmp_path / 'run'))
  _one_line(raised.value, str(shard), 'damaged', 'pipelines.build',
            '--overwrite')
  assert not (tmp_path / 'run').exists()


# --model_dir and --cache: refused up front, nothing created.


def test_special_files_in_the_run_or_its_cache_are_refused(env, tmp_path):
  """A resumed run reads and writes its folder's files, and tf.data its
  cache's, without looking first: a FIFO there would block forever (a
  state.json FIFO also made the run start over, silently)."""
  run = pathlib.Path(shutil.copytree(env.run, tmp_path / 'run'))
  state = run / 'checkpoint' / 'state.json'
  state.unlink()
  os.mkfifo(state)
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, run, epochs=2))
  _one_line(raised.value, f'--model_dir={run}: {state} is not a regular '
            'file but a FIFO', 'move it away')
  config = _config(env.data, tmp_path / 'other', cache=str(tmp_path / 'c'))
  spec = tfrecords_schema.read_dataset_spec(str(env.data))
  train, _ = train_lib._cache_files(  # pylint: disable=protected-access
      config, spec, train_lib.run_model_input(config, spec).size)
  os.mkfifo(train + '.index')
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(config)
  _one_line(raised.value, f'{train}.index is not a regular file but a FIFO',
            f'delete {train}* and rerun')
  # A bucket "folder" is refused as a local one is (it made hidden objects
  # named .<key>.train... in it).
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, tmp_path / 'third',
                                         cache='gs://bucket/cache/'))
  _one_line(raised.value, '--cache=gs://bucket/cache/ is a folder',
            '--cache=gs://bucket/cache/cache')


def test_a_damaged_cache_is_named_not_the_dataset(env, tmp_path):
  """The --cache is this run's copy of the data: when it is damaged, the
  line names it and says to delete it (not to rebuild the dataset)."""
  cache = tmp_path / 'c'
  train_lib.train_and_evaluate(_config(env.data, tmp_path / 'first',
                                       cache=str(cache)))
  (data,) = tmp_path.glob('c.*.train.data-*')
  content = bytearray(data.read_bytes())
  content[100:300] = bytes(200)
  data.write_bytes(bytes(content))
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, tmp_path / 'second',
                                         cache=str(cache)))
  text = _one_line(raised.value, f'--cache={cache}: a file of the cache is '
                   'damaged', f'delete {cache}.* and rerun')
  assert 'pipelines.build' not in text


def test_model_dir_that_is_a_file(env, tmp_path):
  victim = helpers.write(tmp_path / 'notes' / 'notes.txt', b'mine')
  before = _snapshot(tmp_path)
  result = helpers.run_cli('trainer.main', *_train_args(env.data, victim))
  _one_error(result, f'--model_dir={victim}', 'is a file')
  assert _snapshot(tmp_path) == before
  with pytest.raises(UserError) as raised:  # A file on the way to it.
    train_lib.train_and_evaluate(_config(env.data, victim / 'run'))
  _one_line(raised.value, str(victim), 'is a file')


def test_cache_in_a_missing_folder(env, tmp_path):
  cache = tmp_path / 'missing' / 'dir' / 'cache'
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, tmp_path / 'run',
                                         cache=str(cache)))
  _one_line(raised.value, f'--cache={cache}', str(cache.parent),
            'does not exist')
  assert not (tmp_path / 'run').exists()
  assert not (tmp_path / 'missing').exists()


def test_memory_cache_refusal_speaks_in_flags(env, tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, '_available_memory_bytes', lambda: 1000)
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, tmp_path / 'run',
                                         cache='memory'))
  text = _one_line(raised.value, '--cache=memory', '--cache=/path/to/file')
  assert 'cache="' not in text and 'cache=None' not in text  # Library talk.
  assert not (tmp_path / 'run').exists()


# Resuming: refused before anything is written, only the differences named.


def test_other_settings_name_only_the_differing_flags(env):
  before = _snapshot(env.run)
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(train_lib.TrainConfig(
        data_dir=str(env.data), model_dir=str(env.run), epochs=1,
        batch_size=8, seed=3, early_stopping_patience=0))
  # Not `_config`: every other setting the same as the saved run.
  text = _one_line(raised.value, f'--model_dir={env.run}',
                   '--batch_size: 4 in the saved run, 8 now',
                   '--seed: 0 in the saved run, 3 now')
  for unchanged in ('learning_rate', 'optimizer', 'data_dir', '{'):
    assert unchanged not in text, text
  assert _snapshot(env.run) == before  # train_samples.png included.


@pytest.mark.parametrize('damage', ['weights', 'state'])
def test_damaged_checkpoint_is_refused(env, tmp_path, damage):
  run = pathlib.Path(shutil.copytree(env.run, tmp_path / 'run'))
  name = {'weights': 'last.weights.h5', 'state': 'state.json'}[damage]
  path = run / 'checkpoint' / name
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  before = _snapshot(run)
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, run, epochs=2))
  _one_line(raised.value, str(path), 'checkpoint/')
  assert _snapshot(run) == before


# --data_dir that is not a dataset.


def test_photo_folder_as_data_dir_suggests_a_build_outside_it(env, tmp_path):
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.photos, tmp_path / 'run'))
  text = _one_line(raised.value, f'--input_dir={env.photos}', '--output_dir=')
  output = text.split('--output_dir=')[1].split('`')[0].split()[0]
  resolved = os.path.realpath(output)
  assert resolved != str(env.photos)
  assert not resolved.startswith(str(env.photos) + os.sep), output
  assert not (tmp_path / 'run').exists()


# trainer.predict.


def _predict_folder(root: pathlib.Path) -> list[str]:
  """Images in nested folders, plus what a folder expansion must skip."""
  photo = helpers.jpeg_bytes(helpers.photo('chelsea'))
  for rel in ('b/2.jpg', 'a/deeper/1.JPEG', 'a/0.png', 'b/.hidden.jpg',
              '.cache/3.jpg', 'a/notes.txt'):
    helpers.write(root / rel, photo)
  return [str(root / rel) for rel in ('a/0.png', 'a/deeper/1.JPEG', 'b/2.jpg')]


def test_predict_expands_folders(env, tmp_path):
  expected = _predict_folder(tmp_path / 'pictures')
  result = helpers.run_main_in_process('trainer.predict', f'--model_dir={env.run}',
                           str(tmp_path / 'pictures'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  lines = result.stdout.strip().splitlines()
  assert [l.split('\t')[0] for l in lines] == expected
  assert all(l.split('\t')[1] in ('cat', 'coffee', 'rocket') for l in lines)


def test_predict_folder_without_images_is_an_error_entry(tmp_path):
  (tmp_path / 'empty').mkdir()
  entries = list(predict.expand_paths([str(tmp_path / 'empty')]))
  assert len(entries) == 1 and 'no images' in entries[0][1]


def test_predict_into_a_closed_pipe_exits_quietly(env, tmp_path):
  _predict_folder(tmp_path / 'pictures')
  read_end, write_end = os.pipe()
  os.close(read_end)  # As `| head` that has already exited.
  process = subprocess.Popen(
      [sys.executable, '-m', 'trainer.predict', f'--model_dir={env.run}',
       str(tmp_path / 'pictures')], cwd=helpers.REPO_ROOT, stdout=write_end,
      stderr=subprocess.PIPE, text=True)
  os.close(write_end)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 141, stderr[-3000:]  # 128 + SIGPIPE.
  assert 'Traceback' not in stderr and 'BrokenPipe' not in stderr, stderr
  assert not helpers.error_lines(stderr)


def test_predict_bad_model_dir_is_one_line(env, tmp_path):
  image = helpers.write(tmp_path / 'x.jpg',
                        helpers.jpeg_bytes(helpers.photo('rocket')))
  missing = tmp_path / 'no_such_run'
  result = helpers.run_main_in_process('trainer.predict', f'--model_dir={missing}',
                           str(image))
  _one_error(result, f'--model_dir={missing}', 'does not exist')
  broken = pathlib.Path(shutil.copytree(env.run, tmp_path / 'run'))
  config = broken / 'model_config.json'
  for content, needles in ((b'{"class_na', ['not valid JSON']),
                           (b'\xff\xfe\x00garbage', ['not UTF-8 text']),
                           (b'[1, 2]', ['lacks class_names']),
                           (json.dumps({'class_names': ['a']}).encode(),
                            ['lacks', 'image_format'])):
    config.write_bytes(content)
    with pytest.raises(UserError) as raised:
      predict.load(str(broken))
    _one_line(raised.value, str(config), *needles, 'trainer.main')
  # A FIFO in its place is refused, never opened (open() would wait for a
  # writer forever).
  config.unlink()
  os.mkfifo(config)
  with pytest.raises(UserError) as raised:
    predict.load(str(broken))
  _one_line(raised.value, str(config), 'not a regular file but a FIFO')
  config.unlink()
  config.write_bytes((env.run / 'model_config.json').read_bytes())
  # So is one in the export, which TensorFlow's loader would open blindly.
  saved = broken / 'export' / 'saved_model.pb'
  saved.unlink()
  os.mkfifo(saved)
  with pytest.raises(UserError) as raised:
    predict.load(str(broken))
  _one_line(raised.value, str(saved), 'not a regular file but a FIFO')
  shutil.rmtree(broken / 'export')
  config.write_bytes((env.run / 'model_config.json').read_bytes())
  with pytest.raises(UserError) as raised:
    predict.load(str(broken))
  _one_line(raised.value, str(broken / 'export'))


def test_predict_reads_files_as_safely_as_the_build(env, tmp_path):
  """No hang on a FIFO, no memory on /dev/zero or a huge file, every name."""
  folder = tmp_path / 'hostile'
  folder.mkdir()
  os.mkfifo(folder / 'pipe.jpg')
  os.symlink('/dev/zero', folder / 'zero.png')
  with open(folder / 'movie.jpg', 'wb') as f:
    f.truncate(3 << 30)  # 3 GiB, sparse: over the default limit.
  photo = helpers.jpeg_bytes(helpers.photo('chelsea'))
  with open(os.path.join(os.fsencode(folder), b'\xff\xfe.jpg'), 'wb') as f:
    f.write(photo)
  helpers.write(folder / 'small.jpg', photo[:2000] + b'\xff\xd9')
  result = helpers.run_cli(
      'trainer.predict', f'--model_dir={env.run}', '--max_file_bytes=100000',
      str(folder), str(folder / 'pipe.jpg'), timeout=120,
      env={'PYTHONIOENCODING': 'utf-8:strict'})  # No surrogates printed.
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = dict(line.split('\t', 1) for line in result.stdout.splitlines())
  assert lines.pop(f'{folder}/\\xff\\xfe.jpg').split('\t')[0] in (
      'cat', 'coffee', 'rocket')
  assert lines == {
      f'{folder}/movie.jpg': 'error: file is 3221225472 bytes, over the '
                             'limit --max_file_bytes=100000',
      f'{folder}/pipe.jpg': 'error: not a regular file but a FIFO (named '
                            'pipe); only image files are read',
      f'{folder}/small.jpg': lines[f'{folder}/small.jpg'],
      f'{folder}/zero.png': 'error: not a regular file but a character '
                            'device; only image files are read',
  }
  assert lines[f'{folder}/small.jpg'].startswith('error: ')


# Wrong results are never a success: a diverged run fails and exports
# nothing; JSON outputs stay valid JSON; predict refuses NaN.


def _strict_json(path: pathlib.Path):
  def refuse(token):
    raise AssertionError(f'{path} holds {token}: not JSON')
  return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_run_fails_and_exports_nothing(env, tmp_path, capsys):
  run = tmp_path / 'run'

  def check(error: str):
    for needle in ('diverged in epoch 1', '--learning_rate',
                   'no model was saved or exported', 'nan'):
      assert needle in error, (needle, error)
    for name in ('best.keras', 'export', 'metrics.json', 'model_config.json'):
      assert not (run / name).exists(), name
    state = _strict_json(run / 'checkpoint' / 'state.json')
    assert state['rows'] == [] and state['stopped_early']

  result = helpers.run_cli('trainer.main', *_train_args(
      env.data, run, '--learning_rate=1e10', '--epochs=3'))
  assert 'Epoch 1/3' in result.stdout, result.stdout[-2000:]
  check(_one_error(result))
  # The rerun (in this process) ends the same way, without training again.
  capsys.readouterr()
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, run, epochs=3,
                                         learning_rate=1e10))
  check(_one_line(raised.value))
  assert 'Epoch 1/3' not in capsys.readouterr().out


def test_a_non_finite_epoch_is_not_recorded(env, tmp_path):
  from trainer import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(env.run / 'best.keras')
  resumable = callbacks_lib.ResumableTraining(str(tmp_path), patience=0)
  resumable.set_model(model)
  resumable.prepare()
  resumable.on_epoch_end(0, {'loss': 0.5, 'val_loss': 0.6})
  last = (tmp_path / 'checkpoint' / 'last.weights.h5').read_bytes()
  model.set_weights([w * float('nan') for w in model.get_weights()])
  resumable.on_epoch_end(1, {'loss': float('nan'), 'val_loss': float('inf')})
  assert model.stop_training and resumable.diverged
  assert [r['epoch'] for r in resumable.rows] == [1]
  assert 'diverged in epoch 2' in resumable.stop_reason
  assert (tmp_path / 'checkpoint' / 'last.weights.h5').read_bytes() == last
  state = _strict_json(tmp_path / 'checkpoint' / 'state.json')
  assert len(state['rows']) == 1 and state['stopped_early']


def test_json_ready_makes_every_output_valid_json():
  from trainer import report  # pylint: disable=g-import-not-at-top
  value = {'a': float('nan'), 'b': [1.0, float('inf'), {'c': -float('inf')}],
           'd': 'nan', 'e': 2}
  text = json.dumps(report.json_ready(value), allow_nan=False)
  assert json.loads(text) == {'a': None, 'b': [1.0, None, {'c': None}],
                              'd': 'nan', 'e': 2}


def test_predict_refuses_a_model_that_gives_nan(env, tmp_path):
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  from trainer import export as export_lib  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'nan_run'
  run.mkdir()
  model = keras.models.load_model(env.run / 'best.keras')
  model.set_weights([w * float('nan') for w in model.get_weights()])
  config = config_lib.ModelConfig.from_json_dict(json.loads(
      (env.run / 'model_config.json').read_text()))
  export_lib.export(model, str(run), config)
  image = helpers.write(tmp_path / 'cat.jpg',
                        helpers.jpeg_bytes(helpers.photo('chelsea')))
  result = helpers.run_main_in_process('trainer.predict', f'--model_dir={run}', '--json',
                           str(image))
  assert result.returncode == 1, result.stderr[-3000:]
  (line,) = result.stdout.splitlines()
  entry = json.loads(line, parse_constant=lambda token: pytest.fail(token))
  assert 'non-finite' in entry['error'] and 'probability' not in entry


# Where a run lives: never inside, at or around a dataset or its photos.


def test_model_dir_inside_or_around_data_or_photos_is_refused(env, tmp_path):
  data = _copy_data(env, tmp_path)
  for model_dir, needles in (
      (data / 'run1', ['is inside the dataset --data_dir']),
      (data, ['is the dataset']),
      (tmp_path, ['holds the dataset']),
      (env.photos / 'run', ['is inside the photo folder']),
      (env.photos, ['is the photo folder']),
      (data / 'sub' / 'deeper', ['is inside the dataset'])):
    before = _snapshot(tmp_path)
    with pytest.raises(UserError) as raised:
      train_lib.train_and_evaluate(_config(data, model_dir))
    _one_line(raised.value, f'--model_dir={model_dir}', *needles,
              'outside')
    assert _snapshot(tmp_path) == before
    assert not (env.photos / 'run').exists()
  # Another dataset above --model_dir counts too.
  other = _copy_data(env, tmp_path / 'other')
  with pytest.raises(UserError, match='inside the dataset folder'):
    train_lib.train_and_evaluate(_config(data, other / 'run'))


def test_paths_with_tilde_and_a_run_as_data_dir(env, tmp_path):
  home = tmp_path / 'home'
  shutil.copytree(env.data, home / 'data')
  shutil.copytree(env.run, home / 'run')
  result = helpers.run_cli('trainer.main', '--data_dir=~/data',
                           '--model_dir=~/data/run', env={'HOME': str(home)})
  _one_error(result, f'is inside the dataset --data_dir={home}/data')
  assert not (helpers.REPO_ROOT / '~').exists()
  result = helpers.run_cli('trainer.main', '--data_dir=~/run',
                           '--model_dir=~/run2', env={'HOME': str(home)})
  _one_error(result, 'is a training run', f'--data_dir={env.data}')


def test_predict_follows_folder_links_as_the_build_does(env, tmp_path):
  photo = helpers.jpeg_bytes(helpers.photo('chelsea'))
  outside = tmp_path / 'elsewhere'
  helpers.write(outside / 'linked.jpg', photo)
  folder = tmp_path / 'pictures'
  helpers.write(folder / 'a' / 'own.jpg', photo)
  os.symlink(outside, folder / 'again')  # Outside: followed.
  os.symlink(folder, folder / 'a' / 'loop')  # A parent: skipped, noted.
  os.symlink(outside, folder / 'a' / 'more')  # Read already: skipped.
  helpers.write(folder / 'notes.txt', b'x')
  result = helpers.run_main_in_process('trainer.predict', f'--model_dir={env.run}',
                           str(folder))
  assert result.returncode == 0, result.stderr[-3000:]
  assert [l.split('\t')[0] for l in result.stdout.splitlines()] == [
      f'{folder}/a/own.jpg', f'{folder}/again/linked.jpg']
  notes = [l for l in result.stderr.splitlines() if l.startswith('[predict]')]
  assert any(f'{folder}/a/loop' in n and 'not followed' in n for n in notes)
  assert any(f'{folder}/a/more' in n and 'not followed' in n for n in notes)
  assert any('1 file(s) without an image extension (notes.txt)' in n
             for n in notes), notes


# Pictures never stop the model's outputs, and stay readable at any class
# count.


def test_a_fresh_run_survives_a_failing_picture_reruns_and_refuses_a_rebuild(
    env, tmp_path, monkeypatch, capsys):
  """Three checks that each need a run of their own share one (training is the cost).

  A picture that fails to draw does not stop the model's outputs; the finished
  run reruns from relative paths without Keras' variable-loading warnings; the
  dataset rebuilt in place at another size is then refused, nothing touched.
  """
  from pipelines import plots  # pylint: disable=g-import-not-at-top
  data, run = _copy_data(env, tmp_path), tmp_path / 'run'
  with monkeypatch.context() as patch:
    def broken(*args, **kwargs):
      raise MemoryError('drawing failed')
    patch.setattr(plots, 'plot_confusion_matrix', broken)
    train_lib.train_and_evaluate(_config(data, run))
  for name in ('best.keras', 'metrics.json', 'export/saved_model.pb',
               'training_curves.png'):
    assert (run / name).exists(), name
  assert not (run / 'confusion_matrix.png').exists()

  monkeypatch.chdir(tmp_path)
  capsys.readouterr()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    metrics = train_lib.train_and_evaluate(_config('data', 'run', epochs=2))
  messages = [str(w.message) for w in caught]
  assert not [m for m in messages if 'Skipping variable loading' in m], messages
  assert 'resuming after epoch 1' in capsys.readouterr().err
  assert metrics['epochs_run'] == 2
  # The finished run, rerun: nothing is trained, evaluated or written again.
  before = _snapshot(run)
  again = train_lib.train_and_evaluate(_config('data', 'run', epochs=2))
  out = capsys.readouterr()
  assert again == metrics
  assert 'nothing left to train in --model_dir=run: it finished --epochs=2' in (
      out.err)
  assert 'Epoch' not in out.out and 'resuming' not in out.err
  assert 'validation accuracy' in out.out  # The summary, from metrics.json.
  assert _snapshot(run) == before

  builder.build(input_dir=str(env.photos), output_dir=str(data),
                image_size='32', validation_fraction=0.25, test_fraction=0.2,
                seed=1, quiet=True, samples=False, overwrite=True)
  before = _snapshot(run)
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(data, run, epochs=3))
  _one_line(raised.value, f'--data_dir={data}', 'another dataset', '28x28x3',
            '32x32x3', '--model_dir')
  assert _snapshot(run) == before
  assert 'resuming' not in capsys.readouterr().err


def test_the_confusion_picture_is_bounded_at_any_class_count(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from pipelines import plots  # pylint: disable=g-import-not-at-top
  k = 2000
  rng = np.random.default_rng(0)
  labels = rng.integers(0, k, 8000)
  predictions = labels.copy()
  predictions[:300] = (labels[:300] + 1) % k  # Planted confusions...
  predictions[:40] = 7  # ...and a big one.
  labels[:40] = 3
  matrix = np.zeros((k, k), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  top = plots.most_confused(matrix, 5)
  assert top[0] == (3, 7, 40) and [n for *_, n in top] == sorted(
      [n for *_, n in top], reverse=True)
  path = tmp_path / 'cm.png'
  plots.plot_confusion_matrix(matrix, [f'c{i}' for i in range(k)], str(path),
                              title='t')
  with Image.open(path) as image:
    assert image.size == (2200, 1100)  # Not k-sized.


@pytest.mark.parametrize('changes, needle', [
    (dict(learning_rate=float('inf')),
     '--learning_rate=inf must be a finite number > 0'),
    (dict(learning_rate=float('nan')), '--learning_rate=nan must be'),
    (dict(seed=-1), '--seed=-1 must be in [0, 4294967295]'),
    (dict(seed=2**32), '--seed=4294967296 must be'),
])
def test_numbers_out_of_range_are_refused_before_anything_is_written(
    env, tmp_path, changes, needle):
  """inf passed `> 0` (a traceback writing the NaN state, after the run
  folder was made); a seed out of numpy's range was numpy's traceback."""
  run = tmp_path / 'run'
  with pytest.raises(UserError) as raised:
    train_lib.train_and_evaluate(_config(env.data, run, **changes))
  assert needle in str(raised.value)
  assert not run.exists()


def test_a_nan_augmentation_is_one_line_and_writes_nothing(env, tmp_path):
  run = tmp_path / 'run'
  result = helpers.run_cli('trainer.main', *_train_args(
      env.data, run, '--augment=rotation_range=nan'))
  assert result.returncode == 1
  lines = helpers.error_lines(result.stderr)
  assert lines == ['error: --augment=rotation_range=nan: rotation_range=nan '
                   'must be a finite number'], result.stderr[-2000:]
  assert not run.exists()



@pytest.mark.parametrize('line', [
    'Corrupt JPEG data: premature end of data segment',
    'Corrupt JPEG data: 11 extraneous bytes before marker 0xd9'])
def test_libjpeg_notes_on_the_exports_own_copies_are_not_shown(line):
  """The export's JPEG check decodes altered copies of each JPEG on purpose
  (serving/jpeg.py): calling `serve` on a good 677-byte 50x40 JPEG made
  libjpeg print both lines, and trainer.predict showed the first, telling
  users a good file was corrupt. A damaged input is refused by the
  export's own error, which names it."""
  from pipelines.common import cli  # pylint: disable=g-import-not-at-top
  assert cli._NOISE.search(line)  # pylint: disable=protected-access


def test_a_second_trainer_on_a_run_folder_in_use_is_one_line(env, tmp_path):
  """Two trainers on one --model_dir both resumed from the same checkpoint
  and wrote every output over each other's. The first holds a lock on the
  folder (here: a trainer process started on it); the second is refused
  before it writes, and the first's files are untouched."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  # A run trained in this process (the fixture) is not left locked.
  fd = os.open(env.run, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  finally:
    os.close(fd)
  run = tmp_path / 'run'
  shutil.copytree(env.run, run)
  (run / config_lib.METRICS_FILE).unlink()  # Not finished: it would resume.
  before = {p: p.stat().st_mtime_ns for p in run.rglob('*') if p.is_file()}
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import fcntl, os, sys, time\n'
       f'fd = os.open({str(run)!r}, os.O_RDONLY)\n'
       'fcntl.flock(fd, fcntl.LOCK_EX)\nprint("locked", flush=True)\n'
       'time.sleep(600)'], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    result = helpers.run_cli('trainer.main', *_train_args(env.data, run))
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 1
  lines = helpers.error_lines(result.stderr)
  assert len(lines) == 1 and 'is in use by another trainer' in lines[0], (
      result.stderr[-2000:])
  assert {p: p.stat().st_mtime_ns for p in run.rglob('*')
          if p.is_file()} == before
  # Free again: the same run resumes and finishes (in this process: the
  # command's path to the lock is the one refused above).
  train_lib.train_and_evaluate(_config(env.data, run))
  assert (run / config_lib.METRICS_FILE).exists()


def test_a_run_written_between_reading_it_and_the_lock_is_refused(
    env, tmp_path, monkeypatch):
  """The lock comes at the first write, after the saved state was read: a
  trainer that ended in between (its state.json replaced) must not be
  resumed from the state read before it, nor written over."""
  from trainer import config as config_lib  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  shutil.copytree(env.run, run)
  (run / config_lib.METRICS_FILE).unlink()  # Not finished: it would resume.
  state = run / config_lib.CHECKPOINT_DIR / config_lib.STATE_FILE
  lock = train_lib._lock_model_dir  # pylint: disable=protected-access

  def other_trainer_ends_first(model_dir):
    copy = state.with_suffix('.other')
    copy.write_bytes(state.read_bytes())
    os.replace(copy, state)  # As another trainer commits an epoch.
    lock(model_dir)

  monkeypatch.setattr(train_lib, '_lock_model_dir', other_trainer_ends_first)
  with pytest.raises(UserError, match='was written by another trainer'):
    train_lib.train_and_evaluate(_config(env.data, run))
  assert not (run / config_lib.METRICS_FILE).exists()
