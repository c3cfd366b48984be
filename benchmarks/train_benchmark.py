r"""Training throughput and input-wait share of the trainer's model + input.

  python -m benchmarks.train_benchmark --model=cats_dogs --steps=60

Uses the input benchmark's 150x150 records (made on first use). For each
setting, the same compiled model is timed over --steps steps (after a
warm-up epoch) twice:

  real       batches from make_dataset (decode, shuffle, augment, ...)
  in-memory  one real batch repeated from memory: no input work at all

input wait share = 1 - in-memory step time / real step time: the part of a
step spent waiting for (or competing with) the input pipeline. On a CPU the
input pipeline shares the cores with the model, so the share also counts
that contention.
"""

import os
import tempfile
import time

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string('model', 'cats_dogs', 'trainer model name.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Timed steps per measurement.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1500, 'Images to build.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', os.path.join(tempfile.gettempdir(), 'input_benchmark'),
    'Shared with the input benchmark.')
_SETTINGS = flags.DEFINE_list(
    'settings', ['plain', 'augment'],
    'plain, augment (in tf.data), augment_in_model (the Keras layer, on the '
    'accelerator when there is one), augment_jit (--jit_compile), mixed '
    '(--mixed_precision).')
_RESULTS = flags.DEFINE_string('results', None, 'Also write results JSON here.')


def _timed_fit(model, ds, steps: int) -> float:
  """Seconds per step of epoch 2 (epoch 1 warms up tracing and buffers)."""
  times = []

  class Timer(__import__('keras').callbacks.Callback):

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.start)

  model.fit(ds, steps_per_epoch=steps, epochs=2, verbose=0,
            callbacks=[Timer()])
  return times[-1] / steps


def measure(setting: str, data_dir: str) -> dict:
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import input_pipeline  # pylint: disable=g-import-not-at-top
  from trainer import models  # pylint: disable=g-import-not-at-top
  import tfrecords_schema  # pylint: disable=g-import-not-at-top
  spec = tfrecords_schema.read_dataset_spec(data_dir)
  keras.mixed_precision.set_global_policy(
      'mixed_bfloat16' if setting == 'mixed' and not tf.config.list_physical_devices('GPU')
      else 'mixed_float16' if setting == 'mixed' else 'float32')
  from pipelines.records_to_batches import augment  # pylint: disable=g-import-not-at-top
  from pipelines.records_to_batches import augment_config  # pylint: disable=g-import-not-at-top
  shape = (spec.height, spec.width, spec.channels)
  model = models.build_model(_MODEL.value, input_shape=shape,
                             num_classes=spec.num_classes)
  if setting == 'augment_in_model':
    model = keras.Sequential([
        keras.Input(shape),
        augment.ImageAugmentation(value_range=(0, 1),
                                  **augment.COURSE_AUGMENTATION),
        model])
  model.compile('rmsprop', keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=['accuracy'],
                jit_compile=setting == 'augment_jit')
  ds = input_pipeline.make_dataset(
      data_dir, 'train', batch_size=_BATCH.value, training=True, repeat=True,
      augment=(augment_config.COURSE if setting in ('augment', 'augment_jit')
               else None))
  real = _timed_fit(model, ds, _STEPS.value)
  memory = _timed_fit(model, ds.take(1).cache().repeat(), _STEPS.value)
  return {'model': _MODEL.value, 'setting': setting,
          'device': 'GPU' if tf.config.list_physical_devices('GPU') else 'CPU',
          'images_per_s': round(_BATCH.value / real, 1),
          'in_memory_images_per_s': round(_BATCH.value / memory, 1),
          'step_ms': round(real * 1000, 1),
          'input_wait_share': round(max(0.0, 1 - memory / real), 3)}


def main(argv):
  del argv
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  _, data = common.photo_records(_WORK_DIR.value, _NUM_IMAGES.value)
  results = [measure(s, str(data)) for s in _SETTINGS.value]
  common.report(
      ['model', 'setting', 'device', 'images/s', 'in-memory images/s',
       'step ms', 'input wait share'],
      [[r['model'], r['setting'], r['device'], r['images_per_s'],
        r['in_memory_images_per_s'], r['step_ms'],
        f'{r["input_wait_share"]:.1%}'] for r in results],
      results, _RESULTS.value)

if __name__ == '__main__':
  app.run(main)
