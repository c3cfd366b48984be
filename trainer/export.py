"""Serving export: encoded image bytes in, class probabilities out.

The exported function applies the training preprocessing itself (decode,
resize with the dataset's resize mode, the model's normalization), so a
server feeds it raw JPEG/PNG/GIF/BMP bytes and gets the same inputs the
model saw in training. `trainer.predict` goes one step further and first
runs the build's own Pillow path (`image_ops.process`), which makes a
prediction on a file bit-identical to training on that file.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from pipelines import input_pipeline

EXPORT_DIR = 'export'
MODEL_CONFIG = 'model_config.json'


def _resize(image: tf.Tensor, height: int, width: int, mode: str) -> tf.Tensor:
  """uint8 [h, w, C] -> float32 [height, width, C] like the build's modes."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  if mode == 'crop':
    scale = tf.minimum(w / width, h / height)
    crop_h = tf.cast(tf.round(height * scale), tf.int32)
    crop_w = tf.cast(tf.round(width * scale), tf.int32)
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - crop_h) // 2, (shape[1] - crop_w) // 2, crop_h,
        crop_w)
  if mode == 'pad':
    resized = tf.image.resize_with_pad(tf.cast(image, tf.float32), height,
                                       width, antialias=True)
  else:
    resized = tf.image.resize(image, [height, width], antialias=True)
  return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def make_serving_fn(model: keras.Model, config: dict):
  """string [N] of encoded images -> probabilities, class index and name."""
  height, width, channels = config['height'], config['width'], config['channels']
  class_names = tf.constant(config['class_names'])
  mode, resize_mode = config['normalize'], config['resize_mode']
  mean, std = config.get('mean'), config.get('std')

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=channels,
                               expand_animations=False)
    image.set_shape([None, None, channels])
    same = tf.logical_and(tf.equal(tf.shape(image)[0], height),
                          tf.equal(tf.shape(image)[1], width))
    return tf.cond(same, lambda: tf.cast(image, tf.float32),
                   lambda: _resize(image, height, width, resize_mode))

  def serve(encoded):
    images = tf.map_fn(decode, encoded, fn_output_signature=tf.TensorSpec(
        [height, width, channels], tf.float32))
    images = input_pipeline.normalize_images(images, mode, mean=mean, std=std)
    outputs = tf.cast(model(images, training=False), tf.float32)
    if len(config['class_names']) == 2:
      p = outputs[:, 0]
      probabilities = tf.stack([1.0 - p, p], axis=1)
    else:
      probabilities = tf.nn.softmax(outputs, axis=-1)
    index = tf.argmax(probabilities, axis=1, output_type=tf.int32)
    return {'probabilities': probabilities, 'class_index': index,
            'class_name': tf.gather(class_names, index)}

  return serve


def export(model: keras.Model, model_dir: str, config: dict) -> str:
  """Writes model_dir/export (SavedModel, endpoint `serve`) + the config."""
  path = os.path.join(model_dir, EXPORT_DIR)
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      name='serve', fn=make_serving_fn(model, config),
      input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  archive.write_out(path, verbose=False)
  with open(os.path.join(model_dir, MODEL_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  return path
