"""An update's carried near-duplicate search (near_carry): the same slots,
lines, counts and left-out images as the whole search over the new set,
after random changes to a set of near copies."""

import json
import zlib

import numpy as np
import pytest

from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import near_carry
from pipelines.folder_to_records import near_duplicates as nd

_LAYOUT = 'class_folders'
_CLASSES = ('cat', 'dog', 'émeu')
# Names that take the json path of near_carry._line_fields: a quote, a
# backslash, a character outside ASCII, an undecodable byte.
_ODD = ('say "hi"', 'back\\slash', 'naïve', 'bad\udcff')


def _hash(rng, center: int, flips: int) -> int:
  for bit in rng.choice(64, size=flips, replace=False).tolist():
    center ^= 1 << bit
  return center


def _refs(rng, n: int, centers: list, start: int = 0, odd: float = 0.0
          ) -> list:
  """n images near the centers (0-6 bits off), their centres 0-4 bits off
  their wholes; random splits and classes; a share `odd` of odd names."""
  refs = []
  for i in range(start, start + n):
    whole = _hash(rng, centers[rng.integers(len(centers))], rng.integers(7))
    name = f'img_{i:04d}' if rng.random() >= odd else (
        f'{_ODD[rng.integers(len(_ODD))]} {i}')
    refs.append(nd.Ref((whole, _hash(rng, whole, rng.integers(5))),
                       f'{_CLASSES[rng.integers(3)]}/{name}.jpg',
                       nd._SPLITS[rng.integers(3)], i % 7, i))
  return refs


def _whole(refs, distance, run_dir):
  """(search set, the whole search's best), the build's way."""
  s = near_carry.SearchSet.of_refs(refs, [False] * len(refs),
                                   layout=_LAYOUT)
  best, capped = near_carry._whole_search(s, refs, distance=distance,
                                          layout=_LAYOUT, run_dir=str(run_dir))
  assert not capped
  return s, best


def _outputs(outputs, run_dir) -> dict:
  """Lines (merged, each once), counts, drops and rejected entries."""
  runs, counts, tagged = [], {}, {nd.DROPS: [], 'rejected': []}
  for out in outputs:
    if isinstance(out, nd.PairRun):
      runs += [out.path] if out.path else []
      for kind, number in out.counts.items():
        counts[kind] = counts.get(kind, 0) + number
    else:
      tagged[out.tag].append(out.value)
  merged = run_dir / f'merged-{len(list(run_dir.iterdir()))}.jsonl'
  file_io.merge_runs(str(merged), runs, unique=True)
  return {'lines': merged.read_bytes(), 'counts': counts,
          'drops': sorted(tagged[nd.DROPS]),
          'rejected': sorted(repr(r)
                             for r in tagged['rejected'])}


def _reported(s, best, run_dir):
  """What the whole search's last step says of every image."""
  reporter = nd.Reporter(layout=_LAYOUT, run_dir=str(run_dir))
  outs = []
  for i in np.flatnonzero((best < nd.NEVER * len(s) + len(s)).any(1)):
    outs += list(reporter.image(s.relpaths[i], nd._SPLITS[s.split[i]],
                                int(s.chunk[i]), near_carry._slot_tuple(
                                    s, best[i].tolist())))
  outs.append(reporter.flush())
  return _outputs(outs, run_dir)


def _brute_force(s, distance) -> np.ndarray:
  """best as the whole search gives it, from near_distance of every pair
  (no capped group: every pair within the distance is a candidate)."""
  n = len(s)
  best = np.full((n, nd.SLOTS), nd.NEVER * n + n, dtype=np.int64)
  hashes = [tuple(h) for h in s.hashes.tolist()]
  for i in range(n):
    for j in range(n):
      d = nd.near_distance(hashes[i], hashes[j])
      if i == j or d > distance:
        continue
      for k in (s.split[j], *((nd.SLOTS - 1,) if s.cls[i] != s.cls[j]
                              else ())):
        best[i, k] = min(best[i, k], d * n + j)
  return best


@pytest.mark.parametrize('seed', range(12))
def test_the_carried_search_is_the_whole_search(tmp_path, monkeypatch, seed):
  rng = np.random.default_rng(seed)
  distance = (4, 8)[seed % 2]
  monkeypatch.setattr(near_carry, '_MOST_ROWS', 1.0)
  centers = [int(c) | 0xF0F0F0F0 for c in rng.integers(0, 1 << 62, size=6)]
  # Odd names in half the trials: their lists are read line by line.
  old_refs = _refs(rng, 200, centers, odd=0.05 * (seed % 4 < 2))
  old, old_best = _whole(old_refs, distance, tmp_path)
  earlier_file = tmp_path / 'near_duplicates.jsonl'
  lines = _reported(old, old_best, tmp_path)['lines']
  earlier_file.write_bytes(lines)
  assert lines.count(b'\n') > 100  # Enough pairs to mean something.

  # Deleted, changed in place (new hashes, maybe a new split), the same
  # bytes in another split (taken: no), left out as an exact copy before
  # (taken, not same), and new images, some nearer than what was there.
  kept = [r for r in old_refs if rng.random() > 0.03]
  changed = {i for i in range(len(kept)) if rng.random() < 0.02}
  moved = {i for i in range(len(kept)) if rng.random() < 0.01} - changed
  exact = {i for i in range(len(kept)) if rng.random() < 0.01}
  refs, same = [], []
  for i, ref in enumerate(kept):
    if i in changed:
      whole = _hash(rng, ref.phashes[0], rng.integers(1, 4))
      ref = ref._replace(phashes=(whole, _hash(rng, whole, 2)),
                         split=nd._SPLITS[rng.integers(3)])
    elif i in moved:
      ref = ref._replace(split=nd._SPLITS[(nd._SPLITS.index(ref.split) + 1)
                                          % 3])
    refs.append(ref)
    same.append(i not in changed and i not in moved and i not in exact)
  new = _refs(rng, 6, centers + [r.phashes[0] for r in refs[:3]],
              start=1000)
  refs += new
  same += [False] * len(new)

  s = near_carry.SearchSet.of_refs(refs, same, layout=_LAYOUT)
  earlier = near_carry.earlier_lines(
      lines, s, listed=lines.count(b'\n'), crc32=zlib.crc32(lines))
  # Not the lines the report describes: not read.
  assert near_carry.earlier_lines(lines, s, listed=lines.count(b'\n') - 1,
                                  crc32=zlib.crc32(lines)) is None
  assert near_carry.earlier_lines(lines, s, listed=lines.count(b'\n'),
                                  crc32=zlib.crc32(lines) ^ 1) is None
  carried = near_carry.carried_slots(s, earlier, distance=distance)
  assert carried.rows.sum() < len(s) / 2  # Carried, not all searched.
  whole, best = _whole(refs, distance, tmp_path)
  assert whole.paths == s.paths
  np.testing.assert_array_equal(best, _brute_force(whole, distance))
  np.testing.assert_array_equal(carried.best, best)
  got = _outputs(near_carry.carried_outputs(
      s, carried, earlier, layout=_LAYOUT, run_dir=str(tmp_path)), tmp_path)
  want = _reported(whole, best, tmp_path)
  assert got == want
  assert want['drops'] and want['counts']['label_conflicts']


def test_a_line_reads_the_same_with_or_without_json():
  """_line_fields' quick reading of a line equals json's, and a line with
  an escape in a name is read through json."""
  text = nd._Lines(_LAYOUT)
  pairs = (('cat/a.jpg', 'dog/b.jpg'), ('cat/say "hi".jpg', 'cat/x.jpg'),
           ('émeu/naïve.jpg', 'dog/bad\udcff.jpg'),
           ('cat/back\\slash.jpg', 'cat/[1], "distance": 3.jpg'))
  lines = [text.pair((a, 'validation'), (b, 'test'), 5).encode()
           for a, b in pairs]
  for line in lines:
    parsed = json.loads(line)
    assert near_carry._line_fields(line) == (
        nd._encoded(parsed['paths'][0]), nd._encoded(parsed['paths'][1]),
        b'5', *(s.encode() for s in parsed['splits']),
        json.dumps(parsed['label_conflict']).encode())
  # A file of lines without an escape is read all at once: the same.
  plain = b'\n'.join(lines[:1] * 3) + b'\n'
  assert near_carry._EVERY_LINE.findall(plain) == [
      near_carry._line_fields(lines[0])] * 3
  with pytest.raises(ValueError):
    near_carry._line_fields(b'{"paths": ["cat/a.jpg", "dog/b.jpg"], "dis')
  s = near_carry.SearchSet.of_refs([], [], layout=_LAYOUT)
  escaped = b'\n'.join(lines) + b'\n'
  # Lines the build does not write, their count and crc32 given as the
  # report would (a review's cases: each raised something else once).
  for damaged in (plain[:-1], plain.replace(b'true', b'yes', 1),
                  plain + b'{}\n', plain.replace(b'"distance": 5',
                                                 b'"distance": -5', 1),
                  plain.replace(b'"distance": 5', b'"distance": ' +
                                b'9' * 20, 1),
                  plain.replace(b'"kind"', b'"kinds"', 1),
                  escaped + b'["x"]\n', escaped + b'"x"\n',
                  escaped + b'[' * 100_000 + b']' * 100_000 + b'\n',
                  escaped + b'{"paths": [1, 2], "splits": [3, 4]}\n'):
    assert near_carry.earlier_lines(
        damaged, s, listed=damaged.count(b'\n'),
        crc32=zlib.crc32(damaged)) is None, damaged[-60:]
  assert near_carry.earlier_lines(
      escaped, s, listed=len(lines), crc32=zlib.crc32(escaped)) is not None
