"""tf.data input layer over datasets written by `pipelines.build`.

    train = make_dataset('data/photos', 'train', batch_size=32, training=True,
                         augment=augment_config.COURSE, seed=0)
    val = make_dataset('data/photos', 'validation', batch_size=32,
                       training=False)
    model.fit(train, validation_data=val, epochs=10)

Order of operations, and why:

  shard files (shuffled when training)
  -> interleave reads            parallel I/O across shards (one shard: none)
  -> per-shard length check      a damaged shard is named, or skipped + counted
  -> parse + decode (parallel)   deterministic: record -> uint8 [H, W, C]
  -> resize (if image_size)      still uint8, so a cache stays 4x smaller
  -> cache                       after decode, before anything random
  -> shuffle                     encoded records (no cache) or decoded
                                 uint8 images (after a cache); bounded buffer
  -> repeat
  -> batch                       fused with the decode map; everything after
                                 works on whole batches
  -> augment (parallel)          one projective warp per batch, seeded
  -> normalize, labels           float32 only from here
  -> prefetch

Training is non-deterministic in order (faster) unless a seed is given;
evaluation (`training=False`) never shuffles or augments.

`batches(data_dir, split, model_input, DatasetOptions(...))` is the
pipeline: what the model reads (size, normalization) is a ModelInput, how
the split is read (batch size, shuffling, augmentation, cache, ...) a
DatasetOptions; `make_dataset(...)` above is its keyword form.

The parts, each usable alone (Model Garden style): `read_records` (shards ->
serialized records), `decode_example` (deterministic: record -> uint8 image,
label), `train_parse` (random: augment, then eval_parse) and `eval_parse`
(normalize, encode labels). What decode/resize/normalize mean is defined
once in pipelines.preprocessing.model_input, shared with the serving export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
import sys
from typing import Optional, Union

import tensorflow as tf

from pipelines.common import cli
from pipelines.common import paths
from pipelines.common.errors import UserError
from pipelines.preprocessing import model_input as model_input_lib
from pipelines.preprocessing.model_input import ModelInput
from pipelines.records_to_batches import augment as augment_lib
from pipelines.records_to_batches import augment_config
import tfrecords_schema
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import schema

AUTOTUNE = tf.data.AUTOTUNE
# Every function handed to tf.data here is written with TensorFlow's own
# control flow (tf.cond, tf.where), so AutoGraph has nothing to convert;
# letting it parse and rewrite them anyway cost ~3 s of CPU per trainer
# process (116 conversions, more than half the input pipeline's set-up).
_plain = tf.autograph.experimental.do_not_convert
NORMALIZATIONS = model_input_lib.NORMALIZATIONS
LABEL_MODES = ('int', 'categorical', 'binary')
SHUFFLE_BUFFER_BYTES = 256 << 20  # Default shuffle buffer: ~256 MB of images.
MAX_PARALLEL_READS = 8
CACHE_MEMORY_SHARE = 0.5  # Refuse an in-memory cache above this share of RAM.
# Start of the string a damaged shard is padded with (see _shard_records);
# parsing it fails with an error that quotes it, path and record count.
CORRUPT_SHARD_MARKER = '?? corrupt shard '
_MARKER_RE = re.compile(re.escape(CORRUPT_SHARD_MARKER) +
                        r'(.+?) \((\d+) records expected\)')


# Errors name the trainer's flags (--data_dir, --cache): they are the
# lines `python -m trainer.main` prints, raised here with their final
# wording so that no layer above rewords them.


def rebuild_hint(data_dir: str) -> str:
  """'rebuild it: python -m pipelines.build --input_dir=... --overwrite', or
  for a dataset imported from TFDS, how to import it again."""
  imported = None
  try:
    imported = paths.read_json(
        os.path.join(data_dir, metadata_lib.TFDS_SOURCE_FILE))
  except (OSError, ValueError):
    pass
  if isinstance(imported, dict) and isinstance(imported.get('name'), str):
    version = imported.get('version')
    name = imported['name'] + (f':{version}' if isinstance(version, str)
                               else '')
    return (f'import it again: remove {data_dir} and rerun trainer.main '
            f'with --tfds={name} --data_dir={data_dir}')
  source = 'IMAGES'
  try:
    report = tfrecords_schema.read_build_report(data_dir, ours_only=False)
    recorded = report.input_dir if report else None
    if isinstance(recorded, str) and tf.io.gfile.isdir(recorded):
      source = recorded
  except Exception:  # pylint: disable=broad-except
    pass  # No usable build report: the generic command.
  return (f'rebuild it: python -m pipelines.build --input_dir={source} '
          f'--output_dir={data_dir} --overwrite')


class MemoryCacheTooLarge(UserError):
  """cache='memory' would take more than CACHE_MEMORY_SHARE of the memory."""

  def __init__(self, message: str, *, split: str, need_bytes: int,
               have_bytes: int, num_examples: int, shape: tuple[int, ...]):
    super().__init__(message)
    self.split = split
    self.need_bytes = need_bytes
    self.have_bytes = have_bytes
    self.num_examples = num_examples
    self.shape = shape


class DamagedShardError(tfrecords_schema.DatasetError):
  """A shard no longer holds the records the build wrote into it.

  The message names the shard, --data_dir and the rebuild command.
  """

  def __init__(self, message: str, *, path: str, reason: str):
    super().__init__(message)
    self.path = path
    self.reason = reason


def corrupt_shard_in(message: str) -> Optional[tuple[str, int]]:
  """(shard path, records expected) when an error quotes a damaged-shard marker.

  Reading a damaged shard fails, at the first record past the damage, with
  an error that quotes the marker string it was padded with.
  """
  match = _MARKER_RE.search(message)
  return (match.group(1), int(match.group(2))) if match else None


_TF_NOISE = re.compile(r'\{\{function_node [^}]*\}\}\s*|'
                       r'Error in user-defined function passed to .*? '
                       r'transformation with iterator: \S+: ')


def tf_message(error: Exception) -> str:
  """The first line of a TensorFlow error, without graph/iterator names."""
  text = str(getattr(error, 'message', None) or error)
  text = _TF_NOISE.sub('', text.strip().splitlines()[0] if text.strip()
                       else type(error).__name__)
  return cli.one_line(text, 300)


@contextlib.contextmanager
def reading_errors(data_dir: str, *, cache: Optional[str] = None):
  """Errors raised while a dataset of `data_dir` is iterated -> UserError.

  Reading happens inside TensorFlow (fit, evaluate, next()), so its errors
  surface there; wrap that iteration in this. A damaged shard is padded
  with a marker that names it (see _shard_records): parsing the marker is
  the error, and the shard in it is what the message names. cache: the
  file cache's path prefix (--cache), whose damage is its own, not the
  dataset's.
  """
  try:
    yield
  except tf.errors.OpError as e:
    # A cut cache file is reported by tf.data's FileCacheImpl iterator, not
    # by path; a checksum mismatch names the file (PREFIX.<key>.<split>). A
    # damaged shard is the dataset's, whatever its path holds.
    text = str(e)
    if cache and not corrupt_shard_in(text) and (
        re.search(re.escape(cache) + r'\.[0-9a-f]{12}\.', text)
        or 'FileCacheImpl' in text):
      raise UserError(
          f'--cache={cache}: a file of the cache is damaged ({tf_message(e)}'
          f'); delete {cache}.* and rerun (the cache is made again from '
          f'--data_dir={data_dir})') from None
    if not isinstance(e, (tf.errors.InvalidArgumentError,
                          tf.errors.DataLossError)):
      raise
    text = str(e)
    damaged = corrupt_shard_in(text)
    hint = rebuild_hint(data_dir)
    if damaged:
      path, expected = damaged
      raise UserError(
          f'shard {path} of --data_dir={data_dir} is damaged (a '
          f'record is corrupt or cut short; the build wrote {expected}); '
          f'{hint}') from None
    if isinstance(e, tf.errors.DataLossError) or 'corrupted record' in text:
      raise UserError(f'a shard of --data_dir={data_dir} is damaged '
                      f'({tf_message(e)}); {hint}') from None
    raise UserError(
        f'reading --data_dir={data_dir} failed ({tf_message(e)}); if '
        f'the dataset changed or was damaged since it was built, {hint}'
    ) from None


def _available_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo, else total physical memory."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _shard_records(path: tf.Tensor, expected: tf.Tensor, skip: bool):
  """Serialized records of one shard, never silently fewer than `expected`.

  TFRecordDataset raises DataLossError on a bad checksum or a truncated
  record, without naming the file, and cannot read past it; `ignore_errors`
  ends the shard there instead. Then:

  * default: the shard is padded with marker strings up to its length in
    the metadata. A marker is not a valid Example (its first byte is an
    invalid protobuf tag), so parsing it fails with an error that quotes it:
    "corrupt shard PATH ...: rebuild ... or pass skip_bad_records=True".
    No extra work per record: the padding is C++ `concatenate` + `take`.
  * skip: a counting scan prints, at the shard's end, how many records were
    lost, and the rest of the pipeline never sees them.
  """
  records = tf.data.TFRecordDataset(path).ignore_errors()
  if not skip:
    marker = tf.strings.join([
        CORRUPT_SHARD_MARKER, path, ' (', tf.strings.as_string(expected),
        ' records expected): a damaged record cut it short; rebuild the '
        'dataset with pipelines.build, or pass skip_bad_records=True to '
        'skip bad records'])
    return records.concatenate(
        tf.data.Dataset.from_tensors(marker).repeat()).take(expected)
  records = records.concatenate(tf.data.Dataset.from_tensors(tf.constant(b'')))

  def count(seen, record):
    missing = expected - seen
    damaged = tf.logical_and(tf.equal(tf.strings.length(record), 0),
                             missing > 0)
    checked = tf.cond(damaged,
                      lambda: _report_skipped(path, missing, expected),
                      lambda: tf.constant(True))
    with tf.control_dependencies([checked]):
      return seen + 1, record

  return (records.scan(tf.constant(0, tf.int64), _plain(count))
          .filter(_plain(lambda record: tf.strings.length(record) > 0)))


def _report_skipped(path, missing, expected):
  printed = tf.print('WARNING: skipped bad records: corrupt shard', path,
                     'has', missing, 'unreadable records of', expected,
                     output_stream=sys.stderr)
  with tf.control_dependencies([printed]):
    return tf.constant(True)


def _shard_damage(path: str, expected: int) -> Optional[str]:
  """Why a shard's record framing does not hold `expected` records, or None.

  Walks the TFRecord frame headers only (8-byte length, then skip length,
  data and checksums): a cheap check that finds a truncated or grown shard
  without reading the images.
  """
  size = tf.io.gfile.stat(path).length
  count = position = 0
  with tf.io.gfile.GFile(path, 'rb') as f:
    while position < size:
      if position + 12 > size:
        return (f'cut short after record {count} of the {expected} the '
                'build wrote')
      f.seek(position)
      (length,) = struct.unpack('<Q', f.read(8))
      position += 16 + length
      if position > size:
        return f'cut short in record {count + 1} of the {expected} the build wrote'
      count += 1
      if count > expected:
        return f'holds more than the {expected} records the build wrote'
  if count != expected:
    return f'holds {count} of the {expected} records the build wrote'
  return None


def _check_shard_sizes(data_dir, spec, split, paths) -> None:
  """Shards truncated, grown or replaced since the build: an error now."""
  found = 0
  for path in paths:
    if not tf.io.gfile.exists(path):
      raise tfrecords_schema.DatasetError(
          f'shard {path} is missing; rebuild {data_dir} with pipelines.build '
          f'(--data_dir={data_dir})')
    found += tf.io.gfile.stat(path).length
  expected = spec.splits[split].num_bytes
  if found != expected:
    # Name the shard: only now (the sizes already disagree) walk the frames.
    for path, length in zip(paths, spec.splits[split].shard_lengths):
      try:
        reason = _shard_damage(path, length)
      except (OSError, tf.errors.OpError, struct.error) as e:
        reason = f'unreadable ({e})'
      if reason:
        raise DamagedShardError(
            f'shard {path} of --data_dir={data_dir} is damaged ({reason}); '
            f'{rebuild_hint(data_dir)}', path=path, reason=reason)
    raise tfrecords_schema.DatasetError(
        f'the {split} shards of {data_dir} hold {found} bytes, the build '
        f'wrote {expected}: they changed since; rebuild with pipelines.build '
        f'(--data_dir={data_dir})')


def _record_bytes(spec, split: str) -> int:
  info = spec.splits[split]
  return max(1, info.num_bytes // max(1, info.num_examples))


def _shuffle_buffer(spec, split: str, requested: Optional[int], *,
                    bytes_per_example: int) -> int:
  """The requested size, or as many examples as fit in SHUFFLE_BUFFER_BYTES."""
  if requested:
    return requested
  return max(1, min(spec.splits[split].num_examples,
                    SHUFFLE_BUFFER_BYTES // bytes_per_example))


def _estimate_bytes(spec, split: str, size) -> int:
  return spec.splits[split].num_examples * size[0] * size[1] * spec.channels


# Whole files per reader only when every reader's share of records is within
# this fraction of the largest share; else readers split by record.
MAX_FILE_PART_IMBALANCE = 0.1


def file_parts(shard_lengths, count: int) -> Optional[list[list[int]]]:
  """Shard files dealt to `count` readers with near-equal record counts.

  Largest file first to the reader with the fewest records so far (ties:
  lowest index), so the split is the same on every machine. None when some
  reader would get more than MAX_FILE_PART_IMBALANCE fewer records than
  the largest share (a short last shard, too few files): with equal batches
  per step, a small share would be repeated more often than the rest.
  """
  if len(shard_lengths) < count:
    return None
  parts, totals = [[] for _ in range(count)], [0] * count
  for i in sorted(range(len(shard_lengths)), key=lambda i: -shard_lengths[i]):
    reader = min(range(count), key=lambda r: (totals[r], r))
    parts[reader].append(i)
    totals[reader] += shard_lengths[i]
  if min(totals) < (1 - MAX_FILE_PART_IMBALANCE) * max(totals):
    return None
  return [sorted(p) for p in parts]


def read_records(data_dir: str, spec, split: str, *, training: bool,
                 seed: Optional[int] = None, skip_bad_records: bool = False,
                 deterministic: bool = True,
                 splittable: bool = False,
                 shard: Optional[tuple[int, int]] = None) -> tf.data.Dataset:
  """Serialized records (tf.string []) of one split, checked shard by shard.

  Shards are read in parallel (in a new order every epoch when training);
  a shard that holds fewer records than the build wrote is an error naming
  it (or, with skip_bad_records, a printed count). splittable: always start
  from the list of shard files (what a tf.data service deals out).
  shard: (count, index): only this reader's part of the split, for one of
  `count` training processes: whole shard files when they share out with
  near-equal record counts (`file_parts`), else every count-th record of
  the split read in a fixed file order.
  """
  paths = spec.shard_paths(data_dir, split)
  if not paths:
    raise tfrecords_schema.DatasetError(
        f'split {split!r} of {data_dir} is empty; rebuild with a non-zero '
        f'fraction for it, or use one of '
        f'{[s for s, v in spec.splits.items() if v.shards]} '
        f'(--data_dir={data_dir})')
  _check_shard_sizes(data_dir, spec, split, paths)
  shard_lengths = spec.splits[split].shard_lengths
  if shard is not None:
    count, index = shard
    if not 0 <= index < count:
      raise ValueError(f'shard={shard}: index must be in [0, {count})')
    files = file_parts(shard_lengths, count)
    if files is None:  # The files do not share out evenly: split by record.
      return read_records(data_dir, spec, split, training=False,
                          skip_bad_records=skip_bad_records,
                          deterministic=True).shard(count, index)
    paths = [paths[i] for i in files[index]]
    shard_lengths = [shard_lengths[i] for i in files[index]]
  if len(paths) == 1 and not splittable:
    # One shard: no interleave at all (even a sequential one costs ~8%).
    return _shard_records(tf.constant(paths[0]),
                          tf.constant(shard_lengths[0], tf.int64),
                          skip_bad_records)
  # Parallel reads across shards (they pay off on remote storage), in a new
  # shard order every epoch when training.
  files = tf.data.Dataset.from_tensor_slices(
      (paths, tf.constant(shard_lengths, tf.int64)))
  if training:
    files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
  return files.interleave(
      _plain(lambda path, n: _shard_records(path, n, skip_bad_records)),
      cycle_length=min(len(paths), MAX_PARALLEL_READS), block_length=1,
      num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def decode_example(serialized: tf.Tensor, model_input: ModelInput
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """Deterministic: one record -> (uint8 [h, w, C], int32 [] label).

  Decodes the stored image and applies the read-time resize; nothing
  random, so a cache may follow.
  """
  example = schema.parse_examples(serialized)
  return _image(example, model_input), tf.cast(example[schema.LABEL],
                                               tf.int32)


def _image(example: dict, model_input: ModelInput) -> tf.Tensor:
  """A parsed record's image, decoded and read-time resized: uint8
  [h, w, C] (what every reader of records starts from)."""
  return model_input.read_resize(model_input.decode(example[schema.IMAGE]))


def encode_labels(labels: tf.Tensor, label_mode: str,
                  num_classes: int) -> tf.Tensor:
  """int32 [B] -> int32 [B] ('int'), float32 [B, K] ('categorical') or
  float32 [B, 1] ('binary')."""
  if label_mode == 'categorical':
    return tf.one_hot(labels, num_classes, dtype=tf.float32)
  if label_mode == 'binary':
    return tf.cast(labels[:, None], tf.float32)
  return labels


def eval_parse(images: tf.Tensor, labels: tf.Tensor, *,
               model_input: ModelInput, label_mode: str, num_classes: int
               ) -> tuple[tf.Tensor, tf.Tensor]:
  """Deterministic: uint8 [B, h, w, C], int32 [B] -> model inputs.

  images float32 [B, h, w, C] normalized; labels as encode_labels.
  """
  return (model_input.to_model(images),
          encode_labels(labels, label_mode, num_classes))


def train_parse(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *,
                model_input: ModelInput,
                augment: Optional[augment_config.AugmentConfig],
                label_mode: str, num_classes: int
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Random: uint8 [B, h, w, C], int32 [B], int64 [2] seed -> model inputs.

  The batch is augmented (seeded, one warp per batch) before eval_parse.
  """
  if augment is not None:
    images = augment_lib.augment_batch(images, seed, augment)
  return eval_parse(images, labels, model_input=model_input,
                    label_mode=label_mode, num_classes=num_classes)


@dataclasses.dataclass(frozen=True)
class DatasetOptions:
  """How `batches` reads a split (what the model reads is a ModelInput).

  Attributes:
    batch_size: images per batch.
    training: shuffle (and augment, if asked); False never does either.
    augment: an AugmentConfig (`augment_config.COURSE` is the course's
      ImageDataGenerator set), applied only when training; None for none.
    cache: None, True / 'memory', or a file path prefix; caches decoded
      uint8 images (before any randomness). An in-memory cache larger than
      half the available memory is refused with an error.
    shuffle_buffer: images in the shuffle buffer; default ~256 MB of images.
    seed: makes file order, shuffling and augmentation reproducible (and the
      pipeline deterministic); None lets tf.data reorder for speed.
    repeat: repeat forever (use with `steps_per_epoch`).
    drop_remainder: default True when training (static batch shape, no tiny
      last batch), False otherwise (every evaluation image counts).
    label_mode: 'int' (int32 [B]), 'categorical' (one-hot float32 [B, K]) or
      'binary' (float32 [B, 1], two classes only), as `class_mode`.
    skip_bad_records: skip records of damaged shards and print how many per
      shard, instead of raising an error naming the shard.
    data_service: 'grpc://HOST:PORT' of a tf.data service dispatcher
      (`python -m pipelines.data_service`): a training pipeline then runs on
      its workers (read, decode, shuffle, batch, augment, normalize) in
      distributed-epoch mode — the shard files are dealt out dynamically, so
      each record is read once per pass — and this host only receives
      batches. Each worker batches and shuffles its own share, so a pass
      ends with up to one partial batch per worker (drop_remainder drops
      them), order is not reproducible, and augmentation draws fresh random
      seeds on the worker. Batches travel as uint8 (augmented pixels
      rounded to whole levels) and are normalized on this host. Ignored
      when not training (evaluation stays local).
    shard: (count, index) to read only this process's part of the split, as
      one of `count` training processes (--distribution=multi_worker): by
      shard file when the files share out with near-equal record counts,
      else by record (see `file_parts`). Shuffle and augmentation seeds
      then differ per index.
  """
  batch_size: int
  training: bool
  augment: Optional[augment_config.AugmentConfig] = None
  cache: Union[None, bool, str] = None
  shuffle_buffer: Optional[int] = None
  seed: Optional[int] = None
  repeat: bool = False
  drop_remainder: Optional[bool] = None
  label_mode: str = 'int'
  skip_bad_records: bool = False
  data_service: Optional[str] = None
  shard: Optional[tuple[int, int]] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f'batch_size={self.batch_size} must be >= 1')
    if self.augment is not None and not isinstance(
        self.augment, augment_config.AugmentConfig):
      raise TypeError(
          f'augment={self.augment!r}: pass an AugmentConfig (e.g. '
          'augment_config.COURSE, or augment_config.parse('
          '"rotation_range=40")) or None')
    if self.label_mode not in LABEL_MODES:
      raise ValueError(f'label_mode={self.label_mode!r} is not one of '
                       f'{LABEL_MODES}')


def make_dataset(data_dir: str, split: str, *,
                 image_size: Union[None, int, tuple[int, int]] = None,
                 normalize: str = model_input_lib.DEFAULT_NORMALIZATION,
                 spec: Optional[tfrecords_schema.DatasetSpec] = None,
                 **options) -> tf.data.Dataset:
  """Batches of (images float32 [B, H, W, C], labels) from a built dataset.

  The keyword form of `batches`:

    make_dataset('data/photos', 'train', batch_size=32, training=True,
                 augment=augment_config.COURSE, seed=0)

  Args:
    data_dir: the --output_dir of `pipelines.build`.
    split: 'train', 'validation' or 'test'.
    image_size: N or (height, width) to resize to at read time; default the
      stored size.
    normalize: 'rescale' ([0, 1]), 'standardize' (train mean/std from the
      metadata), '[-1,1]' or 'none' (0..255 floats).
    spec: the dataset's DatasetSpec if already read.
    **options: the fields of DatasetOptions (batch_size and training are
      required).

  Returns:
    A `tf.data.Dataset` of `(images, labels)`.
  """
  known = {f.name for f in dataclasses.fields(DatasetOptions)}
  for key in options:
    if key not in known:  # As Python says it for a keyword it lacks.
      raise TypeError(
          f'make_dataset() got an unexpected keyword argument {key!r}')
  options = DatasetOptions(**options)
  if spec is None:
    spec = tfrecords_schema.read_dataset_spec(data_dir)
  model_input = ModelInput.from_spec(spec, image_size=image_size,
                                     normalize=normalize)
  return batches(data_dir, split, model_input, options, spec=spec)


def batches(data_dir: str, split: str, model_input: ModelInput,
            options: DatasetOptions, *,
            spec: Optional[tfrecords_schema.DatasetSpec] = None
            ) -> tf.data.Dataset:
  """Batches of `model_input`'s inputs and labels from a built dataset.

  Args:
    data_dir: the --output_dir of `pipelines.build`.
    split: 'train', 'validation' or 'test'.
    model_input: what the model reads (size, normalization), e.g.
      ModelInput.from_spec(spec, image_size=96).
    options: batching, shuffling, augmentation, caching (DatasetOptions).
    spec: the dataset's DatasetSpec if already read (a run reads it once).

  Returns:
    A `tf.data.Dataset` of (images float32 [B, h, w, C] as
    `model_input.to_model` makes them, labels as options.label_mode).
  """
  if spec is None:
    spec = tfrecords_schema.read_dataset_spec(data_dir)
  o = options
  if o.label_mode == 'binary' and spec.num_classes != 2:
    raise ValueError(f"label_mode='binary' needs 2 classes; {data_dir} has "
                     f'{spec.num_classes}: use "int" or "categorical"')
  size = model_input.size
  training, seed = o.training, o.seed
  augment = o.augment if training and o.augment and (
      not o.augment.is_identity) else None
  if o.cache in (True, 'memory'):
    _check_memory_cache(spec, split, size)
  distributed = bool(o.data_service) and training
  deterministic = (seed is not None or not training) and not distributed
  records = read_records(data_dir, spec, split, training=training, seed=seed,
                         skip_bad_records=o.skip_bad_records,
                         deterministic=deterministic,
                         splittable=distributed, shard=o.shard)
  if o.shard is not None and seed is not None:
    seed = seed + 7919 * o.shard[1]  # Other shuffles and augmentations.

  caching = o.cache in (True, 'memory') or (isinstance(o.cache, str) and
                                            o.cache)
  if training and not caching:
    # Without a cache, shuffle the encoded records: the same randomness as
    # shuffling images, ~7x less memory per buffered example, and the
    # decode map right after it stays parallel.
    records = records.shuffle(
        _shuffle_buffer(spec, split, o.shuffle_buffer,
                        bytes_per_example=_record_bytes(spec, split)),
        seed=seed, reshuffle_each_iteration=True)
  ds = records.map(_plain(lambda r: decode_example(r, model_input)),
                   num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  if caching:
    ds = ds.cache() if o.cache in (True, 'memory') else ds.cache(o.cache)
    if training:  # After the cache: decoded images, nothing random before.
      ds = ds.shuffle(_shuffle_buffer(
          spec, split, o.shuffle_buffer,
          bytes_per_example=size[0] * size[1] * spec.channels),
                      seed=seed, reshuffle_each_iteration=True)
  if o.repeat:
    ds = ds.repeat()
  drop_remainder = training if o.drop_remainder is None else o.drop_remainder
  # A plain batch right after the decode map lets tf.data fuse the two
  # (MapAndBatch); a parallel batch would block that fusion (-10%).
  ds = ds.batch(o.batch_size, drop_remainder=drop_remainder)

  parse = dict(model_input=model_input, label_mode=o.label_mode,
               num_classes=spec.num_classes)
  if distributed:
    # On the service workers: decode, shuffle, batch, augment; batches cross
    # the network as uint8 (augmented pixels rounded: 4x fewer bytes than
    # float32, the limit of a service pass) and are normalized here.
    # Augmentation draws a fresh random seed per batch (a seeded stream
    # would be a second, unsplittable source).
    if augment is not None:

      def augment_to_uint8(images, labels):
        seed = tf.random.uniform([2], maxval=2**62, dtype=tf.int64)
        return model_input_lib.round_to_uint8(
            augment_lib.augment_batch(images, seed, augment)), labels

      ds = ds.map(_plain(augment_to_uint8), num_parallel_calls=AUTOTUNE,
                  deterministic=False)
    ds = ds.prefetch(AUTOTUNE)  # The worker keeps making batches meanwhile.
    ds = ds.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
        service=o.data_service))
    ds = ds.map(_plain(lambda images, labels: eval_parse(images, labels,
                                                         **parse)),
                num_parallel_calls=AUTOTUNE, deterministic=False)
  elif augment is not None:
    # One seed per batch from a seeded stream that changes every epoch.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True
                                   ).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(_plain(
        lambda batch, s: train_parse(*batch, s, augment=augment, **parse)),
        num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  else:
    ds = ds.map(_plain(lambda images, labels: eval_parse(images, labels,
                                                         **parse)),
                num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  if not distributed and not o.repeat and not o.skip_bad_records and (
      o.shard is None):
    # The exact batch count is known from the metadata: declaring it lets
    # Keras size epochs (no "ran out of data" warnings) and makes any
    # shortfall an error instead of a shorter epoch.
    count = spec.splits[split].num_examples
    num_batches = (count // o.batch_size if drop_remainder
                else -(-count // o.batch_size))
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
  ds = ds.prefetch(AUTOTUNE)
  tf_options = tf.data.Options()
  tf_options.deterministic = deterministic
  tf_options.autotune.enabled = True
  return ds.with_options(tf_options)


def labelled_files(data_dir: str, split: str, model_input: ModelInput, *,
                   batch_size: int,
                   spec: Optional[tfrecords_schema.DatasetSpec] = None
                   ) -> tf.data.Dataset:
  """A whole split in record order, with each image's file: what the trainer
  reports by file (predictions.csv).

  Returns batches of (images float32 [B, h, w, C] as model_input.to_model
  makes them, labels int32 [B], filenames string [B]: paths relative to the
  build's --input_dir). Deterministic: the same order as `pictures` numbers
  the records.
  """
  if spec is None:
    spec = tfrecords_schema.read_dataset_spec(data_dir)

  def decode(serialized):
    example = schema.parse_examples(serialized)
    return (_image(example, model_input),
            tf.cast(example[schema.LABEL], tf.int32), example[schema.FILENAME])

  ds = read_records(data_dir, spec, split, training=False)
  ds = ds.map(_plain(decode), num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).map(_plain(
      lambda images, labels, files: (model_input.to_model(images), labels,
                                     files)),
      num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.prefetch(AUTOTUNE)


def pictures(data_dir: str, split: str, model_input: ModelInput,
             indices, *, spec: Optional[tfrecords_schema.DatasetSpec] = None
             ) -> dict:
  """{record index: uint8 [h, w, C]} for the given indices of a split (in
  `labelled_files`' order); only those records are decoded."""
  wanted = sorted({int(i) for i in indices})
  if not wanted:
    return {}
  if spec is None:
    spec = tfrecords_schema.read_dataset_spec(data_dir)
  keep = tf.constant(wanted, dtype=tf.int64)
  ds = read_records(data_dir, spec, split, training=False).enumerate()
  ds = ds.filter(_plain(lambda i, _: tf.reduce_any(tf.equal(keep, i))))
  ds = ds.map(_plain(
      lambda i, r: (i, _image(schema.parse_examples(r), model_input))))
  return {int(i): image.numpy() for i, image in ds.take(len(wanted))}


def _check_memory_cache(spec, split: str, size) -> None:
  """MemoryCacheTooLarge if cache='memory' would take too much memory."""
  need = _estimate_bytes(spec, split, size)
  have = _available_memory_bytes()
  if need > CACHE_MEMORY_SHARE * have:
    raise MemoryCacheTooLarge(
        f'--cache=memory needs ~{need / 2**30:.1f} GiB for the '
        f'{spec.splits[split].num_examples} {split} images at {size[0]}x'
        f'{size[1]}x{spec.channels}, over half the {have / 2**30:.1f} GiB of '
        'memory available; pass --cache=/path/to/file to cache on disk '
        'instead, or leave --cache out', split=split,
        need_bytes=need, have_bytes=have,
        num_examples=spec.splits[split].num_examples,
        shape=(size[0], size[1], spec.channels))
