"""The build as a library call: validate, list, run Beam, commit, summarize.

`build()` is what `python -m pipelines.build` calls with plain arguments. All
user mistakes raise `UserError` *before* anything is written or removed.

The jobs around the Beam run live one per module: settings (BuildSettings
and its checks), output_folder (what a build owns, the lock, leftovers, the
atomic commit), failures (disk failures and Ctrl-C as one line), summary
(the end-of-build table, empty classes). Their public names, and the few
private ones tests use, are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import posixpath
import shutil
import sys
import time
from typing import Optional, Sequence

from pipelines import plots
from pipelines.common import cli
from pipelines.common import paths
from pipelines.common.cli import parse_image_size
from pipelines.common.errors import UserError
from pipelines.folder_to_records import beam_build
from pipelines.folder_to_records import failures
from pipelines.folder_to_records import listing as listing_lib
from pipelines.folder_to_records import output_folder
from pipelines.folder_to_records import report_page
from pipelines.folder_to_records import reuse as reuse_lib
from pipelines.folder_to_records import runner_options
from pipelines.folder_to_records import settings as settings_lib
from pipelines.folder_to_records import splits as splits_lib
from pipelines.folder_to_records import summary
from pipelines.folder_to_records import warm_workers
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
# pylint: disable=g-importing-member,unused-import
from pipelines.folder_to_records.failures import BuildFailed
from pipelines.folder_to_records.failures import disk_failure
from pipelines.folder_to_records.failures import (
    worker_log_levels as _worker_log_levels)
from pipelines.folder_to_records.output_folder import BUILD_FILES
from pipelines.folder_to_records.output_folder import check_output_dir
from pipelines.folder_to_records.output_folder import clear_leftovers
from pipelines.folder_to_records.output_folder import commit as _commit
from pipelines.folder_to_records.output_folder import describe_entries
from pipelines.folder_to_records.output_folder import foreign_error
from pipelines.folder_to_records.output_folder import is_toolkit_output
from pipelines.folder_to_records.output_folder import output_lock
from pipelines.folder_to_records.output_folder import Owned
from pipelines.folder_to_records.output_folder import owned_entries
from pipelines.folder_to_records.output_folder import signals_deferred
from pipelines.folder_to_records.output_folder import temp_dir_for
from pipelines.folder_to_records.output_folder import TFDS_FILES
from pipelines.folder_to_records.output_folder import TRAINING_RUN_FOLDERS
from pipelines.folder_to_records.settings import BuildSettings
from pipelines.folder_to_records.settings import DEFAULT_IMAGE_SIZE
from pipelines.folder_to_records.settings import DEFAULT_SHARD_SIZE_MB
from pipelines.folder_to_records.settings import default_dataset_name
from pipelines.folder_to_records.settings import make_config
from pipelines.folder_to_records.summary import empty_classes
from pipelines.folder_to_records.summary import format_summary
from pipelines.folder_to_records.summary import SUMMARY_MAX_CLASSES
# pylint: enable=g-importing-member,unused-import


def build(settings: Optional[settings_lib.BuildSettings] = None, *,
          beam_args: Sequence[str] = (), quiet: bool = False,
          samples: bool = True, **kwargs) -> dict:
  """Builds a dataset directory from a labelled image folder.

  `samples` also writes `samples.png`, a grid of stored train images per
  class, to check labels and resizing at a glance, and `report.html`, the
  page to read after a build (report_page; neither is counted in the
  timing).

  Refusals (UserError) come before anything is written. A failure of the
  disk (full, read-only, denied) and Ctrl-C/SIGTERM raise BuildFailed, one
  line that says what was kept: the earlier dataset stays untouched and the
  temporary folder is removed.

  Args:
    settings: a BuildSettings, or its fields as keywords (kwargs).
    beam_args: Beam pipeline options (--runner=..., ...).
    quiet: no progress lines.
    samples: also write samples.png and report.html.

  Returns:
    The build report as its JSON object (report_lib.BuildReport: what
    `output_dir/build_report.json` holds, elapsed_s and images_per_s of the
    Beam run included), with `output_dir` added.
  """
  # TensorFlow loads only in _run_and_commit, after the cheap checks, so
  # typos fail fast.
  if settings is None:
    settings = settings_lib.BuildSettings(**kwargs)
  elif kwargs:
    settings = dataclasses.replace(settings, **kwargs)
  started_at = time.time()  # Before any file is looked at (reuse.RACY_S).
  overwrite = settings.overwrite or settings.update
  given = {'input_dir': settings.input_dir, 'output_dir': settings.output_dir}
  input_dir, output_dir = (output_folder.real_path(paths.expand(p))
                           for p in given.values())
  if (paths.is_within(output_dir, input_dir, backslash_separates=True) or
      paths.is_within(input_dir, output_dir, backslash_separates=True)):
    shown = ' and '.join(
        f'--{flag}={path}' + (f' (really {real})' if real != path else '')
        for (flag, path), real in zip(given.items(), (input_dir, output_dir)))
    raise UserError(f'{shown} overlap; write the dataset outside the image '
                    'folder')
  parse_image_size(settings.image_size)  # Cheap checks before the disk.
  settings_lib.check_range(
      'max_file_bytes', settings.max_file_bytes, 1, 1 << 50,
      'pass a positive size in bytes, e.g. 268435456 (256 MiB)')
  reuse_dir = _reuse_dir(settings, output_dir)
  output_folder.check_output_dir(output_dir, overwrite=overwrite)
  say = (lambda m: None) if quiet else (
      lambda m: print(f'[build] {m}', file=sys.stderr, flush=True))
  progress = output_folder.Progress(input_dir, output_dir,
                                    output_folder.temp_dir_for(output_dir))
  with failures.one_line_failures(progress), warm_workers.started(
      beam_args):
    with output_folder.output_lock(output_dir):
      progress.had_dataset = output_folder.check_output_dir(  # Again, locked.
          output_dir, overwrite=overwrite)
      for line in output_folder.clear_leftovers(output_dir):
        say(line)
      plan = listing_lib.plan_input(
          input_dir, exclude=(output_dir,),
          allow_missing_eval_classes=settings.allow_missing_eval_classes)
      config = settings_lib.make_config(settings, input_dir=input_dir,
                                        listing=plan)
      if reuse_dir:
        if settings.update and not output_folder.is_dataset(output_dir):
          raise UserError(_no_dataset_to_update(output_dir))
        config = dataclasses.replace(config, reuse=reuse_lib.open_source(
            reuse_dir, image=dataclasses.asdict(config.image),
            flag='--update: --output_dir' if settings.update
            else '--reuse_from', verify=settings.verify_reuse))
      for line in settings_lib.moot_settings(settings, plan.layout):
        say(line)
      say(f'{len(plan.class_names)} classes ({plan.layout} layout), '
          f'{len(plan.folders)} folders to list; writing '
          f'{cli.image_shape(config.image.height, config.image.width, config.image.channels)} '
          f'{config.image.image_format}')
      report, lines = _run_and_commit(
          config, plan, progress=progress, replace=progress.had_dataset,
          beam_args=beam_args, samples=samples, started_at=started_at,
          allow_missing_eval_classes=settings.allow_missing_eval_classes)
    report = dataclasses.replace(report, output_dir=output_dir)
    for line in lines:
      say(line)
    if not quiet:
      print(summary.format_summary(report))
  if not report.written:
    raise UserError(summary.nothing_written(report, output_dir))
  if report.class_gap_error:
    raise UserError(report.class_gap_error + (
        ' (the earlier dataset in --output_dir was kept)'
        if report.kept_earlier else ''))
  return report.to_json_dict(in_file=False)


def _run_and_commit(config, plan, *, progress: output_folder.Progress,
                    replace: bool, beam_args, samples: bool,
                    started_at: float = 0.0,
                    allow_missing_eval_classes: bool = False
                    ) -> tuple[report_lib.BuildReport, list[str]]:
  """Runs Beam into the temporary folder and commits it; the folder never
  outlives a failure. Returns the report and lines to show.

  A build that wrote no image, or left a class with no train image (or, in
  layout (b), a split folder's class with none: splits.class_gap_error),
  commits only its report and rejected.jsonl (no metadata.json: it is not
  a dataset, and a model cannot learn such a class), and only where no
  earlier build would be replaced, so the reasons survive and nothing is
  lost for them. The report then holds `class_gap_error`.
  """
  tmp_dir, output_dir = progress.tmp_dir, progress.output_dir
  try:
    beam_args = runner_options.run_args(beam_args)
    with failures.quiet_disk_failure_logs(beam_args):
      elapsed = beam_build.run_pipeline(
          config=config, plan=plan, tmp_dir=tmp_dir, beam_args=beam_args,
          exclude=(output_dir,))
    report_path = posixpath.join(tmp_dir, report_lib.REPORT_FILE)
    report = report_lib.BuildReport.from_json(paths.read_text(
        report_path, max_bytes=report_lib.MAX_REPORT_BYTES))
    report = dataclasses.replace(
        report, elapsed_s=round(elapsed, 3),
        images_per_s=round(report.written / elapsed, 1),
        started_at=round(started_at, 3))
    report = dataclasses.replace(
        report, empty_classes=tuple(summary.empty_classes(report, tmp_dir)))
    gap = splits_lib.class_gap_error(
        report.classes_without_examples, input_dir=config.input_dir,
        given_splits=config.layout == listing_lib.SPLIT_FOLDERS_LAYOUT,
        allow_missing_eval_classes=allow_missing_eval_classes,
        allow_flag=listing_lib.ALLOW_MISSING_EVAL_CLASSES_FLAG)
    if gap and report.written:
      report = dataclasses.replace(report, class_gap_error=gap)
    paths.write_bytes(report_path, report.to_json().encode('utf-8'))
    if not report.written or gap:
      paths.remove(posixpath.join(tmp_dir, metadata_lib.METADATA_FILE))
      if replace and output_folder.is_dataset(output_dir):
        # Keep the earlier, usable dataset.
        output_folder.remove_temp(progress)
        return dataclasses.replace(report, kept_earlier=True), []
    elif samples:
      plots.write_dataset_samples(
          tmp_dir, posixpath.join(tmp_dir, plots.SAMPLES_FILE))
      draw_report_page(tmp_dir, config.input_dir)
    lines = output_folder.commit(tmp_dir, output_dir, replace=replace,
                                 progress=progress)
  except BaseException:
    with output_folder.signals_deferred():
      output_folder.remove_temp(progress)
    raise
  return report, lines


def _reuse_dir(settings: settings_lib.BuildSettings, output_dir: str
               ) -> Optional[str]:
  """The earlier build an incremental build reads (None for a full
  build); UserError for flags that do not go together."""
  if settings.update and settings.reuse_from:
    raise UserError('--update reads the dataset in --output_dir; drop '
                    '--reuse_from (or drop --update to build into a new '
                    '--output_dir from --reuse_from)')
  if settings.update:
    if not output_folder.is_dataset(output_dir):
      raise UserError(_no_dataset_to_update(output_dir))
    return output_dir
  if settings.reuse_from:
    return output_folder.real_path(paths.expand(settings.reuse_from))
  if settings.verify_reuse:
    raise UserError('--verify_reuse checks the records an incremental build '
                    'takes; pass it with --reuse_from=DATASET or --update')
  return None


def _no_dataset_to_update(output_dir: str) -> str:
  return (f'--update: --output_dir={output_dir} holds no dataset to update; '
          'build it once without --update')


def draw_report_page(dataset_dir: str, input_dir: str) -> None:
  """Writes report.html into dataset_dir; a failure is one warning line
  (and no page), never the end of a build whose dataset is written."""
  page = posixpath.join(dataset_dir, metadata_lib.REPORT_PAGE_FILE)
  try:
    report_page.write_report_page(dataset_dir, input_dir, page)
  except Exception as e:  # pylint: disable=broad-except
    with contextlib.suppress(Exception):  # A page cut short by the failure.
      if paths.exists(page):
        paths.remove(page)
    print(f'[build] warning: {metadata_lib.REPORT_PAGE_FILE} could not be '
          f'drawn ({type(e).__name__}: {cli.one_line(e, 200)}); the dataset '
          'is written', file=sys.stderr, flush=True)


def graph_bytes(input_dir: str, tmp_dir: str, **settings_fields) -> int:
  """Bytes of the serialized pipeline a build of input_dir submits (not run).

  For the graph-size test and the scale benchmark: it must not grow with
  the number of files. settings_fields: other BuildSettings fields (e.g.
  near_duplicate_distance=0).
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  plan = listing_lib.plan_input(input_dir)
  config = settings_lib.make_config(
      settings_lib.BuildSettings(input_dir=input_dir,
                                 output_dir=posixpath.join(tmp_dir, 'out'),
                                 **settings_fields),
      input_dir=input_dir, listing=plan)
  pipeline = beam.Pipeline(options=PipelineOptions(
      runner_options.pipeline_args([])))
  try:
    beam_build.build_pipeline(pipeline, config=config, plan=plan,
                              tmp_dir=posixpath.join(tmp_dir, 'tmp'))
    return len(pipeline.to_runner_api().SerializeToString())
  finally:  # Beam removes its temp folder only when a pipeline runs.
    shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
