"""Shard arithmetic: chunk byte totals -> shard layout -> shard of a record.

Prefix sums over the (split, chunk) byte totals give each record its offset
in its split; shard = offset // shard_size. Nothing here is per image.
"""

from __future__ import annotations

import array
import bisect
from typing import NamedTuple


class ShardResult(NamedTuple):
  """One written shard file."""
  split: str
  index: int
  filename: str
  num_bytes: int
  num_examples: int
  class_counts: tuple[int, ...]


class SplitChunks(NamedTuple):
  """The chunk files of one split, in chunk order (= byte order): parallel
  int64 arrays (24 bytes a chunk file in every worker that reads them)."""
  ids: array.array
  starts: array.array  # Where each chunk file's bytes begin in the split.
  sizes: array.array

  def start_of(self, chunk: int) -> int:
    return self.starts[bisect.bisect_left(self.ids, chunk)]

  def size_of(self, chunk: int) -> int:
    return self.sizes[bisect.bisect_left(self.ids, chunk)]


def shard_layout(totals, *, shard_size_bytes: int) -> dict:
  """[(split, chunk, bytes written)] -> the shard layout, from prefix sums
  over the chunk list, in chunk order:

    'chunks': {split: SplitChunks};
    'num_shards': {split: n}.

  It has one entry per (split, chunk), never one per image. Offsets count
  every written record (a dropped duplicate's bytes too), so a shard holds
  up to shard_size bytes of kept records.
  """
  chunks = {}
  for split, chunk, num_bytes in sorted(totals):
    if split not in chunks:
      chunks[split] = SplitChunks(*(array.array('q') for _ in range(3)))
    c = chunks[split]
    c.starts.append(c.starts[-1] + c.sizes[-1] if c.ids else 0)
    c.ids.append(chunk)
    c.sizes.append(num_bytes)
  return {'chunks': chunks, 'num_shards': {
      split: max(1, -(-(c.starts[-1] + c.sizes[-1]) // shard_size_bytes))
      for split, c in chunks.items()}}


def shard_keys(layout: dict):
  """Every (split, shard) of the layout, each as ((split, shard), None)."""
  for split, num_shards in sorted(layout['num_shards'].items()):
    for shard in range(num_shards):
      yield (split, shard), None


def shard_of(offset: int, num_shards: int, shard_size_bytes: int) -> int:
  """The shard of a record starting `offset` bytes into its split: shard s
  holds [s * shard_size, (s + 1) * shard_size), the last one the rest."""
  return min(offset // shard_size_bytes, num_shards - 1)


def shards_of_drop(drop, layout: dict, *, shard_size_bytes: int):
  """(split, chunk, relpath) of a dropped copy -> ((split, shard), (chunk,
  relpath)) for each shard whose byte range holds part of its chunk file
  (one, or the few a shard boundary cuts it into): the shard that holds
  its record finds it there by path."""
  split, chunk, relpath = drop
  chunks = layout['chunks'][split]
  start, size = chunks.start_of(chunk), chunks.size_of(chunk)
  num_shards = layout['num_shards'][split]
  first = shard_of(start, num_shards, shard_size_bytes)
  last = shard_of(start + max(size, 1) - 1, num_shards, shard_size_bytes)
  for shard in range(first, last + 1):
    yield (split, shard), (chunk, relpath)
