"""Serving export: encoded image bytes in, class probabilities out.

`export` writes model_dir/export, a SavedModel whose endpoint `serve` takes
a batch of raw image files (string [N]) and returns probabilities, the class
index and its name. Each file goes through pipelines.preprocessing.serving
(the build's conversion in TF ops, then the read-time resize) and the
model's normalization (ModelInput.to_model): what training gave the model
for that file. model_config.json (config.ModelConfig) says what it expects.

Input `serve` refuses fails the whole request with an InvalidArgumentError
whose message starts with TensorFlow's "Graph execution error:" and node
names; error_reason(e) is the reason, `image_bytes[i]: ...`.
"""

from __future__ import annotations

import json
import os
import re

import keras
import tensorflow as tf

from pipelines.preprocessing import serving
from trainer import config as config_lib

EXPORT_DIR = config_lib.EXPORT_DIR
MODEL_CONFIG = config_lib.MODEL_CONFIG_FILE

# A refusal of pipelines.preprocessing.serving: tf.debugging.Assert's
# message with its one string, up to where TensorFlow's node names start.
_ASSERTION = re.compile(
    r'assertion failed: \[(.*?)\](?=\s*(?:\[\[|\[Op:|$))', re.DOTALL)
# Lines of a TensorFlow error that are about the graph, not the input.
_GRAPH_NOISE = re.compile(
    r'(Graph execution error|Detected at node|<stack traces|\[\[|'
    r'The error could be|File "|Traceback|\^)')


def error_reason(error) -> str:
  """Why `serve` refused a request: one line, what a user should see first.

  error: the tf.errors.OpError that `serve` raised (or its message). For
  the refusals of pipelines.preprocessing.serving (every bad input it
  knows), the reason as it wrote it, e.g. `image_bytes[1]: not a JPEG, PNG,
  GIF, BMP or WebP image (13 bytes): send the bytes of an image file`, i
  being the first refused input's index in the request. For any other
  error, its first line that is not about the graph (node names, stack
  traces).
  """
  text = str(getattr(error, 'message', None) or error)
  match = _ASSERTION.search(text)
  if match:
    return ' '.join(match.group(1).split())
  lines = [re.sub(r'\s*(\[\[.*|\[Op:[^\]]*\])$', '', line).strip()
           for line in text.splitlines()]
  useful = [line for line in lines if line and not _GRAPH_NOISE.match(line)]
  return ' '.join((useful or [type(error).__name__])[0].split())


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
  # A plain tf.Module rather than keras.export.ExportArchive: the archive
  # traces the serving function twice (once to list the variables it uses,
  # once more inside tf.saved_model.save), and that function (every image
  # format's reader) takes seconds to trace; saved this way it is traced
  # once, inside the save (6.3 -> 4.3 s for a small model, the same bytes
  # served: BUILD_NOTES). The module tracks the model, so every variable the
  # function reads is saved; `serve` is both an attribute and the two
  # signatures (`serve`, `serving_default`), as the archive wrote them.
  module = tf.Module()
  module.model = model
  module.serve = tf.function(
      make_serving_fn(model, config), autograph=False,
      input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  tf.saved_model.save(module, path, signatures={
      'serve': module.serve, 'serving_default': module.serve})
  with open(os.path.join(model_dir, MODEL_CONFIG), 'w') as f:
    json.dump(config.to_json_dict(), f, indent=2)
  return path
