"""Near-duplicates across the whole build, without comparing all pairs.

Each written image has two 64-bit perceptual hashes (pipelines.preprocessing.
perceptual_hash.build_hashes): of the whole image and of its centre.
Resized, re-encoded or brightened copies of a photo land within a few bits
of its whole hash, and copies cropped a few % a side near its centre hash,
so two images are near when near_distance (the least of whole-whole and
whole-centre either way) is at most `distance`. Two hashes within
`distance` bits differ in at most `distance` places, so when the 64 bits
are cut into `distance + 1` bands, some band of the two is identical
(pigeonhole): keying every hash by each of its bands and comparing only
inside a key's group finds every pair within the distance.

What the search keeps is per image, not per pair: its nearest partner in
each slot (the partner's split: train, validation, test; and the nearest
of another class), least distance then first path. Every candidate of
every group counts (a minimum: a pair seen in several groups, or through
several hash pairs, changes nothing), so no pair needs to come out of one
group only, and nothing grows with the number of pairs (30,000 crops of
three photos make ~146 million candidate pairs; their lines were 298 MB
when the report listed every pair). The group step compares each bucket
of groups in one compiled call (bucket_slots) and keeps each image's
slots over its buckets (_Nearest, arrays); it hands them on as records in
files keyed by a hash of the path (not one shuffle element per image),
and a last step (_report_images) keeps each image's nearest over the
bundles (read_slots), writes its pairs' lines, counts it, and leaves it
out when it is an evaluation image with a train copy.

Scale: a group holds the images sharing one band value (~N / 2^band_bits of
them for spread hashes); a group larger than MAX_GROUP (e.g. thousands of
near-identical frames) is compared only among MAX_GROUP members (first by a
hash of their path, so no folder is favoured), reported as capped, so a
group's work is bounded whatever the file count: pairs of two images that
no group compared whole are not found. The band entries travel through
bucket files (_bands_to_buckets), not as shuffle elements, so neither the
launcher nor a worker holds them all. Limit: with spread hashes, groups
reach the member cap near N = 2^band_bits * MAX_GROUP (~260k images at the
default distance). Flat images (a flat whole or centre) take no part: see
MIN_BITS_SET; nor do sources under MIN_SOURCE_SIDE pixels a side
(searched).

Rules for an image (README, "Near-duplicates"):
  * an evaluation image (validation or test) with a train copy: a leak;
    it is left out (rejected.jsonl names its nearest train copy and d), as
    exact leaks are, so files never change split when others are added;
  * a copy in its own split, or validation against test: reported,
    nothing removed;
  * a copy of another class: also reported as a possible label conflict.

The report counts images (image_kinds), and near_duplicates.jsonl lists
each image's pairs with the partners in its slots: at most 4 lines an
image; a pair both its images name is merged once.
"""

from __future__ import annotations

import functools
import struct
import zlib
from typing import Iterable, Iterator, NamedTuple, Optional

import numpy as np

from pipelines.common import walk
from pipelines.folder_to_records import listing as listing_lib

try:  # The group step compiled (bucket_slots), when built.
  from pipelines.folder_to_records import _near_pairs as _compiled  # pylint: disable=g-import-not-at-top
except ImportError:  # Not built (no C compiler at install): numpy.
  _compiled = None

HASH_BITS = 64
# Default --near_duplicate_distance (see BUILD_NOTES "Near-duplicates" for
# the precision/recall table it was chosen from); 0 turns the search off.
DEFAULT_DISTANCE = 8
# Past ~16 the bands are 3-4 bits: groups hold N/8-N/16 hashes, reach
# MAX_GROUP at a few thousand images and the search compares only part of
# them (and the false pairs of the calibration grow: BUILD_NOTES).
MAX_DISTANCE = 16
# Most references one band group compares (see "Scale" above).
MAX_GROUP = 4096
_ROWS = 256  # Rows of a group's distance matrix computed at once.
# Which entries of a block of _ROWS rows against the same columns are above
# the diagonal (each pair once).
_ABOVE = np.triu(np.ones((_ROWS, _ROWS), dtype=bool), k=1)

NEAR_LEAK = 'near_duplicate_leak'  # Outcome of a left-out evaluation copy.
LEAK, WITHIN_SPLIT, ACROSS_EVALUATION = (
    'leak', 'within_split', 'across_evaluation_splits')
CAPPED = 'near_capped'  # Tagged output: a capped group's report.


def _tagged(tag: str, value):
  """Beam's TaggedOutput (Beam loads only where the graph runs: the build's
  settings read this module's constants without it)."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  return pvalue.TaggedOutput(tag, value)


class Ref(NamedTuple):
  """A written record, as the near-duplicate search carries it. phashes:
  (whole, centre) from perceptual_hash.build_hashes."""
  phashes: tuple[int, int]
  relpath: str
  split: str
  chunk: int
  offset: int


WHOLE, CENTRE = 0, 1  # Which of a Ref's hashes.
# The hash pairs near_distance compares: (which hash of a, which of b).
# Centre against centre is not one (it adds only false pairs).
_COMBOS = ((WHOLE, WHOLE), (WHOLE, CENTRE), (CENTRE, WHOLE))
# A pHash sets the 32 of its 64 bits above their median; a flat image (or a
# flat centre) sets 0 or 1, so every flat image would be "near" every other
# (a white test image left out for an unrelated black train one). Hashes
# with fewer bits set than this take no part in the search; such images
# are what the low_information quality flag reports.
MIN_BITS_SET = 16
NEVER = HASH_BITS + 1  # The distance of two images with no usable hash pair.
# A source whose shorter side is under this takes no part in the search
# either: a 64-bit hash of a thumbnail-sized image (upscaled to the 32x32
# the hash reads) says too little to tell images apart. Among scikit-
# learn's 1,797 8x8 digits the search at distance 8 paired 1,298 of them,
# 83 pairs across classes, and left ~200 evaluation digits out as "copies"
# of other writers' digits. The default of the tiny quality flag, which
# reports those images; exact copies are still caught by their bytes.
MIN_SOURCE_SIDE = 32


def searched(original_height: int, original_width: int) -> bool:
  """Whether an image of this source size takes part in the search."""
  return min(original_height, original_width) >= MIN_SOURCE_SIDE


def usable(h: int) -> bool:
  """Whether hash h takes part in the search (see MIN_BITS_SET)."""
  return h.bit_count() >= MIN_BITS_SET


def near_distance(a: tuple[int, int], b: tuple[int, int]) -> int:
  """Distance of two images' (whole, centre) hashes: a copy cropped a few %
  a side is near the other's centre, so the least of whole-whole and
  whole-centre either way (centre-centre adds nothing but false pairs),
  over the usable hashes; NEVER when no pair of them is."""
  return min(((a[i] ^ b[j]).bit_count() for i, j in _COMBOS
              if usable(a[i]) and usable(b[j])), default=NEVER)


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


# A band entry's value: which hash, both hashes, chunk, offset, split, the
# crc32 of the path's bytes (the member order of a capped group: _rank),
# the path's length; then the path's bytes and its class's. Each image
# makes 2 x (distance + 1) of them (written to bucket files, below): one
# bytes object (~100 B) instead of a tuple of a Ref (~600 B). The group
# step reads them in C (_near_pairs.c, which must agree with this layout).
_PACKED = struct.Struct('>BQQIQBIH')
_SPLITS = ('train', 'validation', 'test')


def _encoded(text: str) -> bytes:
  """A path or class name's bytes (any name a folder can hold)."""
  return text.encode('utf-8', 'surrogateescape')


def _decoded(data: bytes) -> str:
  """_encoded's text back."""
  return data.decode('utf-8', 'surrogateescape')


def class_name(relpath: str, layout: str) -> str:
  """The class of the image at relpath (the input layout's rule)."""
  return listing_lib.source_file(relpath, layout).class_name


def pack(which: int, ref: Ref, class_of: str) -> bytes:
  """(which hash, ref, its class) as one bytes object (see _PACKED)."""
  path = _encoded(ref.relpath)
  return _PACKED.pack(which, *ref.phashes, ref.chunk, ref.offset,
                      _SPLITS.index(ref.split), zlib.crc32(path),
                      len(path)) + path + _encoded(class_of)


def unpack(data: bytes) -> tuple[int, Ref, str]:
  """pack's (which hash, ref, class) back."""
  which, whole, centre, chunk, offset, split, _, length = (
      _PACKED.unpack_from(data))
  path = data[_PACKED.size:_PACKED.size + length]
  return which, Ref((whole, centre), _decoded(path), _SPLITS[split], chunk,
                    offset), _decoded(data[_PACKED.size + length:])


def band_keys(ref: Ref, *, masks: tuple[int, ...], layout: str
              ) -> Iterator[tuple[int, bytes]]:
  """(band key, pack(which hash, ref, its class)) for each band of each of
  ref's two hashes; the key is band << 64 | the hash's bits in the band
  (one int)."""
  cls = class_name(ref.relpath, layout)
  for which, h in enumerate(ref.phashes):
    if not usable(h):
      continue
    value = pack(which, ref, cls)
    for band, mask in enumerate(masks):
      yield band << HASH_BITS | (h & mask), value


# The band shuffle goes through files, as the records do through chunk
# files: a local runner holds a shuffle's elements in the launcher and
# hands each worker its whole share at once, so 2 x (distance + 1)
# elements an image made both grow with the file count (issue 19's scale
# benchmark). Each worker of the band step buffers the refs of at most
# _FLUSH_ENTRIES band entries, then makes their entries at once
# (bucket_bytes), writes them as one file sorted by bucket and sends on
# only (bucket, (file, offset, length)); the group step reads one bucket's
# ranges, groups them by band key and compares group by group. Buckets
# hold ~BUCKET_ENTRIES entries (at least MIN_BUCKETS of them, for the
# workers to share), but a band key's group never splits, so a bucket holds
# at least its largest group: ~2N / 2^band_bits entries for spread hashes
# (band_bits 7-8 at the default distance: ~110,000 entries, ~15 MB, at 1M
# images). So the band step's buffer is bounded, and the group step's
# memory grows with the file count only through the group size. Temporary
# disk: ~1.5 KB an image, in the build's temporary folder until it ends.
# On an object store each range is read through Beam's FileSystems, whose
# readers may fetch more than the range (GCS: up to its 16 MiB buffer), so
# there a bucket's reads can cost up to the flush files' size: not
# measured here (no object store can be reached).
_FLUSH_ENTRIES = 50_000
# bucket_bytes: mean bytes per segment above which a bucket is joined
# from slices, not gathered through an index of every byte.
_LONG_SEGMENT = 64
BUCKET_ENTRIES = 25_000
MIN_BUCKETS = 16
# A band entry in a bucket file: band, the hash's bits in it (band_keys'
# key), the length of pack's bytes, which follow.
_ENTRY = struct.Struct('>BQH')
_BITS = (1 << HASH_BITS) - 1


def num_buckets(num_files: int, masks: tuple[int, ...]) -> int:
  """Buckets of the band step for num_files listed files (see above)."""
  most = 2 * len(masks) * num_files  # Two hashes, each in every band.
  return max(MIN_BUCKETS, -(-most // BUCKET_ENTRIES))


def bucket_entries(ref: Ref, *, masks: tuple[int, ...], buckets: int,
                   layout: str) -> Iterator[tuple[int, bytes]]:
  """(bucket, entry) for each of band_keys(ref): the entry is _ENTRY then
  pack's bytes; a band key's entries all go to one bucket."""
  for key, value in band_keys(ref, masks=masks, layout=layout):
    head = _ENTRY.pack(key >> HASH_BITS, key & _BITS, len(value))
    yield zlib.crc32(head[:-2]) % buckets, head + value


# _ENTRY as numpy records, and its first two fields (what the bucket hashes).
_HEAD = np.dtype([('band', 'u1'), ('bits', '>u8'), ('length', '>u2')])
_KEY = np.dtype([('band', 'u1'), ('bits', '>u8')])
# _PACKED as numpy records.
_FIXED = np.dtype([('which', 'u1'), ('whole', '>u8'), ('centre', '>u8'),
                   ('chunk', '>u4'), ('offset', '>u8'), ('split', 'u1'),
                   ('crc', '>u4'), ('path_length', '>u2')])


def bucket_bytes(refs: list[Ref], *, masks: tuple[int, ...], buckets: int,
                 layout: str) -> list[tuple[int, bytes]]:
  """(bucket, its bytes) for each bucket bucket_entries puts an entry of
  refs in: the entries of `refs` (ref by ref, as bucket_entries makes
  them) in a bucket, one after another. The same bytes, at once: the
  bands, keys and entry heads in numpy, a crc32 per distinct key, two
  pack() per ref (a test holds it to bucket_entries); one ref's 18
  entries one by one cost ~50 µs in Python (BUILD_NOTES, issue 19)."""
  if not refs:
    return []
  n, num_bands = len(refs), len(masks)
  hashes = np.array([ref.phashes for ref in refs], dtype=np.uint64)  # [N, 2]
  has = np.bitwise_count(hashes) >= MIN_BITS_SET  # [N, 2]
  # [N, 2, bands] in bucket_entries' order: ref, which hash, band.
  taken = np.repeat(has[:, :, None], num_bands, axis=2)
  bits = (hashes[:, :, None] & np.array(masks, dtype=np.uint64))[taken]
  if not len(bits):  # No usable hash.
    return []
  band = np.broadcast_to(np.arange(num_bands, dtype=np.uint8),
                         taken.shape)[taken]
  value = np.broadcast_to(np.arange(2 * n).reshape(n, 2, 1),
                          taken.shape)[taken]  # pack(which, ref): 2 ref + which
  # pack's bytes: _PACKED's fields, then the path and its class (the tail).
  paths = [_encoded(ref.relpath) for ref in refs]
  tails = [p + _encoded(class_name(ref.relpath, layout))
           for p, ref in zip(paths, refs)]
  tail_length = np.array([len(t) for t in tails], dtype=np.int64)
  if _PACKED.size + tail_length.max() > 0xFFFF:  # _ENTRY's 'H'.
    raise ValueError('a band entry of over 65,535 bytes (a path that long?)')
  fixed = np.empty((n, 2), dtype=_FIXED)
  fixed['which'] = [0, 1]
  fixed['whole'], fixed['centre'] = hashes[:, :1], hashes[:, 1:]
  # uint64: one offset of 2**63 or more made the array float (review).
  fixed['chunk'] = np.array([ref.chunk for ref in refs], dtype=np.uint64
                            )[:, None]
  fixed['offset'] = np.array([ref.offset for ref in refs], dtype=np.uint64
                             )[:, None]
  fixed['split'] = np.array([_SPLITS.index(ref.split) for ref in refs]
                            )[:, None]
  fixed['crc'] = np.array([zlib.crc32(p) for p in paths], dtype=np.uint32
                          )[:, None]
  fixed['path_length'] = np.array([len(p) for p in paths])[:, None]
  heads = np.empty(len(bits), dtype=_HEAD)
  heads['band'], heads['bits'] = band, bits
  heads['length'] = _PACKED.size + tail_length[value >> 1]
  # A key's bucket: crc32 of its head's band and bits, once per key (a
  # band's bits, shifted down, take at most 32 bits: 2 bands or more).
  shifts = np.array([(m & -m).bit_length() - 1 for m in masks], dtype=np.uint64)
  keys, inverse = np.unique((band.astype(np.uint64) << np.uint64(32))
                            | (bits >> shifts[band]), return_inverse=True)
  key_heads = np.empty(len(keys), dtype=_KEY)
  key_heads['band'] = keys >> np.uint64(32)
  key_heads['bits'] = (keys & np.uint64(0xFFFFFFFF)) << shifts[
      key_heads['band']]
  key_bytes = key_heads.tobytes()
  size = _KEY.itemsize
  bucket = np.array([zlib.crc32(key_bytes[i:i + size]) % buckets
                     for i in range(0, len(key_bytes), size)],
                    dtype=np.int64)[inverse.reshape(-1)]
  # The entries' bytes gathered bucket by bucket from one source (heads,
  # pack's fields, tails, end to end): each entry is three segments of it.
  fixed_at = len(heads) * _HEAD.itemsize
  tail_at = fixed_at + fixed.size * _PACKED.size + np.concatenate(
      [[0], np.cumsum(tail_length)[:-1]])
  source = np.frombuffer(heads.tobytes() + fixed.tobytes() + b''.join(tails),
                         dtype=np.uint8)
  order = np.argsort(bucket, kind='stable')
  segment_start = np.stack([
      order * _HEAD.itemsize, fixed_at + value[order] * _PACKED.size,
      tail_at[value[order] >> 1]], axis=1).reshape(-1)
  segment_length = np.stack([
      np.full(len(order), _HEAD.itemsize), np.full(len(order), _PACKED.size),
      tail_length[value[order] >> 1]], axis=1).reshape(-1)
  bucket = bucket[order]
  cuts = [0, *(np.flatnonzero(bucket[1:] != bucket[:-1]) + 1).tolist(),
          len(order)]
  # A bucket of short segments is gathered through an index of its bytes
  # (int32 unless the source is 2 GiB or more: paths near 65,535 bytes);
  # one of long segments (long paths) is joined from slices of the
  # source, so no index holds 4-8 bytes per byte of a large bucket (a
  # 4,000-byte-path flush: 0.9 -> 0.2 s, peak 386 -> 257 MB).
  index = np.int32 if len(source) < 2**31 else np.int64
  view = memoryview(source)
  out = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    starts = segment_start[3 * lo:3 * hi]
    lengths = segment_length[3 * lo:3 * hi]
    total = int(lengths.sum())
    if total > _LONG_SEGMENT * len(lengths):
      data = b''.join([view[a:a + n] for a, n in zip(starts.tolist(),
                                                     lengths.tolist())])
    else:
      at = np.cumsum(lengths) - lengths
      gather = np.repeat((starts - at).astype(index), lengths)
      gather += np.arange(total, dtype=index)
      data = source[gather].tobytes()
    out.append((int(bucket[lo]), data))
  return out


def read_bucket(data: bytes) -> dict[int, list[bytes]]:
  """Bucket file bytes (entries, one after another) -> {band key: [pack's
  bytes]}."""
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  groups = {}
  for (band, bits, _), value in file_io.unpack_entries(data, _ENTRY,
                                                       'a band entry'):
    groups.setdefault(band << HASH_BITS | bits, []).append(value)
  return groups


def _bands_to_buckets(*, masks: tuple[int, ...], run_dir: str, layout: str):
  """A DoFn: (Ref, whether its record was taken: unused here), with the
  listing's counts as side input -> (bucket, (file, offset, length)) of
  the bucket files its bundle wrote (see above).
  Only the files of a bundle that succeeded are named downstream, so a
  retried bundle adds no entry twice."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top

  class BandsToBuckets(beam.DoFn):
    """See _bands_to_buckets."""

    def start_bundle(self):
      self._refs, self._entries, self._buckets = [], 0, MIN_BUCKETS

    def _flush(self):
      refs, self._refs, self._entries = self._refs, [], 0
      return file_io.write_keyed(run_dir, 'bands', bucket_bytes(
          refs, masks=masks, buckets=self._buckets, layout=layout))

    def process(self, element: tuple[Ref, bool], counts):
      ref, _ = element
      self._buckets = num_buckets(counts[0], masks)
      usable_hashes = sum(usable(h) for h in ref.phashes)
      if not usable_hashes:  # Flat: no band entry (held no longer).
        return
      self._refs.append(ref)
      self._entries += len(masks) * usable_hashes
      if self._entries >= _FLUSH_ENTRIES:
        yield from self._flush()

    def finish_bundle(self):
      for out in self._flush():
        yield file_io.in_global_window(out)

  return BandsToBuckets()


def _rank(ref: Ref, which: int) -> tuple:
  """A capped group keeps the members first by this: a hash of the path
  (so no class or folder name is favoured), then the path's bytes."""
  path = _encoded(ref.relpath)
  return zlib.crc32(path), path, which


class BucketSlots(NamedTuple):
  """What the group step finds in one bucket (bucket_slots).

  paths: the bucket's images' paths (bytes, end to end, in bytes order;
  ends [I] where each ends), splits [I] (indices into _SPLITS), chunks
  [I]; image, slot, partner, d [K]: each filled slot (image indices), in
  (image, slot) order: the image's nearest partner in the slot over the
  bucket's groups (least d, then first path); capped: the capped groups'
  reports, in key order.
  """
  paths: bytes
  ends: np.ndarray
  splits: np.ndarray
  chunks: np.ndarray
  image: np.ndarray
  slot: np.ndarray
  partner: np.ndarray
  d: np.ndarray
  capped: list

  def path(self, image: int) -> bytes:
    return self.paths[int(self.ends[image - 1]) if image else 0:
                      int(self.ends[image])]


def bucket_slots(data: bytes, *, distance: int, cap: Optional[int] = None,
                 use_compiled: Optional[bool] = None,
                 vector: bool = True) -> BucketSlots:
  """A bucket's band entries (entries one after another, as the band step
  writes them) -> BucketSlots: the group step's work. Its band groups
  (entries with one band key) are each compared among their first `cap`
  members by _rank (a larger one is reported as capped); for members i <
  j of a group, a candidate is a pair of two images within `distance`
  bits of which one hash at least is a whole one (centre-centre adds only
  false pairs); every candidate counts for both images' slots. From the
  compiled `_near_pairs` extension when it is built (use_compiled None;
  False: _bucket_slots_reference, which a test holds it equal to). cap:
  MAX_GROUP when None (read at each call). vector: False scans in plain C
  where the compiled scan would use AVX-512 (the tests compare both)."""
  if cap is None:
    cap = MAX_GROUP
  if use_compiled is None:
    use_compiled = _compiled is not None
  elif use_compiled and _compiled is None:
    raise ValueError('use_compiled=True, but _near_pairs was not built (no '
                     'C compiler at install?)')
  if not use_compiled:
    return _bucket_slots_reference(data, distance=distance, cap=cap)
  (paths, ends, splits, chunks, image, slot, partner, d, band, members,
   example) = _compiled.bucket_slots(data, distance, cap, vector)
  ints = lambda raw: np.frombuffer(raw, dtype=np.int64)
  found = BucketSlots(paths, ints(ends), np.frombuffer(splits, np.uint8),
                      ints(chunks), ints(image), ints(slot), ints(partner),
                      ints(d), [])
  for b, m, e in zip(*(ints(x).tolist() for x in (band, members, example))):
    found.capped.append({'band': b, 'members': m, 'compared': cap,
                         'example': _decoded(found.path(e))})
  return found


def _bucket_slots_reference(data: bytes, *, distance: int, cap: int
                            ) -> BucketSlots:
  """bucket_slots in Python and numpy, group by group (_slots_reference)."""
  groups, images, classes = {}, {}, {}
  for key, values in read_bucket(data).items():
    for value in values:
      which, ref, cls = unpack(value)
      images[_encoded(ref.relpath)] = ref
      classes[_encoded(ref.relpath)] = _encoded(cls)
      groups.setdefault(key, []).append((which, ref))
  paths = sorted(images)
  image_of = {p: i for i, p in enumerate(paths)}
  class_ids = {c: i for i, c in enumerate(sorted(set(classes.values())))}
  best = {}  # (image, slot) -> (d, partner)
  capped = []
  for key in sorted(groups):
    members = sorted(groups[key], key=lambda m: _rank(m[1], m[0]))
    if len(members) > cap:
      capped.append({'band': key >> HASH_BITS, 'members': len(members),
                     'compared': cap, 'example': members[0][1].relpath})
      members = members[:cap]
    if len(members) < 2:
      continue
    at = [image_of[_encoded(ref.relpath)] for _, ref in members]
    found = _slots_reference(
        np.array([ref.phashes[w] for w, ref in members], dtype=np.uint64),
        np.array([w for w, _ in members], dtype=np.uint8),
        np.array(at, dtype=np.int32),
        np.array([_SPLITS.index(ref.split) for _, ref in members]),
        np.array([class_ids[classes[paths[i]]] for i in at]),
        distance=distance)
    for i, slot, j, d in zip(*(x.tolist() for x in found)):
      entry = (d, at[j])
      best[at[i], slot] = min(best.get((at[i], slot), entry), entry)
  rows = sorted(best)
  column = lambda values: np.array(values, dtype=np.int64)
  return BucketSlots(
      b''.join(paths), column(np.cumsum([len(p) for p in paths])),
      np.array([_SPLITS.index(images[p].split) for p in paths],
               dtype=np.uint8),
      column([images[p].chunk for p in paths]),
      column([i for i, _ in rows]), column([s for _, s in rows]),
      column([best[r][1] for r in rows]), column([best[r][0] for r in rows]),
      capped)


def _slots_reference(hashes: np.ndarray, which: np.ndarray,
                     order: np.ndarray, split: np.ndarray, cls: np.ndarray,
                     *, distance: int):
  """A group's candidates, per image: its nearest partner in each slot.

  hashes: uint64 [M], the hash each member is in the group by; which: [M]
  (WHOLE or CENTRE); order: int32 [M], the rank of its path (equal for an
  image's two hashes); split: [M] an index into _SPLITS; cls: [M] class
  ints. A candidate is a pair of two images within `distance` bits of
  which one hash at least is a whole one (centre-centre adds only false
  pairs). Returns (image, slot, partner, d) [K], one per filled slot in
  (rank, slot) order: the image's first member, the slot (the partner's
  split, or _OTHER_CLASS), its nearest partner's first member (least d,
  then path rank), d.
  """
  m = len(hashes)
  scale = int(order.max()) + 1
  none = NEVER * scale
  best = np.full((scale, SLOTS), none, dtype=np.int64)
  whole = which == WHOLE
  for top in range(0, m, _ROWS):
    # Rows top.. against columns top..: each member pair once (column >
    # row), a centre hash only against a whole one, not an image's own.
    rows = len(hashes[top:top + _ROWS])
    bits = np.bitwise_count(hashes[top:top + rows, None] ^ hashes[None, top:])
    row_order, column_order = order[top:top + rows], order[top:]
    near = bits <= distance
    near[:, :rows] &= _ABOVE[:rows, :rows]
    near &= whole[None, top:] | whole[top:top + rows, None]
    near &= row_order[:, None] != column_order[None, :]
    if not near.any():
      continue
    # d * scale + the partner's rank where a candidate, else `none`.
    key = np.where(near, bits.astype(np.int64) * scale, none)
    by_row = key + column_order[None, :]  # A row's partners: the columns.
    by_column = key + row_order[:, None]
    row_split, column_split = split[top:top + rows], split[top:]
    other = cls[top:top + rows, None] != cls[None, top:]
    for slot in range(SLOTS):
      if slot == _OTHER_CLASS:
        row_mask = column_mask = other
      else:
        row_mask = (column_split == slot)[None, :]
        column_mask = (row_split == slot)[:, None]
      np.minimum.at(best[:, slot], row_order,
                    np.where(row_mask, by_row, none).min(axis=1))
      np.minimum.at(best[:, slot], column_order,
                    np.where(column_mask, by_column, none).min(axis=0))
  member_of = np.empty(scale, dtype=np.int64)
  member_of[order[::-1]] = np.arange(m)[::-1]
  rank, slot = np.nonzero(best < none)
  kept = best[rank, slot]
  return (member_of[rank], slot.astype(np.int64), member_of[kept % scale],
          kept // scale)


def _kind(split_a: str, split_b: str) -> str:
  """The rule a pair of images in these splits falls under (module
  docstring)."""
  if (split_a == 'train') != (split_b == 'train'):
    return LEAK
  return WITHIN_SPLIT if split_a == split_b else ACROSS_EVALUATION


def classify(pair: tuple[Ref, Ref, int], *, layout: str) -> dict:
  """(a, b, d) -> its report line as a dict: what _Lines writes as text
  (a test holds the two equal)."""
  a, b, d = pair
  classes = [class_name(r.relpath, layout) for r in (a, b)]
  # Paths first: the file's lines are sorted as text, so by path.
  return {'paths': [a.relpath, b.relpath], 'distance': d,
          'kind': _kind(a.split, b.split), 'splits': [a.split, b.split],
          'classes': classes, 'label_conflict': classes[0] != classes[1]}


# Most paths _Lines keeps made (a worker's memory stays bounded).
_SEEN_PATHS = 50_000


class _Lines:
  """classify's lines as text (json.dumps of its dict, the same bytes),
  with each path's JSON and class made once, not per pair."""

  def __init__(self, layout: str):
    import json  # pylint: disable=g-import-not-at-top
    self._dumps = json.dumps
    self._layout = layout
    self._seen = {}

  def _of(self, relpath: str) -> tuple[str, str, str]:
    """(relpath's JSON, its class, the class's JSON), made once: an image
    is in the lines of its own slots and of the images it is a partner
    of."""
    seen = self._seen.get(relpath)
    if seen is None:
      if len(self._seen) >= _SEEN_PATHS:
        self._seen.clear()
      cls = class_name(relpath, self._layout)
      seen = self._seen[relpath] = (self._dumps(relpath), cls,
                                    self._dumps(cls))
    return seen

  def pair(self, a: tuple[str, str], b: tuple[str, str], d: int) -> str:
    """The line of the pair of images a and b ((relpath, split) each) at
    distance d, with the paths in order."""
    (pa, sa), (pb, sb) = sorted((a, b))
    ja, ca, cja = self._of(pa)
    jb, cb, cjb = self._of(pb)
    return _pair_line(ja, jb, d, _kind(sa, sb), sa, sb, cja, cjb, ca != cb)


def _pair_line(path_a: str, path_b: str, d: int, kind: str, split_a: str,
               split_b: str, class_a: str, class_b: str,
               conflict: bool) -> str:
  """A pair's line from its parts (paths and classes already as JSON):
  json.dumps of classify's dict, byte for byte."""
  return (f'{{"paths": [{path_a}, {path_b}], "distance": {d}, '
          f'"kind": "{kind}", "splits": ["{split_a}", "{split_b}"], '
          f'"classes": [{class_a}, {class_b}], '
          f'"label_conflict": {"true" if conflict else "false"}}}')


# Which partners of an image near_duplicates.jsonl names: its nearest in
# each split (train, validation, test: _SPLITS' order) and its nearest of
# another class. A pair gets a line when it fills one of the slots of
# either image (module docstring).
_OTHER_CLASS = len(_SPLITS)
SLOTS = len(_SPLITS) + 1
# _Nearest reduces its entries to each image's slots past this many.
_REDUCE_ENTRIES = 1_000_000


class _Nearest:
  """Per image, its nearest partner in each slot over the buckets added so
  far: the least distance, then the first path (bytes order, as
  bucket_slots orders them). Entries are held as arrays, only those within
  their slot's least distance so far, and reduced to one an image and
  slot past _REDUCE_ENTRIES: an image is in up to 2 x (distance + 1)
  groups, in as many buckets."""

  def __init__(self):
    self._forget()

  def _forget(self) -> None:
    self._ids = {}  # path bytes -> id: an index into _paths and _info
    self._paths, self._info = [], []  # (split index, chunk) each
    self._parts, self._size = [], 0
    # [ids, SLOTS]: the least distance of each image's slot so far. An
    # entry farther than it can never be the slot's nearest: not held.
    self._least = np.full((64, SLOTS), NEVER, dtype=np.int64)

  def __len__(self) -> int:
    """Images held."""
    return len(self._paths)

  def add(self, found: BucketSlots) -> None:
    """A bucket's slots (bucket_slots)."""
    if not len(found.image):
      return
    used = np.unique(np.concatenate([found.image, found.partner]))
    ends = found.ends.tolist()
    splits, chunks = found.splits.tolist(), found.chunks.tolist()
    local = np.zeros(len(ends), dtype=np.int64)
    get, paths, data = self._ids.get, self._paths, found.paths
    ids = []
    for i in used.tolist():
      path = data[ends[i - 1] if i else 0:ends[i]]
      known = get(path)
      if known is None:
        known = self._ids[path] = len(paths)
        paths.append(path)
        self._info.append((splits[i], chunks[i]))
      ids.append(known)
    local[used] = ids
    this, other = local[found.image], local[found.partner]
    slot, dist = found.slot, found.d
    if len(paths) > len(self._least):
      grown = np.full((2 * len(paths), SLOTS), NEVER, dtype=np.int64)
      grown[:len(self._least)] = self._least
      self._least = grown
    np.minimum.at(self._least, (this, slot), dist)
    near = dist <= self._least[this, slot]
    self._parts.append((this[near], slot[near], dist[near], other[near]))
    self._size += int(near.sum())
    if self._size > _REDUCE_ENTRIES:
      self._reduce()

  def _reduce(self) -> None:
    """The entries held, reduced to each image's nearest per slot."""
    if not self._parts:
      return
    this, slot, dist, other = (np.concatenate(x) for x in zip(*self._parts))
    rank = np.empty(len(self._paths), dtype=np.int64)
    rank[sorted(range(len(self._paths)), key=self._paths.__getitem__)] = (
        np.arange(len(self._paths)))
    # The least distance, then the first path: one int.
    key = dist * len(self._paths) + rank[other]
    order = np.lexsort((key, slot, this))
    this, slot = this[order], slot[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (this[1:] != this[:-1]) | (slot[1:] != slot[:-1])
    kept = order[first]
    self._parts = [(this[first], slot[first], dist[kept], other[kept])]
    self._size = len(kept)

  def records(self) -> Iterator[tuple[bytes, bytes]]:
    """(path, its slot record: _SLOT_RECORD's fields and the paths) for
    each image held; then holds none."""
    self._reduce()
    parts, paths, info = self._parts, self._paths, self._info
    self._forget()
    if not parts:
      return
    this, slot, dist, other = (x.tolist() for x in parts[0])
    at = 0
    while at < len(this):
      image = this[at]
      d, splits, partners = [NEVER] * SLOTS, [0] * SLOTS, [b''] * SLOTS
      while at < len(this) and this[at] == image:
        k, partner = slot[at], other[at]
        d[k], splits[k], partners[k] = dist[at], info[partner][0], paths[
            partner]
        at += 1
      path = paths[image]
      tail = path + b''.join(partners)
      yield path, _SLOT_RECORD.pack(
          *info[image], *d, *splits, *map(len, partners), len(path),
          len(tail)) + tail


# An image's slots as the group step hands them on (through keyed files,
# not one shuffle element per image: ~20 µs each): its split and chunk,
# per slot the distance (NEVER: empty), the partner's split and path
# length, the image's path length, the tail's length; then the tail: the
# image's path and the partners' paths.
_SLOT_RECORD = struct.Struct(f'>BI{SLOTS}B{SLOTS}B{SLOTS}HHI')
# Images a key of the per-image hand-off holds, about (see slot_keys).
_IMAGES_PER_KEY = 20_000


def slot_keys(num_files: int) -> int:
  """Keys of the per-image hand-off for num_files listed files."""
  return max(MIN_BUCKETS, -(-num_files // _IMAGES_PER_KEY))


def read_slots(data: bytes) -> dict[bytes, list]:
  """Slot records (one after another, from one or more bundles) -> {path:
  [split, chunk, SLOTS of (d, partner path, partner split) or None]},
  each slot the nearest over the records (least d, then path bytes)."""
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
  images = {}
  for fields, tail in file_io.unpack_entries(data, _SLOT_RECORD,
                                             'a slots record'):
    split, chunk = fields[:2]
    d = fields[2:2 + SLOTS]
    splits = fields[2 + SLOTS:2 + 2 * SLOTS]
    lengths = fields[2 + 2 * SLOTS:2 + 3 * SLOTS]
    at = fields[-2]
    path = tail[:at]
    held = images.get(path)
    if held is None:
      held = images[path] = [split, chunk, [None] * SLOTS]
    best = held[2]
    for k in range(SLOTS):
      if d[k] == NEVER:
        continue
      partner = (d[k], tail[at:at + lengths[k]], splits[k])
      at += lengths[k]
      if best[k] is None or partner[:2] < best[k][:2]:
        best[k] = partner
  return images


def image_kinds(split: str, slots: tuple) -> tuple[str, ...]:
  """The report's counts an image with these slots (SLOTS of (d, partner,
  partner's split) or None) adds one to: 'images' (it has a near copy),
  'leaks' (a copy across the train/evaluation line), 'within_split',
  'across_evaluation_splits' (a validation image's copy in test or the
  reverse), 'label_conflicts' (a copy of another class)."""
  return _kinds_of(split, tuple(s is not None for s in slots))


@functools.cache
def _kinds_of(split: str, filled: tuple[bool, ...]) -> tuple[str, ...]:
  """image_kinds by which slots are filled (12 cases: made once each)."""
  kinds = []
  if any(filled):
    kinds.append('images')
  if any(f and _kind(split, other) == LEAK
         for f, other in zip(filled, _SPLITS)):
    kinds.append('leaks')
  if filled[_SPLITS.index(split)]:
    kinds.append(WITHIN_SPLIT)
  if any(f and _kind(split, other) == ACROSS_EVALUATION
         for f, other in zip(filled, _SPLITS)):
    kinds.append(ACROSS_EVALUATION)
  if filled[_OTHER_CLASS]:
    kinds.append('label_conflicts')
  return tuple(kinds)


def near_leak(relpath: str, split: str, copy: str, d: int) -> walk.Skipped:
  """The rejected entry of an evaluation image left out for its nearest
  train copy."""
  return walk.Skipped(
      relpath, NEAR_LEAK,
      f'near-duplicate of {copy} (train; perceptual hash distance {d}): '
      f'left out of {split} so that it does not inflate evaluation',
      near=copy, distance=d)


class Reporter:
  """What the search says of each image, from its slots: the lines of its
  pairs with the partners in its slots (sorted run files: one per
  SORT_RUN_LINES lines, then one at the end), the counts (image_kinds),
  and, for an evaluation image with a train copy, its drop and its
  rejected entry (its nearest train copy named). A pair named by both its
  images has the same line twice; the launcher's merge writes it once.
  Used by the search's last step (_report_images) and by an update's
  carried search (near_carry)."""

  def __init__(self, *, layout: str, run_dir: str):
    import collections  # pylint: disable=g-import-not-at-top
    self._counter = collections.Counter
    self._text = _Lines(layout)
    self._run_dir = run_dir
    self._lines, self._counts = [], self._counter()

  def pending(self) -> bool:
    """Whether lines or counts are held (flush sends them on)."""
    return bool(self._lines or self._counts)

  def flush(self) -> PairRun:
    """The lines held, as a sorted run file, and the counts; then none."""
    from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
    lines, self._lines = self._lines, []
    counts, self._counts = dict(self._counts), self._counter()
    return PairRun(file_io.write_run(self._run_dir, 'pairs', lines) if lines
                   else None, counts)

  def add(self, lines: Iterable[str], counts: dict) -> None:
    """Lines and counts made elsewhere (an update's carried search keeps
    earlier lines and counts in numpy)."""
    self._lines.extend(lines)
    self._counts.update(counts)

  def pairs(self, relpath: str, split: str, slots: tuple) -> None:
    """The lines of an image's pairs with the partners in its slots (SLOTS
    of (d, partner's relpath, partner's split) or None)."""
    for d, partner, partner_split in sorted(set(filter(None, slots))):
      self._lines.append(self._text.pair((relpath, split),
                                         (partner, partner_split), d))

  @staticmethod
  def left_out(relpath: str, split: str, chunk: int, slots: tuple):
    """An evaluation image with a train copy: its drop and its rejected
    entry (tagged DROPS and 'rejected'), its nearest train copy named."""
    train = slots[_SPLITS.index('train')]
    if split != 'train' and train is not None:
      d, copy, _ = train
      yield _tagged(DROPS, (split, chunk, relpath))
      yield _tagged('rejected', near_leak(relpath, split, copy, d))

  def image(self, relpath: str, split: str, chunk: int, slots: tuple):
    """One image's outputs: its counts and pairs, left_out's, and a
    PairRun when the lines held reach SORT_RUN_LINES."""
    from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top
    self._counts.update(image_kinds(split, slots))
    self.pairs(relpath, split, slots)
    yield from self.left_out(relpath, split, chunk, slots)
    if len(self._lines) >= file_io.SORT_RUN_LINES:
      yield self.flush()


def _report_images(*, layout: str, run_dir: str):
  """A DoFn: (key, the ranges of its slot records) -> Reporter's outputs
  for each image (read_slots: its nearest per slot over the group step's
  bundles)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top

  class ReportImages(beam.DoFn):
    """See _report_images."""

    def setup(self):  # A path's text made once per worker (_Lines).
      self._reporter = Reporter(layout=layout, run_dir=run_dir)

    def process(self, element):
      _, ranges = element
      for path, (split, chunk, slots) in read_slots(
          file_io.read_keyed(ranges)).items():
        yield from self._reporter.image(
            _decoded(path), _SPLITS[split], chunk, tuple(
                None if s is None else (s[0], _decoded(s[1]), _SPLITS[s[2]])
                for s in slots))

    def finish_bundle(self):
      if self._reporter.pending():
        yield file_io.in_global_window(self._reporter.flush())

  return ReportImages()


class PairRun(NamedTuple):
  """A sorted run file of pair lines (path; None: no lines) and the counts
  of the images it read (image_kinds')."""
  path: Optional[str]
  counts: dict


DROPS = 'near_drops'  # Tagged output: (split, chunk, relpath) left out.


def _group_slots(*, distance: int, run_dir: str):
  """A DoFn: a bucket of band groups (_bands_to_buckets; the listing's
  counts as side input) -> (key, (file, offset, length)) of the slot
  records it wrote: per image, its nearest partner in each slot among the
  bundle's buckets (bucket_slots, _Nearest; at most _BUNDLE_IMAGES images
  held at once), keyed by a hash of the path (slot_keys of them), so that
  one step meets every bundle's record of an image; 'near_capped'. No
  element per pair crosses a step (at 30,000 photo-like images there are
  millions of candidate pairs), nor one per image. Only the files of a
  bundle that succeeded are named downstream, so a retried bundle adds
  nothing twice."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import file_io  # pylint: disable=g-import-not-at-top

  class GroupSlots(beam.DoFn):
    """See _group_slots."""

    def start_bundle(self):
      self._nearest, self._keys = _Nearest(), MIN_BUCKETS

    def _flush(self):
      keys = self._keys
      return file_io.write_keyed(run_dir, 'slots', [
          (zlib.crc32(path) % keys, record)
          for path, record in self._nearest.records()])

    def process(self, element, counts):
      """(bucket, its file ranges) -> its outputs."""
      self._keys = slot_keys(counts[0])
      _, ranges = element
      found = bucket_slots(file_io.read_keyed(ranges), distance=distance)
      self._nearest.add(found)
      if len(self._nearest) >= _BUNDLE_IMAGES:
        yield from self._flush()
      for capped in found.capped:
        yield _tagged(CAPPED, capped)

    def finish_bundle(self):
      for out in self._flush():
        yield file_io.in_global_window(out)

  return GroupSlots()


# Most images a group-step bundle keeps the slots of (_Nearest) before it
# sends them on.
_BUNDLE_IMAGES = 50_000


def find(refs, counts, *, distance: int, layout: str, run_dir: str):
  """The search as Beam steps: refs ((Ref, taken) per written record; counts:
  the listing's (files, ignored) side input) -> (drops, rejected, PairRuns
  of the images' counts and of the lines of the pairs listed, capped
  groups)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  masks = band_masks(distance)
  slots = (
      refs
      | 'NearBands' >> beam.ParDo(_bands_to_buckets(
          masks=masks, run_dir=run_dir, layout=layout), counts)
      | 'NearGroups' >> beam.GroupByKey()
      | 'NearSlots' >> beam.ParDo(_group_slots(
          distance=distance, run_dir=run_dir), counts).with_outputs(
              CAPPED, main='slots'))
  found = (slots.slots
           | 'NearImagesByKey' >> beam.GroupByKey()
           | 'NearImages' >> beam.ParDo(_report_images(
               layout=layout, run_dir=run_dir)).with_outputs(
                   DROPS, 'rejected', main='runs'))
  return found[DROPS], found.rejected, found.runs, slots[CAPPED]
