"""End-to-end builds with Beam's DirectRunner on fixtures written to tmp dirs."""

import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import builder
from pipelines.folder_to_records import splits
from pipelines.common.errors import UserError
from tests import helpers
import tfrecords_schema
from tfrecords_schema import metadata
from tfrecords_schema import schema


def _records(data_dir: pathlib.Path, split: str) -> list[dict]:
  spec = tfrecords_schema.read_dataset_spec(str(data_dir))
  out = []
  for serialized in tf.data.TFRecordDataset(spec.shard_paths(str(data_dir), split)):
    parsed = schema.parse_examples(serialized)
    out.append({k: v.numpy() for k, v in parsed.items()})
  return out


def _rejected(data_dir: pathlib.Path) -> dict:
  lines = (data_dir / metadata.REJECTED_FILE).read_text().splitlines()
  return {json.loads(l)['path']: json.loads(l) for l in lines}


@pytest.fixture(scope='module')
def messy_build(tmp_path_factory):
  """Real photos + every kind of bad file, built once for several tests."""
  root = tmp_path_factory.mktemp('messy')
  images = root / 'images'
  good = helpers.make_photo_folder(images, per_class=6)
  bad = helpers.add_bad_files(images)
  # Same bytes twice in one class, and once more in another class.
  shutil.copy(images / 'cat' / 'chelsea_0.jpg', images / 'cat' / 'copy.jpg')
  shutil.copy(images / 'coffee' / 'coffee_0.jpg', images / 'rocket' / 'c.jpg')
  bad.update({'cat/copy.jpg': 'duplicate', 'coffee/coffee_0.jpg':
              'label_conflict', 'rocket/c.jpg': 'label_conflict'})
  del good['coffee/coffee_0.jpg']
  # A PNG behind a .jpg extension: a good image, written with a warning.
  helpers.save(images / 'rocket' / 'really_png.jpg',
               Image.fromarray(helpers.photo('rocket')[:200, :300]), format='PNG')
  good['rocket/really_png.jpg'] = 'rocket'
  out = root / 'out'
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='64,96', validation_fraction=0.3,
                         test_fraction=0.2, seed=7, quiet=True)
  return images, out, report, good, bad


def test_every_file_is_written_or_rejected_with_a_reason(messy_build):
  images, out, report, good, bad = messy_build
  all_files = {str(p.relative_to(images)).replace(os.sep, '/')
               for p in images.rglob('*') if p.is_file() or p.is_symlink()}
  counts = report['counts']
  assert counts['seen'] == len(all_files)
  assert counts['written'] == len(good)
  assert sum(v for k, v in counts.items() if k != 'seen') == counts['seen']
  rejected = _rejected(out)
  # Of identical bytes the first path in sorted order is kept:
  # cat/chelsea_0.jpg, not cat/copy.jpg.
  assert {p: r['outcome'] for p, r in rejected.items()} == bad
  assert rejected['cat/copy.jpg']['reason'] == (
      'exact duplicate of cat/chelsea_0.jpg (written once)')
  assert all(r['reason'] for r in rejected.values())
  written = set()
  for split in ('train', 'validation', 'test'):
    for record in _records(out, split):
      written.add(record[schema.FILENAME].decode())
  assert written | set(rejected) == all_files
  assert written == set(good)
  assert 'cat/chelsea_0.jpg' in written


def test_labels_match_folders_and_keras_class_order(messy_build):
  import keras  # pylint: disable=g-import-not-at-top
  images, out, report, _, _ = messy_build
  keras_ds = keras.utils.image_dataset_from_directory(
      str(images), image_size=(8, 8), batch_size=4, verbose=False)
  assert report['class_names'] == keras_ds.class_names
  for split in ('train', 'validation', 'test'):
    for record in _records(out, split):
      folder = record[schema.FILENAME].decode().split('/')[0]
      assert report['class_names'][record[schema.LABEL]] == folder


def test_report_has_splits_stats_and_findings(messy_build):
  _, out, report, _, _ = messy_build
  per_split = {s: report['splits'][s]['total'] for s in report['splits']}
  assert sum(per_split.values()) == report['counts']['written']
  assert all(per_split.values())  # 17 images over 3 splits: none empty here.
  assert len(report['train_mean']) == 3 and len(report['train_std']) == 3
  assert all(0 < m < 255 for m in report['train_mean'])
  assert [c['classes'] for c in report['conflicts']] == [['coffee', 'rocket']]
  assert len(report['duplicates']) == 1
  assert report['warnings'] == [{'path': 'rocket/really_png.jpg',
                                 'warning': 'extension .jpg but content is PNG'}]
  # The statistics are those of the train images as stored (JPEG, so within
  # a little of the pixels the build summed before encoding).
  pixels = np.concatenate([
      np.asarray(Image.open(io.BytesIO(r[schema.IMAGE])).convert('RGB'),
                 np.float64).reshape(-1, 3) for r in _records(out, 'train')])
  np.testing.assert_allclose(report['train_mean'], pixels.mean(0), atol=1.0)
  np.testing.assert_allclose(report['train_std'], pixels.std(0), atol=1.0)
  # Throughput is what was written over the time the run took.
  assert 0 < report['elapsed_s'] < 600
  assert report['images_per_s'] == pytest.approx(
      report['counts']['written'] / report['elapsed_s'], rel=0.01, abs=0.1)
  spec = tfrecords_schema.read_dataset_spec(str(out))
  assert (spec.height, spec.width, spec.channels) == (64, 96, 3)
  assert spec.mean == tuple(report['train_mean'])


def _grid_cells(path, count):
  """Cells of a plot_sample_grid picture of `count` images (4 to 10 columns,
  row by row): ink share (non-white pixels) and mean colour of each."""
  cols = max(4, min(10, int(np.ceil(np.sqrt(count)))))
  rows = -(-count // cols)
  with Image.open(path) as picture:
    pixels = np.asarray(picture.convert('RGB')).astype(np.float64)
  height, width = pixels.shape[:2]
  cells = []
  for i in range(rows * cols):
    r, c = divmod(i, cols)
    cell = pixels[r * height // rows:(r + 1) * height // rows,
                  c * width // cols:(c + 1) * width // cols]
    ink = (255 - cell).max(axis=-1) > 30
    image_rows = ink.mean(axis=1) > 0.5  # Not the title above the image.
    image_cols = ink[image_rows].mean(axis=0) > 0.5 if image_rows.any() else (
        image_rows[:0])
    colour = (cell[image_rows][:, image_cols].reshape(-1, 3).mean(axis=0)
              if image_cols.any() else None)
    cells.append((ink.mean(), colour))
  return cells


def test_samples_png_shows_stored_train_images_of_every_class(messy_build):
  _, out, report, _, _ = messy_build
  by_class = {}
  for record in _records(out, 'train'):
    by_class.setdefault(int(record[schema.LABEL]), []).append(
        schema.decode_image(record[schema.IMAGE], image_format='jpeg',
                            height=64, width=96, channels=3).numpy())
  assert sorted(by_class) == [0, 1, 2]  # Every class has train images.
  # Up to 4 per class, class by class (plots.write_dataset_samples).
  expected = [c for c in sorted(by_class) for _ in by_class[c][:4]]
  cells = _grid_cells(out / 'samples.png', len(expected))
  means = {c: np.mean(images, axis=(0, 1, 2)) for c, images in by_class.items()}
  for i, (ink, colour) in enumerate(cells):
    if i >= len(expected):
      assert ink < 0.05, f'cell {i} should be empty'
      continue
    assert ink > 0.3, f'cell {i} has no image'
    nearest = min(means, key=lambda c: np.abs(means[c] - colour).sum())
    assert report['class_names'][nearest] == report['class_names'][
        expected[i]], f'cell {i} does not look like its class'


def test_output_loads_with_tfds_builder_from_directory(messy_build):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _, out, report, _, _ = messy_build
  tfds_builder = tfds.builder_from_directory(str(out))
  assert tfds_builder.info.features['label'].names == report['class_names']
  assert tfds_builder.info.splits['train'].num_examples == (
      report['splits']['train']['total'])
  examples = list(tfds_builder.as_dataset(split='train'))
  assert len(examples) == report['splits']['train']['total']
  assert examples[0]['image'].shape == (64, 96, 3)
  assert examples[0]['image'].dtype == tf.uint8
  image, label = next(iter(tfds_builder.as_dataset(split='validation',
                                                    as_supervised=True)))
  assert image.shape == (64, 96, 3) and label.dtype == tf.int64


def test_split_folders_keep_splits_and_report_leaks(tmp_path, capsys):
  images = tmp_path / 'horse-or-human'
  helpers.photo_folder(images, layout='splits',
                       classes={'horses': 'chelsea', 'humans': 'astronaut'},
                       per_class={'train': 4, 'validation': 2},
                       formats=('png',), name='{split}{i}')
  shutil.copy(images / 'train' / 'humans' / 'train0.png',
              images / 'validation' / 'humans' / 'leaked.png')
  out = tmp_path / 'out'
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='32', image_format='png', channels=1,
                         validation_fraction=0.3, samples=False,
                         stratified=True)
  # The folders are the splits: a fraction given is said to do nothing,
  # and the report records none.
  err = capsys.readouterr().err
  assert ('[build] --validation_fraction=0.3 has no effect: --input_dir is '
          'split already') in err and '--test_fraction' not in err
  assert '[build] --stratified=true has no effect' in err
  saved = json.loads((out / 'build_report.json').read_text())
  assert saved['validation_fraction'] is None is saved['test_fraction']
  assert report['dataset_name'] == 'horse_or_human'
  assert report['layout'] == 'split_folders'
  assert report['splits']['train']['per_class'] == {'horses': 4, 'humans': 4}
  assert report['splits']['validation']['per_class'] == {'horses': 2, 'humans': 2}
  assert report['counts']['leak'] == 1
  assert _rejected(out)['validation/humans/leaked.png']['outcome'] == 'leak'
  assert report['leaks'][0]['kept'] == 'train/humans/train0.png'
  for split in ('train', 'validation'):
    for record in _records(out, split):
      name = record[schema.FILENAME].decode()
      assert name.startswith(split + '/')
      assert report['class_names'][record[schema.LABEL]] == name.split('/')[1]
  spec = tfrecords_schema.read_dataset_spec(str(out))
  image = schema.decode_image(_records(out, 'train')[0][schema.IMAGE],
                              image_format='png', height=32, width=32, channels=1)
  assert image.shape == (32, 32, 1) and spec.channels == 1


def _small_folder(root: pathlib.Path, per_class: int = 40) -> pathlib.Path:
  helpers.photo_folder(root, classes={'a': 'chelsea', 'b': 'coffee'},
                       per_class=per_class, formats=('jpg',), size=(120, 90),
                       name='{i:03d}')
  return root


def test_byte_identical_shards_with_one_or_two_worker_processes(tmp_path):
  images = _small_folder(tmp_path / 'images', per_class=70)  # Several chunks.
  runs = {
      'one': [],
      'two': ['--direct_num_workers=2', '--direct_running_mode=multi_processing'],
  }
  shards = {}
  for name, extra in runs.items():
    out = tmp_path / name
    result = helpers.run_cli(
        'pipelines.build', f'--input_dir={images}', f'--output_dir={out}',
        '--image_size=48', '--shard_size_mb=0.05', *extra,
        env={'PYTHONHASHSEED': str(len(name) * 11)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'files read: ' in result.stderr  # The progress line.
    assert 'images/s' in result.stdout  # Summary table.
    shards[name] = {p.name: p.read_bytes() for p in sorted(out.glob('*.tfrecord-*'))}
  assert len(shards['one']) > 2  # Several shards per split were written.
  assert shards['one'] == shards['two']


@pytest.mark.parametrize('args,message', [
    (['--input_dir={tmp}/nope', '--output_dir={tmp}/out'], 'does not exist'),
    (['--input_dir={images}', '--output_dir={tmp}/out', '--image_size=big'],
     '--image_size=big'),
    (['--input_dir={images}', '--output_dir={tmp}/out',
      '--validation_fraction=0.7', '--test_fraction=0.5'], 'keep their sum'),
    (['--input_dir={images}', '--output_dir={tmp}/full'], 'never replaces'),
    (['--input_dir={images}', '--output_dir={tmp}/out', '--channels=2'],
     'channels'),
])
def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path, args, message):
  images = _small_folder(tmp_path / 'images', per_class=2)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('precious')
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  args = [a.format(tmp=tmp_path, images=images) for a in args]
  result = helpers.run_cli('pipelines.build', *args)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = helpers.error_lines(result.stderr)
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before


def test_overwrite_replaces_only_a_dataset(tmp_path):
  images = _small_folder(tmp_path / 'images', per_class=3)
  out = tmp_path / 'out'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='16',
                quiet=True)
  with pytest.raises(UserError, match='--overwrite'):
    builder.build(input_dir=str(images), output_dir=str(out), quiet=True)
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='24', overwrite=True, quiet=True)
  assert tfrecords_schema.read_dataset_spec(str(out)).height == 24
  assert report['counts']['written'] == 6
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'thesis.tex').write_text('x')
  with pytest.raises(UserError, match='not a dataset built by this toolkit'):
    builder.build(input_dir=str(images), output_dir=str(other),
                  overwrite=True, quiet=True)
  assert (other / 'thesis.tex').read_text() == 'x'
  with pytest.raises(UserError, match='overlap'):
    builder.build(input_dir=str(images), output_dir=str(images / 'a' / 'x'),
                  quiet=True)
  assert not list(tmp_path.glob('.*'))  # No temporary folders left behind.


def test_failed_run_leaves_no_dataset(tmp_path, monkeypatch):
  images = _small_folder(tmp_path / 'images', per_class=3)

  def crash(*args, **kwargs):
    raise RuntimeError('simulated crash while finalizing')

  monkeypatch.setattr(beam_build, 'finalize', crash)
  with pytest.raises(Exception, match='simulated crash'):
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  quiet=True)
  assert not (tmp_path / 'out').exists()
  assert not list(tmp_path.glob('.*'))


def test_killed_run_leaves_nothing_that_looks_like_a_dataset(tmp_path,
                                                             capsys):
  images = _small_folder(tmp_path / 'images', per_class=400)
  out = tmp_path / 'out'
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.build', f'--input_dir={images}',
       f'--output_dir={out}', '--image_size=32'],
      cwd=helpers.REPO_ROOT, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  for line in process.stderr:
    if 'files read' in line or time.time() > deadline:
      break
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not out.exists()
  # A killed build leaves its lock file (the lock itself died with it: see
  # test_hostile_build) and its hidden, incomplete folder.
  leftovers = [l for l in tmp_path.glob('.*') if l.name != '.out.lock']
  assert [l.name.startswith('.out.incomplete-') for l in leftovers] == [True]
  with pytest.raises(metadata.DatasetError, match='not a dataset built'):
    tfrecords_schema.read_dataset_spec(str(leftovers[0]))
  # The rerun (holding the lock: no other build of out runs) finds it all
  # a build's own files, removes it and says so.
  capsys.readouterr()
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8')
  assert (f'[build] removed 1 temporary folder(s) that stopped builds left '
          f'beside --output_dir: {leftovers[0].name}\n') in (
              capsys.readouterr().err)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['images', 'out']


def test_commit_by_copy_puts_metadata_last_and_replaces_old(tmp_path,
                                                              monkeypatch):
  """The object-store commit (no folder rename), run on local folders."""
  tmp, out = tmp_path / '.new.incomplete', tmp_path / 'new'
  tmp.mkdir()
  for name in ('a-train.tfrecord-00000-of-00001', 'metadata.json', 'zz.json'):
    (tmp / name).write_text(name)
  out.mkdir()
  (out / 'build_report.json').write_text(json.dumps(
      {'toolkit': metadata.TOOLKIT_MARKER, 'dataset_name': 'old',
       'splits': {'train': {'num_shards': 2}}}))  # Ours: may be replaced.
  (out / 'old-train.tfrecord-00001-of-00002').write_text('old')
  copied = []
  original = tf.io.gfile.copy
  monkeypatch.setattr(tf.io.gfile, 'copy', lambda a, b, *args, **kw: (
      copied.append(os.path.basename(b)), original(a, b, *args, **kw)))
  builder._commit(str(tmp), str(out), replace=True, by_copy=True)  # pylint: disable=protected-access
  assert copied[-1] == 'metadata.json'
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ['a-train.tfrecord-00000-of-00001', 'metadata.json', 'zz.json'])
  assert (out / 'metadata.json').read_text() == 'metadata.json'
  assert not tmp.exists()


def test_a_class_thin_in_validation_is_named_with_the_fix(tmp_path, capsys):
  """The hash split gives each file its split by itself: a small class can
  get few validation images. At half its share or less it is named."""
  images = tmp_path / 'images'
  helpers.photo_folder(images, classes={'big': 'chelsea'}, per_class=20,
                       size=24)
  helpers.photo_folder(images, classes={'small': 'rocket'}, per_class=4,
                       size=24)
  hashes = [hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((images / 'small').iterdir())]

  def small_in_validation(seed):
    return sum(splits.assign_split(h, seed=seed, validation_fraction=0.5,
                                   test_fraction=0.0) == 'validation'
               for h in hashes)

  seeds = {n: next(s for s in range(200) if small_in_validation(s) == n)
           for n in (1, 2)}
  for got, seed in seeds.items():
    report = builder.build(input_dir=str(images),
                           output_dir=str(tmp_path / f'out{seed}'),
                           image_size='8', validation_fraction=0.5, seed=seed,
                           samples=False)
    assert report['splits']['validation']['per_class']['small'] == got
    out = capsys.readouterr().out  # The summary.
    named = ("warning: class 'small': 1 image in validation, 2.0 expected "
             '(--validation_fraction=0.5)')
    assert (named in out) == (got == 1), out  # 2 of 2 expected: not named.
    assert "class 'big'" not in out
    assert ('add images to the class' in out) == (got == 1)  # The fix.
  # --stratified: exact shares per class, whatever the seed.
  report = builder.build(input_dir=str(images), output_dir=str(tmp_path / 's'),
                         image_size='8', validation_fraction=0.5,
                         seed=seeds[1], samples=False, stratified=True)
  assert report['splits']['validation']['per_class'] == {'big': 10, 'small': 2}
  assert report['stratified'] and 'warning' not in capsys.readouterr().out
