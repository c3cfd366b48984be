"""Seeded fuzz test: the build on a few hundred mutated real images.

Real JPEG (baseline and progressive), PNG, GIF and WebP bytes are truncated,
bit-flipped, given lying headers, cut with a new end marker, zeroed in
places and padded with junk. The build must not hang or crash, its memory
stays bounded, its counts reconcile, and every mutated file is either
written as a fully decodable image or reported with a reason.
"""

import io
import json
import os
import warnings

import numpy as np
from PIL import Image
import simplejpeg
import tensorflow as tf

from tests import helpers
import tfrecords_schema
from tfrecords_schema import schema

SEED = int(os.environ.get("FUZZ_SEED", "20261123"))  # Other seeds: FUZZ_SEED=N.
FILES_PER_CLASS = 120


def _originals() -> list[tuple[str, bytes]]:
  """Small real photos in every format the build reads."""
  out = []
  for name in ('chelsea', 'coffee', 'rocket', 'astronaut'):
    image = Image.fromarray(helpers.photo(name)).resize((72, 56))
    for fmt, ext, kwargs in (
        ('JPEG', '.jpg', {'quality': 90}),
        ('JPEG', '.jpg', {'quality': 80, 'progressive': True}),
        ('PNG', '.png', {}),
        ('GIF', '.gif', {}),
        ('WEBP', '.webp', {'quality': 80})):
      buffer = io.BytesIO()
      image.save(buffer, format=fmt, **kwargs)
      out.append((ext, buffer.getvalue()))
  return out


def _mutate(data: bytes, ext: str, rng: np.random.Generator) -> bytes:
  """One seeded mutation of an image file's bytes."""
  data = bytearray(data)
  kind = rng.integers(7)
  n = len(data)
  if kind == 0:  # Truncation anywhere (also inside the header).
    return bytes(data[:rng.integers(1, n)])
  if kind == 1:  # A few bit flips past the signature.
    for _ in range(rng.integers(1, 8)):
      i = rng.integers(8, n)
      data[i] ^= 1 << int(rng.integers(8))
    return bytes(data)
  if kind == 2:  # Header edit: random bytes where sizes and tables live.
    start = rng.integers(4, min(64, n - 4))
    data[start:start + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
    return bytes(data)
  if kind == 3:  # Cut and given a new end (JPEG EOI / PNG IEND / GIF ';').
    end = {'.jpg': b'\xff\xd9', '.png': data[-12:], '.gif': b';'}.get(ext, b'')
    return bytes(data[:rng.integers(n // 4, n)]) + bytes(end)
  if kind == 4:  # A zeroed range in the middle.
    i = rng.integers(8, n - 1)
    data[i:i + int(rng.integers(1, 64))] = b'\0' * len(data[i:i + 64])
    return bytes(data[:n])
  if kind == 5:  # Junk appended after the image.
    return bytes(data) + rng.integers(0, 256, rng.integers(1, 200),
                                      dtype=np.uint8).tobytes()
  # Size fields set to huge values (a decompression bomb that lies).
  if ext == '.png':
    data[16:24] = (30000).to_bytes(4, 'big') * 2
  elif ext == '.gif':
    data[6:10] = (65535).to_bytes(2, 'little') * 2
  else:
    i = rng.integers(8, n - 4)
    data[i:i + 4] = b'\xff\xff\xff\xff'
  return bytes(data)


def _fully_decodable(data: bytes) -> bool:
  """Strict decode of a whole file, as a user's other tools would."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt = image.format
    if fmt in ('JPEG', 'MPO'):
      simplejpeg.decode_jpeg(data, strict=True)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def test_fuzzed_images_never_hang_crash_or_vanish(tmp_path):
  rng = np.random.default_rng(SEED)
  originals = _originals()
  images = tmp_path / 'images'
  sources = {}
  for cls in ('a', 'b'):
    for i in range(FILES_PER_CLASS):
      ext, data = originals[rng.integers(len(originals))]
      mutated = _mutate(data, ext, rng)
      rel = f'{cls}/{i:03d}{ext}'
      helpers.write(images / rel, mutated)
      sources[rel] = mutated
  out = tmp_path / 'out'
  result, peak_mb = helpers.run_cli_peak(
      'pipelines.build', f'--input_dir={images}', f'--output_dir={out}',
      '--image_size=24', '--validation_fraction=0.25', timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert peak_mb < 2000

  report = json.loads((out / 'build_report.json').read_text())
  counts = report['counts']
  assert counts['seen'] == len(sources)
  assert sum(v for k, v in counts.items() if k != 'seen') == counts['seen']
  rejected = {}
  for line in (out / 'rejected.jsonl').read_text().splitlines():
    entry = json.loads(line)
    assert entry['reason'], entry
    rejected[entry['path']] = entry
  spec = tfrecords_schema.read_dataset_spec(str(out))
  written = set()
  for split in spec.splits:
    for record in tf.data.TFRecordDataset(spec.shard_paths(str(out), split)):
      example = schema.parse_examples(record)
      image = schema.decode_image(
          example[schema.IMAGE], image_format=spec.image_format,
          height=spec.height, width=spec.width, channels=spec.channels)
      assert image.shape == (24, 24, 3)
      written.add(example[schema.FILENAME].numpy().decode())
  assert written | set(rejected) == set(sources)
  assert not written & set(rejected)
  # Each written file decodes strictly; a rejected one either does not, or
  # was left out for a reason that is not about its bytes (a duplicate).
  undecodable_written = sorted(p for p in written
                               if not _fully_decodable(sources[p]))
  assert not undecodable_written
  for path, entry in rejected.items():
    if entry['outcome'].startswith('rejected_') and entry['outcome'] != (
        'rejected_too_large'):
      assert not _fully_decodable(sources[path]), entry
  # The mutations did their job: both outcomes are well represented.
  assert len(written) > 40 and len(rejected) > 40
