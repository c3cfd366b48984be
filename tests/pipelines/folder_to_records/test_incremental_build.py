"""Incremental builds (--reuse_from, --update): byte-identical to a full build
of the same folder, whatever changed, and refused where they cannot be."""

import dataclasses
import json
import os
import pathlib
import shutil
import time
import zlib

import pytest
from PIL import Image

from pipelines.common.errors import UserError
from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import builder
from pipelines.folder_to_records import near_carry
from pipelines.folder_to_records import reuse
from tests import helpers
from tfrecords_schema import metadata
from tfrecords_schema import schema

# Small shards: records of one split spread over several shard files, so a
# record's place is found across shard boundaries.
FLAGS = dict(image_size='32', shard_size_mb=0.02, quiet=True)


def _build(images, out, **kwargs):
  return builder.build(input_dir=str(images), output_dir=str(out),
                       **{**FLAGS, **kwargs})


def _same_as_full(images, out, tmp_path, name='full', **kwargs):
  """Asserts `out` holds what a full build of `images` writes."""
  full = tmp_path / name
  _build(images, full, **kwargs)
  assert reuse.differences(str(out), str(full)) == []


def _folder(root: pathlib.Path) -> pathlib.Path:
  """30 photos, written an hour ago: older than the racy window."""
  helpers.photo_folder(root, per_class=10, formats=('jpg', 'png'))
  hour_ago = time.time() - 3600
  for path in root.rglob('*.*'):
    os.utime(path, (hour_ago, hour_ago))
  return root


def _lines(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _left_out_paths(dataset: pathlib.Path) -> set:
  """The file names in a dataset's left_out records."""
  names = set()
  for path in dataset.glob('left_out-*.tfrecord'):
    with open(path, 'rb') as f:
      for data in schema.read_records(f, max_record_bytes=1 << 30):
        names.add(schema.decode_example(data)[schema.FILENAME].decode())
  return names


def _save_copy(src: pathlib.Path, dst: pathlib.Path, scale: float) -> None:
  image = Image.open(src).convert('RGB')
  image.resize((int(image.width * scale), int(image.height * scale))).save(
      dst, quality=80)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(images, a full build of them) that tests copy, never change."""
  root = tmp_path_factory.mktemp('built')
  images = _folder(root / 'images')
  _build(images, root / 'v1')
  return images, root / 'v1'


def test_an_update_is_the_full_build_after_every_kind_of_change(tmp_path):
  images = _folder(tmp_path / 'images')
  _build(images, tmp_path / 'v1')
  cat = sorted((images / 'cat').iterdir())
  # Added, deleted, changed in place (another size), touched (same bytes,
  # a new time), renamed, moved to another class, a near copy and an exact
  # copy (another class: a label conflict) of kept files.
  helpers.photo_folder(images, classes={'cat': 'astronaut'}, per_class=3,
                       name='new_{i}')
  cat[0].unlink()
  _save_copy(cat[1], cat[1], 0.8)
  os.utime(cat[2])
  cat[3].rename(images / 'cat' / 'renamed.jpg')
  cat[4].rename(images / 'coffee' / cat[4].name)
  _save_copy(cat[5], images / 'rocket' / 'near_copy.jpg', 0.7)
  shutil.copy(cat[6], images / 'rocket' / f'exact_copy{cat[6].suffix}')
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  _same_as_full(images, tmp_path / 'v2', tmp_path)
  r = report['reuse']
  # 30 files before; 1 deleted, 1 changed, 2 renamed or moved: 26 unchanged
  # (the touched file hashed and found unchanged) are taken.
  # Built: 3 new, the changed, renamed and moved ones, the two copies.
  assert (r['reused'], r['built'], r['gone'], r['damaged']) == (
      26, 8, 3, 0), r
  # The copies it left out are kept, in the shards' format, for the next
  # update (and for a person to look at).
  left_out = _left_out_paths(tmp_path / 'v2')
  assert left_out == {line['path'] for line in _lines(
      tmp_path / 'v2' / metadata.REJECTED_FILE)
                      if line['outcome'] in ('label_conflict',
                                             'near_duplicate_leak')}
  assert 'rocket/exact_copy' + cat[6].suffix in left_out

  # A class added before the others (every class index moves) and one
  # removed, updated in place.
  helpers.photo_folder(images, classes={'aardvark': 'immunohistochemistry'},
                       per_class=4, name='a_{i}')
  shutil.rmtree(images / 'rocket')
  report = _build(images, tmp_path / 'v2', update=True)
  _same_as_full(images, tmp_path / 'v2', tmp_path, name='full2')
  # Only the new class is built: the copies left out last time too are
  # taken from the left_out files.
  assert report['reuse']['built'] == 4, report['reuse']
  spec = metadata.read_dataset_spec(str(tmp_path / 'v2'))
  assert spec.class_names == ('aardvark', 'cat', 'coffee')


def test_an_update_carries_the_near_duplicate_search_over(tmp_path,
                                                         monkeypatch):
  """A small change: the search is carried over (near_carry), not done
  again, and the dataset is the full build's; an earlier list of pairs
  that was edited is not carried over."""
  images = _folder(tmp_path / 'images')
  _build(images, tmp_path / 'v1')
  cat = sorted((images / 'cat').iterdir())
  _save_copy(cat[5], images / 'coffee' / 'near_copy.jpg', 0.7)
  carried = _carried_marker(tmp_path, monkeypatch)
  _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert carried.exists()
  _same_as_full(images, tmp_path / 'v2', tmp_path)
  pairs = _lines(tmp_path / 'v2' / metadata.NEAR_DUPLICATES_FILE)
  assert any('coffee/near_copy.jpg' in p['paths'] for p in pairs)
  # A line of the earlier list edited: its checksum no longer holds.
  listed = tmp_path / 'v2' / metadata.NEAR_DUPLICATES_FILE
  edited = listed.read_bytes().replace(b'"distance": ', b'"distance": 1', 1)
  assert edited != listed.read_bytes()
  listed.write_bytes(edited)
  _save_copy(cat[6], images / 'rocket' / 'near_copy.jpg', 0.8)
  carried.unlink()
  _build(images, tmp_path / 'v3', reuse_from=str(tmp_path / 'v2'))
  assert not carried.exists()
  _same_as_full(images, tmp_path / 'v3', tmp_path, name='full2')


def _carried_marker(tmp_path, monkeypatch) -> pathlib.Path:
  """A file that exists once an update carried the search over (Beam
  pickles the step with what it calls: a list would not come back)."""
  carried = tmp_path / 'carried'
  outputs = near_carry.carried_outputs
  monkeypatch.setattr(near_carry, 'carried_outputs', lambda *a, **k: (
      carried.touch(), outputs(*a, **k))[1])
  return carried


def test_an_earlier_exact_copy_edited_as_searched_is_not_trusted(
    tmp_path, monkeypatch):
  """An exact copy the earlier build left out, its rejected.jsonl outcome
  edited to a near leak (which the earlier search held): its counts no
  longer agree with the report, so no record counts as searched before,
  and the update, once the copy is kept, is the full build's (a review
  found it missing the copy's pairs)."""
  images = _folder(tmp_path / 'images')
  first = images / 'cat' / 'b_orig.jpg'
  _save_copy(sorted((images / 'cat').iterdir())[0], first, 1.0)
  shutil.copy(first, images / 'cat' / 'c_exact.jpg')
  _save_copy(first, images / 'coffee' / 'w_near.jpg', 0.8)
  _build(images, tmp_path / 'v1')
  rejected = tmp_path / 'v1' / metadata.REJECTED_FILE
  lines = _lines(rejected)
  assert [(x['path'], x['outcome']) for x in lines] == [
      ('cat/c_exact.jpg', 'duplicate')]
  rejected.write_text(''.join(json.dumps(
      {**x, 'outcome': 'near_duplicate_leak'}) + '\n' for x in lines))
  first.unlink()
  carried = _carried_marker(tmp_path, monkeypatch)
  _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert not carried.exists()
  _same_as_full(images, tmp_path / 'v2', tmp_path)


def test_split_folders_carry_the_search_over(tmp_path, monkeypatch):
  """A pre-split folder's report has no fractions: the search is carried
  over all the same (a review found it never was)."""
  images = tmp_path / 'images'
  helpers.photo_folder(images, layout='splits',
                       per_class={'train': 8, 'validation': 4})
  train = sorted((images / 'train' / 'cat').iterdir())
  _save_copy(train[0], images / 'validation' / 'cat' / 'near.jpg', 0.9)
  _build(images, tmp_path / 'v1')
  _save_copy(train[1], images / 'train' / 'coffee' / 'near2.jpg', 0.85)
  carried = _carried_marker(tmp_path, monkeypatch)
  _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert carried.exists()
  _same_as_full(images, tmp_path / 'v2', tmp_path)


def test_split_folders_with_a_new_exact_leak(tmp_path):
  images = tmp_path / 'images'
  helpers.photo_folder(images, layout='splits', per_class=4)
  _build(images, tmp_path / 'v1', validation_fraction=0.3)
  train = sorted((images / 'train' / 'cat').iterdir())
  shutil.copy(train[0], images / 'validation' / 'cat' / 'copy_of_train.jpg')
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert report['counts'].get('leak') == 1
  _same_as_full(images, tmp_path / 'v2', tmp_path)


def _hidden_change(target: pathlib.Path) -> None:
  """New bytes of the same size, and the old time put back (as `touch -r`
  or a restore would)."""
  info = target.stat()
  flipped = Image.open(target).convert('RGB').transpose(
      Image.Transpose.FLIP_LEFT_RIGHT)
  helpers.save(target, flipped)
  data = target.read_bytes()[:info.st_size].ljust(info.st_size, b'\0')
  target.write_bytes(data)
  os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_size_and_time_kept_hides_a_change_unless_verified(tmp_path):
  images = _folder(tmp_path / 'images')
  _build(images, tmp_path / 'v1')
  _hidden_change(sorted((images / 'coffee').glob('*.png'))[0])
  _build(images, tmp_path / 'trusted', reuse_from=str(tmp_path / 'v1'))
  _build(images, tmp_path / 'full')
  assert reuse.differences(str(tmp_path / 'trusted'), str(tmp_path / 'full'))
  report = _build(images, tmp_path / 'verified',
                  reuse_from=str(tmp_path / 'v1'), verify_reuse=True)
  assert reuse.differences(str(tmp_path / 'verified'),
                           str(tmp_path / 'full')) == []
  assert report['reuse']['verified'] and report['reuse']['reused'] == 29


def test_a_damaged_earlier_shard_is_built_from_its_files(built, tmp_path,
                                                        capsys):
  images, v1 = built  # v1: the full build of images these flags give.
  shutil.copytree(v1, tmp_path / 'v1')
  shard = sorted((tmp_path / 'v1').glob('*-train.tfrecord-*'))[1]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  report = builder.build(input_dir=str(images), output_dir=str(tmp_path / 'v2'),
                         reuse_from=str(tmp_path / 'v1'), image_size='32',
                         shard_size_mb=0.02)
  assert report['reuse']['damaged'] == 1
  assert 'earlier record was damaged' in capsys.readouterr().out
  assert reuse.differences(str(tmp_path / 'v2'), str(v1)) == []


def test_a_file_in_the_racy_window_is_read(tmp_path):
  """A file whose time is within RACY_S of the earlier build's start may
  have changed in the same clock tick: it is read and hashed, so even a
  change that kept its size and time is seen."""
  images = _folder(tmp_path / 'images')
  _build(images, tmp_path / 'v1')
  target = sorted((images / 'coffee').glob('*.png'))[0]
  _hidden_change(target)
  report_path = tmp_path / 'v1' / 'build_report.json'
  raw = json.loads(report_path.read_text())
  raw['started_at'] = target.stat().st_mtime + reuse.RACY_S / 2
  report_path.write_text(json.dumps(raw))
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert report['reuse']['reused'] == 29
  _same_as_full(images, tmp_path / 'v2', tmp_path)


@pytest.mark.parametrize('change,message', [
    (dict(image_size='40'), 'was built with other --image_size: '
     '--image_size=32 '),
    (dict(image_format='png'), '--image_format'),
    (dict(jpeg_quality=80), 'other --jpeg_quality: --jpeg_quality=95'),
    (dict(near_duplicate_distance=0, quality_thresholds='off'),
     '--near_duplicate_distance/--quality_thresholds: hashes and '
     'measures on'),
    ('old_format', 'older version of pipelines.build'),
    ('libraries', 'other library versions (pillow 1.0'),
    ('not_dataset', 'is not a dataset written by pipelines.build'),
    ('missing', 'is not a folder'),
    # Workers read its files without looking first: a FIFO would block
    # them, /dev/zero fill the memory.
    ('fifo', 'images.jsonl, which is not a regular file but a FIFO'),
    ('zero', 'rejected.jsonl, which is not a regular file but a character '
     'device'),
])
def test_refusals_are_one_line_before_anything_is_written(built, tmp_path,
                                                         change, message):
  images, v1 = built
  old = tmp_path / 'v1'
  shutil.copytree(v1, old)
  kwargs = change if isinstance(change, dict) else {}
  raw = json.loads((old / 'build_report.json').read_text())
  if change == 'old_format':
    del raw['software']
  if change == 'libraries':
    raw['software']['pillow'] = '1.0'
  (old / 'build_report.json').write_text(json.dumps(raw))
  source = old
  if change == 'not_dataset':
    source = images
  if change == 'missing':
    source = tmp_path / 'nope'
  if change == 'fifo':
    (old / 'images.jsonl').unlink()
    os.mkfifo(old / 'images.jsonl')
  if change == 'zero':
    (old / 'rejected.jsonl').unlink()
    os.symlink('/dev/zero', old / 'rejected.jsonl')
  with pytest.raises(UserError, match=message.replace('(', r'\(')):
    _build(images, tmp_path / 'v2', reuse_from=str(source), **kwargs)
  assert not (tmp_path / 'v2').exists()


def test_update_flags(built, tmp_path):
  images, v1 = built
  with pytest.raises(UserError, match='holds no dataset to update'):
    _build(images, tmp_path / 'v1', update=True)
  shutil.copytree(v1, tmp_path / 'v1')
  with pytest.raises(UserError, match='drop --reuse_from'):
    _build(images, tmp_path / 'v1', update=True, reuse_from=str(images))
  with pytest.raises(UserError, match='--verify_reuse'):
    _build(images, tmp_path / 'v2', verify_reuse=True)
  error, loaded = helpers.refusal(  # One line, before TensorFlow loads.
      'pipelines.build', f'--input_dir={images}',
      f'--output_dir={tmp_path / "v2"}', f'--reuse_from={tmp_path / "v1"}',
      '--image_size=64')
  assert 'was built with other --image_size: --image_size=32 ' in error, error
  assert not loaded, loaded


def test_a_failed_update_leaves_the_dataset_as_it_was(tmp_path, monkeypatch):
  images = _folder(tmp_path / 'images')
  _build(images, tmp_path / 'v1')
  before = {p.name: p.read_bytes() for p in (tmp_path / 'v1').iterdir()}
  helpers.photo_folder(images, classes={'cat': 'astronaut'}, per_class=2,
                       name='new_{i}')

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(beam_build, 'finalize', fail)
  with pytest.raises(builder.BuildFailed):
    _build(images, tmp_path / 'v1', update=True)
  after = {p.name: p.read_bytes() for p in (tmp_path / 'v1').iterdir()}
  assert after == before
  assert {p.name for p in tmp_path.iterdir()} == {'images', 'v1'}


def test_other_seed_and_fractions_still_take_every_record(built, tmp_path):
  """--seed and the fractions move files between chunks, shards and
  splits, and other quality thresholds change the flags in images.jsonl,
  not the stored bytes: every record is still taken, and each line is the
  full build's (not the earlier line as it was)."""
  images, v1 = built
  flags = dict(seed=7, validation_fraction=0.3, test_fraction=0.2,
               quality_thresholds='blurry=0.6,dark=0.5')
  report = _build(images, tmp_path / 'v2', reuse_from=str(v1), **flags)
  assert (report['reuse']['reused'], report['reuse']['built']) == (30, 0)
  _same_as_full(images, tmp_path / 'v2', tmp_path, **flags)
  old, new = (_lines(d / metadata.IMAGES_FILE) for d in (v1, tmp_path / 'v2'))
  assert sum(bool(line['flags']) for line in new) > sum(
      bool(line['flags']) for line in old)


def _edit_line(line: str) -> str:
  """A line with its pixel sums changed and its check left as it was."""
  return line.replace('"pixel_sum": [', '"pixel_sum": [1', 1)


@pytest.mark.parametrize('damage', [
    'images_cut', 'images_garbage_line', 'line_edited', 'rejected_missing',
    'rejected_garbage'])
def test_a_damaged_manifest_costs_files_never_the_build(built, tmp_path,
                                                        damage):
  """Found by a hostile review: a damaged images.jsonl or rejected.jsonl
  stopped the build with a traceback, and an edited line's values went
  into the new dataset. Now the files from the damage on are built."""
  images, v1 = built
  old = tmp_path / 'v1'
  shutil.copytree(v1, old)
  manifest, rejected = old / metadata.IMAGES_FILE, old / metadata.REJECTED_FILE
  lines = manifest.read_text().splitlines(keepends=True)
  if damage == 'images_cut':
    manifest.write_text(''.join(lines)[:len(''.join(lines)) // 2])
  elif damage == 'images_garbage_line':
    manifest.write_text(''.join(lines[:3] + ['not json\n'] + lines[4:]))
  elif damage == 'line_edited':
    manifest.write_text(''.join(lines[:3] + [_edit_line(lines[3])] +
                                lines[4:]))
  elif damage == 'rejected_missing':
    rejected.unlink()
  else:
    rejected.write_text(rejected.read_text() + 'zzz\n')
  report = _build(images, tmp_path / 'v2', reuse_from=str(old))
  assert report['reuse']['built'] >= 1, report['reuse']
  assert reuse.differences(str(tmp_path / 'v2'), str(v1)) == []


def test_a_report_that_disagrees_with_the_metadata_is_refused(built,
                                                              tmp_path):
  images, v1 = built
  old = tmp_path / 'v1'
  shutil.copytree(v1, old)
  raw = json.loads((old / 'build_report.json').read_text())
  raw['image'].update(height=48, width=48)
  (old / 'build_report.json').write_text(json.dumps(raw))
  with pytest.raises(UserError, match='disagree on the stored images'):
    _build(images, tmp_path / 'v2', reuse_from=str(old), image_size='48')


_ODD_NAMES = ('a/plain.jpg', 'a/quote"and\\backslash.jpg', 'a/ünï cödé 照片.jpg',
              'a/\udcff-not-utf8.jpg', 'a/line\u2028sep\x01.jpg',
              'a/, "split": "test".jpg')


@pytest.mark.parametrize('name', _ODD_NAMES)
def test_the_quick_line_reader_agrees_with_the_full_one(name):
  """old_records reads path, split and record length without parsing the
  whole line; for any path it gives checked_line's values, and None for
  a line whose checksum fails."""
  from pipelines.folder_to_records import chunk_format  # pylint: disable=g-import-not-at-top
  entry = chunk_format.IndexEntry(0, 12345, 1, (1, 2, 3), (4, 5, 6), 9,
                                  None, name)
  raw = (chunk_format.image_line(
      name, 'validation', 'ab' * 32, (1, 2), ('blurry',), None,
      file_stat=(10, 20), entry=entry, original_size=(5, 6)) + '\n').encode()
  full = reuse.checked_line(raw)
  assert reuse._place_fields(raw) == (name, 'validation', 12345)  # pylint: disable=protected-access
  assert (full['path'], full['split'], full['record_bytes']) == (
      name, 'validation', 12345)
  damaged = raw.replace(b'12345', b'12346')
  assert reuse._place_fields(damaged) is None  # pylint: disable=protected-access
  assert reuse.checked_line(damaged) is None


def test_earlier_records_travel_through_files_intact(built, tmp_path,
                                                     monkeypatch):
  """earlier_ranges gives each chunk one range per flush of the Olds
  old_records yields for it, in the same order, odd paths included."""
  _, v1 = built
  spec = metadata.read_dataset_spec(str(v1))
  source = reuse.open_source(str(v1), image=json.loads(
      (v1 / 'build_report.json').read_text())['image'], flag='--reuse_from',
                             verify=False)
  assert spec.splits
  counts = (30, 0)
  direct = list(reuse.old_records(None, counts, source=source, seed=0))
  assert len(direct) >= 20
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  ranges = list(reuse.earlier_ranges(None, counts, source=source, seed=0,
                                     run_dir=str(run_dir)))
  assert len({chunk for chunk, _ in ranges}) == len(ranges)  # One a chunk.
  through = [(chunk, old) for chunk, earlier in ranges
             for old in reuse.read_olds(earlier)]
  assert sorted(through, key=lambda c: c[0]) == sorted(
      direct, key=lambda c: c[0])
  # Flushed every 7 Olds: the pieces are merged, still one range a chunk.
  monkeypatch.setattr(reuse, '_FLUSH_OLDS', 7)
  small = run_dir / 'small'
  small.mkdir()
  ranges = list(reuse.earlier_ranges(None, counts, source=source, seed=0,
                                     run_dir=str(small)))
  assert len({chunk for chunk, _ in ranges}) == len(ranges)
  assert len({earlier.path for _, earlier in ranges}) == 1
  assert len(list(small.iterdir())) == 1  # The pieces removed.
  assert [(chunk, old) for chunk, earlier in ranges
          for old in reuse.read_olds(earlier)] == sorted(
              direct, key=lambda c: c[0])
  odd = reuse.Old(_ODD_NAMES[3], 1, 2, 3, 4)
  packed = reuse._pack_old(odd)  # pylint: disable=protected-access
  (run_dir / 'one.bin').write_bytes(packed * 2)
  assert reuse.read_olds(reuse.Earlier(str(run_dir / 'one.bin'), 0,
                                       2 * len(packed))) == [odd, odd]


def test_taken_records_are_copied_from_the_files_that_were_checked(
    built, tmp_path, monkeypatch):
  """A taken record is not written again: the shard step copies it from
  the earlier shard where it was checked. A shard replaced in between
  (another build swapping that dataset) fails the build with a line that
  says so, instead of copying other bytes from the same offsets."""
  images, v1 = built
  shutil.copytree(v1, tmp_path / 'v1')
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'))
  assert report['reuse']['reused'] == 30
  assert not list((tmp_path).glob('**/_chunks'))  # Temporary files gone.
  _same_as_full(images, tmp_path / 'v2', tmp_path)

  concat = beam_build.ConcatShard.process

  def replace_then_concat(self, element, layout):
    for shard in (tmp_path / 'v1').glob('*.tfrecord-*'):
      data = shard.read_bytes()
      shard.unlink()  # Same bytes, another file.
      shard.write_bytes(data)
    return concat(self, element, layout)

  monkeypatch.setattr(beam_build.ConcatShard, 'process', replace_then_concat)
  with pytest.raises(builder.BuildFailed) as failed:
    _build(images, tmp_path / 'v3', reuse_from=str(tmp_path / 'v1'))
  assert 'not the file an earlier step of this build checked' in str(
      failed.value) and 'run the build again' in str(failed.value)
  assert '\n' not in str(failed.value)
  assert not (tmp_path / 'v3').exists()


def test_a_label_that_grows_a_byte_gives_the_full_builds_lines(tmp_path):
  """A class folder added first moves class 127 to 128, whose label takes
  one byte more: that record is re-labelled, its length changes, and its
  images.jsonl line must be made again (not kept as it was)."""
  images = tmp_path / 'images'
  for i in range(128):
    folder = images / f'c{i:03d}'
    folder.mkdir(parents=True)
    Image.new('L', (8, 8), i * 2).save(folder / 'x.png')
  hour_ago = time.time() - 3600
  for path in images.rglob('*.png'):
    os.utime(path, (hour_ago, hour_ago))
  flags = dict(image_size='8', channels=1, near_duplicate_distance=0,
               validation_fraction=0.0, test_fraction=0.0,
               quality_thresholds='off')
  _build(images, tmp_path / 'v1', **flags)
  (images / 'a_first').mkdir()
  Image.new('L', (8, 8), 255).save(images / 'a_first' / 'x.png')
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'),
                  **flags)
  assert report['reuse']['reused'] == 128
  _same_as_full(images, tmp_path / 'v2', tmp_path, **flags)
  old, new = ({line['path']: line['record_bytes'] for line in _lines(
      d / metadata.IMAGES_FILE)} for d in (tmp_path / 'v1', tmp_path / 'v2'))
  assert new['c127/x.png'] == old['c127/x.png'] + 1


def test_a_name_holding_another_labels_bytes_is_still_re_labelled(tmp_path):
  """A file name may hold any bytes but '/' and NUL, e.g. the serialized
  entry of label 1. A record whose class index moves from 0 to 1 must be
  re-labelled even then (the check of a taken record once found label 1's
  bytes anywhere in the record's last bytes, the name among them)."""
  images = tmp_path / 'images'
  helpers.photo_folder(images, classes={'b': 'chelsea', 'c': 'coffee'},
                       per_class=3, formats=('png',))
  name = schema.encode_example(image=b'', label=1, filename='', sha256='',
                               original_height=0, original_width=0)
  # Label 1's map entry, the last: its tag and length, then key and value.
  label_entry = name[name.rindex(b'\n\x05label') - 2:]
  assert label_entry == b'\n\x0e\n\x05label\x12\x05\x1a\x03\n\x01\x01'
  crafted = images / 'b' / ('x' + label_entry.decode('ascii') + '.png')
  Image.open(next((images / 'b').glob('*.png'))).transpose(
      Image.Transpose.FLIP_LEFT_RIGHT).save(crafted)  # Not a duplicate.
  hour_ago = time.time() - 3600
  for path in images.rglob('*.png'):
    os.utime(path, (hour_ago, hour_ago))
  flags = dict(validation_fraction=0.0, test_fraction=0.0,
               near_duplicate_distance=0)
  _build(images, tmp_path / 'v1', **flags)
  helpers.photo_folder(images, classes={'a': 'rocket'}, per_class=2,
                       formats=('png',))  # b: label 0 -> 1.
  report = _build(images, tmp_path / 'v2', reuse_from=str(tmp_path / 'v1'),
                  **flags)
  assert report['reuse']['reused'] == 7
  assert crafted.name in {line['path'].split('/')[1] for line in _lines(
      tmp_path / 'v2' / metadata.IMAGES_FILE)}  # Written, not dropped.
  _same_as_full(images, tmp_path / 'v2', tmp_path, **flags)


_RETYPED = {  # A value as another type or text for the same number.
    'original_size': lambda v: [float(v[0]), v[1]],
    'sha256': str.upper,
    'file_bytes': float,
    'phash': lambda v: v and v.upper(),
    'phash_centre': lambda v: None,  # The whole hash without its centre.
    'quality': lambda q: q and {**q, 'min_side': float(q['min_side'])},
    'pixel_sum': lambda v: [float(v[0])] + v[1:],
    # The same measures in another order: other text for the same values.
    'luma_std': lambda q: q and dict(reversed(list(q.items()))),
}


def test_the_types_a_line_is_held_to_are_the_measures():
  """reuse.MEASURE_TYPES: the types of a Measures' values in field order,
  colour measured or not (1-channel datasets)."""
  from pipelines.preprocessing import image_quality  # pylint: disable=g-import-not-at-top
  measures = image_quality.Measures(
      sharpness=0.5, luma_p05=0.1, luma_p95=0.9, luma_std=0.2, aspect=1.5,
      min_side=40, colour=0.3)
  for m in (measures, dataclasses.replace(measures, colour=None)):
    assert tuple(m.as_dict()) == image_quality.MEASURE_FIELDS
    assert tuple(map(type, m.as_dict().values())) in reuse.MEASURE_TYPES
    assert image_quality.flags(m) == image_quality.flags(m.as_dict())
  assert len(reuse.MEASURE_TYPES) == 2


def test_a_line_retyped_with_its_check_made_again_is_built(built, tmp_path):
  """Found by a hostile review: a line edited to hold 48.0 for 48 (or
  'AB' for 'ab') with its checksum made again was taken as it was, and
  the update's images.jsonl differed from the full build's (the check of
  its record even passed or failed with what an earlier record had
  cached). Such a line is now damaged: its file is built."""
  images, v1 = built
  old = tmp_path / 'v1'
  shutil.copytree(v1, old)
  manifest = old / metadata.IMAGES_FILE
  lines = manifest.read_text().splitlines(keepends=True)
  for i, (key, retype) in enumerate(_RETYPED.items()):
    line = json.loads(lines[i])
    del line['check']
    field = 'quality' if key == 'luma_std' else key
    line[field] = retype(line[field])
    text = json.dumps(line)
    lines[i] = f'{text[:-1]}, "check": {zlib.crc32(text.encode())}}}\n'
    assert reuse.checked_line(lines[i].encode()) is None, key
  manifest.write_text(''.join(lines))
  report = _build(images, tmp_path / 'v2', reuse_from=str(old))
  assert report['reuse']['built'] >= len(_RETYPED), report['reuse']
  assert reuse.differences(str(tmp_path / 'v2'), str(v1)) == []
