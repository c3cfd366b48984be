"""tf.data input layer over datasets written by `pipelines.build`.

    train = make_dataset('data/photos', 'train', batch_size=32, training=True,
                         augment='course', seed=0)
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
"""

from __future__ import annotations

import os
import re
import struct
import sys
from typing import Any, Mapping, Optional, Union

import tensorflow as tf

from pipelines.records_to_batches import augment as augment_lib
import tfrecords_schema
from tfrecords_schema import schema

AUTOTUNE = tf.data.AUTOTUNE
NORMALIZATIONS = ('rescale', 'standardize', '[-1,1]', 'none')
LABEL_MODES = ('int', 'categorical', 'binary')
SHUFFLE_BUFFER_BYTES = 256 << 20  # Default shuffle buffer: ~256 MB of images.
MAX_PARALLEL_READS = 8
CACHE_MEMORY_SHARE = 0.5  # Refuse an in-memory cache above this share of RAM.
# Start of the string a damaged shard is padded with (see _shard_records);
# parsing it fails with an error that quotes it, path and record count.
CORRUPT_SHARD_MARKER = '?? corrupt shard '
_MARKER_RE = re.compile(re.escape(CORRUPT_SHARD_MARKER) +
                        r'(.+?) \((\d+) records expected\)')


class MemoryCacheTooLarge(ValueError):
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
  """A shard no longer holds the records the build wrote into it."""

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


def normalize_images(images: tf.Tensor, mode: str, *, mean=None,
                     std=None) -> tf.Tensor:
  """float32 [..., C] on 0..255 -> the model's input scale.

  rescale: [0, 1] (the course's `rescale=1./255`); standardize: (x - mean) /
  std with the train split's per-channel statistics; '[-1,1]': Inception /
  MobileNet inputs; none: unchanged.
  """
  if mode == 'rescale':
    return images * (1.0 / 255.0)
  if mode == '[-1,1]':
    return images * (1.0 / 127.5) - 1.0
  if mode == 'standardize':
    return (images - tf.constant(mean, tf.float32)) / tf.constant(
        [max(s, 1e-6) for s in std], tf.float32)
  if mode == 'none':
    return images
  raise ValueError(f'normalize={mode!r} is not one of {NORMALIZATIONS}')


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

  return (records.scan(tf.constant(0, tf.int64), count)
          .filter(lambda record: tf.strings.length(record) > 0))


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
          f'shard {path} is missing; rebuild {data_dir} with pipelines.build')
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
            f'shard {path} is damaged ({reason}); rebuild {data_dir} with '
            'pipelines.build', path=path, reason=reason)
    raise tfrecords_schema.DatasetError(
        f'the {split} shards of {data_dir} hold {found} bytes, the build '
        f'wrote {expected}: they changed since; rebuild with pipelines.build')


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


def make_dataset(data_dir: str, split: str, *, batch_size: int,
                 training: bool,
                 image_size: Union[None, int, tuple[int, int]] = None,
                 augment: Union[None, bool, str, Mapping[str, Any],
                                augment_lib.AugmentConfig] = None,
                 normalize: str = 'rescale',
                 cache: Union[None, bool, str] = None,
                 shuffle_buffer: Optional[int] = None,
                 seed: Optional[int] = None, repeat: bool = False,
                 drop_remainder: Optional[bool] = None,
                 label_mode: str = 'int', skip_bad_records: bool = False,
                 ) -> tf.data.Dataset:
  """Batches of (images float32 [B, H, W, C], labels) from a built dataset.

  Args:
    data_dir: the --output_dir of `pipelines.build`.
    split: 'train', 'validation' or 'test'.
    batch_size: images per batch.
    training: shuffle (and augment, if asked); False never does either.
    image_size: N or (height, width) to resize to at read time; default the
      stored size.
    augment: None, True / 'course' (the course's ImageDataGenerator set), a
      dict of ImageDataGenerator-style options, or an AugmentConfig.
      Applied only when training.
    normalize: 'rescale' ([0, 1]), 'standardize' (train mean/std from the
      metadata), '[-1,1]' or 'none' (0..255 floats).
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

  Returns:
    A `tf.data.Dataset` of `(images, labels)`.
  """
  spec = tfrecords_schema.read_dataset_spec(data_dir)
  paths = spec.shard_paths(data_dir, split)
  if not paths:
    raise tfrecords_schema.DatasetError(
        f'split {split!r} of {data_dir} is empty; rebuild with a non-zero '
        f'fraction for it, or use one of '
        f'{[s for s, v in spec.splits.items() if v.shards]}')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1')
  if normalize not in NORMALIZATIONS:
    raise ValueError(f'normalize={normalize!r} is not one of {NORMALIZATIONS}')
  if normalize == 'standardize' and spec.mean is None:
    raise ValueError(f'normalize=standardize needs train statistics, and '
                     f'{data_dir} has no train split')
  if label_mode not in LABEL_MODES:
    raise ValueError(f'label_mode={label_mode!r} is not one of {LABEL_MODES}')
  if label_mode == 'binary' and spec.num_classes != 2:
    raise ValueError(f"label_mode='binary' needs 2 classes; {data_dir} has "
                     f'{spec.num_classes}: use "int" or "categorical"')
  size = (spec.height, spec.width)
  if image_size is not None:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(
        image_size)
  config = augment_lib.resolve(augment) if training else None
  if cache in (True, 'memory'):
    need = _estimate_bytes(spec, split, size)
    have = _available_memory_bytes()
    if need > CACHE_MEMORY_SHARE * have:
      raise MemoryCacheTooLarge(
          f'cache=memory needs ~{need / 2**30:.1f} GiB for '
          f'{spec.splits[split].num_examples} images of {size[0]}x{size[1]}x'
          f'{spec.channels}, over half the {have / 2**30:.1f} GiB available; '
          'pass cache="/path/to/cache_file" or cache=None', split=split,
          need_bytes=need, have_bytes=have,
          num_examples=spec.splits[split].num_examples,
          shape=(size[0], size[1], spec.channels))
  _check_shard_sizes(data_dir, spec, split, paths)
  deterministic = seed is not None or not training
  shard_lengths = spec.splits[split].shard_lengths

  if len(paths) == 1:
    # One shard: no interleave at all (even a sequential one costs ~8%).
    records = _shard_records(tf.constant(paths[0]),
                             tf.constant(shard_lengths[0], tf.int64),
                             skip_bad_records)
  else:
    # Parallel reads across shards (they pay off on remote storage), in a
    # new shard order every epoch when training.
    files = tf.data.Dataset.from_tensor_slices(
        (paths, tf.constant(shard_lengths, tf.int64)))
    if training:
      files = files.shuffle(len(paths), seed=seed,
                            reshuffle_each_iteration=True)
    records = files.interleave(
        lambda path, n: _shard_records(path, n, skip_bad_records),
        cycle_length=min(len(paths), MAX_PARALLEL_READS), block_length=1,
        num_parallel_calls=AUTOTUNE, deterministic=deterministic)

  def decode(serialized):
    example = schema.parse_examples(serialized)
    image = schema.decode_image(
        example[schema.IMAGE], image_format=spec.image_format,
        height=spec.height, width=spec.width, channels=spec.channels)
    if size != (spec.height, spec.width):
      image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
          image, size, antialias=True)), 0, 255), tf.uint8)
    return image, tf.cast(example[schema.LABEL], tf.int32)

  caching = cache in (True, 'memory') or (isinstance(cache, str) and cache)
  if training and not caching:
    # Without a cache, shuffle the encoded records: the same randomness as
    # shuffling images, ~7x less memory per buffered example, and the
    # decode map right after it stays parallel.
    ds = records.shuffle(_shuffle_buffer(spec, split, shuffle_buffer,
                                         bytes_per_example=_record_bytes(
                                             spec, split)),
                         seed=seed, reshuffle_each_iteration=True)
  else:
    ds = records
  ds = ds.map(decode, num_parallel_calls=AUTOTUNE,
              deterministic=deterministic)
  if caching:
    ds = ds.cache() if cache in (True, 'memory') else ds.cache(cache)
    if training:  # After the cache: decoded images, nothing random before.
      ds = ds.shuffle(_shuffle_buffer(
          spec, split, shuffle_buffer,
          bytes_per_example=size[0] * size[1] * spec.channels),
                      seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  if drop_remainder is None:
    drop_remainder = training
  # A plain batch right after the decode map lets tf.data fuse the two
  # (MapAndBatch); a parallel batch would block that fusion (-10%).
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)

  num_classes = spec.num_classes
  mean, std = spec.mean, spec.std

  def to_model_inputs(images, labels, batch_seed=None):
    if config is not None:  # uint8 in: converted while sampling.
      images = augment_lib.augment_batch(images, batch_seed, config)
    images = tf.cast(images, tf.float32)
    images = normalize_images(images, normalize, mean=mean, std=std)
    if label_mode == 'categorical':
      labels = tf.one_hot(labels, num_classes, dtype=tf.float32)
    elif label_mode == 'binary':
      labels = tf.cast(labels[:, None], tf.float32)
    return images, labels

  if config is not None:
    # One seed per batch from a seeded stream that changes every epoch.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True
                                   ).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        lambda batch, s: to_model_inputs(*batch, s),
        num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  else:
    ds = ds.map(to_model_inputs, num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
  if not repeat and not skip_bad_records:
    # The exact batch count is known from the metadata: declaring it lets
    # Keras size epochs (no "ran out of data" warnings) and makes any
    # shortfall an error instead of a shorter epoch.
    count = spec.splits[split].num_examples
    batches = count // batch_size if drop_remainder else -(-count // batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
  ds = ds.prefetch(AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  return ds.with_options(options)

