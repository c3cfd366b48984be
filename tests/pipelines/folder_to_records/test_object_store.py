"""Builds and updates whose datasets live on an object store (tests/
ram_store.py: TensorFlow's ram:// behaving as gs:// does, in-process)."""

import json
import os
import posixpath
import time

import pytest

from PIL import Image

from pipelines.folder_to_records import builder
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import failures
from pipelines.folder_to_records import reuse
from tests import helpers
from tests import ram_store
from tfrecords_schema import metadata

FLAGS = dict(image_size='32', shard_size_mb=0.02, quiet=True,
             beam_args=['--direct_num_workers=1',
                        '--direct_running_mode=in_memory'])


def _build(images, out, **kwargs):
  return builder.build(input_dir=str(images), output_dir=str(out),
                       **{**FLAGS, **kwargs})


def _changed_folder(tmp_path):
  """A photo folder, its first full build on the store, then changes of
  every kind: added, deleted, changed in place, moved to another class."""
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=6, formats=('jpg', 'png'))
  hour_ago = time.time() - 3600  # Older than the racy window.
  for path in images.rglob('*.*'):
    os.utime(path, (hour_ago, hour_ago))
  bucket = f'{ram_store.SCHEME}://bucket-{tmp_path.name}'
  first = _build(images, f'{bucket}/v1')
  cats = sorted(p.name for p in (images / 'cat').iterdir())
  (images / 'cat' / cats[0]).unlink()
  changed = images / 'cat' / cats[1]
  Image.open(changed).rotate(90).save(changed)
  os.replace(images / 'cat' / cats[2], images / 'rocket' / cats[2])
  helpers.photo_folder(images, classes={'coffee': 'astronaut'}, per_class=3,
                       name='new_{i}')
  return images, bucket, first


def test_old_and_new_datasets_on_the_store_give_the_full_builds_bytes(
    tmp_path, monkeypatch):
  ram_store.use(monkeypatch)
  images, bucket, first = _changed_folder(tmp_path)
  assert first['counts']['written'] > 0
  moved = _build(images, f'{bucket}/v2', reuse_from=f'{bucket}/v1')
  in_place = _build(images, f'{bucket}/v1', update=True)
  _build(images, tmp_path / 'full')
  for report in (moved, in_place):
    assert report['reuse']['from'] == f'{bucket}/v1'
    # Unchanged files were taken from the store; the changed, moved and new
    # ones were built, and the deleted and moved ones' old paths are gone.
    assert report['reuse']['reused'] == first['counts']['written'] - 3, (
        report['reuse'])
    assert report['reuse']['damaged'] == 0 and report['reuse']['gone'] == 2
  for name in ('v2', 'v1'):
    local = tmp_path / f'copy_{name}'
    ram_store.copy_out(f'{bucket}/{name}', str(local))
    assert reuse.differences(str(local), str(tmp_path / 'full')) == [], name
    # The pictures a build draws reach the store too.
    assert (local / 'samples.png').stat().st_size > 0
    assert (local / 'report.html').stat().st_size > 0


def test_earlier_records_that_cannot_be_read_are_built_not_rejected(
    tmp_path, monkeypatch):
  """A remote read of the earlier shards fails with the store client's own
  error (not an OSError): each of those files is built from its source, as
  a full build does; none is reported unreadable."""
  ram_store.use(monkeypatch)
  images, bucket, _ = _changed_folder(tmp_path)
  monkeypatch.setattr(
      ram_store.RamFileSystem, 'failing_reads',
      staticmethod(lambda path: path.startswith(f'{bucket}/v1/')
                   and '.tfrecord' in path))
  report = _build(images, f'{bucket}/v2', reuse_from=f'{bucket}/v1')
  assert report['reuse']['reused'] == 0 and report['reuse']['damaged'] > 0
  assert 'rejected_unreadable' not in report['counts']
  _build(images, tmp_path / 'full')
  ram_store.copy_out(f'{bucket}/v2', str(tmp_path / 'copy'))
  assert reuse.differences(str(tmp_path / 'copy'), str(tmp_path / 'full')) == []


def test_a_folder_on_the_store_builds_and_updates_as_the_same_local_folder(
    tmp_path, monkeypatch):
  """--input_dir on the store: listed through Beam's FileSystems, every file
  read from there (and, in an update, read and hashed: a store gives no
  modification time to trust)."""
  ram_store.use(monkeypatch)
  images = tmp_path / 'photos'
  helpers.photo_folder(images, per_class=6, formats=('jpg', 'png'))
  remote = f'{ram_store.SCHEME}://bucket-{tmp_path.name}/in/photos'
  ram_store.copy_in(str(images), remote)
  out = f'{ram_store.SCHEME}://bucket-{tmp_path.name}/out/photos'
  first = _build(remote, out)
  update = _build(remote, out, update=True)
  local = _build(images, tmp_path / 'local')
  assert first['counts'] == update['counts'] == local['counts']
  assert first['counts']['written'] == 18
  assert update['reuse']['reused'] == 18 and update['reuse']['built'] == 0
  ram_store.copy_out(out, str(tmp_path / 'copy'))
  # The records and every report are the local folder's but for where the
  # images were read from (input_dir, the TFDS description, report.html's
  # settings) and the files' modification times (a store gives none; each
  # line's checksum covers it).
  where = {'build_report.json': ('input_dir',),
           'dataset_info.json': ('description',),
           'images.jsonl': ('mtime_ns', 'check')}
  differ = reuse.differences(str(tmp_path / 'copy'), str(tmp_path / 'local'))
  assert sorted(differ) == sorted([*where, 'report.html'])
  for name, keys in where.items():
    copy, built = ([{k: v for k, v in value.items()
                     if k not in keys and k not in reuse.MAKING_KEYS}
                    for value in _json_values(tmp_path / folder / name)]
                   for folder in ('copy', 'local'))
    assert copy == built, name


def _json_values(path):
  """The objects of a .jsonl file, or the one of a .json file."""
  text = path.read_text()
  if path.suffix == '.jsonl':
    return [json.loads(line) for line in text.splitlines()]
  return [json.loads(text)]


def test_a_store_failure_while_copying_in_keeps_the_new_dataset(
    tmp_path, monkeypatch):
  """A store has no rename: the finished dataset is copied in after the
  earlier one's files are deleted. A copy that fails then (a 503) is one
  line, and the temporary folder, the only whole copy, is kept."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ram_store.use(monkeypatch)
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=3)
  out = f'{ram_store.SCHEME}://bucket-{tmp_path.name}/ds'
  _build(images, out)
  copy, copied = tf.io.gfile.copy, []

  def failing(source, destination, overwrite=False):
    if '.incomplete-' in source:
      copied.append(source)
      if len(copied) == 3:
        raise tf.errors.UnavailableError(None, None, '503 Service Unavailable')
    return copy(source, destination, overwrite=overwrite)

  monkeypatch.setattr(tf.io.gfile, 'copy', failing)
  with pytest.raises(failures.BuildFailed) as raised:
    _build(images, out, overwrite=True)
  message = str(raised.value)
  kept = posixpath.dirname(copied[0])
  assert message.startswith('the object store failed (UnavailableError: 503 '
                            'Service Unavailable)'), message
  assert f'the whole new dataset is kept in {kept}' in message
  assert '\n' not in message
  assert tf.io.gfile.exists(f'{kept}/{metadata.METADATA_FILE}')
  monkeypatch.setattr(tf.io.gfile, 'copy', copy)
  tf.io.gfile.rmtree(kept)  # What the line says to do.
  _build(images, out, overwrite=True)
  ram_store.copy_out(out, str(tmp_path / 'copy'))
  _build(images, tmp_path / 'local')
  assert reuse.differences(str(tmp_path / 'copy'),
                           str(tmp_path / 'local')) == []


def test_a_store_failure_while_building_is_one_line_and_keeps_the_dataset(
    tmp_path, monkeypatch):
  """A worker's write fails with the store client's own error (here a
  google.api_core-like ServiceUnavailable): one line, the earlier dataset
  as it was, no temporary folder left."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ram_store.use(monkeypatch)
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=3)
  out = f'{ram_store.SCHEME}://bucket-{tmp_path.name}/ds'
  _build(images, out)
  before = {name: tf.io.gfile.GFile(f'{out}/{name}', 'rb').read()
            for name in tf.io.gfile.listdir(out)}
  unavailable = type('ServiceUnavailable', (Exception,),
                     {'__module__': 'google.api_core.exceptions'})
  create = ram_store.RamFileSystem.create

  def failing(self, path, *args, **kwargs):
    if f'/{chunk_format.CHUNKS_DIR}/' in path:
      raise unavailable('503 backend error')
    return create(self, path, *args, **kwargs)

  monkeypatch.setattr(ram_store.RamFileSystem, 'create', failing)
  with pytest.raises(failures.BuildFailed) as raised:
    _build(images, out, overwrite=True)
  message = str(raised.value)
  assert message.startswith('the object store failed (ServiceUnavailable: '
                            '503 backend error'), message
  assert message.endswith(f'nothing was changed in --output_dir={out} (the '
                          'earlier dataset is kept); no temporary folder is '
                          'left'), message
  assert {name: tf.io.gfile.GFile(f'{out}/{name}', 'rb').read()
          for name in tf.io.gfile.listdir(out)} == before
  assert tf.io.gfile.listdir(posixpath.dirname(out)) == ['ds']
