"""A TFDS image classification dataset as a built dataset (trainer --tfds).

    python -m trainer.main --tfds=fashion_mnist --model=dense --model_dir=runs/f

`import_dataset` reads the dataset TFDS prepared (downloading and preparing
it first when it is not, as `tfds.load` does) and writes it once in this
toolkit's format (the record schema of tfrecords_schema, shards and
metadata.json), so training, read-time resize, normalization, augmentation,
cache, pictures, export and predict are exactly those of a folder build:

  TFDS train       train, minus a validation share when the dataset has no
                   validation split: each image's split comes from the hash
                   of its pixels (splits.assign_split, as the build does), so
                   it is stable across runs and machines
  TFDS validation  validation
  TFDS test        test
  image feature    stored as PNG (lossless) at its own size; a dataset of
                   images of varying size is resized once (stretch, Pillow,
                   as the build) to --image_size (default 150)
  record filename  `train[123]`: the TFDS split and index, so
                   `tfds.load(NAME, split='train[123:124]')` gives the image

The folder (by default `<tfds_data_dir>/image_toolkit/<name>/<version>`,
`<version>-HxW` when resized on import) is written under a temporary name
and renamed when complete; a later run with the same dataset and settings
reuses it (tfds_source.json says what it was made from), and an existing
folder is never replaced. The split hash is of the pixels TFDS gives.
Examples without a class label (-1) are left out, and said.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from typing import Optional

import numpy as np
from PIL import Image

from pipelines.common import cli
from pipelines.common import net
from pipelines.common import paths
from pipelines.common.errors import UserError
from pipelines.folder_to_records import settings as build_settings
from pipelines.folder_to_records import splits as splits_lib
from pipelines.preprocessing import source_image
from tfrecords_schema import metadata
from tfrecords_schema import schema

SOURCE_FILE = metadata.TFDS_SOURCE_FILE
FOLDER = 'image_toolkit'  # Under the TFDS data dir: imported datasets.
DEFAULT_SIZE = 150  # Stored side of datasets whose images vary in size.
SHARD_BYTES = 64 << 20
# Validation share carved from TFDS train when a dataset has none, and the
# seed of that hash: the build's defaults (one definition).
VALIDATION_FRACTION = build_settings.BuildSettings.validation_fraction
SEED = build_settings.BuildSettings.seed
# Whole names only (fullmatch: `$` would let a trailing line break through).
_NAME_RE = re.compile(r'[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]+)?(:[0-9.*]+)?')
_PROGRESS_S = 5.0  # Seconds between progress lines.
TFDS_MIRROR = 'storage.googleapis.com'  # Where TFDS downloads most data.


def _say(message: str) -> None:
  print(f'[tfds] {message}', file=sys.stderr, flush=True)


def default_data_dir(tfds_data_dir: Optional[str]) -> str:
  """TFDS' own data dir: --tfds_data_dir, else $TFDS_DATA_DIR or
  ~/tensorflow_datasets (as tfds.load)."""
  return os.path.expanduser(tfds_data_dir or os.environ.get(
      'TFDS_DATA_DIR', '~/tensorflow_datasets'))


@dataclasses.dataclass(frozen=True)
class Source:
  """What an imported folder is made from (tfds_source.json)."""
  name: str  # The dataset (and config) name, without the version.
  version: str
  image: str  # The image feature's key.
  label: str  # The ClassLabel feature's key.
  validation_fraction: float
  seed: int
  size: Optional[tuple[int, int]]  # Resize of varying-size images.


def channels_of(shape) -> int:
  """Channels of an Image feature's shape (h, w, c); 3 when unknown."""
  return shape[-1] or 3


def _check_name(name: str) -> None:
  if not _NAME_RE.fullmatch(name or ''):
    raise UserError(
        f'--tfds={name!r} is not a TFDS dataset name: expected NAME, '
        'NAME/CONFIG or NAME:VERSION in lower_snake_case, e.g. '
        '--tfds=fashion_mnist or --tfds=fashion_mnist:3.0.1')


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises DatasetNotFoundError (with close names) and others.
    raise UserError(
        f'--tfds={name}: TFDS has no such dataset ({cli.one_line(e, 300)}); '
        'see https://www.tensorflow.org/datasets/catalog for names, or pass '
        f'--tfds_data_dir where it is prepared (now {data_dir})') from None


def _feature_keys(name: str, features) -> tuple[str, str]:
  """(image key, label key) of an image classification dataset; UserError
  naming the features it has otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  items = dict(features.items()) if hasattr(features, 'items') else {}
  images = [k for k, f in items.items()
            if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in items.items()
            if isinstance(f, tfds.features.ClassLabel)]
  if not images or not labels:
    have = ', '.join(f'{k} ({type(f).__name__})' for k, f in sorted(
        items.items()))
    raise UserError(
        f'--tfds={name} is not an image classification dataset: training '
        'needs an Image feature and a ClassLabel feature at its top level; '
        f'it has {have or "no features"}')
  pick = lambda keys, preferred: preferred if preferred in keys else keys[0]
  return pick(images, 'image'), pick(labels, 'label')


def _prepare(builder, name: str, data_dir: str, download: bool) -> None:
  """Downloads and prepares the dataset if TFDS has not (as tfds.load)."""
  if builder.info.splits:
    return
  if not download:
    raise UserError(f'--tfds={name} is not prepared in --tfds_data_dir='
                    f'{data_dir}; prepare it there first')
  # TFDS fetches most datasets from its GCS mirror and retries for minutes
  # when there is no network: ask once, quickly.
  offline = net.unreachable(TFDS_MIRROR, 443, timeout=10)
  if offline:
    raise UserError(
        f'--tfds={name} is not prepared in --tfds_data_dir={data_dir} and '
        f'cannot be downloaded: {TFDS_MIRROR} does not answer ({offline}); '
        'prepare it on a machine with internet (python -c "import '
        f"tensorflow_datasets as tfds; tfds.load('{name}')\") and copy its "
        'folder into --tfds_data_dir')
  _say(f'{name}: downloading and preparing into {data_dir} (TFDS)')
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f'--tfds={name}: TFDS could not download and prepare it '
        f'({cli.one_line(e, 300)}); without internet, prepare it on a '
        'machine with internet (python -c "import tensorflow_datasets as '
        f"tfds; tfds.load('{name}')\") and copy its folder into "
        f'--tfds_data_dir={data_dir}') from None


def import_dataset(name: str, *, tfds_data_dir: Optional[str] = None,
                   output_dir: Optional[str] = None,
                   validation_fraction: float = VALIDATION_FRACTION,
                   seed: int = SEED,
                   image_size: Optional[tuple[int, int]] = None,
                   download: bool = True) -> str:
  """Writes (or reuses) the dataset's built folder; returns its path.

  Args:
    name: NAME, NAME/CONFIG or NAME:VERSION (tfds.builder's syntax).
    tfds_data_dir: where TFDS keeps prepared datasets (default_data_dir).
    output_dir: the folder to write; default
      <tfds_data_dir>/image_toolkit/<name>/<version>.
    validation_fraction: share of TFDS train made validation when the
      dataset has no validation split.
    seed: seed of that split hash.
    image_size: (height, width) for datasets whose images vary in size.
    download: download and prepare it when TFDS has not.

  Raises:
    UserError: one line, naming the flag, for a name TFDS does not know, a
      dataset that is not image classification, or one it cannot prepare.
  """
  _check_name(name)
  data_dir = default_data_dir(tfds_data_dir)
  if output_dir and paths.is_remote(output_dir):
    raise UserError(_local_only(f'--data_dir={output_dir} is'))
  if not output_dir and paths.is_remote(data_dir):
    raise UserError(_local_only(
        f'--data_dir (by default inside --tfds_data_dir={data_dir}) is'))
  special = paths.special_entry(os.path.join(
      data_dir, name.split(':')[0].split('/')[0]))
  if special:  # TFDS opens its files without looking first.
    raise UserError(f'--tfds_data_dir={data_dir}: {special[0]} is not a '
                    f'regular file but {special[1]}; remove it (prepare '
                    'the dataset again if it was part of it)')
  builder = _builder(name, data_dir)
  info = builder.info
  image_key, label_key = _feature_keys(name, info.features)
  base_name = name.split(':')[0]
  version = str(info.version)
  shape = info.features[image_key].shape  # (h, w, c), h/w None if varying.
  varying = shape[0] is None or shape[1] is None
  size = tuple(image_size or (DEFAULT_SIZE, DEFAULT_SIZE)) if varying else None
  source = Source(name=base_name, version=version, image=image_key,
                  label=label_key, validation_fraction=validation_fraction,
                  seed=seed, size=size)
  if channels_of(shape) not in (1, 3):
    raise UserError(f'--tfds={name}: its images have {shape[-1]} channels; '
                    'training here takes 1 (grey) or 3 (RGB): this dataset '
                    'cannot be trained with this toolkit')
  # A folder per size for datasets resized on import: runs at another
  # --image_size never replace each other's data.
  default = os.path.join(data_dir, FOLDER, base_name, version + (
      f'-{size[0]}x{size[1]}' if size else ''))
  output_dir = os.path.normpath(output_dir or default)
  if _already_imported(output_dir, source):
    return output_dir
  _prepare(builder, name, data_dir, download)
  tfds_splits = sorted(builder.info.splits)
  if 'train' not in tfds_splits:
    raise UserError(f'--tfds={name} has no train split (it has '
                    f'{", ".join(tfds_splits)}); training needs one')
  ignored = [s for s in tfds_splits if s not in metadata.SPLITS]
  if ignored:
    _say(f'{name}: splits {", ".join(ignored)} are not used (train, '
         'validation and test are)')
  _refuse_other_folder(output_dir)
  tmp = f'{output_dir}.incomplete-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    spec = _write(builder, source, tmp, shape, dataset_name=re.sub(
        r'[^a-z0-9_]', '_', base_name.lower()),
                  class_names=tuple(info.features[label_key].names),
                  has_validation='validation' in tfds_splits,
                  tfds_splits=[s for s in tfds_splits if s not in ignored])
    metadata.write_dataset_metadata(
        tmp, spec, description=f'TFDS {base_name} {version}, imported by '
        'pipelines.tfds_import.')
    with open(os.path.join(tmp, SOURCE_FILE), 'w') as f:
      json.dump(dataclasses.asdict(source), f, indent=2)
    if _already_imported(output_dir, source):
      return output_dir  # A concurrent run imported it meanwhile: keep it.
    _refuse_other_folder(output_dir)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    if os.path.isdir(output_dir):
      os.rmdir(output_dir)  # Empty (checked): nothing is ever replaced.
    os.rename(tmp, output_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return output_dir


def _local_only(what_is: str) -> str:
  """The line refusing an import into an object store."""
  return (f'{what_is} on an object store: an import writes a local folder '
          'and renames it into place, which a store cannot do; pass a local '
          '--data_dir (--tfds_data_dir may stay on the store)')


def _already_imported(output_dir: str, source: Source) -> bool:
  try:
    saved = paths.read_json(os.path.join(output_dir, SOURCE_FILE))
    metadata.read_dataset_spec(output_dir)
  except (OSError, ValueError, UserError):
    return False
  if isinstance(saved.get('size'), list):
    saved['size'] = tuple(saved['size'])
  return saved == dataclasses.asdict(source)


def _refuse_other_folder(output_dir: str) -> None:
  """The import goes only into a missing or empty folder: an existing one
  (another dataset's import, the same dataset at another size, anything of
  the user's) is never replaced; a run may be training on it."""
  if not os.path.lexists(output_dir) or (
      os.path.isdir(output_dir) and not os.path.islink(output_dir)
      and not os.listdir(output_dir)):
    return
  what = 'is not a TFDS import of this toolkit'
  special = paths.special_entry(output_dir)
  if special:  # Not what an import writes (e.g. metadata.json a FIFO).
    what = (f'holds {special[0]}, which is not a regular file but '
            f'{special[1]}')
  else:
    try:
      saved = paths.read_json(os.path.join(output_dir, SOURCE_FILE))
      what = (f'holds the import of {saved["name"]} {saved["version"]} with '
              f'other settings (size {saved.get("size")})')
    except (OSError, ValueError, KeyError, TypeError):
      pass
  raise UserError(
      f'--data_dir={output_dir} exists and {what}; nothing there is '
      'replaced: pass another --data_dir (or leave it out) for this import')


class _ShardWriter:
  """Records of one split into shards of about SHARD_BYTES."""

  def __init__(self, folder: str, dataset_name: str, split: str):
    self.folder, self.dataset_name, self.split = folder, dataset_name, split
    self.parts, self.lengths = [], []
    self.num_bytes = 0
    self._file = None

  def add(self, record: bytes) -> None:
    if self._file is None or self._file.tell() >= SHARD_BYTES:
      self._close()
      path = os.path.join(self.folder, f'.part-{self.split}-{len(self.parts)}')
      self._file = open(path, 'wb')
      self.parts.append(path)
      self.lengths.append(0)
    self._file.write(record)
    self.lengths[-1] += 1
    self.num_bytes += len(record)

  def _close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def finish(self) -> tuple[str, ...]:
    """Renames the parts to TFDS shard names; returns them."""
    self._close()
    names = []
    for i, path in enumerate(self.parts):
      name = schema.shard_filename(self.dataset_name, self.split, i,
                                   len(self.parts))
      os.rename(path, os.path.join(self.folder, name))
      names.append(name)
    return tuple(names)


def _write(builder, source: Source, folder: str, shape, *, dataset_name: str,
           class_names: tuple[str, ...], has_validation: bool,
           tfds_splits: list[str]) -> metadata.DatasetSpec:
  """Every example of tfds_splits as records in `folder`; the spec."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  channels = channels_of(shape)
  unlabelled = collections.Counter()
  height, width = source.size or shape[:2]
  writers = {s: _ShardWriter(folder, dataset_name, s)
             for s in metadata.SPLITS}
  counts = {s: [0] * len(class_names) for s in metadata.SPLITS}
  sums = np.zeros(channels)
  squares = np.zeros(channels)
  pixels = 0
  last = time.monotonic()
  for tfds_split in tfds_splits:
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
    for index, example in enumerate(tfds.as_numpy(ds)):
      label = int(example[source.label])
      if not 0 <= label < len(class_names):
        unlabelled[tfds_split] += 1  # E.g. -1: a test split without labels.
        continue
      array = np.asarray(example[source.image])
      if array.dtype != np.uint8:
        raise UserError(f'--tfds={source.name}: its images are '
                        f'{array.dtype}, not 8-bit; training here reads '
                        '8-bit images')
      # The split and the record's sha256 come from the pixels TFDS gives
      # (not from Pillow's PNG bytes, which another zlib may change).
      pixels_hash = hashlib.sha256(
          str(array.shape).encode() + array.tobytes()).hexdigest()
      image = Image.fromarray(array[..., 0] if channels == 1 else array,
                              'L' if channels == 1 else 'RGB')
      original = image.size
      if source.size:
        image = source_image.resize(image, height=height, width=width,
                                    mode='stretch')
      buffer = io.BytesIO()
      image.save(buffer, format='PNG')
      encoded = buffer.getvalue()
      sha256 = pixels_hash
      split = tfds_split
      if tfds_split == 'train' and not has_validation:
        split = splits_lib.assign_split(
            sha256, seed=source.seed,
            validation_fraction=source.validation_fraction, test_fraction=0.0)
      writers[split].add(schema.frame_record(schema.encode_example(
          image=encoded, label=label, filename=f'{tfds_split}[{index}]',
          sha256=sha256, original_height=original[1],
          original_width=original[0])))
      counts[split][label] += 1
      if split == 'train':
        s, q, n = source_image.channel_sums(image)
        sums += s
        squares += q
        pixels += n
      if time.monotonic() - last >= _PROGRESS_S:
        last = time.monotonic()
        _say(f'{source.name} {tfds_split}: {index + 1:,} images imported')
  for tfds_split, count in sorted(unlabelled.items()):
    _say(f'{source.name} {tfds_split}: {count:,} examples without a class '
         'label (e.g. -1) left out')
  split_specs = {}
  for split, writer in writers.items():
    shards = writer.finish()
    split_specs[split] = metadata.SplitSpec(
        name=split, shards=shards, shard_lengths=tuple(writer.lengths),
        num_bytes=writer.num_bytes, class_counts=tuple(counts[split]))
  mean = std = None
  if pixels:
    m = sums / pixels
    mean = tuple(round(float(v), 4) for v in m)
    std = tuple(round(float(v), 4)
                for v in np.sqrt(np.maximum(squares / pixels - m * m, 0)))
  _say(f'{source.name} {source.version}: ' + ', '.join(
      f'{sum(counts[s]):,} {s}' for s in metadata.SPLITS) +
       f' images, {cli.image_shape(height, width, channels)}')
  return metadata.DatasetSpec(
      name=dataset_name, class_names=class_names, height=height, width=width,
      channels=channels, image_format='png', resize_mode='stretch',
      splits=split_specs, mean=mean, std=std, jpeg_quality=None)
