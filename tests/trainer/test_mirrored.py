"""--distribution=mirrored computes what one device computes.

The CPU is split into 2 logical devices (in a fresh process: it must happen
before TensorFlow starts). On the same batches, the trainer's model and
compile settings under MirroredStrategy give the same losses and weights as
on one device. (Through make_dataset the order of a seeded, per-epoch
reshuffled stream differs under a strategy: tf.distribute rewrites the
dataset and its shuffle's seed generator starts elsewhere; see
BUILD_NOTES.md.)
"""

import json
import subprocess
import sys

from tests import helpers

_SCRIPT = r'''
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainer import models
from trainer import train_lib

rng = np.random.default_rng(0)
x = rng.random((32, 24, 24, 3)).astype(np.float32)
y = rng.integers(0, 3, 32).astype(np.int32)


def run(strategy):
  keras.utils.set_random_seed(3)
  with strategy.scope():
    model = models.build_model('small_cnn', input_shape=(24, 24, 3),
                               num_classes=3, dropout=0.0)
    model.compile(optimizer=train_lib._optimizer('rmsprop', 1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=['accuracy'])
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  history = model.fit(ds, epochs=4, verbose=0, shuffle=False)
  return history.history['loss'], [w.numpy() for w in model.weights]


mirrored = train_lib._mirrored_strategy()
one_loss, one_weights = run(tf.distribute.get_strategy())
mirrored_loss, mirrored_weights = run(mirrored)
print(json.dumps({
    'replicas': mirrored.num_replicas_in_sync, 'one': one_loss,
    'mirrored': mirrored_loss,
    'weight_diff': max(float(np.abs(a - b).max())
                       for a, b in zip(one_weights, mirrored_weights))}))
'''


def test_mirrored_on_two_logical_devices_matches_one_device():
  result = subprocess.run([sys.executable, '-c', _SCRIPT],
                          cwd=helpers.REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['replicas'] == 2
  assert len(out['one']) == 4
  for a, b in zip(out['one'], out['mirrored']):
    assert abs(a - b) < 1e-4 * max(1.0, abs(a)), out
  assert out['one'][-1] < out['one'][0]  # It trained.
  assert out['weight_diff'] < 1e-4, out
