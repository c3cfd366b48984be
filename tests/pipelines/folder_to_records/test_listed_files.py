"""What travels between steps in runs and files instead of one element
each: the listed files (listed_files: chunks as chunk_of gives them, paths
back byte for byte) and the records' references for the dedupe step;
builds do not depend on how either was cut or where it travelled."""

import collections
import hashlib
import os
import random
import shutil

import pytest

from pipelines.folder_to_records import builder
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import dofns
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import listed_files
from pipelines.folder_to_records import reuse
from pipelines.folder_to_records import splits
from tests import helpers

# Names a listing passes on (names that are not UTF-8 it ignores): non-ASCII,
# quotes, newlines, separators inside the class folder, long ones.
_ODD = ['cat/a.jpg', 'cat/ä ö.png', 'dog/日本.jpg', 'dog/"q"\n.jpg',
        'cat/sub/deep/x.jpg', 'dog/' + 'l' * 300 + '.jpg']


def _relpaths(count: int, rng: random.Random) -> list[str]:
  return _ODD + [f'c{rng.randrange(5)}/{rng.random():.17f}.jpg'
                 for _ in range(count)]


@pytest.mark.parametrize('in_file', [False, True])
@pytest.mark.parametrize('num_files', [1, 7, 64, 65, 1_000, 100_000])
def test_each_chunk_piece_holds_the_files_chunk_of_gives_it(
    tmp_path, monkeypatch, num_files, in_file):
  rng = random.Random(num_files)
  relpaths = _relpaths(500, rng)
  seed = rng.randrange(1000)
  if in_file:
    monkeypatch.setattr(listed_files, 'INLINE_BYTES', 100)
  run = listed_files.write_run(str(tmp_path), list(relpaths), seed=seed)
  assert (run.data is None) == in_file
  assert len(list(tmp_path.iterdir())) == in_file
  pieces = listed_files.chunk_pieces(run, num_files)
  assert len({chunk for chunk, _ in pieces}) == len(pieces)  # One a chunk.
  n = chunk_format.num_chunks(num_files)
  got = []
  for chunk, piece in pieces:
    assert isinstance(piece, listed_files.ListRange) == in_file
    entries = listed_files.entries(piece)
    assert entries == sorted(entries)
    for key, relpath in entries:
      assert key == splits.order_key(relpath, seed=seed)
      assert chunk == chunk_format.chunk_of(relpath, n, seed=seed)
      got.append(relpath)
  assert sorted(got) == sorted(relpaths)  # Every file once, bytes intact.


def test_an_empty_run_has_no_pieces_and_a_cut_one_is_an_error(
    tmp_path, monkeypatch):
  run = listed_files.write_run(str(tmp_path), [], seed=0)
  assert listed_files.chunk_pieces(run, 10) == []
  monkeypatch.setattr(listed_files, 'INLINE_BYTES', 0)
  run = listed_files.write_run(str(tmp_path), ['cat/a.jpg', 'cat/b.jpg'],
                               seed=0)
  [(_, piece)] = listed_files.chunk_pieces(run, 1)
  data = b''.join(file_io.range_blocks([piece]))
  with pytest.raises(IOError, match='cut short'):
    listed_files.read_entries(data[:-1])
  with open(run.path, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(IOError):
    listed_files.entries(piece)


def test_record_references_come_back_grouped_by_content():
  digest_a, digest_b = bytes(range(32)), bytes(32)
  references = [
      (digest_a, 'cat/ä ö.png', 3, 1 << 40, (1, (1 << 64) - 1), None, True),
      (digest_b, 'dog/"q"\n.jpg', 0, 0, None, 'validation', False),
      (digest_a, 'dog/' + 'l' * 300 + '.jpg', 7, 9, None, 'test', True)]
  data = b''.join(dofns.pack_reference(*r) for r in references)
  assert dofns.read_references(data) == {
      digest_a: [r[1:] for r in references if r[0] == digest_a],
      digest_b: [references[1][1:]]}
  with pytest.raises(IOError, match='cut short'):
    dofns.read_references(data[:-1])


def test_a_build_does_not_depend_on_how_its_runs_were_cut_or_sent(
    tmp_path, monkeypatch):
  """The listing's runs and the writers' references, whole or cut into
  many pieces, in their elements or in files: the same bytes, exact copies
  in one class and across classes resolved alike."""
  helpers.photo_folder(tmp_path / 'in', per_class=4)
  files = sorted((tmp_path / 'in').rglob('*.*'))
  shutil.copy(files[0], files[0].with_name('copy.jpg'))  # Same class.
  shutil.copy(files[1], tmp_path / 'in' / 'rocket' / 'conflict.jpg')
  flags = dict(input_dir=str(tmp_path / 'in'), image_size='32', quiet=True,
               validation_fraction=0.3)
  monkeypatch.setattr(chunk_format, 'EXAMPLES_PER_CHUNK', 2)  # 7 chunks.
  one = builder.build(output_dir=str(tmp_path / 'one'), **flags)
  assert one['duplicates'] and one['conflicts']
  monkeypatch.setattr(listed_files, 'FLUSH_ENTRIES', 2)  # Runs of 2 files,
  monkeypatch.setattr(dofns, 'FLUSH_REFERENCES', 1)  # references a chunk,
  builder.build(output_dir=str(tmp_path / 'many'), **flags)
  monkeypatch.setattr(listed_files, 'INLINE_BYTES', 0)  # each in a file.
  builder.build(output_dir=str(tmp_path / 'files'), **flags)
  for other in ('many', 'files'):
    assert reuse.differences(str(tmp_path / 'one'),
                             str(tmp_path / other)) == []


def test_dedupe_buckets_stay_small_whatever_the_hashes():
  """A bucket holds ~REFERENCES_PER_BUCKET references whatever the file
  count, even for files made so that their sha256 share a prefix: the
  bucket is a hash keyed by the build's random salt."""
  num_files = 100_000
  buckets = dofns.reference_buckets(num_files)
  assert buckets * dofns.REFERENCES_PER_BUCKET >= num_files
  assert dofns.reference_buckets(10) == dofns.MIN_BUCKETS
  digests = [b'\x07\x07' + hashlib.sha256(str(i).encode()).digest()[2:]
             for i in range(num_files)]  # A shared prefix, as if ground.
  salt = os.urandom(16)
  sizes = collections.Counter(dofns.reference_bucket(
      d, salt=salt, buckets=buckets) for d in digests)
  assert len(sizes) == buckets
  assert max(sizes.values()) < 1.2 * dofns.REFERENCES_PER_BUCKET
  other = [dofns.reference_bucket(d, salt=os.urandom(16), buckets=buckets)
           for d in digests[:100]]
  assert other != [dofns.reference_bucket(d, salt=salt, buckets=buckets)
                   for d in digests[:100]]
