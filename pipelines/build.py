r"""Builds sharded, resized TFRecords from a folder of labelled images.

  python -m pipelines.build --input_dir=photos --output_dir=data/photos \
      --image_size=150 --validation_fraction=0.2

Flags this script does not know (--runner, --direct_num_workers,
--direct_running_mode, Dataflow/Flink/Spark options) are checked here and
passed to Beam; the runner defaults a build adds to them (FnApiRunner, quiet
workers) are in pipelines/folder_to_records/runner_options.py.
"""

import dataclasses
import difflib
import sys

from pipelines.common import cli
from pipelines.common import net

if __name__ == '__main__':
  # Before TensorFlow and Beam's workers start: their start-up chatter would
  # drown the progress lines (Beam's workers inherit this stderr). A failure
  # the build explains in one line, and Ctrl-C, hide Beam's tracebacks.
  import os  # pylint: disable=g-import-not-at-top
  from pipelines.folder_to_records import progress  # pylint: disable=g-import-not-at-top
  cli.filter_noise(own_lines=('error:', '[build]'),
                   progress=progress.ChunkProgress(terminal=os.isatty(2)))
  cli.skip_unused_imports(also=cli.UNUSED_BY_THE_BUILD)


cli.import_beam_quietly()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.preprocessing import image_quality  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.preprocessing import source_image  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.preprocessing import resize_modes  # pylint: disable=g-import-not-at-top,wrong-import-position
from pipelines.common.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every BuildSettings field is a flag of the same name and default (a test
# checks it).
_D = {f.name: f.default for f in dataclasses.fields(builder.BuildSettings)}
flags.DEFINE_string(
    'input_dir', None, 'Folder of images: <class>/* or train|validation|test/<class>/*.')
flags.DEFINE_string(
    'output_dir', None, 'Dataset folder to create (must be new or empty, or --overwrite).')
flags.DEFINE_string(
    'image_size', _D['image_size'], 'Stored size: N for NxN, or HEIGHT,WIDTH.')
flags.DEFINE_enum(
    'resize_mode', _D['resize_mode'], source_image.RESIZE_MODES,
    resize_modes.describe())
flags.DEFINE_enum(
    'image_format', _D['image_format'], schema.IMAGE_FORMATS,
    'Stored encoding: jpeg (small), png (lossless), raw uint8 (fastest to read).')
flags.DEFINE_integer('jpeg_quality', _D['jpeg_quality'], 'JPEG quality 1..100.')
flags.DEFINE_integer('channels', _D['channels'], '3 = RGB, 1 = grayscale.')
flags.DEFINE_float(
    'validation_fraction', _D['validation_fraction'],
    'Share of images for validation (class-folder layout only).')
flags.DEFINE_float(
    'test_fraction', _D['test_fraction'],
    'Share of images for test (class-folder layout only).')
flags.DEFINE_integer('seed', _D['seed'], 'Seed of the split assignment and record order.')
flags.DEFINE_string(
    'dataset_name', _D['dataset_name'], 'lower_snake_case name; default: from --input_dir.')
flags.DEFINE_float(
    'shard_size_mb', _D['shard_size_mb'], 'Target size of one shard file.')
flags.DEFINE_integer(
    'max_image_pixels', _D['max_image_pixels'],
    'Larger images are rejected as decompression bombs.')
flags.DEFINE_integer(
    'max_file_bytes', _D['max_file_bytes'],
    'Larger files are rejected without being read.')
flags.DEFINE_boolean(
    'overwrite', _D['overwrite'],
    'Replace an earlier build in --output_dir: only what a build wrote; '
    'anything else there stops the build, named.')
flags.DEFINE_boolean(
    'allow_missing_eval_classes', _D['allow_missing_eval_classes'],
    'Split-folder layout: accept a class that has a train/<class>/ folder but '
    'none (or no image) in validation/ or test/ (no metrics for it there). A '
    'class with no train image is always refused.')
flags.DEFINE_integer(
    'near_duplicate_distance', _D['near_duplicate_distance'],
    'Images whose perceptual hashes differ in at most this many of 64 bits '
    'are near-duplicates (resized, re-encoded, lightly cropped or '
    'brightened copies): one in validation/test of a train image is left '
    'out; others are reported (near_duplicates.jsonl). 0: no search.')
flags.DEFINE_boolean(
    'stratified', _D['stratified'],
    'Class-folder layout: each class gets exactly round(n x fraction) '
    'validation/test images (for small folders). The default split hashes '
    'each file alone, so adding files never moves one; with --stratified '
    'adding files can move earlier ones between splits.')
flags.DEFINE_string(
    'reuse_from', _D['reuse_from'],
    'An earlier build of this folder with the same image flags: files '
    'unchanged since (same path, size and modification time) take their '
    'records from it instead of being decoded again. The result is the '
    'bytes a full build gives.')
flags.DEFINE_boolean(
    'update', _D['update'],
    'Update the dataset in --output_dir from --input_dir (as --reuse_from='
    '--output_dir); it is replaced at the end, and kept as it was if the '
    'update fails or is interrupted.')
flags.DEFINE_boolean(
    'verify_reuse', _D['verify_reuse'],
    'With --reuse_from/--update: read and hash every file instead of '
    'trusting size and modification time (for files changed by tools that '
    'restore times).')
flags.DEFINE_string(
    'quality_thresholds', _D['quality_thresholds'],
    image_quality.flag_help())
FLAGS = flags.FLAGS


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


def check_endpoints(args: list[str]) -> None:
  """Refuses a --job_endpoint (and an EXTERNAL --environment_config) that
  nothing answers at: Beam's portable runner would wait minutes for it and
  then print a gRPC traceback."""
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  options = pipeline_options.PipelineOptions(args).view_as(
      pipeline_options.PortableOptions)
  peers = []
  if options.job_endpoint and options.job_endpoint != 'embed':
    peers.append(('job_endpoint', options.job_endpoint,
                  'python -m apache_beam.runners.portability.'
                  'local_job_service_main --port=PORT'))
  if (options.environment_type or '').upper() == 'EXTERNAL' and (
      options.environment_config):
    peers.append(('environment_config', options.environment_config,
                  'python -m apache_beam.runners.worker.worker_pool_main '
                  '--service_port=PORT'))
  for flag, address, start in peers:
    host, _, port = address.rpartition(':')
    if not port.isdigit() or not host:
      raise UserError(f'--{flag}={address} is not HOST:PORT')
    reason = net.unreachable(host.strip('[]'), int(port), timeout=5)
    if reason:
      raise UserError(f'--{flag}={address}: nothing answers there ({reason}); '
                      f'start it first ({start}) or fix --{flag}')


def main(argv):
  cli.interrupt_on_sigterm()  # Cleans up as after Ctrl-C.
  beam_args = argv[1:]
  try:
    check_beam_args(beam_args)
    check_endpoints(beam_args)
    if not FLAGS.input_dir or not FLAGS.output_dir:
      raise UserError('--input_dir and --output_dir are required, e.g. '
                      '--input_dir=photos --output_dir=data/photos')
    cli.quiet_logs()  # Beam's INFO lines would drown the progress lines.
    builder.build(builder.BuildSettings(**{
        f.name: FLAGS[f.name].value
        for f in dataclasses.fields(builder.BuildSettings)}),
                  beam_args=beam_args)
  except UserError as e:
    print(f'error: {cli.one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(getattr(e, 'exit_code', 1))
  except KeyboardInterrupt as e:  # Before the build began: nothing written.
    print(f'error: interrupted ({cli.signal_name(e)}); nothing was written',
          file=sys.stderr, flush=True)
    sys.exit(128 + cli.signal_number(e))


if __name__ == '__main__':
  # Unknown flags stay in argv: they are Beam's. The process ends without
  # tearing the interpreter down once the build is done (cli.run_and_exit).
  cli.run_and_exit(main, known_only=True, module=__spec__.name)
