"""A build worker holds one image at a time, whatever the chunk size: each
record is written before the next file is read, and the bytes allocated
while a chunk is written do not grow with its number of images (issue 23,
case 11: 4096x4096 raw images)."""

import pathlib
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import listing
from pipelines.preprocessing import source_image
from tests import helpers

_SIDE = 512  # A raw record of 768 KiB: it dwarfs everything else per image.
_RECORD = _SIDE * _SIDE * 3
# Copies of the stored image alive at once, at most: 4.2 measured (the
# decode's and the pixel sums' arrays, the stored bytes, the Example and its
# framing); holding the previous record while decoding the next made 6.2.
_MAX_RECORDS_IN_FLIGHT = 5


@pytest.fixture(scope='module')
def chunk(tmp_path_factory):
  """12 real 512x512 photos (PNG) and a corrupt file; a WriteChunk of them."""
  root = tmp_path_factory.mktemp('memory')
  images = root / 'images'
  base = np.asarray(Image.fromarray(helpers.photo('astronaut')).resize(
      (_SIDE, _SIDE)))
  relpaths = []
  for i in range(12):
    relpath = f'{"ab"[i % 2]}/{i:02d}.png'
    helpers.save(images / relpath, Image.fromarray(np.roll(base, 5 * i, 1)))
    relpaths.append(relpath)
  helpers.write(images / 'a' / 'bad.png', b'\x89PNG\r\n\x1a\n' + bytes(100))
  relpaths.append('a/bad.png')
  tmp = root / 'tmp'
  (tmp / beam_build.CHUNKS_DIR).mkdir(parents=True)
  config = beam_build.BuildConfig(
      str(images), 'ds', ('a', 'b'), listing.CLASS_FOLDERS_LAYOUT,
      source_image.ImageOptions(height=_SIDE, width=_SIDE,
                                image_format='raw'),
      0.0, 0.0, 0, 1 << 30)
  return config, str(tmp), relpaths


def test_each_record_is_written_before_the_next_file_is_read(
    chunk, monkeypatch):
  config, tmp, relpaths = chunk
  events = []
  read_source = source_image.read_source
  create = beam_build.FileSystems.create

  def read(path, **kwargs):
    events.append(('read', path[len(config.input_dir) + 1:]))
    return read_source(path, **kwargs)

  class Writer:
    """A chunk file that logs each write (what it is given, not buffered)."""

    def __init__(self, f):
      self._f = f

    def write(self, data):
      events.append(('write', len(data)))
      self._f.write(data)

    def close(self):
      self._f.close()

  monkeypatch.setattr(source_image, 'read_source', read)
  monkeypatch.setattr(beam_build.FileSystems, 'create', lambda path, **kw: (
      Writer(create(path, **kw)) if path.endswith('.tfrecord') else
      create(path, **kw)))
  outputs = list(beam_build.WriteChunk(config, tmp).process((0, relpaths)))
  rejected = [o.value.relpath for o in outputs
              if getattr(o, 'tag', None) == beam_build.REJECTED]
  assert rejected == ['a/bad.png']
  # read, write, read, write, ...: one framed record per write, and nothing
  # read ahead of a record that is not written yet (local files are only
  # announced to the kernel ahead, never read).
  reads = [e[1] for e in events if e[0] == 'read']
  assert sorted(reads) == sorted(relpaths)
  expected = []
  for relpath in reads:
    expected += [('read', relpath)] + (
        [] if relpath == 'a/bad.png' else [('write', 'one record')])
  record = lambda size: 'one record' if _RECORD < size < _RECORD + 300 else size
  assert [(kind, value if kind == 'read' else record(value))
          for kind, value in events] == expected


def _peak_bytes(config, tmp: str, index: int, relpaths) -> int:
  """The most bytes Python and numpy held at once while writing a chunk."""
  write_chunk = beam_build.WriteChunk(config, tmp)
  tracemalloc.start()
  try:
    list(write_chunk.process((index, relpaths)))
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_a_chunk_writer_holds_a_few_copies_of_one_image_whatever_its_size(
    chunk):
  config, tmp, relpaths = chunk
  _peak_bytes(config, tmp, 1, relpaths[:2])  # Warm: imports, caches.
  small = _peak_bytes(config, tmp, 2, relpaths[:2])
  large = _peak_bytes(config, tmp, 3, relpaths)
  assert large < small + _RECORD / 4, (small, large)  # No growth per image.
  assert large < _MAX_RECORDS_IN_FLIGHT * _RECORD, large / _RECORD
  [written] = pathlib.Path(tmp, beam_build.CHUNKS_DIR).glob('000003-train-*')
  assert 12 * _RECORD < written.stat().st_size < 12 * (_RECORD + 300)
