"""Split assignment and duplicate resolution: pure functions of file content.

Both are stable functions of bytes, never of listing order or worker count:

* a file's split is a hash of (seed, content sha256), so adding files later
  never moves an existing file, and identical bytes always share a split;
* records are ordered inside a split by a hash of (seed, relative path), a
  fixed pseudo-random order that mixes classes across shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Mapping, Optional, Sequence

from pipelines.common import walk
from tfrecords_schema.metadata import SPLITS

DUPLICATE = 'duplicate'
# Classes named per split in an error line; the rest are counted.
_MAX_NAMED = 5
LABEL_CONFLICT = 'label_conflict'
LEAK = 'leak'


@dataclasses.dataclass(frozen=True)
class FileEntry:
  """A readable, non-empty candidate file and its content hash."""
  relpath: str
  class_name: str
  given_split: Optional[str]
  sha256: str


@dataclasses.dataclass(frozen=True)
class Kept:
  """A file chosen to be written into `split`."""
  split: str
  relpath: str


def _unit_hash(*parts: object) -> float:
  """A uniform number in [0, 1) from the parts (stable across processes)."""
  digest = hashlib.sha256(':'.join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def assign_split(sha256: str, *, seed: int, validation_fraction: float,
                 test_fraction: float) -> str:
  """'train', 'validation' or 'test' for content `sha256`."""
  u = _unit_hash('split', seed, sha256)
  if u < test_fraction:
    return 'test'
  if u < test_fraction + validation_fraction:
    return 'validation'
  return 'train'


def order_key(relpath: str, *, seed: int) -> float:
  """Position key of a record inside its split (a seeded shuffle)."""
  return _unit_hash('order', seed, relpath)


def stratify(relpaths: Iterable[str], *, seed: int,
             validation_fraction: float, test_fraction: float
             ) -> list[tuple[str, str]]:
  """(relpath, split) for one class's files, with exact shares (--stratified).

  round(n * test_fraction) files go to test and round(n *
  validation_fraction) to validation, the first in a seeded order of their
  paths; at least one stays in train. What it gives up against
  assign_split: adding files to a class can move earlier files between
  splits (each file's split depends on the others).
  """
  ordered = sorted(relpaths, key=lambda p: (_unit_hash('stratify', seed, p), p))
  n = len(ordered)
  num_test = min(round(n * test_fraction), max(n - 1, 0))
  num_validation = min(round(n * validation_fraction), n - num_test - 1)
  num_validation = max(num_validation, 0)
  splits = (['test'] * num_test + ['validation'] * num_validation +
            ['train'] * (n - num_test - num_validation))
  return list(zip(ordered, splits))


def resolve_same_bytes(sha256: str, entries: Iterable[FileEntry], *,
                       seed: int, validation_fraction: float,
                       test_fraction: float,
                       ) -> tuple[list[Kept], list[walk.Skipped], Optional[dict]]:
  """Decides the fate of all files sharing the same bytes.

  * different classes -> a label conflict: all are dropped;
  * same class, several copies -> the first (in split order, then path
    order) is kept; other copies in the same split are duplicates, copies in
    a later split (pre-split layout) are leaks and left out of that split.

  Returns:
    (kept, dropped, finding): finding is a dict for the report's
    duplicates/conflicts/leaks lists, or None for a unique file.
  """
  entries = sorted(entries, key=lambda e: (
      SPLITS.index(e.given_split) if e.given_split else 0, e.relpath))
  paths = [e.relpath for e in entries]
  classes = sorted({e.class_name for e in entries})
  if len(classes) > 1:
    dropped = [walk.Skipped(e.relpath, LABEL_CONFLICT,
                       f'label conflict: the same bytes are in classes '
                       f'{classes} ({", ".join(p for p in paths if p != e.relpath)})')
               for e in entries]
    return [], dropped, {'kind': LABEL_CONFLICT, 'sha256': sha256,
                         'classes': classes, 'paths': paths}
  first = entries[0]
  split = first.given_split or assign_split(
      sha256, seed=seed, validation_fraction=validation_fraction,
      test_fraction=test_fraction)
  kept = [Kept(split, first.relpath)]
  if len(entries) == 1:
    return kept, [], None
  dropped = []
  for e in entries[1:]:
    if (e.given_split or split) == split:
      dropped.append(walk.Skipped(e.relpath, DUPLICATE,
                             f'exact duplicate of {first.relpath} (written once)'))
    else:
      dropped.append(walk.Skipped(
          e.relpath, LEAK,
          f'leak: same bytes as {first.relpath} in {split}; left out of '
          f'{e.given_split}'))
  kind = LEAK if any(d.outcome == LEAK for d in dropped) else DUPLICATE
  return kept, dropped, {'kind': kind, 'sha256': sha256, 'kept': first.relpath,
                         'dropped': [d.relpath for d in dropped]}


def classes_without_examples(class_names: Sequence[str],
                             counts: Mapping[str, Sequence[int]]
                             ) -> dict[str, list[str]]:
  """{split: names of its classes with no written example}.

  Train always (a class with no train example cannot be learned); another
  split only when it holds examples (an empty validation split is a choice,
  --validation_fraction=0, not a gap). counts: split -> per-class counts in
  class order.
  """
  gaps = {}
  for split in SPLITS:
    split_counts = counts.get(split) or [0] * len(class_names)
    if split == 'train' or any(split_counts):
      missing = [n for n, c in zip(class_names, split_counts) if not c]
      if missing:
        gaps[split] = missing
  return gaps


def class_gap_error(gaps: Mapping[str, Sequence[str]], *, input_dir: str,
                    given_splits: bool, allow_missing_eval_classes: bool,
                    allow_flag: str) -> Optional[str]:
  """The error for classes a build wrote no example of, or None.

  A class with no train example (its folder held no usable image, or all of
  its few images fell into validation/test) is always an error. One with no
  example in a split folder it should fill (layout (b): given_splits) is one
  unless allowed; in layout (a) a small class may miss an evaluation split
  by chance, which the report shows (`classes_without_examples`).
  """
  named = lambda split: f'{split}: ' + ', '.join(
      repr(n) for n in gaps[split][:_MAX_NAMED]) + (
          f' and {len(gaps[split]) - _MAX_NAMED} more'
          if len(gaps[split]) > _MAX_NAMED else '')
  problems = [named('train')] if 'train' in gaps else []
  if given_splits and not allow_missing_eval_classes:
    problems += [named(split) for split in gaps if split != 'train']
  if not problems:
    return None
  small = ('' if given_splits else ', or a class too small for '
           '--validation_fraction and --test_fraction')
  allow = (f', or pass {allow_flag} to build with classes missing from '
           'validation/ or test/' if 'train' not in gaps else '')
  return (f'--input_dir={input_dir} gave classes no image in a split that '
          f'needs them ({"; ".join(problems)}): a class folder that is empty '
          f'or whose files were all rejected (see rejected.jsonl){small}; add '
          f'readable images or remove the class folder{allow}')
