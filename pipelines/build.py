r"""Builds sharded, resized TFRecords from a folder of labelled images.

  python -m pipelines.build --input_dir=photos --output_dir=data/photos \
      --image_size=150 --validation_fraction=0.2

Flags this script does not know (--runner, --direct_num_workers,
--direct_running_mode, Dataflow/Flink/Spark options) are passed to Beam.
"""

import difflib
import sys

from pipelines.common import cli

if __name__ == '__main__':
  # Before TensorFlow and Beam's workers start: their start-up chatter would
  # drown the progress lines (Beam's workers inherit this stderr).
  cli.filter_noise()


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

from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.preprocessing import source_image  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_INPUT_DIR = flags.DEFINE_string(
    'input_dir', None, 'Folder of images: <class>/* or train|validation|test/<class>/*.')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'Dataset folder to create (must be new or empty, or --overwrite).')
_IMAGE_SIZE = flags.DEFINE_string(
    'image_size', builder.DEFAULT_IMAGE_SIZE,
    'Stored size: N for NxN, or HEIGHT,WIDTH.')
_RESIZE_MODE = flags.DEFINE_enum(
    'resize_mode', 'stretch', source_image.RESIZE_MODES,
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
    'max_image_pixels', source_image.DEFAULT_MAX_PIXELS,
    'Larger images are rejected as decompression bombs.')
_MAX_FILE_BYTES = flags.DEFINE_integer(
    'max_file_bytes', source_image.DEFAULT_MAX_FILE_BYTES,
    'Larger files are rejected without being read.')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Replace an existing dataset in --output_dir.')


def _beam_parser():
  """An argument parser that knows every Beam pipeline option."""
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  classes = {}
  pending = list(pipeline_options.PipelineOptions.__subclasses__())
  while pending:
    cls = pending.pop()
    classes.setdefault(str(cls), cls)
    pending.extend(cls.__subclasses__())
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def check_beam_args(args: list[str]) -> None:
  """Refuses arguments that neither this build nor Beam knows.

  Beam only logs "Discarding unparseable args" and goes on with defaults,
  so a typo like --image-size=64 would silently build 150x150 images.
  """
  parser = _beam_parser()
  _, unknown = parser.parse_known_args(args)
  for arg in unknown:
    if not arg.startswith('-'):
      raise UserError(f'unexpected argument {arg!r}; flags look like '
                      '--name=value')
    name = arg.lstrip('-').split('=', 1)[0]
    known = list(flags.FLAGS) + [
        a.lstrip('-') for action in parser._actions  # pylint: disable=protected-access
        for a in action.option_strings]
    close = difflib.get_close_matches(name.replace('-', '_'), known, n=1)
    hint = f'; did you mean --{close[0]}?' if close else (
        '; see --helpfull for the build\'s flags')
    raise UserError(f'unknown flag {arg.split("=", 1)[0]}{hint}')


def main(argv):
  beam_args = argv[1:]
  try:
    check_beam_args(beam_args)
  except UserError as e:
    sys.exit(f'error: {e}')
  if not _INPUT_DIR.value or not _OUTPUT_DIR.value:
    sys.exit('error: --input_dir and --output_dir are required, e.g. '
             '--input_dir=photos --output_dir=data/photos')
  cli.quiet_logs()  # Beam's INFO lines would drown the progress lines.
  try:
    builder.build(
        input_dir=_INPUT_DIR.value, output_dir=_OUTPUT_DIR.value,
        image_size=_IMAGE_SIZE.value, resize_mode=_RESIZE_MODE.value,
        image_format=_IMAGE_FORMAT.value, jpeg_quality=_JPEG_QUALITY.value,
        channels=int(_CHANNELS.value),
        validation_fraction=_VALIDATION_FRACTION.value,
        test_fraction=_TEST_FRACTION.value, seed=_SEED.value,
        dataset_name=_DATASET_NAME.value, shard_size_mb=_SHARD_SIZE_MB.value,
        max_image_pixels=_MAX_IMAGE_PIXELS.value,
        max_file_bytes=_MAX_FILE_BYTES.value, overwrite=_OVERWRITE.value,
        beam_args=beam_args)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  # Unknown flags stay in argv: they are Beam's.
  app.run(main, flags_parser=cli.flags_parser(known_only=True))
