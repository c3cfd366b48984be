"""Near-duplicate pairs across the whole build, without comparing all pairs.

Each written image has a 64-bit perceptual hash (pipelines.preprocessing.
perceptual_hash: resized, re-encoded, lightly cropped or brightened copies
of a photo land within a few bits of it). Two hashes within `distance` bits
differ in at most `distance` places, so when the 64 bits are cut into
`distance + 1` bands, some band of the two is identical (pigeonhole): keying
every image by each of its bands and comparing only inside a key's group
finds every pair within the distance. A pair sharing several bands is
emitted only by the group of the first one, so each pair comes out once.

Scale: a group holds the images sharing one band value (~N / 2^band_bits of
them for spread hashes); a group larger than MAX_GROUP (e.g. thousands of
blank images with the same hash) is compared only among its MAX_GROUP first
members by path and reported as capped, so no worker ever holds more than
MAX_GROUP references, whatever the file count.

Rules for a pair (a, b) at distance d (README, "Near-duplicates"):
  * one in train, the other in validation or test: a leak; the evaluation
    copy is left out (rejected.jsonl names the train file and d), as exact
    leaks are, so files never change split when others are added;
  * same split, or validation against test: reported, nothing removed;
  * different classes: also reported as a possible label conflict.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from pipelines.common import walk
from pipelines.folder_to_records import listing as listing_lib

HASH_BITS = 64
# Default --near_duplicate_distance (see BUILD_NOTES "Near-duplicates" for
# the precision/recall table it was chosen from); 0 turns the search off.
DEFAULT_DISTANCE = 8
MAX_DISTANCE = 24
# Most references one band group compares (see "Scale" above).
MAX_GROUP = 4096
_ROWS = 256  # Rows of a group's distance matrix computed at once.

NEAR_LEAK = 'near_duplicate_leak'  # Outcome of a left-out evaluation copy.
LEAK, WITHIN_SPLIT, ACROSS_EVALUATION = (
    'leak', 'within_split', 'across_evaluation_splits')
# Tagged outputs.
PAIRS, CAPPED = 'near_pairs', 'near_capped'


def _tagged(tag: str, value):
  """Beam's TaggedOutput (Beam loads only where the graph runs: the build's
  settings read this module's constants without it)."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  return pvalue.TaggedOutput(tag, value)


class Ref(NamedTuple):
  """A written record, as the near-duplicate search carries it."""
  phash: int
  relpath: str
  split: str
  chunk: int
  offset: int


def band_masks(distance: int) -> tuple[int, ...]:
  """The bit masks of the distance + 1 bands (as even as can be) that cut
  HASH_BITS bits: two hashes within `distance` share one band exactly."""
  num_bands = min(distance + 1, HASH_BITS)
  masks, start = [], 0
  for band in range(num_bands):
    width = HASH_BITS // num_bands + (band < HASH_BITS % num_bands)
    masks.append(((1 << width) - 1) << start)
    start += width
  return tuple(masks)


def band_keys(ref: Ref, *, masks: tuple[int, ...]
              ) -> Iterator[tuple[tuple[int, int], Ref]]:
  """((band, band bits), ref) for each band of ref's hash."""
  for band, mask in enumerate(masks):
    yield (band, ref.phash & mask), ref


def _smallest(refs: Iterable[Ref], cap: int) -> tuple[list[Ref], int]:
  """(the `cap` refs first by path, sorted; how many there were in all),
  holding at most cap refs at a time."""
  heap, total = [], 0  # Max-heap by path (negated via a wrapper).
  for ref in refs:
    total += 1
    item = (_Desc(ref.relpath), ref)
    if len(heap) < cap:
      heapq.heappush(heap, item)
    elif item[0] > heap[0][0]:  # Earlier path than the latest kept.
      heapq.heapreplace(heap, item)
  return sorted((ref for _, ref in heap), key=lambda r: r.relpath), total


@dataclasses.dataclass(frozen=True, order=False)
class _Desc:
  """A string that sorts in reverse (a max-heap from heapq's min-heap)."""
  text: str

  def __lt__(self, other):
    return self.text > other.text

  def __gt__(self, other):
    return self.text < other.text


def group_pairs(element, *, distance: int, masks: tuple[int, ...],
                cap: int = MAX_GROUP
                ) -> Iterator[tuple[Ref, Ref, int]]:
  """((band, bits), refs) -> (a, b, d) for each pair within `distance`
  whose first shared band is this one; 'near_capped' for a group over cap.
  """
  (band, _), refs = element
  members, total = _smallest(refs, cap)
  if total > cap:
    yield _tagged(CAPPED, {
        'band': band, 'members': total, 'compared': cap,
        'example': members[0].relpath})
  if len(members) < 2:
    return
  hashes = np.array([m.phash for m in members], dtype=np.uint64)
  earlier = [np.uint64(m) for m in masks[:band]]
  for top in range(0, len(members), _ROWS):
    rows = hashes[top:top + _ROWS, None] ^ hashes[None, :]
    near = np.bitwise_count(rows) <= distance
    # Upper triangle only: each pair once.
    near &= np.arange(len(members))[None, :] > (
        top + np.arange(rows.shape[0]))[:, None]
    for i, j in zip(*np.nonzero(near)):
      x = rows[i, j]
      if any(not x & m for m in earlier):  # An earlier band's group has it.
        continue
      yield members[top + i], members[j], int(np.bitwise_count(x))


def classify(pair: tuple[Ref, Ref, int], *, layout: str):
  """(a, b, d) -> its report line (dict); and, for a leak, 'leak':
  (the evaluation copy's relpath, (d, train relpath, eval Ref))."""
  a, b, d = pair
  classes = [listing_lib.source_file(r.relpath, layout).class_name
             for r in (a, b)]
  splits = [a.split, b.split]
  if (a.split == 'train') != (b.split == 'train'):
    kind = LEAK
    train, held_out = (a, b) if a.split == 'train' else (b, a)
    yield _tagged(LEAK, (held_out.relpath,
                                          (d, train.relpath, held_out)))
  else:
    kind = WITHIN_SPLIT if a.split == b.split else ACROSS_EVALUATION
  yield {'kind': kind, 'distance': d, 'paths': [a.relpath, b.relpath],
         'splits': splits, 'classes': classes,
         'label_conflict': classes[0] != classes[1]}


def leave_out(element):
  """(evaluation relpath, [(d, train relpath, Ref), ...]) -> its drop
  (split, chunk, offset), and its 'rejected' line naming the nearest train
  copy."""
  relpath, partners = element
  d, train, ref = min(partners, key=lambda p: (p[0], p[1]))
  yield ref.split, ref.chunk, ref.offset
  yield _tagged('rejected', walk.Skipped(
      relpath, NEAR_LEAK,
      f'near-duplicate of {train} (train; perceptual hash distance {d}): '
      f'left out of {ref.split} so that it does not inflate evaluation',
      near=train, distance=d))


def find(refs, *, distance: int, layout: str):
  """The search as Beam steps: refs (one Ref per written record) ->
  (drops, rejected, pair lines, capped groups)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  masks = band_masks(distance)
  pairs = (
      refs
      | 'NearBands' >> beam.FlatMap(band_keys, masks=masks)
      | 'NearGroups' >> beam.GroupByKey()
      | 'NearPairs' >> beam.FlatMap(group_pairs, distance=distance,
                                    masks=masks).with_outputs(
                                        CAPPED, main='pairs'))
  lines = pairs.pairs | 'NearRules' >> beam.FlatMap(
      classify, layout=layout).with_outputs(LEAK, main='lines')
  left_out = (lines[LEAK]
              | 'NearLeaks' >> beam.GroupByKey()
              | 'LeaveOut' >> beam.FlatMap(leave_out).with_outputs(
                  'rejected', main='drops'))
  return left_out.drops, left_out.rejected, lines.lines, pairs[CAPPED]
