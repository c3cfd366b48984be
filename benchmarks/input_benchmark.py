r"""Input throughput: this toolkit's tf.data layer vs the course's loaders.

  python -m benchmarks.input_benchmark --num_images=1500

One folder of photo-like JPEGs (300-500 px, 3 classes) is made and built
once into 150x150 JPEG records (not timed). Each variant then runs in its own
process, 150x150 batches of 32, for --epochs epochs:

  idg            tf_keras ImageDataGenerator(rescale=1/255, course aug)
                 .flow_from_directory, batches pulled with next()
  keras          keras.utils.image_dataset_from_directory + RandomFlip,
                 RandomRotation, RandomTranslation, RandomZoom, RandomShear,
                 mapped with AUTOTUNE + prefetch
  ours_aug       make_dataset(training=True, augment=augment_config.COURSE)
  ours_aug_cache ... with cache=True
  ours           make_dataset(training=True), no augmentation
  ours_cache     ... with cache=True
  ours_eval      make_dataset(training=False): no shuffle, no augmentation
  decode_only    the limit: TFRecordDataset -> parse + decode_jpeg (AUTOTUNE)
                 -> batch -> float32 / 255 -> prefetch: the same model input
                 as every other variant, nothing else
  decode_only_uint8  ... without the float conversion (uint8 batches)

Per epoch: images/s over the batches, and the epoch time including the
turnover (deleting the finished iterator). "steady" is the median over
epochs 2..N (an epoch of 1,500 images lasts 0.1-3 s, so single epochs are
noisy). Peak RSS is the process' maximum.
"""

import gc
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common

VARIANTS = ('idg', 'keras', 'ours_aug', 'ours_aug_cache', 'ours', 'ours_cache',
            'ours_eval', 'decode_only', 'decode_only_uint8')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1500, 'Images in the folder.')
_EPOCHS = flags.DEFINE_integer('epochs', 8, 'Epochs per variant.')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'input_benchmark'),
    'Where the image folder and records go (kept between runs).')
_RUN = flags.DEFINE_string('run', None, 'Internal: run one variant.')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')

SIZE, BATCH = 150, 32


def _course_keras_layers():
  import keras  # pylint: disable=g-import-not-at-top
  return keras.Sequential([
      keras.layers.Rescaling(1 / 255.0),
      keras.layers.RandomFlip('horizontal'),
      keras.layers.RandomRotation(40 / 360, fill_mode='nearest'),
      keras.layers.RandomTranslation(0.2, 0.2, fill_mode='nearest'),
      keras.layers.RandomZoom(0.2, fill_mode='nearest'),
      keras.layers.RandomShear(0.2, 0.2, fill_mode='nearest'),
  ])


def _make(variant: str, images_dir: str, data_dir: str):
  """Returns (make_epoch_iterable, batches_per_epoch)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import augment  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  import tfrecords_schema  # pylint: disable=g-import-not-at-top
  if variant == 'idg':
    from tf_keras.preprocessing.image import ImageDataGenerator  # pylint: disable=g-import-not-at-top
    gen = ImageDataGenerator(rescale=1 / 255.0,
                             **augment.COURSE_AUGMENTATION).flow_from_directory(
                                 images_dir, target_size=(SIZE, SIZE),
                                 batch_size=BATCH, class_mode='sparse')
    steps = len(gen)
    return (lambda: (next(gen) for _ in range(steps))), steps
  if variant == 'keras':
    import keras  # pylint: disable=g-import-not-at-top
    layers = _course_keras_layers()
    ds = keras.utils.image_dataset_from_directory(
        images_dir, image_size=(SIZE, SIZE), batch_size=BATCH, verbose=False)
    ds = ds.map(lambda x, y: (layers(x, training=True), y),
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return (lambda: iter(ds)), None
  if variant.startswith('decode_only'):
    spec = tfrecords_schema.read_dataset_spec(data_dir)

    def decode(serialized):
      ex = tfrecords_schema.parse_examples(serialized)
      return tfrecords_schema.decode_image(
          ex['image'], image_format=spec.image_format, height=spec.height,
          width=spec.width, channels=spec.channels), ex['label']

    ds = (tf.data.TFRecordDataset(spec.shard_paths(data_dir, 'train'))
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH))
    if variant == 'decode_only':
      ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) * (1 / 255.0), y),
                  num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return (lambda: iter(ds)), None
  ds = input_pipeline.make_dataset(
      data_dir, 'train', batch_size=BATCH, training=variant != 'ours_eval',
      augment=augment_config.COURSE if 'aug' in variant else None,
      cache=True if 'cache' in variant else None)
  return (lambda: iter(ds)), None


def run_variant(variant: str, images_dir: str, data_dir: str,
                epochs: int) -> dict:
  """Times `epochs` epochs of one variant in this process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  make_iter, _ = _make(variant, images_dir, data_dir)
  rows = []
  for epoch in range(epochs):
    start = time.perf_counter()
    iterator = make_iter()
    images = 0
    for x, _ in iterator:
      images += int(np.shape(x)[0])
    batches_done = time.perf_counter()
    del iterator
    gc.collect()
    end = time.perf_counter()
    rows.append({'epoch': epoch + 1, 'images': images,
                 'images_per_s': round(images / (batches_done - start), 1),
                 'epoch_s': round(end - start, 2),
                 'turnover_s': round(end - batches_done, 2)})
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'variant': variant, 'epochs': rows, 'peak_rss_mb': round(peak)}


def _prepare(n: int) -> tuple[pathlib.Path, pathlib.Path]:
  return common.photo_records(_WORK_DIR.value, n, SIZE)


def main(argv):
  del argv
  if _RUN.value:
    images_dir, data_dir = _RUN.value.split(',')[1:]
    print(json.dumps(run_variant(_RUN.value.split(',')[0], images_dir,
                                 data_dir, _EPOCHS.value)))
    return
  images, data = _prepare(_NUM_IMAGES.value)
  results = []
  for variant in _VARIANTS.value:
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.input_benchmark',
         f'--run={variant},{images},{data}', f'--epochs={_EPOCHS.value}'],
        capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f'{variant} failed:\n{proc.stderr[-3000:]}')
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    results.append(row)
    print(json.dumps(row), flush=True)
  by_name = {r['variant']: r for r in results}
  def steady(r):  # Median over epochs 2..N: epochs here last ~0.1-3 s.
    rates = sorted(e['images_per_s'] for e in r['epochs'][1:]) or [
        r['epochs'][0]['images_per_s']]
    return rates[len(rates) // 2]
  rows = []
  for r in results:
    ratios = [f'{steady(r) / steady(by_name[b]):.2f}x' if b in by_name else '-'
              for b in ('idg', 'keras', 'decode_only')]
    last = r['epochs'][-1]
    rows.append([r['variant'], r['epochs'][0]['images_per_s'], steady(r),
                 *ratios, last['epoch_s'], last['turnover_s'],
                 r['peak_rss_mb']])
  common.report(['variant', 'epoch 1 img/s', 'steady img/s', 'vs idg',
                 'vs keras', 'vs decode_only', 'epoch s (with turnover)',
                 'turnover s', 'peak RSS MB'], rows, results, _RESULTS.value)

if __name__ == '__main__':
  app.run(main)
