"""Serving export: encoded image bytes in, class probabilities out.

`export` writes model_dir/export, a SavedModel whose endpoint `serve` takes
a batch of raw image files (string [N]) and returns probabilities, the class
index and its name. Each file goes through pipelines.preprocessing.serving
(the build's conversion in TF ops, then the read-time resize) and the
model's normalization (ModelInput.to_model): what training gave the model
for that file. model_config.json (config.ModelConfig) says what it expects.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from pipelines.preprocessing import serving
from trainer import config as config_lib

EXPORT_DIR = config_lib.EXPORT_DIR
MODEL_CONFIG = config_lib.MODEL_CONFIG_FILE


def make_serving_fn(model: keras.Model, config: config_lib.ModelConfig):
  """string [N] of encoded images -> probabilities, class index and name."""
  model_input = config.model_input
  class_names = tf.constant(list(config.class_names))

  def serve(encoded):
    encoded = serving.known_formats(encoded)
    # One image at a time: a request holds at most one full-size decode.
    images = tf.map_fn(
        lambda i: serving.preprocess_image(encoded[i], i, model_input),
        tf.range(tf.shape(encoded)[0]), parallel_iterations=1,
        fn_output_signature=tf.TensorSpec(model_input.shape, tf.uint8))
    outputs = tf.cast(model(model_input.to_model(images), training=False),
                      tf.float32)
    if config.single_unit:
      p = outputs[:, 0]
      probabilities = tf.stack([1.0 - p, p], axis=1)
    else:
      probabilities = tf.nn.softmax(outputs, axis=-1)
    index = tf.argmax(probabilities, axis=1, output_type=tf.int32)
    return {'probabilities': probabilities, 'class_index': index,
            'class_name': tf.gather(class_names, index)}

  return serve


def export(model: keras.Model, model_dir: str,
           config: config_lib.ModelConfig) -> str:
  """Writes model_dir/export (SavedModel, endpoint `serve`) + the config.

  The endpoint refuses images over config.model_input.max_pixels (the
  build's decompression-bomb limit) from their header.
  """
  path = os.path.join(model_dir, EXPORT_DIR)
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      name='serve', fn=make_serving_fn(model, config),
      input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  archive.write_out(path, verbose=False)
  with open(os.path.join(model_dir, MODEL_CONFIG), 'w') as f:
    json.dump(config.to_json_dict(), f, indent=2)
  return path
