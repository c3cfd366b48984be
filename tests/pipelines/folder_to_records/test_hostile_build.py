"""The build against hostile input: special files, odd names, links, races.

Every case here once hung, crashed, lost files or destroyed data. Fixtures
are written to tmp dirs; CLI cases run `python -m pipelines.build` in a
subprocess, because the promise is about what a user sees: no hang, no
traceback, one `error:` line, nothing lost, nothing of theirs destroyed.
"""

import io
import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import builder
from pipelines.preprocessing import source_image
from pipelines.folder_to_records import listing
from pipelines import plots
from pipelines.common.errors import UserError
from tests import helpers
import tfrecords_schema
from tfrecords_schema import metadata
from tfrecords_schema import schema


def _folder(root: pathlib.Path, classes=('a', 'b'), per_class: int = 3,
            size: int = 48, first_photo: int = 0) -> pathlib.Path:
  """Real photo crops, distinct bytes, `per_class` PNGs per class folder
  (class k: a crop of photo first_photo + k; folders made from other photos
  hold no near-duplicate of these)."""
  names = ('chelsea', 'coffee', 'rocket', 'astronaut')
  for k, cls in enumerate(classes):
    photo = helpers.photo(names[(first_photo + k) % len(names)])
    for i, crop in enumerate(helpers.variants(photo, per_class)):
      image = Image.fromarray(np.roll(crop, k, axis=0)).resize((size, size))
      helpers.save(root / cls / f'{i}.png', image)
  return root


def _rejected(out: pathlib.Path) -> dict:
  lines = (out / metadata.REJECTED_FILE).read_text().splitlines()
  return {json.loads(l)['path']: json.loads(l) for l in lines}


_written = helpers.written_filenames


def _build_cli(*args, timeout=240):
  """Runs the build CLI; returns (result, its peak RSS in MB)."""
  return helpers.run_cli_peak('pipelines.build', *args, timeout=timeout)


def _one_error(result) -> str:
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = helpers.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def test_special_and_huge_files_are_rejected_without_reading_them(tmp_path):
  images = _folder(tmp_path / 'images')
  os.mkfifo(images / 'a' / 'pipe.jpg')  # Opening it for reading would block.
  os.symlink('/dev/zero', images / 'a' / 'zero.png')  # Endless bytes.
  with open(images / 'b' / 'movie.jpg', 'wb') as f:
    f.truncate(6 << 30)  # 6 GB (sparse): reading it would fill memory.
  helpers.write(images / 'b' / 'fake.png', b'%PDF-1.4' + b'\0' * 100_000)
  out = tmp_path / 'out'
  result, peak_mb = _build_cli(f'--input_dir={images}', f'--output_dir={out}',
                               '--image_size=16')
  assert result.returncode == 0, result.stderr[-3000:]
  assert peak_mb < 1500, peak_mb
  rejected = _rejected(out)
  assert {p: r['outcome'] for p, r in rejected.items()} == {
      'a/pipe.jpg': source_image.NOT_A_FILE, 'a/zero.png': source_image.NOT_A_FILE,
      'b/movie.jpg': source_image.TOO_LARGE, 'b/fake.png': source_image.CORRUPT}
  assert 'FIFO' in rejected['a/pipe.jpg']['reason']
  assert 'character device' in rejected['a/zero.png']['reason']
  assert '--max_file_bytes' in rejected['b/movie.jpg']['reason']
  assert len(_written(out)) == 6


def test_read_source_reads_only_the_header_of_a_non_image(tmp_path):
  path = helpers.write(tmp_path / 'big.jpg', b'not an image' * 1_000_000)
  reads = []

  class Spy(io.FileIO):

    def read(self, size=-1):
      reads.append(size)
      return super().read(size)

  with pytest.raises(source_image.ImageRejected) as e:
    source_image._read_bounded(Spy(path), None, extension='.jpg',  # pylint: disable=protected-access
                            max_bytes=1 << 30)
  assert e.value.outcome == source_image.CORRUPT
  assert sum(reads) <= 4096
  with pytest.raises(source_image.ImageRejected) as e:
    source_image.read_source(str(path), max_bytes=1000)
  assert e.value.outcome == source_image.TOO_LARGE


def test_undecodable_names_are_reported_escaped_and_bad_class_names_refused(
    tmp_path):
  images = _folder(tmp_path / 'images')
  data = (images / 'a' / '0.png').read_bytes()
  root = os.fsencode(images)
  with open(os.path.join(root, b'a', b'\xff\xfe.png'), 'wb') as f:
    f.write(data[:-1] + b'\1')  # Other bytes: no duplicate of a/0.png.
  out = tmp_path / 'out'
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='16', quiet=True)
  assert report['counts'][listing.BAD_NAME] == 1
  assert _rejected(out)['a/\\xff\\xfe.png']['outcome'] == listing.BAD_NAME

  os.mkdir(os.path.join(root, b'\xe9t\xe9'))
  result, _ = _build_cli(f'--input_dir={images}', f'--output_dir={out}2')
  assert "class folder '\\xe9t\\xe9'" in _one_error(result)
  assert not (tmp_path / 'out2').exists()


@pytest.mark.parametrize('name,problem', [
    ('b\nc', 'line break'), ('tab\there', 'control character'),
    ('cats ', 'white space')])
def test_class_names_a_label_file_cannot_hold_are_refused(tmp_path, name,
                                                          problem):
  images = _folder(tmp_path / 'images', classes=('a', name), per_class=1)
  with pytest.raises(UserError, match=problem):
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_folder_links_are_followed_once_and_never_loop(tmp_path):
  images = _folder(tmp_path / 'images')
  os.symlink('../b', images / 'a' / 'to_b')  # Would label b's images as a.
  os.symlink('../a', images / 'b' / 'to_a')
  os.symlink('..', images / 'a' / 'up1')  # Two links up: hung the listing.
  os.symlink('..', images / 'a' / 'up2')
  outside = _folder(tmp_path / 'outside', classes=('extra',), per_class=2,
                    size=40, first_photo=2)
  os.symlink(outside / 'extra', images / 'b' / 'more')  # Followed, once.
  os.symlink(outside / 'extra', images / 'b' / 'same_again')
  os.symlink(images / 'b', outside / 'extra' / 'back')  # A loop through it.
  out = tmp_path / 'out'
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='16', quiet=True)
  links = {p for p, r in _rejected(out).items()
           if r['outcome'] == listing.IGNORED_LINK}
  assert links == {'a/to_b', 'b/to_a', 'a/up1', 'a/up2', 'b/same_again',
                   'b/more/back'}
  assert report['counts']['seen'] == 6 + 2 + len(links)
  assert _written(out) == {f'{c}/{i}.png' for c in 'ab' for i in range(3)} | {
      'b/more/0.png', 'b/more/1.png'}


def test_when_every_file_is_rejected_the_reasons_survive(tmp_path):
  images = tmp_path / 'images'
  helpers.write(images / 'a' / 'empty.jpg', b'')
  helpers.write(images / 'b' / 'text.png', b'just some text\n')
  out = tmp_path / 'out'
  result, _ = _build_cli(f'--input_dir={images}', f'--output_dir={out}')
  error = _one_error(result)
  assert 'no image' in error and str(out / metadata.REJECTED_FILE) in error
  assert {p: r['outcome'] for p, r in _rejected(out).items()} == {
      'a/empty.jpg': source_image.EMPTY, 'b/text.png': source_image.CORRUPT}
  assert not (out / metadata.METADATA_FILE).exists()  # Not a dataset.
  # A fixed folder builds over the report with --overwrite.
  _folder(images)
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='16', overwrite=True, quiet=True)
  assert report['counts']['written'] == 6


def test_a_folder_that_appears_during_the_build_is_never_replaced(
    tmp_path, monkeypatch):
  images = _folder(tmp_path / 'images')
  out = tmp_path / 'out'
  run = beam_build.run_pipeline

  def run_and_race(**kwargs):
    elapsed = run(**kwargs)
    helpers.write(out / 'mine.txt', b'precious')  # Someone else's folder.
    return elapsed

  monkeypatch.setattr(beam_build, 'run_pipeline', run_and_race)
  with pytest.raises(UserError, match='left untouched'):
    builder.build(input_dir=str(images), output_dir=str(out), quiet=True)
  assert [p.name for p in out.iterdir()] == ['mine.txt']
  assert (out / 'mine.txt').read_bytes() == b'precious'
  assert not [p for p in tmp_path.glob('.out*')]  # No temp folder or lock left.


def test_a_second_build_to_the_same_folder_is_refused_while_one_runs(
    tmp_path):
  images = _folder(tmp_path / 'images')
  out = tmp_path / 'out'
  with builder.output_lock(str(out)):  # As a running build holds it.
    result, _ = _build_cli(f'--input_dir={images}', f'--output_dir={out}')
    assert 'another build is writing' in _one_error(result)
  assert not out.exists()
  builder.build(input_dir=str(images), output_dir=str(out), image_size='16',
                quiet=True)  # The lock went with its holder.


def test_overwrite_through_a_linked_output_folder_keeps_the_link(tmp_path):
  images = _folder(tmp_path / 'images')
  target = tmp_path / 'target'
  link = tmp_path / 'link'
  os.symlink(target, link)
  builder.build(input_dir=str(images), output_dir=str(link), image_size='16',
                quiet=True)
  builder.build(input_dir=str(images), output_dir=str(link), image_size='24',
                overwrite=True, quiet=True)
  assert link.is_symlink() and os.readlink(link) == str(target)
  assert tfrecords_schema.read_dataset_spec(str(link)).height == 24
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'images', 'link', 'target']


def test_an_output_folder_reached_through_a_link_into_the_input_is_refused(
    tmp_path):
  images = _folder(tmp_path / 'images')
  os.symlink(images / 'a', tmp_path / 'link')
  with pytest.raises(UserError, match='overlap'):
    builder.build(input_dir=str(images),
                  output_dir=str(tmp_path / 'link' / 'ds'))
  assert sorted(p.name for p in (images / 'a').iterdir()) == [
      '0.png', '1.png', '2.png']


def test_a_link_to_the_output_folder_inside_the_input_is_not_read(tmp_path):
  images = _folder(tmp_path / 'images')
  out = tmp_path / 'out'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='16',
                quiet=True)
  os.symlink(out, images / 'a' / 'ds')  # samples.png would become a cat.
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='16', overwrite=True, quiet=True)
  assert _rejected(out)['a/ds']['outcome'] == listing.IGNORED_LINK
  assert report['counts']['written'] == 6


def test_split_folders_are_recognised_in_any_case(tmp_path):
  images = tmp_path / 'images'
  _folder(images / 'Train', classes=('cats', 'dogs'), per_class=3)
  _folder(images / 'VAL', classes=('cats', 'dogs'), per_class=3, size=40,
          first_photo=2)
  report = builder.build(input_dir=str(images), output_dir=str(tmp_path / 'o'),
                         image_size='16', quiet=True)
  assert report['layout'] == listing.SPLIT_FOLDERS_LAYOUT
  assert report['class_names'] == ['cats', 'dogs']
  assert report['splits']['validation']['total'] == 6


@pytest.mark.parametrize('folders,message', [
    (('train', 'Train'), 'several train folders'),
    (('cats', 'Cats'), 'differ only in case'),
])
def test_folders_that_differ_only_in_case_are_refused(tmp_path, folders,
                                                      message):
  images = tmp_path / 'images'
  for folder in folders:
    _folder(images / folder, classes=('x', 'y'), per_class=1)
  with pytest.raises(UserError, match=message):
    listing.list_input(str(images))


def test_corrupt_jpegs_that_libjpeg_only_warns_about_are_rejected(tmp_path):
  images = _folder(tmp_path / 'images')
  good = helpers.jpeg_bytes(helpers.photo('chelsea'))
  # Cut to 30% with a new end marker: libjpeg fills the rest with grey.
  helpers.write(images / 'a' / 'cut.jpg', good[:len(good) * 3 // 10] + b'\xff\xd9')
  big = io.BytesIO()
  Image.new('RGB', (9000, 9000)).save(big, format='JPEG')
  # 729 bytes whose header claims 9000x9000: a flat grey image before.
  helpers.write(images / 'b' / 'liar.jpg', big.getvalue()[:727] + b'\xff\xd9')
  helpers.write(images / 'b' / 'fine.jpg', good)
  out = tmp_path / 'out'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='16',
                quiet=True)
  rejected = _rejected(out)
  assert {p: r['outcome'] for p, r in rejected.items()} == {
      'a/cut.jpg': source_image.CORRUPT, 'b/liar.jpg': source_image.CORRUPT}
  assert 'premature end' in rejected['a/cut.jpg']['reason']
  assert 'b/fine.jpg' in _written(out)


@pytest.mark.parametrize('arg,message', [
    ('--image-size=64', 'unknown flag --image-size; did you mean --image_size?'),
    ('--validation_fracton=0.5',
     'did you mean --validation_fraction?'),
    ('--input-dir=x', 'did you mean --input_dir?'),
    ('photos', "unexpected argument 'photos'"),
])
def test_misspelled_flags_are_refused_with_a_suggestion(tmp_path, arg,
                                                        message):
  images = _folder(tmp_path / 'images', per_class=1)
  result, _ = _build_cli(f'--input_dir={images}',
                         f'--output_dir={tmp_path / "out"}', arg)
  assert message in _one_error(result)
  assert not (tmp_path / 'out').exists()


def test_beam_flags_still_pass_through(tmp_path):
  images = _folder(tmp_path / 'images', per_class=1)
  result, _ = _build_cli(f'--input_dir={images}',
                         f'--output_dir={tmp_path / "out"}', '--image_size=8',
                         '--validation_fraction=0', '--test_fraction=0',
                         '--runner=FnApiRunner', '--direct_num_workers=1')
  assert result.returncode == 0, result.stderr[-3000:]


def test_cli_output_has_no_cuda_or_worker_chatter(tmp_path):
  images = _folder(tmp_path / 'images', per_class=2)
  out = tmp_path / 'out'
  result, _ = _build_cli(f'--input_dir={images}', f'--output_dir={out}',
                         '--image_size=8', '--direct_num_workers=2',
                         '--direct_running_mode=multi_processing')
  assert result.returncode == 0, result.stderr[-3000:]
  for noise in ('cuInit', 'cuda drivers', 'INFO:', 'apitools',
                'absl::InitializeLog'):
    assert noise not in result.stderr, result.stderr
  assert all(l.startswith('[build]') for l in result.stderr.splitlines()), (
      result.stderr)
  assert f'pictures: {out}/samples.png' in result.stdout
  assert 'not written 0\n' in result.stdout  # No dangling colon.


@pytest.mark.parametrize('name', ['abc\n', 'Abc', '1abc', 'a-b', 'a b'])
def test_a_dataset_name_that_is_not_lower_snake_case_is_one_line(tmp_path,
                                                                  name):
  """A whole-name check: a trailing line break once passed the pattern's
  `$` and failed later in TFDS's writer with a traceback."""
  images = _folder(tmp_path / 'images', per_class=1)
  with pytest.raises(UserError) as raised:
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  dataset_name=name, quiet=True)
  assert f'--dataset_name={name!r} must be lower_snake_case' in str(
      raised.value)
  assert '\n' not in str(raised.value)
  assert not (tmp_path / 'out').exists()


def _grid_labels(out, tmp_path, monkeypatch) -> list:
  """The labels of the images plots.write_dataset_samples puts in its grid
  (plot_sample_grid spied on: what it is handed, not the picture)."""
  shown = []

  def spy(images, labels, *args, **kwargs):
    del args, kwargs
    assert len(images) == len(labels)
    shown.extend(labels)

  monkeypatch.setattr(plots, 'plot_sample_grid', spy)
  plots.write_dataset_samples(str(out), str(tmp_path / 'grid.png'))
  return shown


def test_samples_grid_shows_every_class(tmp_path, monkeypatch):
  classes = tuple(f'class{i}' for i in range(10))
  images = _folder(tmp_path / 'images', classes=classes, per_class=2, size=24)
  out = tmp_path / 'out'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8',
                validation_fraction=0.0, quiet=True, samples=False)
  labels = _grid_labels(out, tmp_path, monkeypatch)
  assert sorted(set(labels)) == list(range(10))
  assert len(labels) == 20


@pytest.mark.parametrize('cap', ['MAX_SAMPLE_SCAN', 'MAX_SAMPLE_SCAN_BYTES'])
def test_samples_grid_stops_at_its_record_and_byte_caps(tmp_path, monkeypatch,
                                                         cap):
  """The grid's reader stops after MAX_SAMPLE_SCAN records or
  MAX_SAMPLE_SCAN_BYTES bytes of records, whichever comes first, even
  with classes still missing (a split of huge records is not read whole)."""
  classes = tuple(f'class{i}' for i in range(6))
  images = _folder(tmp_path / 'images', classes=classes, per_class=2, size=24)
  out = tmp_path / 'out'
  builder.build(input_dir=str(images), output_dir=str(out), image_size='8',
                validation_fraction=0.0, quiet=True, samples=False)
  monkeypatch.setattr(plots, cap, 3)  # Records, or bytes: one record.
  assert len(_grid_labels(out, tmp_path, monkeypatch)) == (
      3 if cap == 'MAX_SAMPLE_SCAN' else 1)


def test_samples_grid_shows_records_larger_than_their_raw_pixels(
    tmp_path, monkeypatch):
  """A grey JPEG of noise at quality 100 is larger than its raw pixels (here
  by more than 1 MiB): samples.png still shows it (a bound of raw + 1 MiB
  on the records it reads left every record out and drew nothing)."""
  rng = np.random.default_rng(0)
  side = 1800
  for cls in ('a', 'b'):
    helpers.save(tmp_path / 'images' / cls / 'noise.png', Image.fromarray(
        rng.integers(0, 256, size=(side, side), dtype=np.uint8)))
  out = tmp_path / 'out'
  builder.build(input_dir=str(tmp_path / 'images'), output_dir=str(out),
                image_size=str(side), channels=1, jpeg_quality=100,
                validation_fraction=0.0, quiet=True, samples=False,
                near_duplicate_distance=0)
  spec = tfrecords_schema.read_dataset_spec(str(out))
  record_bytes = [size for _, size in schema.read_examples(
      spec.shard_paths(str(out), 'train'), max_record_bytes=1 << 30)]
  assert len(record_bytes) == 2
  assert min(record_bytes) > side * side + (1 << 20), record_bytes
  assert sorted(_grid_labels(out, tmp_path, monkeypatch)) == [0, 1]
