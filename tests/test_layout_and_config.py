"""The layout's promises: what each entry point imports, settings defined once."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pipelines.common import paths
from tests import helpers

_IMPORTED = ('import sys, json, {module}; print(json.dumps(sorted(m for m in '
             "('tensorflow', 'keras', 'apache_beam') if m in sys.modules)))")


def _heavy_imports(module: str) -> list[str]:
  """Which of TensorFlow, Keras, Beam importing `module` loads (fresh process)."""
  result = subprocess.run([sys.executable, '-c', _IMPORTED.format(
      module=module)], cwd=helpers.REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('module', [
    'pipelines.common.cli', 'pipelines.common.errors', 'trainer.config',
    'trainer.main', 'pipelines.records_to_batches.augment_config',
    'pipelines.preprocessing.model_input', 'pipelines.data_service'])
def test_light_modules_import_neither_tensorflow_nor_beam(module):
  # trainer.main imports TensorFlow only once training starts: --help and a
  # flag typo answer at once.
  assert _heavy_imports(module) == []


def test_the_trainer_never_imports_beam():
  # One process for all three: imports only add modules, so Beam absent
  # after the last means none of them loaded it.
  assert 'apache_beam' not in _heavy_imports(
      'trainer.train_lib, trainer.predict, trainer.export')


def test_a_build_of_a_local_folder_never_loads_tensorflow(tmp_path):
  """The build's launcher reads and writes local files with `os` and
  Pillow, and TFDS writes its metadata without TensorFlow: a whole build
  (samples.png and report.html included) runs without its 3-6 s start,
  and draws samples.png without matplotlib."""
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=3)
  out = tmp_path / 'out'
  argv = ['pipelines.build', f'--input_dir={images}', f'--output_dir={out}',
          '--image_size=32']
  result = subprocess.run(
      [sys.executable, '-c', helpers.RUN_CLI.format(
          argv=argv, module='pipelines.build')],
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=300,
      check=True)
  code, loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert code in ('0', 'None'), result.stderr[-3000:]
  assert loaded == [], result.stderr[-3000:]
  for name in ('metadata.json', 'dataset_info.json', 'features.json',
               'samples.png', 'report.html'):
    assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize('module', ['trainer.main', 'trainer.predict',
                                    'pipelines.build', 'pipelines.data_service'])
def test_help_exits_0_and_lists_every_setting_without_tensorflow(module):
  argv = [module, '--helpshort']
  result = subprocess.run(
      [sys.executable, '-c', helpers.RUN_CLI.format(argv=argv, module=module)],
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=120,
      check=True)
  code, loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert code == '0' and loaded == [], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  if module == 'trainer.main':
    from trainer import config  # pylint: disable=g-import-not-at-top
    for field in dataclasses.fields(config.TrainConfig):
      assert (f'--{field.name}:' in result.stdout or
              f'--[no]{field.name}:' in result.stdout), field.name


def test_predict_answers_a_mistyped_model_dir_before_tensorflow_loads(
    tmp_path):
  """And once TensorFlow loads (here: a config without an export), a
  command's process has not loaded scikit-learn (cli.skip_unused_imports)."""
  error, loaded = helpers.refusal(
      'trainer.predict', f'--model_dir={tmp_path}/nope', 'x.png')
  assert f'--model_dir={tmp_path}/nope does not exist' in error
  assert loaded == []
  from pipelines.preprocessing import model_input  # pylint: disable=g-import-not-at-top
  from trainer import config  # pylint: disable=g-import-not-at-top
  helpers.write(tmp_path / 'run' / config.MODEL_CONFIG_FILE, json.dumps(
      config.ModelConfig('small_cnn', ('a', 'b'), model_input.ModelInput(
          8, 8, 3, 'png', 8, 8)).to_json_dict()).encode())
  error, loaded = helpers.refusal(
      'trainer.predict', f'--model_dir={tmp_path}/run', 'x.png')
  assert f'{tmp_path}/run/{config.EXPORT_DIR}' in error
  # Not sklearn, though installed (Keras itself loads matplotlib).
  assert {'keras', 'tensorflow'} <= set(loaded) and 'sklearn' not in loaded


def test_every_command_skips_unused_imports_before_tensorflow():
  # The process check above runs predict; the other commands' first lines
  # (before TensorFlow can load) are read here.
  for module in ('trainer.main', 'trainer.predict', 'pipelines.build',
                 'pipelines.data_service'):
    source = (pathlib.Path(helpers.REPO_ROOT) /
              (module.replace('.', '/') + '.py')).read_text()
    head = source.split("if __name__ == '__main__':", 1)
    assert len(head) == 2 and 'tensorflow' not in head[0].split(
        '"""', 2)[-1], module
    assert 'cli.skip_unused_imports(' in head[1].split('\n\n', 1)[0], module


def test_a_mistyped_path_is_refused_before_tensorflow_loads(tmp_path):
  # TensorFlow takes seconds to start; a typo should not wait for it.
  error, loaded = helpers.refusal('pipelines.build', f'--input_dir={tmp_path}/nope',
                           f'--output_dir={tmp_path}/out')
  assert f'--input_dir={tmp_path}/nope does not exist' in error
  assert loaded == []
  (tmp_path / 'file').write_text('x')
  error, loaded = helpers.refusal('pipelines.build', f'--input_dir={tmp_path}/in',
                           f'--output_dir={tmp_path}/file')
  assert 'is a file' in error and loaded == []
  (tmp_path / 'theirs').mkdir()
  (tmp_path / 'theirs' / 'notes.txt').write_text('keep me')
  error, loaded = helpers.refusal('pipelines.build', f'--input_dir={tmp_path}/in',
                           f'--output_dir={tmp_path}/theirs')
  assert 'never replaces' in error and loaded == []
  (tmp_path / 'photos' / 'cats').mkdir(parents=True)
  (tmp_path / 'photos' / 'cats' / 'a.jpg').write_bytes(b'')
  error, loaded = helpers.refusal('trainer.main', f'--data_dir={tmp_path}/photos',
                           f'--model_dir={tmp_path}/run')
  assert 'is a folder of images' in error and loaded == []
  error, loaded = helpers.refusal('trainer.main', f'--data_dir={tmp_path}/photos',
                           f'--model_dir={tmp_path}/run', '--model=resnet')
  assert '--model=resnet is not a model; choose one of' in error
  assert loaded == []
  error, loaded = helpers.refusal('trainer.main', f'--data_dir={tmp_path}/nope',
                           f'--model_dir={tmp_path}/run')
  assert f'--data_dir={tmp_path}/nope does not exist' in error
  assert loaded == []
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('kind', ['fifo', 'device', 'huge', 'not_utf8'])
def test_a_metadata_file_that_is_not_small_text_is_one_line(tmp_path, kind):
  from tfrecords_schema import metadata  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'data'
  data.mkdir()
  path = data / metadata.METADATA_FILE
  if kind == 'fifo':
    os.mkfifo(path)  # Opened for reading, it would block forever.
  elif kind == 'device':
    os.symlink('/dev/zero', path)  # Read, it would never end.
  elif kind == 'huge':
    with open(path, 'wb') as f:
      f.truncate(metadata.MAX_METADATA_BYTES + 1)  # Sparse: no disk used.
  else:
    path.write_bytes(b'\xff\xfe{}')
  error, loaded = helpers.refusal('trainer.main', f'--data_dir={data}',
                           f'--model_dir={tmp_path}/run')
  assert error.startswith(f'error: {path} is ') and 'rebuild' in error, error
  assert '\n' not in error and loaded == []


@pytest.mark.parametrize('module,kind', [
    ('trainer.main', 'fifo'), ('pipelines.build', 'zero'),
    ('trainer.predict', 'nested')])
def test_a_flagfile_that_is_not_a_text_file_is_one_line(tmp_path, module,
                                                        kind):
  """absl reads a --flagfile whole with open(): a FIFO would wait forever
  and /dev/zero fill the memory, before any flag is read; also when a flag
  file names it."""
  special = tmp_path / 'flags'
  if kind == 'zero':
    os.symlink('/dev/zero', special)
  else:
    os.mkfifo(special)
  given = special
  if kind == 'nested':  # Past a '--' line too, as absl reads on.
    given = tmp_path / 'outer'
    given.write_text(f'--image_size=64\n--\n--flagfile= {special}\n')
  what = 'a character device' if kind == 'zero' else 'a FIFO (named pipe)'
  error, loaded = helpers.refusal(module, f'--flagfile={given}')
  assert error == (f'error: --flagfile={special} is not a regular file but '
                   f'{what}; pass a text file of flags, one --name=value a '
                   'line'), error
  assert loaded == []


@pytest.mark.parametrize('kind,reason', [
    ('fifo', 'is not a regular file but a FIFO'),
    ('device', 'is not a regular file but a character device'),
    ('huge', 'is over'), ('not_utf8', 'is not UTF-8 text'),
    ('not_json', 'Expecting value')])
def test_json_files_read_back_are_read_without_blocking(tmp_path, kind,
                                                        reason):
  """Every JSON file a tool reads back from a folder (a run's state.json and
  metrics.json, predict's model_config.json, an import's source file) goes
  through paths.read_json: what is not a small JSON file is a ValueError
  that says why, and nothing blocks or is read without end."""
  path = tmp_path / 'state.json'
  if kind == 'fifo':
    os.mkfifo(path)
  elif kind == 'device':
    os.symlink('/dev/zero', path)
  elif kind == 'huge':
    with open(path, 'wb') as f:
      f.truncate(paths.SMALL_JSON_BYTES + 1)
  else:
    path.write_bytes(b'\xff\xfe{}' if kind == 'not_utf8' else b'{"a": ')
  with pytest.raises(ValueError, match=reason):
    paths.read_json(str(path))
  path.unlink()
  path.write_text('{"a": [1]}')
  assert paths.read_json(str(path)) == {'a': [1]}


def _flag_defaults(module: str) -> dict:
  """{flag name: default} of a command's own flags, from a fresh process."""
  code = (f'import json; from absl import flags; import {module}; '
          f'print(json.dumps({{f.name: f.default for f in '
          f'flags.FLAGS.get_flags_for_module("{module}")}}))')
  result = subprocess.run([sys.executable, '-c', code], cwd=helpers.REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_train_setting_is_a_flag_with_the_same_default():
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  from trainer import config  # pylint: disable=g-import-not-at-top
  defaults = _flag_defaults('trainer.main')
  fields = dataclasses.fields(config.TrainConfig)
  assert set(defaults) == {f.name for f in fields}
  for field in fields:
    expected = field.default if field.default is not dataclasses.MISSING else None
    if field.name == 'augment':
      expected = augment_config.to_text(expected)
    assert defaults[field.name] == expected, field.name


def test_every_build_setting_is_a_flag_with_the_same_default():
  from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top
  defaults = _flag_defaults('pipelines.build')
  fields = dataclasses.fields(builder.BuildSettings)
  assert set(defaults) == {f.name for f in fields}
  for field in fields:
    expected = field.default if field.default is not dataclasses.MISSING else None
    assert defaults[field.name] == expected, field.name


_FLAGS_TO_CONFIG = r"""
import json
import pathlib
from absl import flags
from trainer import main
flags.FLAGS(['main', '--data_dir=d', '--model_dir=m', '--image_size=24,40',
             '--augment=rotation_range=10,zoom_range=0.9:1.1', '--epochs=3'])
config = main.config_from_flags()
print(json.dumps({'image_size': config.image_size, 'epochs': config.epochs,
                  'augment': repr(config.augment)}))
"""


def test_flags_become_the_typed_config():
  # A fresh process: trainer.main and trainer.predict both define --model_dir.
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, '-c', _FLAGS_TO_CONFIG],
                          cwd=helpers.REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['image_size'] == [24, 40] and out['epochs'] == 3
  expected = augment_config.AugmentConfig(rotation_range=10.0,
                                          zoom_range=(0.9, 1.1))
  assert out['augment'] == repr(expected)
  assert augment_config.parse(augment_config.to_text(expected)) == expected
  assert augment_config.parse('course') == augment_config.COURSE
  assert augment_config.parse('none') is None


def test_model_config_round_trips_and_reads_older_files():
  from pipelines.preprocessing.model_input import ModelInput  # pylint: disable=g-import-not-at-top
  from trainer import config  # pylint: disable=g-import-not-at-top
  model_input = ModelInput(stored_height=32, stored_width=32, channels=3,
                           image_format='jpeg', height=24, width=40,
                           normalize='[-1,1]', resize_mode='crop',
                           jpeg_quality=90)
  record = config.ModelConfig(model='transfer', class_names=('a', 'b'),
                              model_input=model_input)
  data = json.loads(json.dumps(record.to_json_dict()))
  assert config.ModelConfig.from_json_dict(data) == record
  assert record.single_unit and not dataclasses.replace(
      record, class_names=('a', 'b', 'c')).single_unit
  older = {k: v for k, v in data.items()
           if k not in ('stored_height', 'stored_width', 'max_pixels')}
  loaded = config.ModelConfig.from_json_dict(older).model_input
  assert loaded.stored_size == (24, 40)  # Older files: stored = read size.
  with pytest.raises(ValueError, match='lacks class_names'):
    config.ModelConfig.from_json_dict([1, 2])


@pytest.mark.parametrize('text, needle', [
    ('rotation_range=abc', 'rotation_range'), ('crop_range=0.5', 'crop_range'),
    ('horizontal_flip=1', 'horizontal_flip'), ('zoom_range=1:2:3', 'zoom_range'),
    ('fill_mode=mirror', 'fill_mode'), ('rotaton_range=3', 'unknown'),
    ('rotation', 'key=value'), ('zoom_range=1:x', 'zoom_range'),
    # NaN passes every `<` check and inf makes NaN coordinates: either
    # trained a model of NaN weights that then crashed writing its JSON.
    ('rotation_range=nan', 'rotation_range=nan must be a finite number'),
    ('width_shift_range=inf', 'finite'), ('rotation_range=1e400', 'finite'),
    ('brightness_range=nan:nan', 'finite'), ('zoom_range=nan', 'finite'),
    # Zoom factors must be 0 < low <= high (0:0 zoomed every image to one
    # pixel; 1.2:0.8 and -1 were taken as they came).
    ('zoom_range=0:0', 'zoom factors'), ('zoom_range=1.2:0.8', 'zoom factors'),
    ('zoom_range=-1', 'zoom factors'), ('zoom_range=1', 'zoom factors')])
def test_bad_augment_text_is_a_value_error_naming_the_option(text, needle):
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=needle):
    augment_config.parse(text)
