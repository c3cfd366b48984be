"""An update's near-duplicate search, carried over from the earlier build.

The search keeps per image its nearest partner in each slot (near_duplicates:
a minimum over its candidates). Without a capped band group in the earlier
build or in this one, a candidate is a property of the pair alone (two
images within the distance, one hash at least a whole one), so an update
can compute only what changed, exactly:

  * same: an image of this search whose record was taken from the earlier
    build (the same bytes, so the same hashes; the same split, for the
    split settings are checked equal) and that the earlier search held
    (not a copy the earlier build left out as an exact duplicate);
  * C: the other images of this search (new, changed, or no longer left
    out); R: C, and each same image with an earlier slot partner that is
    not a same image now (gone, changed, left out);
  * an image of R gets its whole row (its candidates among every image of
    this search); every same image outside R keeps its earlier slots (read
    from the earlier near_duplicates.jsonl: an image's slot partner is in
    a listed pair of it, and no other listed pair in that slot is nearer),
    and takes a nearer candidate among R's rows. A same pair's distance
    and classes did not change, so nothing else can.

One step in one worker does it (NearCarry): this search's references
gathered in a few elements, the earlier lines read, the rows compared in
numpy (C and their earlier partners: ~1.5% of the images at a 1% change,
where the whole search compares every group), then the same Reporter as
the whole search's last step. Where a capped group turns up in this
search's set, it runs the whole search there instead (bucket_slots over
one bucket: the same slots). `applies` says when the launcher plans it.
"""

from __future__ import annotations

import bisect
import json
import posixpath
import re
import zlib
from typing import NamedTuple, Optional

import numpy as np

from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import near_duplicates as nd

# The earlier build's report must have these as this build has them (the
# split of a taken record is then its earlier split); with split folders
# the folder gives the split, and the report has no fractions.
_SPLIT_SETTINGS = ('seed', 'validation_fraction', 'test_fraction', 'layout')
_SPLIT_FOLDER_SETTINGS = ('layout',)
# Most images an earlier build may have written for its search to be
# carried over: a row costs ~N (its near_distance to every image, in numpy,
# in one worker), so past this the band steps' search, spread over the
# workers, costs less.
MOST_IMAGES = 200_000
# Most row x image pairs the carried step computes (~2 s of numpy): more
# images in R than this allows, and the step searches whole instead.
_MOST_ROW_PAIRS = 400_000_000


def applies(config) -> bool:
  """Whether an update with this BuildConfig carries the search over from
  its earlier build (config.reuse, with its report as open_source checked
  it): the search on in both at the same distance, no capped group in the
  earlier one, the same split settings, not --stratified (its splits move
  with the file set), at most MOST_IMAGES written by the earlier one."""
  report = getattr(config.reuse, 'report', None)
  near = getattr(report, 'near_duplicates', None)
  return bool(
      report is not None and config.near_duplicate_distance
      and not config.stratified and not report.stratified
      and near is not None and near.distance == config.near_duplicate_distance
      and not near.capped_groups
      # An earlier build without the lines' checksum (an older toolkit):
      # its search is not carried over.
      and (near.lines_crc32 or not near.listed)
      and report.written <= MOST_IMAGES
      and all(getattr(report, k) == getattr(config, k) for k in (
          _SPLIT_FOLDER_SETTINGS
          if config.layout == listing_lib.SPLIT_FOLDERS_LAYOUT
          else _SPLIT_SETTINGS)))


class Columns(NamedTuple):
  """Refs (near_duplicates.Ref) as columns, and whether each record was
  taken from the earlier build: relpaths (a list), whole, centre [N]
  uint64, split [N] (index into near_duplicates' splits), chunk, offset
  [N], taken [N]. One a bundle crosses to NearCarry: a list and six arrays
  pickle in a few ms, 15,000 tuples in ~50."""
  relpaths: list
  whole: np.ndarray
  centre: np.ndarray
  split: np.ndarray
  chunk: np.ndarray
  offset: np.ndarray
  taken: np.ndarray

  @classmethod
  def of(cls, pairs: list) -> 'Columns':
    """[(Ref, taken)] as Columns."""
    refs = [ref for ref, _ in pairs]
    column = lambda values, dtype: np.array(values, dtype=dtype)  # noqa: E731
    return cls([r.relpath for r in refs],
               column([r.phashes[0] for r in refs], np.uint64),
               column([r.phashes[1] for r in refs], np.uint64),
               column([nd._SPLITS.index(r.split) for r in refs], np.int64),  # pylint: disable=protected-access
               column([r.chunk for r in refs], np.int64),
               column([r.offset for r in refs], np.int64),
               column([taken for _, taken in pairs], bool))

  @classmethod
  def joined(cls, parts: list) -> 'Columns':
    """Several Columns as one."""
    if not parts:
      return cls.of([])
    return cls([p for part in parts for p in part.relpaths],
               *(np.concatenate([part[k] for part in parts])
                 for k in range(1, len(cls._fields))))

  def refs(self) -> list:
    """The Refs again."""
    splits = nd._SPLITS  # pylint: disable=protected-access
    return [nd.Ref((w, c), p, splits[s], ch, o) for p, w, c, s, ch, o in zip(
        self.relpaths, self.whole.tolist(), self.centre.tolist(),
        self.split.tolist(), self.chunk.tolist(), self.offset.tolist())]


class SearchSet:
  """This build's search set as arrays, in path (bytes) order: paths
  (bytes), relpaths, hashes [N, 2] (whole, centre), usable [N, 2], split
  [N] (index into near_duplicates' splits), chunk [N], cls [N] (class
  ids), same [N]; index: path -> its index."""

  def __init__(self, columns: Columns, same: np.ndarray, *, layout: str):
    n = len(columns.relpaths)
    encoded = [nd._encoded(p) for p in columns.relpaths]  # pylint: disable=protected-access
    order = sorted(range(n), key=encoded.__getitem__)
    self.paths = [encoded[i] for i in order]
    self.relpaths = [columns.relpaths[i] for i in order]
    at = np.array(order, dtype=np.int64)
    self.hashes = np.stack([columns.whole[at], columns.centre[at]],
                           axis=1).reshape(n, 2)
    self.usable = np.bitwise_count(self.hashes) >= nd.MIN_BITS_SET
    self.split = columns.split[at].astype(np.int64)
    self.chunk = columns.chunk[at]
    # A class is a folder's: class_name once a folder.
    folders = [p.rpartition('/')[0] for p in self.relpaths]
    classes = {f: nd.class_name(f + '/_', layout) for f in set(folders)}
    ids = {c: i for i, c in enumerate(sorted(set(classes.values())))}
    self.cls = np.array([ids[classes[f]] for f in folders], dtype=np.int64)
    self.same = np.asarray(same, dtype=bool)[at]
    self.index = dict(zip(self.paths, range(n)))

  @classmethod
  def of_refs(cls, refs: list, same: list, *, layout: str) -> 'SearchSet':
    """A SearchSet of Refs (same: of each)."""
    return cls(Columns.of([(r, False) for r in refs]), np.array(same, bool),
               layout=layout)

  def __len__(self) -> int:
    return len(self.paths)

  def capped(self, distance: int, cap: int) -> bool:
    """Whether a band group of this set has over `cap` members."""
    for mask in nd.band_masks(distance):
      bits = np.concatenate([self.hashes[self.usable[:, w], w]
                             & np.uint64(mask) for w in (0, 1)])
      if len(bits) and np.unique(bits, return_counts=True)[1].max() > cap:
        return True
    return False


class Earlier(NamedTuple):
  """The earlier build's near_duplicates.jsonl, read against this build's
  search set (earlier_lines). texts: the lines (without line ends); a, b
  [L]: each line's images (indices into the search set; -1: not in it), d
  [L], slot_b [L]: the slot b fills for a (b's split), slot_a [L], the
  reverse, conflict [L]: of two classes (then each also fills the other's
  slot of another class); slot_key, slot_partner [N, SLOTS]: each image's
  earlier nearest partner per slot among its listed pairs (its slots: see
  the module docstring) as d * 2 * (N + 1) + an order of paths, and its
  index (-1: not in the search set; NEVER keys: none)."""
  texts: list
  a: np.ndarray
  b: np.ndarray
  d: np.ndarray
  slot_b: np.ndarray
  slot_a: np.ndarray
  conflict: np.ndarray
  slot_key: np.ndarray
  slot_partner: np.ndarray


_SPLIT_BYTES = {name.encode(): k for k, name in enumerate(nd._SPLITS)}  # pylint: disable=protected-access
# A line as near_duplicates._pair_line writes it, its names without an
# escape (a quote, a backslash or a character outside ASCII: a file with
# one is read line by line, those through json).
_LINE = (rb'\{"paths": \["([^"\\\n]*)", "([^"\\\n]*)"\], "distance": ([0-9]+), '
         rb'"kind": "[a-z_]+", "splits": \["([a-z]+)", "([a-z]+)"\], '
         rb'"classes": \["[^"\\\n]*", "[^"\\\n]*"\], '
         rb'"label_conflict": (true|false)\}')
_ONE_LINE = re.compile(_LINE)
_EVERY_LINE = re.compile(rb'^' + _LINE + rb'$', re.MULTILINE)


def _line_fields(raw: bytes) -> tuple:
  """(path a, path b, d, split a, split b, true or false: of two classes),
  each as the line's bytes write it (names as UTF-8), of a line as
  near_duplicates._pair_line writes it (without its line end)."""
  found = _ONE_LINE.fullmatch(raw)
  if found is not None:
    return found.groups()
  line = json.loads(raw)
  (a, b), (split_a, split_b) = line['paths'], line['splits']
  if not isinstance(line['distance'], int) or not isinstance(
      line['label_conflict'], bool):
    raise ValueError('not a line the build writes')
  return (nd._encoded(a), nd._encoded(b), str(line['distance']).encode(),  # pylint: disable=protected-access
          split_a.encode(), split_b.encode(),
          b'true' if line['label_conflict'] else b'false')


def earlier_lines(data: bytes, s: 'SearchSet', *, listed: int,
                  crc32: int) -> Optional[Earlier]:
  """Reads the earlier build's near_duplicates.jsonl (its bytes) against
  this build's search set s; None unless it has the `listed` lines and the
  crc32 its report gives (edited or damaged: not the earlier search's) and
  every line is one the build writes."""
  lines = data.split(b'\n')
  if lines.pop() or len(lines) != listed or zlib.crc32(data) != crc32:
    return None
  try:
    return _read_lines(data, lines, s)
  except Exception:  # pylint: disable=broad-except  # Any line not ours.
    return None


def _read_lines(data: bytes, lines: list, s: 'SearchSet') -> Earlier:
  """earlier_lines, its lines checked: ValueError (or whatever a line
  not written by the build raises) for one it does not write."""
  if b'\\' in data:  # A name with an escape: line by line.
    fields = [_line_fields(raw) for raw in lines]
  else:  # All at once.
    fields = _EVERY_LINE.findall(data)
    if len(fields) != len(lines):
      raise ValueError('a line the build does not write')
  n = len(s)
  get = s.index.get
  paths_a, paths_b = [f[0] for f in fields], [f[1] for f in fields]
  ia = np.array([get(p, -1) for p in paths_a], dtype=np.int64)
  ib = np.array([get(p, -1) for p in paths_b], dtype=np.int64)
  d = np.array([int(f[2]) for f in fields], dtype=np.int64)
  if len(d) and (d.min() < 0 or d.max() >= nd.NEVER):
    raise ValueError('a distance the build does not write')
  slot_a = np.array([_SPLIT_BYTES[f[3]] for f in fields], dtype=np.int64)
  slot_b = np.array([_SPLIT_BYTES[f[4]] for f in fields], dtype=np.int64)
  conflict = np.array([f[5] == b'true' for f in fields], dtype=bool)
  # An order of paths: 2 x the index of one in the search set, 2 x where it
  # would go less 1 for one that is not.
  order = lambda i, paths: np.array([  # noqa: E731
      2 * j if j >= 0 else 2 * bisect.bisect_left(s.paths, p) - 1
      for j, p in zip(i.tolist(), paths)], dtype=np.int64)
  key_a = d * 2 * (n + 1) + order(ia, paths_a) + 1
  key_b = d * 2 * (n + 1) + order(ib, paths_b) + 1
  # Each line fills a slot of each of its images (two when of two classes).
  this = np.concatenate([ia, ib, ia[conflict], ib[conflict]])
  slot = np.concatenate([slot_b, slot_a, np.full(int(conflict.sum()) * 2,
                                                 nd.SLOTS - 1)])
  key = np.concatenate([key_b, key_a, key_b[conflict], key_a[conflict]])
  partner = np.concatenate([ib, ia, ib[conflict], ia[conflict]])
  held = this >= 0
  this, slot, key, partner = this[held], slot[held], key[held], partner[held]
  first = np.lexsort((key, slot, this))
  this, slot, key, partner = this[first], slot[first], key[first], partner[
      first]
  lead = np.ones(len(this), dtype=bool)
  lead[1:] = (this[1:] != this[:-1]) | (slot[1:] != slot[:-1])
  slot_key = np.full((n, nd.SLOTS), nd.NEVER * 2 * (n + 1), dtype=np.int64)
  slot_partner = np.full((n, nd.SLOTS), -1, dtype=np.int64)
  slot_key[this[lead], slot[lead]] = key[lead]
  slot_partner[this[lead], slot[lead]] = partner[lead]
  return Earlier(lines, ia, ib, d, slot_b, slot_a, conflict, slot_key,
                 slot_partner)


def _row_distances(s: SearchSet, r: int) -> np.ndarray:
  """[N] near_duplicates.near_distance of image r and each image (NEVER
  where no usable hash pair; NEVER for r itself)."""
  d = np.full(len(s), nd.NEVER, dtype=np.int64)
  for mine, theirs in nd._COMBOS:  # pylint: disable=protected-access
    if not s.usable[r, mine]:
      continue
    bits = np.bitwise_count(s.hashes[:, theirs] ^ s.hashes[r, mine]).astype(
        np.int64)
    np.minimum(d, np.where(s.usable[:, theirs], bits, nd.NEVER), out=d)
  d[r] = nd.NEVER
  return d


class Carried(NamedTuple):
  """carried_slots' result. best [N, SLOTS]: each image's nearest partner
  per slot as d * N + partner (least d, then first path), NEVER * N + N
  where none; rows [N]: the images given their whole row (R); earlier [N,
  SLOTS]: the earlier slots, so (for the images outside R)."""
  best: np.ndarray
  rows: np.ndarray
  earlier: np.ndarray


# Most images (a share of the search set) given their whole row: past it,
# the whole search (a compiled scan of the band groups) costs less than the
# rows in numpy (~0.3 ms a row at 30,000 images).
_MOST_ROWS = 1 / 8


def carried_slots(s: SearchSet, earlier: Earlier, *,
                  distance: int) -> Optional[Carried]:
  """Each image's slots (module docstring); None where more than
  _MOST_ROWS of the images need their whole row, or more rows than
  _MOST_ROW_PAIRS allows. Needs no capped group in s (SearchSet.capped)
  nor in the earlier search."""
  n = len(s)
  none = nd.NEVER * n + n
  held = earlier.slot_key < nd.NEVER * 2 * (n + 1)
  partner = earlier.slot_partner
  # An earlier partner not in the search set, or not the same image now.
  lost = held & ((partner < 0) | ~s.same[np.maximum(partner, 0)])
  rows = ~s.same | lost.any(axis=1)
  if rows.sum() > len(s) * _MOST_ROWS or (
      rows.sum() * len(s) > _MOST_ROW_PAIRS):
    return None  # The whole search costs less.
  d = earlier.slot_key // (2 * (n + 1))
  best = np.where(held, d * n + partner, none)
  best[rows] = none
  before = best.copy()
  for r in np.flatnonzero(rows).tolist():
    d = _row_distances(s, r)
    cand = np.flatnonzero(d <= distance)
    if not len(cand):
      continue
    key = d[cand] * n + cand
    for k in range(len(nd._SPLITS)):  # pylint: disable=protected-access
      in_slot = key[s.split[cand] == k]
      if len(in_slot):
        best[r, k] = min(best[r, k], in_slot.min())
    other = key[s.cls[cand] != s.cls[r]]
    if len(other):
      best[r, nd.SLOTS - 1] = min(best[r, nd.SLOTS - 1], other.min())
    # r as a candidate of each of its candidates.
    mine = d[cand] * n + r
    np.minimum.at(best, (cand, np.full(len(cand), s.split[r])), mine)
    across = s.cls[cand] != s.cls[r]
    np.minimum.at(best, (cand[across], np.full(int(across.sum()),
                                               nd.SLOTS - 1)), mine[across])
  return Carried(best, rows, before)


def _whole_search(s: SearchSet, refs: list[nd.Ref], *, distance: int,
                  layout: str, run_dir: str):
  """(best as carried_slots gives it, capped groups' reports): the whole
  search over s in this process, as the band steps do it (band entries
  into bucket files, a bucket at a time compared, each image's slots kept:
  memory bounded by a bucket, not by the set)."""
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  n = len(s)
  masks = nd.band_masks(distance)
  buckets, ranges = nd.num_buckets(n, masks), {}
  step = max(1, nd._FLUSH_ENTRIES // (2 * len(masks)))  # pylint: disable=protected-access
  for at in range(0, len(refs), step):
    for bucket, where in file_io.write_keyed(run_dir, 'bands', nd.bucket_bytes(
        refs[at:at + step], masks=masks, buckets=buckets, layout=layout)):
      ranges.setdefault(bucket, []).append(where)
  nearest, capped = nd._Nearest(), []  # pylint: disable=protected-access
  for bucket in sorted(ranges):
    found = nd.bucket_slots(file_io.read_keyed(ranges[bucket]),
                            distance=distance)
    nearest.add(found)
    capped += found.capped
  best = np.full((n, nd.SLOTS), nd.NEVER * n + n, dtype=np.int64)
  found = nd.read_slots(b''.join(record for _, record in nearest.records()))
  for path, (_, _, slots) in found.items():
    i = s.index[path]
    for k, slot in enumerate(slots):
      if slot is not None:
        best[i, k] = slot[0] * n + s.index[slot[1]]
  return best, capped


def _left_out_exact(dataset_dir: str, counts: dict) -> Optional[set[str]]:
  """The paths the earlier build left out as exact copies (or left out
  for any reason but a near leak: its search did not hold them); None when
  its rejected.jsonl cannot be read, or its outcomes are not the counts
  its report gives (`counts`: edited; then no record is a same image)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  left_out, outcomes = set(), {}
  try:
    with FileSystems.open(posixpath.join(dataset_dir,
                                         metadata_lib.REJECTED_FILE),
                          compression_type=file_io.RAW) as f:
      for raw in f:
        line = json.loads(raw)
        outcome = line['outcome']
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome != nd.NEAR_LEAK:
          left_out.add(line['path'])
  except Exception:  # pylint: disable=broad-except  # As reuse's reads.
    return None
  if outcomes != {k: v for k, v in counts.items()
                  if k not in ('seen', 'written') and v}:
    return None
  return left_out


def counts(s: SearchSet, best: np.ndarray) -> dict:
  """The report's counts of images (near_duplicates.image_kinds) from
  each image's slots."""
  n = len(s)
  filled = best < nd.NEVER * n + n
  code = s.split * 16 + (filled * (1 << np.arange(nd.SLOTS))).sum(axis=1)
  found = {}
  for c, number in enumerate(np.bincount(code, minlength=48).tolist()):
    if number:
      split = nd._SPLITS[c // 16]  # pylint: disable=protected-access
      for kind in nd.image_kinds(split, tuple(
          True if (c >> k) & 1 else None for k in range(nd.SLOTS))):
        found[kind] = found.get(kind, 0) + number
  return found


def _slot_tuple(s: SearchSet, keys: list[int]) -> tuple:
  """An image's slots as Reporter.image takes them."""
  n = len(s)
  splits = nd._SPLITS  # pylint: disable=protected-access
  return tuple(None if key >= nd.NEVER * n + n else
               (key // n, s.relpaths[key % n], splits[s.split[key % n]])
               for key in keys)


def carried_outputs(s: SearchSet, carried: Carried, earlier: Earlier, *,
                    layout: str, run_dir: str):
  """The carried search's outputs (those of Reporter for every image: one
  PairRun of all lines and counts, the drops and the rejected entries),
  where a slot as it was, of an image whose partners are as they were,
  keeps its earlier line as it is: the other slots' lines are made again."""
  n = len(s)
  none = nd.NEVER * n + n
  best, splits = carried.best, nd._SPLITS  # pylint: disable=protected-access
  # A slot as it was, of an image as it was whose partners are too: the
  # lines it names are the earlier ones, byte for byte.
  kept = (s.same & ~carried.rows)[:, None] & (best == carried.earlier)
  a, b, d = earlier.a, earlier.b, earlier.d
  both = (a >= 0) & (b >= 0)
  a, b = np.where(both, a, 0), np.where(both, b, 0)

  def named(this, other, slot):
    """Lines a kept slot of `this` names: its partner in `slot`, or in its
    slot of another class."""
    key = d * n + other
    return both & (
        (kept[this, slot] & (carried.earlier[this, slot] == key))
        | (earlier.conflict & kept[this, nd.SLOTS - 1]
           & (carried.earlier[this, nd.SLOTS - 1] == key)))

  keep = named(a, b, earlier.slot_b) | named(b, a, earlier.slot_a)
  reporter = nd.Reporter(layout=layout, run_dir=run_dir)
  reporter.add([earlier.texts[i].decode('ascii')
                for i in np.flatnonzero(keep).tolist()], counts(s, best))
  filled = best < none
  made = filled & ~kept
  for i in np.flatnonzero(made.any(axis=1)).tolist():
    reporter.pairs(s.relpaths[i], splits[s.split[i]],
                   _slot_tuple(s, np.where(made[i], best[i], none).tolist()))
  for i in np.flatnonzero(filled[:, 0] & (s.split != 0)).tolist():
    yield from reporter.left_out(s.relpaths[i], splits[s.split[i]],
                                 int(s.chunk[i]),
                                 _slot_tuple(s, best[i].tolist()))
  yield reporter.flush()


def _near_carry(*, distance: int, layout: str, run_dir: str, source):
  """A DoFn: (None, batches of (Ref, taken)) -> the search's outputs for
  this build's search set: carried over (carried_slots,
  carried_outputs), or where a capped group turns up or the earlier lines
  are not those its report describes, the whole search here (Reporter for
  every image; 'near_capped'). source: the earlier build (reuse.Source)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import metadata as metadata_lib  # pylint: disable=g-import-not-at-top

  class NearCarry(beam.DoFn):
    """See _near_carry."""

    def process(self, element):
      _, batches = element
      columns = Columns.joined(list(batches))
      dataset_dir, report = source.dataset_dir, source.report
      exact = _left_out_exact(dataset_dir, dict(report.counts))
      same = columns.taken & (
          np.array([p not in exact for p in columns.relpaths], dtype=bool)
          if exact is not None else False)
      s = SearchSet(columns, same, layout=layout)
      earlier = carried = None
      # Most images changed (or taken from no earlier record): the whole
      # search costs less than their rows.
      if (len(s) - s.same.sum() <= len(s) * _MOST_ROWS
          and not s.capped(distance, nd.MAX_GROUP)):
        near = report.near_duplicates
        try:
          with FileSystems.open(posixpath.join(
              dataset_dir, metadata_lib.NEAR_DUPLICATES_FILE),
                                compression_type=file_io.RAW) as f:
            data = f.read()
        except Exception:  # pylint: disable=broad-except  # As reuse's reads.
          data = None
        if data is not None:
          earlier = earlier_lines(data, s, listed=near.listed,
                                  crc32=near.lines_crc32)
        if earlier is not None:
          carried = carried_slots(s, earlier, distance=distance)
      if carried is not None:
        yield from carried_outputs(s, carried, earlier, layout=layout,
                                   run_dir=run_dir)
        return
      best, capped = _whole_search(s, columns.refs(), distance=distance,
                                   layout=layout, run_dir=run_dir)
      for found in capped:
        yield nd._tagged(nd.CAPPED, found)  # pylint: disable=protected-access
      n = len(s)
      reporter = nd.Reporter(layout=layout, run_dir=run_dir)
      splits = nd._SPLITS  # pylint: disable=protected-access
      for i in np.flatnonzero((best < nd.NEVER * n + n).any(axis=1)).tolist():
        yield from reporter.image(s.relpaths[i], splits[s.split[i]],
                                  int(s.chunk[i]),
                                  _slot_tuple(s, best[i].tolist()))
      if reporter.pending():
        yield reporter.flush()

  return NearCarry()


def _batches():
  """A DoFn: (Ref, taken) -> one Columns of them per bundle (NearCarry's
  step gathers a few elements, not one per image)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top

  class Batch(beam.DoFn):

    def start_bundle(self):
      self._held = []

    def process(self, element):
      self._held.append(element)

    def finish_bundle(self):
      if self._held:
        yield file_io.in_global_window((None, Columns.of(self._held)))
      self._held = []

  return Batch()


def find(refs, *, distance: int, layout: str, run_dir: str, source):
  """near_duplicates.find's outputs, carried over (see the module
  docstring): refs are (Ref, taken) of each record searched; source the
  earlier build (reuse.Source, with its report)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  found = (refs
           | 'NearBatches' >> beam.ParDo(_batches())
           | 'NearAll' >> beam.GroupByKey()
           | 'NearCarry' >> beam.ParDo(_near_carry(
               distance=distance, layout=layout, run_dir=run_dir,
               source=source)).with_outputs(
                   nd.DROPS, 'rejected', nd.CAPPED, main='runs'))
  return found[nd.DROPS], found.rejected, found.runs, found[nd.CAPPED]


