r"""Builds sharded, resized TFRecords from a folder of labelled images.

  python -m pipelines.build --input_dir=photos --output_dir=data/photos \
      --image_size=150 --validation_fraction=0.2

Flags this script does not know (--runner, --direct_num_workers,
--direct_running_mode, Dataflow/Flink/Spark options) are passed to Beam.
"""

import os
import sys

# Before TensorFlow loads (here and in Beam's worker processes, which inherit
# the environment): keep its C++ start-up chatter off the progress lines.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _import_beam_quietly():
  """Beam's import warns about optional GCP clients on the root logger."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  root = std_logging.getLogger()
  level = root.level
  root.setLevel(std_logging.ERROR)
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    root.setLevel(level)


_import_beam_quietly()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines import builder  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines import image_ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_INPUT_DIR = flags.DEFINE_string(
    'input_dir', None, 'Folder of images: <class>/* or train|validation|test/<class>/*.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Dataset folder to create (must be new or empty, or --overwrite).')
_IMAGE_SIZE = flags.DEFINE_string(
    'image_size', builder.DEFAULT_IMAGE_SIZE,
    'Stored size: N for NxN, or HEIGHT,WIDTH.')
_RESIZE_MODE = flags.DEFINE_enum(
    'resize_mode', 'stretch', image_ops.RESIZE_MODES,
    'stretch: ignore aspect ratio; crop: centre-crop to the aspect ratio; '
    'pad: pad with black to the aspect ratio (Keras semantics).')
_IMAGE_FORMAT = flags.DEFINE_enum(
    'image_format', 'jpeg', ['jpeg', 'png', 'raw'],
    'Stored encoding: jpeg (small), png (lossless), raw uint8 (fastest to read).')
_JPEG_QUALITY = flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality 1..100.')
_CHANNELS = flags.DEFINE_enum('channels', '3', ['1', '3'],
                              '3 = RGB, 1 = grayscale.')
_VALIDATION_FRACTION = flags.DEFINE_float(
    'validation_fraction', 0.2,
    'Share of images for validation (class-folder layout only).')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', 0.0, 'Share of images for test (class-folder layout only).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the split assignment and record order.')
_DATASET_NAME = flags.DEFINE_string(
    'dataset_name', None, 'lower_snake_case name; default: from --input_dir.')
_SHARD_SIZE_MB = flags.DEFINE_float(
    'shard_size_mb', builder.DEFAULT_SHARD_SIZE_MB, 'Target size of one shard file.')
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    'max_image_pixels', image_ops.DEFAULT_MAX_PIXELS,
    'Larger images are rejected as decompression bombs.')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Replace an existing dataset in --output_dir.')


def main(argv):
  if not _INPUT_DIR.value or not _OUTPUT_DIR.value:
    sys.exit('error: --input_dir and --output_dir are required, e.g. '
             '--input_dir=photos --output_dir=data/photos')
  cli.quiet_logs()  # Beam's INFO lines would drown the progress lines.
  beam_args = argv[1:]
  try:
    builder.build(
        input_dir=_INPUT_DIR.value, output_dir=_OUTPUT_DIR.value,
        image_size=_IMAGE_SIZE.value, resize_mode=_RESIZE_MODE.value,
        image_format=_IMAGE_FORMAT.value, jpeg_quality=_JPEG_QUALITY.value,
        channels=int(_CHANNELS.value),
        validation_fraction=_VALIDATION_FRACTION.value,
        test_fraction=_TEST_FRACTION.value, seed=_SEED.value,
        dataset_name=_DATASET_NAME.value, shard_size_mb=_SHARD_SIZE_MB.value,
        max_image_pixels=_MAX_IMAGE_PIXELS.value, overwrite=_OVERWRITE.value,
        beam_args=beam_args)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  # Unknown flags stay in argv: they are Beam's.
  app.run(main, flags_parser=cli.flags_parser(known_only=True))
