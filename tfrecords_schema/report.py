"""build_report.json, typed: what a build did with every input file.

`BuildReport` is the one definition the build writes (beam_build's Finalize,
then the launcher adds its timing and class checks) and every reader reads
(the builder's summary and output-folder checks, the trainer's placement
checks and rebuild hints). A field added here is written and read back with
no other change (tests/tfrecords_schema/test_build_report.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any, Mapping, Optional

from tfrecords_schema import dataclass_json
from tfrecords_schema import files as paths
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import schema

REPORT_FILE = metadata_lib.REPORT_FILE
# Only a build that wrote nothing leaves a report without metadata.json, and
# it lists no duplicates or warnings: small. The cap bounds a fake one.
MAX_REPORT_BYTES = 1 << 28

_field = dataclass_json.field
_omit_none = dict(default=None, omit_if=dataclass_json.is_none)


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  """One split of the report: its examples, shards and per-class counts."""
  total: int = 0
  num_shards: int = 0
  num_bytes: int = 0
  per_class: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Finding:
  """Files with the same bytes (splits.resolve_same_bytes): a label
  conflict has `classes` and `paths`; a duplicate or leak `kept` and
  `dropped`."""
  kind: str
  sha256: str
  classes: Optional[list[str]] = _field(**_omit_none)
  paths: Optional[list[str]] = _field(**_omit_none)
  kept: Optional[str] = _field(**_omit_none)
  dropped: Optional[list[str]] = _field(**_omit_none)


@dataclasses.dataclass(frozen=True)
class FileWarning:
  """A written image the build warns about (e.g. upscaled a lot)."""
  path: str
  warning: str


@dataclasses.dataclass(frozen=True)
class EmptyClass:
  """A class a model cannot learn: no image of it in train."""
  class_name: str = _field(json_key='class')
  written: int = 0
  train: int = 0
  rejected: int = 0
  warning: str = ''


@dataclasses.dataclass(frozen=True)
class CappedGroup:
  """A band group of the near-duplicate search too large to compare whole
  (e.g. many blank images): only `compared` of its `members` were."""
  band: int = 0
  members: int = 0
  compared: int = 0
  example: str = ''


@dataclasses.dataclass(frozen=True)
class NearDuplicates:
  """What the near-duplicate search found, counted in images (an image
  counts once in each count it falls under). distance:
  --near_duplicate_distance (0: no search). images: images with a near
  copy; listed: the pairs near_duplicates.jsonl lists (each image's
  nearest partner in each split and of another class). leaks: images with
  a copy across the train/evaluation line (train images with a copy in
  validation or test, and those copies); left_out: the evaluation images
  left out for them (each in rejected.jsonl, outcome near_duplicate_leak);
  within_split: images with a copy in their own split;
  across_evaluation_splits: validation images with a copy in test and the
  reverse (reported only); label_conflicts: images with a copy of another
  class. lines_crc32: the crc32 of near_duplicates.jsonl's bytes (an update
  checks it before it carries the search over: near_carry)."""
  distance: int = 0
  images: int = 0
  listed: int = 0
  lines_crc32: int = 0
  leaks: int = 0
  left_out: int = 0
  within_split: int = 0
  across_evaluation_splits: int = 0
  label_conflicts: int = 0
  capped_groups: tuple[CappedGroup, ...] = ()


def _given(read_default) -> Any:
  """A field the writer must give; read_default() when a file lacks it."""
  return _field(read_default=read_default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildReport:
  """build_report.json. Fields are written in this order.

  counts: 'seen', 'written', then one count per other outcome (sorted);
  they add up to 'seen'. image: the build's stored-image options
  (pipelines' ImageOptions as a dict). classes_without_examples: split ->
  its classes with no example. write_stage_s: first chunk start to last
  chunk end. elapsed_s, images_per_s, empty_classes: added by the launcher
  after the run; class_gap_error only when the build refuses class gaps.
  output_dir and kept_earlier are never in the file: `builder.build()`
  returns them (kept_earlier only when true).
  """
  toolkit: str = metadata_lib.TOOLKIT_MARKER
  schema_version: int = schema.SCHEMA_VERSION
  # The build's Finalize gives each of these (no default: one it forgets
  # fails every build); a reader takes the read default for a missing key.
  dataset_name: str = _given(str)
  input_dir: str = _given(str)
  layout: str = _given(str)
  class_names: tuple[str, ...] = _given(tuple)
  image: dict[str, Any] = _given(dict)
  seed: int = _given(int)
  # None (null) when --input_dir was split already: they had no effect.
  validation_fraction: Optional[float] = _given(float)
  test_fraction: Optional[float] = _given(float)
  # --stratified: exact per-class shares instead of the per-file hash.
  stratified: bool = _given(bool)
  counts: dict[str, int] = _given(dict)
  splits: dict[str, SplitSummary] = _given(dict)
  train_mean: Optional[tuple[float, ...]] = _given(lambda: None)
  train_std: Optional[tuple[float, ...]] = _given(lambda: None)
  bytes_written: int = _given(int)
  duplicates: tuple[Finding, ...] = _given(tuple)
  conflicts: tuple[Finding, ...] = _given(tuple)
  leaks: tuple[Finding, ...] = _given(tuple)
  near_duplicates: NearDuplicates = _given(NearDuplicates)
  quality_flags: dict[str, int] = _given(dict)
  quality_thresholds: dict[str, Optional[float]] = _given(dict)
  warnings: tuple[FileWarning, ...] = _given(tuple)
  classes_without_examples: dict[str, list[str]] = _given(dict)
  write_stage_s: float = _given(float)
  # The library versions that decide stored bytes, and the version of what
  # an incremental build reads (pipelines/folder_to_records/reuse.py).
  software: dict[str, str] = _given(dict)
  # An incremental build's counts (reused, built, damaged, gone, from):
  # like the timings, how this dataset was made, not what it holds.
  reuse: Optional[dict[str, Any]] = _field(**_omit_none)
  # Added by the launcher after the run.
  started_at: Optional[float] = _field(**_omit_none)
  elapsed_s: Optional[float] = _field(**_omit_none)
  images_per_s: Optional[float] = _field(**_omit_none)
  empty_classes: Optional[tuple[EmptyClass, ...]] = _field(**_omit_none)
  class_gap_error: Optional[str] = _field(**_omit_none)
  # build()'s result only.
  output_dir: Optional[str] = _field(in_file=False, **_omit_none)
  kept_earlier: bool = _field(default=False, in_file=False,
                              omit_if=lambda kept: not kept)

  @property
  def seen(self) -> int:
    """Files the build looked at: written + every other outcome."""
    return self.counts.get('seen', 0)

  @property
  def written(self) -> int:
    return self.counts.get('written', 0)

  @property
  def not_written(self) -> dict[str, int]:
    """Outcome -> count of the files not written (counts without 'seen'
    and 'written')."""
    return {k: n for k, n in self.counts.items()
            if k not in ('seen', 'written')}

  def to_json_dict(self, *, in_file: bool = True) -> dict:
    """The JSON object; in_file=False adds output_dir and kept_earlier."""
    return dataclass_json.to_json_value(self, in_file=in_file)

  def to_json(self) -> str:
    """The text of build_report.json."""
    return json.dumps(self.to_json_dict(), indent=2)

  @classmethod
  def from_json_dict(cls, raw: Mapping) -> 'BuildReport':
    """ValueError when a key holds the wrong type; missing keys take their
    defaults (a partial report reads)."""
    return dataclass_json.from_json_dict(cls, raw)

  @classmethod
  def from_json(cls, text: str) -> 'BuildReport':
    return cls.from_json_dict(json.loads(text))


def read_build_report(data_dir: str, *, ours_only: bool = True,
                      max_bytes: int = MAX_REPORT_BYTES
                      ) -> Optional[BuildReport]:
  """The build report in data_dir, or None when it is absent, over
  max_bytes, damaged or (ours_only) lacks this toolkit's marker. Local
  folders are read without TensorFlow."""
  try:
    raw = json.loads(paths.read_text(posixpath.join(data_dir, REPORT_FILE),
                                     max_bytes=max_bytes))
  except (OSError, ValueError):
    return None
  return parse_build_report(raw, ours_only=ours_only)


def parse_build_report(raw: Any, *, ours_only: bool = True
                       ) -> Optional[BuildReport]:
  """raw (parsed JSON) as a BuildReport; None when it is no JSON object,
  holds a value of the wrong type, or (ours_only) lacks this toolkit's
  marker."""
  if not isinstance(raw, dict) or (
      ours_only and raw.get('toolkit') != metadata_lib.TOOLKIT_MARKER):
    return None
  try:
    return BuildReport.from_json_dict(raw)
  except ValueError:
    return None
