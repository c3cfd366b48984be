r"""Predicts the class of image files with a model trained by trainer.main.

  python -m trainer.predict --model_dir=runs/photos my_cat.jpg holiday.png

One line per file: path, predicted class, its probability (--json for JSON
lines). Files go through the build's own image path (pipelines.image_ops:
any size or format the build accepts, EXIF orientation, alpha, 16-bit), then
the exported serving function, so a file is preprocessed exactly as it
would be for training. Unreadable files get an error line; the exit status
is non-zero when any file failed.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines import image_ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import export as export_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'The --model_dir of trainer.main.')
_JSON = flags.DEFINE_boolean('json', False, 'Print JSON lines.')


def load(model_dir: str):
  """(loaded SavedModel, model config); call `.serve(bytes [N])` on the first.

  Keep the loaded object alive while serving: its variables die with it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(model_dir, export_lib.MODEL_CONFIG)
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f'--model_dir={model_dir} has no {export_lib.MODEL_CONFIG}; pass the '
        '--model_dir of a finished `python -m trainer.main` run')
  with open(config_path) as f:
    config = json.load(f)
  return tf.saved_model.load(os.path.join(model_dir, export_lib.EXPORT_DIR)), config


def preprocess(data: bytes, extension: str, config: dict) -> bytes:
  """Source bytes -> the bytes the build would have stored for them."""
  image_format = 'png' if config['image_format'] == 'raw' else config[
      'image_format']
  processed = image_ops.process(data, extension=extension, options=(
      image_ops.ImageOptions(
          height=config['stored_height'], width=config['stored_width'],
          channels=config['channels'], resize_mode=config['resize_mode'],
          image_format=image_format,
          jpeg_quality=config.get('jpeg_quality') or 95,
          max_pixels=image_ops.DEFAULT_MAX_PIXELS)))
  return processed.encoded


def predict_files(paths, served, config) -> list[dict]:
  """One result dict per path: class/probability, or an error."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  results = []
  for path in paths:
    try:
      with open(path, 'rb') as f:
        data = f.read()
      encoded = preprocess(data, os.path.splitext(path)[1], config)
    except image_ops.ImageRejected as e:
      results.append({'path': path, 'error': e.reason})
      continue
    except OSError as e:
      results.append({'path': path, 'error': f'cannot read ({e.strerror})'})
      continue
    out = served.serve(tf.constant([encoded]))
    index = int(out['class_index'][0])
    results.append({'path': path, 'class': config['class_names'][index],
                    'probability': round(float(out['probabilities'][0, index]),
                                         4)})
  return results


def main(argv):
  paths = argv[1:]
  if not _MODEL_DIR.value or not paths:
    sys.exit('error: usage: python -m trainer.predict --model_dir=DIR '
             'IMAGE [IMAGE ...]')
  try:
    served, config = load(_MODEL_DIR.value)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  failed = 0
  for result in predict_files(paths, served, config):
    failed += 'error' in result
    if _JSON.value:
      print(json.dumps(result))
    elif 'error' in result:
      print(f'{result["path"]}\terror: {result["error"]}')
    else:
      print(f'{result["path"]}\t{result["class"]}\t{result["probability"]:.4f}')
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(known_only=False))
