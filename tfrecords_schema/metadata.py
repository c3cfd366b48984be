"""Dataset-level metadata: what a built dataset directory holds, read and written.

A dataset directory written by `pipelines.build` contains

  {name}-{split}.tfrecord-00000-of-0000N   the shards (see `schema`)
  dataset_info.json, features.json         TFDS metadata (builder_from_directory)
  metadata.json                            `DatasetSpec` below, via TFDS MetadataDict
  build_report.json, rejected.jsonl        what the build did with every input file
  near_duplicates.jsonl                    each image's nearest near-duplicates
  images.jsonl                             every decoded file: hashes, measures
  left_out-{split}.tfrecord                records of the copies left out
  report.html                              all of it as one page, with thumbnails

`metadata.json` is what this toolkit reads; the TFDS files are for TFDS users.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import types
import typing
from typing import Any, Callable, Mapping, Optional

from tfrecords_schema import files as paths
from tfrecords_schema import schema
from tfrecords_schema.errors import UserError

METADATA_FILE = 'metadata.json'
REPORT_FILE = 'build_report.json'
REJECTED_FILE = 'rejected.jsonl'
# Every near-duplicate pair the build found, one JSON object a line.
NEAR_DUPLICATES_FILE = 'near_duplicates.jsonl'
# The page to read after a build (pipelines.folder_to_records.report_page).
REPORT_PAGE_FILE = 'report.html'
# One line per decoded file: its split, hashes, quality measures and flags.
IMAGES_FILE = 'images.jsonl'
# What a dataset imported from TFDS (trainer.main --tfds) was made from.
TFDS_SOURCE_FILE = 'tfds_source.json'
# The records of the copies a build left out of a split (duplicates and
# leaks), in the shards' format and order: an incremental build takes them
# instead of decoding those files again. Never read for training.
LEFT_OUT_FILES = {split: f'left_out-{split}.tfrecord'
                  for split in ('train', 'validation', 'test')}
TOOLKIT_MARKER = 'image-folder-tfrecords'
# metadata.json holds one entry per shard and per class: far below this.
MAX_METADATA_BYTES = 64 << 20
SPLITS = ('train', 'validation', 'test')


class DatasetError(UserError):
  """A data directory is missing, not ours, or of another schema version."""


# The metadata key of a DatasetSpec field that holds how a build fills it.
_FROM_BUILD = 'from_build'


def _built(value_of: Callable[['BuiltDataset'], Any], **kwargs) -> Any:
  """A DatasetSpec field, and its value in a finished build: value_of(b) of
  the BuiltDataset b. Every field is one (DatasetSpec.from_build checks)."""
  return dataclasses.field(metadata={_FROM_BUILD: value_of}, **kwargs)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """What a finished build knows, for DatasetSpec.from_build.

  config: the build's settings, as pipelines' BuildConfig (dataset_name,
    class_names, layout, seed, fractions, image: the stored-image options
    height, width, channels, resize_mode, image_format, jpeg_quality, ...).
  splits: split name -> SplitSpec of the shards written.
  mean, std: per-channel train statistics (0..255), None without train.
  """
  config: Any
  splits: Mapping[str, 'SplitSpec']
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]


def _jpeg_quality(b: BuiltDataset) -> Optional[int]:
  image = b.config.image
  return image.jpeg_quality if image.image_format == 'jpeg' else None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
  return typing.get_type_hints(cls)


def _from_json(tp: Any, value: Any) -> Any:
  """A JSON value as a field of type tp: lists become tuples where the
  field is a tuple (Optional or not); other values are kept."""
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(
      args) == 1:
    tp = args[0]
  if typing.get_origin(tp) is tuple and value is not None:
    return tuple(value)
  return value


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """One split: its shard files (relative names) and example counts."""
  name: str
  shards: tuple[str, ...]
  shard_lengths: tuple[int, ...]
  num_bytes: int
  class_counts: tuple[int, ...]

  @property
  def num_examples(self) -> int:
    return sum(self.shard_lengths)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything a reader needs to decode and normalize a built dataset.

  `mean` / `std` are per-channel statistics of the train split on the 0..255
  scale (None when the train split is empty).
  """
  name: str = _built(lambda b: b.config.dataset_name)
  class_names: tuple[str, ...] = _built(lambda b: tuple(b.config.class_names))
  height: int = _built(lambda b: b.config.image.height)
  width: int = _built(lambda b: b.config.image.width)
  channels: int = _built(lambda b: b.config.image.channels)
  image_format: str = _built(lambda b: b.config.image.image_format)
  resize_mode: str = _built(lambda b: b.config.image.resize_mode)
  splits: Mapping[str, SplitSpec] = _built(lambda b: b.splits)
  mean: Optional[tuple[float, ...]] = _built(lambda b: b.mean, default=None)
  std: Optional[tuple[float, ...]] = _built(lambda b: b.std, default=None)
  jpeg_quality: Optional[int] = _built(_jpeg_quality, default=None)
  schema_version: int = _built(lambda b: schema.SCHEMA_VERSION,
                               default=schema.SCHEMA_VERSION)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @classmethod
  def from_build(cls, built: BuiltDataset) -> 'DatasetSpec':
    """The spec of a finished build: each field's value from its _built
    function, so a new field is one line above."""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if _FROM_BUILD not in f.metadata]
    if missing:
      raise TypeError(
          f'{cls.__name__} fields {missing} have no value from a build: '
          'declare each with _built(lambda b: ...) (see BuiltDataset)')
    return cls(**{f.name: f.metadata[_FROM_BUILD](built) for f in fields})

  def to_json_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out['splits'] = {k: dataclasses.asdict(v) for k, v in self.splits.items()}
    out['toolkit'] = TOOLKIT_MARKER
    return out

  @classmethod
  def from_json_dict(cls, d: Mapping) -> 'DatasetSpec':
    d = dict(d)
    d.pop('toolkit', None)
    split_hints = _hints(SplitSpec)
    splits = {
        k: SplitSpec(**{f.name: _from_json(split_hints[f.name], v[f.name])
                        for f in dataclasses.fields(SplitSpec)})
        for k, v in d.pop('splits').items()
    }
    splits = {k: dataclasses.replace(v, num_bytes=int(v.num_bytes))
              for k, v in splits.items()}
    hints = _hints(cls)
    d = {k: _from_json(hints[k], v) if k in hints else v
         for k, v in d.items()}
    return cls(splits=splits, **d)

  def shard_paths(self, data_dir: str, split: str) -> list[str]:
    """Absolute shard paths of `split`; a one-line error for a missing split."""
    if split not in self.splits:
      raise DatasetError(
          f'split={split!r} is not in this dataset; it has '
          f'{sorted(self.splits)}')
    return [posixpath.join(data_dir, s) for s in self.splits[split].shards]


def _holds_image_folders(data_dir: str, limit: int = 200) -> bool:
  """True if data_dir has sub-folders (or split/class folders) of images.

  Looks at no more than `limit` entries per folder, two levels down: only
  to word an error message.
  """
  extensions = paths.IMAGE_EXTENSION_FORMATS

  def entries(folder):
    try:
      return [e for e in sorted(paths.listdir(folder))
              if not e.startswith('.')][:limit]
    except OSError:
      return []

  def has_images(folder, depth):
    folders = []
    for name in entries(folder):
      if posixpath.splitext(name)[1].lower() in extensions:
        return True
      folders.append(posixpath.join(folder, name))
    return depth > 0 and any(
        has_images(f, depth - 1) for f in folders[:20]
        if paths.isdir(f))

  return any(has_images(posixpath.join(data_dir, name), 1)
             for name in entries(data_dir)[:20]
             if paths.isdir(posixpath.join(data_dir, name)))


def _built_sub_datasets(data_dir: str, limit: int = 200) -> list[str]:
  """Sub-folders of data_dir that hold a built dataset (a metadata.json)."""
  try:
    names = sorted(paths.listdir(data_dir))[:limit]
    return [posixpath.join(data_dir.rstrip('/'), n) for n in names
            if not n.startswith('.') and paths.exists(
                posixpath.join(data_dir, n, METADATA_FILE))]
  except OSError:
    return []


def _sibling_output_dir(data_dir: str) -> str:
  """A new folder next to data_dir (so outside it) to build into."""
  base = data_dir.rstrip('/') or '/'
  if not paths.is_remote(base) and posixpath.basename(base) in ('', '.', '..'):
    import os  # pylint: disable=g-import-not-at-top
    base = os.path.abspath(base)
  return f'{base}_dataset'


def read_dataset_spec(data_dir: str) -> DatasetSpec:
  """Reads and validates `metadata.json` of a dataset built by this toolkit
  (local ones without loading TensorFlow: a mistyped --data_dir fails fast)."""
  if not paths.isdir(data_dir):
    raise DatasetError(
        f'--data_dir={data_dir} does not exist; pass the --output_dir of a '
        '`python -m pipelines.build` run')
  path = posixpath.join(data_dir, METADATA_FILE)
  if not paths.exists(path):
    built = _built_sub_datasets(data_dir)
    if built:
      raise DatasetError(
          f'--data_dir={data_dir} is not a built dataset (no {METADATA_FILE}) '
          f'but holds one: pass --data_dir={built[0]}' +
          (f' (or {", ".join(built[1:3])})' if len(built) > 1 else ''))
    if _holds_image_folders(data_dir):
      # The images to build from: the build must write outside them.
      output = _sibling_output_dir(data_dir)
      raise DatasetError(
          f'--data_dir={data_dir} is a folder of images, not a built dataset '
          f'(no {METADATA_FILE}); build one into a new folder outside it: '
          f'`python -m pipelines.build --input_dir={data_dir} '
          f'--output_dir={output}`, then pass --data_dir={output}')
    raise DatasetError(
        f'{data_dir} is not a dataset built by this toolkit (no '
        f'{METADATA_FILE}); build one with `python -m pipelines.build '
        f'--input_dir=IMAGES --output_dir={data_dir}`')
  try:
    text = paths.read_text(path, max_bytes=MAX_METADATA_BYTES)
  except ValueError as e:
    raise DatasetError(f'{path} {e}; rebuild the dataset with '
                       '`python -m pipelines.build`') from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise DatasetError(f'{path} is not valid JSON ({e}); rebuild the '
                       'dataset with `python -m pipelines.build`') from None
  if raw.get('toolkit') != TOOLKIT_MARKER:
    raise DatasetError(
        f'{path} was not written by this toolkit (toolkit='
        f'{raw.get("toolkit")!r}); rebuild with `python -m pipelines.build`')
  version = raw.get('schema_version')
  if version != schema.SCHEMA_VERSION:
    raise DatasetError(
        f'{data_dir} has schema_version={version}, this toolkit reads '
        f'schema_version={schema.SCHEMA_VERSION}; rebuild it with this '
        'version of `python -m pipelines.build`')
  return DatasetSpec.from_json_dict(raw)


def write_dataset_metadata(data_dir: str, spec: DatasetSpec, *,
                           description: str = '') -> None:
  """Writes TFDS metadata (dataset_info.json, features.json, metadata.json).

  The shards named in `spec.splits` must already be in `data_dir`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = schema.tfds_features(
      class_names=spec.class_names, height=spec.height, width=spec.width,
      channels=spec.channels, image_format=spec.image_format)
  split_infos = []
  for split in spec.splits.values():
    if not split.shards:
      continue  # TFDS cannot describe a split without files.
    split_infos.append(tfds.core.SplitInfo(
        name=split.name, shard_lengths=list(split.shard_lengths),
        num_bytes=split.num_bytes,
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=data_dir, dataset_name=spec.name, split=split.name,
            filetype_suffix=schema.RECORD_SUFFIX)))
  tfds.folder_dataset.write_metadata(
      data_dir=data_dir,
      features=features,
      split_infos=split_infos,
      filename_template=None,
      check_data=False,
      description=description,
      supervised_keys=(schema.IMAGE, schema.LABEL),
      metadata=tfds.core.MetadataDict(spec.to_json_dict()),
  )

