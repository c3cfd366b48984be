"""Failures of a running build as one line: the disk's (full, read-only,
denied...), a worker process that ended (killed, out of memory) and
Ctrl-C/SIGTERM become BuildFailed, saying what was kept; Beam's own logs
of such a failure are held back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import threading
from typing import Iterator, Optional, Sequence

from pipelines.common import cli
from pipelines.common import paths
from pipelines.common.errors import UserError
from pipelines.folder_to_records import output_folder
from pipelines.folder_to_records import runner_options


class BuildFailed(UserError):
  """The disk failed the build (full, read-only, denied...), or the user
  stopped it: one line, with what was kept. exit_code: the exit status."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


# What the temporary folder beside --output_dir adds to its name at most.
_LONGEST_SUFFIX = (f'.{output_folder.TEMP_SUFFIX}01234567'
                   f'{output_folder.OLD_SUFFIX}')
# Failures of the disk, not of the build: errno -> the fix ({parent}: the
# folder --output_dir is in).
_BESIDE = ('the build writes its lock file and temporary folder beside '
           '--output_dir, in {parent}, and renames the finished dataset into '
           'place at the end')
DISK_FIXES = {
    errno.ENOSPC: 'the disk is full (until the end a build needs room for '
                  'the new dataset beside the earlier one): free space '
                  'there, or choose an --output_dir on another disk',
    errno.EDQUOT: 'your disk quota there is used up: free space, or choose '
                  'an --output_dir on another disk',
    errno.EROFS: 'it is on a read-only file system; ' + _BESIDE + ': choose '
                 'an --output_dir on a writable disk',
    errno.EACCES: _BESIDE + ', so {parent} must be writable: make it '
                  'writable, or choose another --output_dir',
    errno.ENAMETOOLONG: 'a name is too long for that file system (the '
                        'temporary folder beside --output_dir adds up to '
                        f'{len(_LONGEST_SUFFIX)} '
                        'characters to its name): choose a shorter '
                        '--output_dir or --dataset_name',
    errno.EFBIG: 'a file is larger than that file system allows: pass a '
                 'smaller --shard_size_mb',
    errno.EIO: 'the disk reported an I/O error: check it, or build to '
               'another disk',
    errno.EMFILE: 'too many open files: raise the limit (ulimit -n 4096) '
                  'and rerun',
    errno.EXDEV: 'the finished dataset cannot be renamed into place: '
                 '--output_dir is on another file system than {parent} (a '
                 'mount point?); build into a folder inside it',
}
DISK_FIXES[errno.ESTALE] = (
    'another process replaced or changed it while this build read it '
    '(another build of that dataset?): run the build again when that one '
    'is done')
DISK_FIXES[errno.EPERM] = DISK_FIXES[errno.EACCES]
DISK_FIXES[errno.ENFILE] = DISK_FIXES[errno.EMFILE]
DISK_FIXES[errno.EBUSY] = DISK_FIXES[errno.EXDEV]
# Beam quotes an error of a worker process as text only.
_QUOTED_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:\]'\n]+)(?:: '([^'\n]+)')?")


def disk_error(progress: output_folder.Progress, code: int,
               path: Optional[str], what: str) -> str:
  """The line for a failure of the disk: where, what, the fix, and what
  of --output_dir was kept."""
  parent = output_folder.parent_and_name(progress.output_dir)[0]
  if code != errno.ESTALE and path and paths.is_within(
      path, progress.input_dir, backslash_separates=True):
    fix = 'the build only reads --input_dir: make it readable'
  else:
    fix = DISK_FIXES[code].format(parent=parent)
  where = path or (progress.tmp_dir if paths.exists(progress.tmp_dir) or
                   progress.tmp_left else parent)
  return f'{where}: {what}; {fix}; {progress.outcome()}'


def _chain(exc: Optional[BaseException]) -> list[BaseException]:
  """exc and the exceptions it was raised from or while handling."""
  chain = []
  while exc is not None and all(exc is not e for e in chain):
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  return chain


def disk_failure(
    exc: Optional[BaseException]) -> Optional[tuple[int, Optional[str], str]]:
  """(errno, path or None, what happened) when exc, or an exception in its
  chain, is a failure of the disk: an OSError, a TensorFlow file error (its
  text), or Beam's error that quotes a worker's OSError. None otherwise."""
  chain = _chain(exc)
  for e in chain:
    if isinstance(e, OSError) and e.errno in DISK_FIXES:
      return e.errno, e.filename, e.strerror or os.strerror(e.errno)
  for e in chain:
    text = str(e)
    quoted = _QUOTED_ERRNO.search(text)
    if quoted and int(quoted[1]) in DISK_FIXES:
      return int(quoted[1]), quoted[3], os.strerror(int(quoted[1]))
    if type(e).__module__.startswith('tensorflow'):
      for code in DISK_FIXES:  # TensorFlow's errors carry strerror's text.
        if os.strerror(code) in text:
          return code, None, os.strerror(code)
  return None


# TensorFlow's errors (tf.io.gfile, which the launcher writes an object store
# with) that say the store, not the build, failed; by name, so this module
# loads without TensorFlow.
_STORE_ERRORS = ('UnavailableError', 'DeadlineExceededError',
                 'PermissionDeniedError', 'UnauthenticatedError',
                 'NotFoundError', 'ResourceExhaustedError', 'AbortedError',
                 'DataLossError')
# The store clients under Beam's gs:// and s3:// file systems raise their
# own errors (every one of them is the store's).
_STORE_CLIENTS = ('google.api_core.', 'google.auth.', 'google.cloud.',
                  'botocore.', 'boto3.')
# Beam quotes a worker's error as text.
_QUOTED_STORE_ERROR = re.compile(
    r'(?:errors_impl\.(?:' + '|'.join(_STORE_ERRORS) + r')|(?:' +
    '|'.join(re.escape(m) for m in _STORE_CLIENTS) +
    r')[\w.]*\.\w+)\b:?[^\n]*')


def store_failure(exc: Optional[BaseException]) -> Optional[str]:
  """'Name: message' when exc, or an exception in its chain, is an object
  store's failure (a 503, a timeout, access denied) as TensorFlow or the
  store's client reports it; None otherwise."""
  for e in _chain(exc):
    kind, module = type(e).__name__, type(e).__module__
    if (kind in _STORE_ERRORS and module.startswith('tensorflow')) or (
        module.startswith(_STORE_CLIENTS)):
      return f'{kind}: {getattr(e, "message", None) or e}'
    quoted = _QUOTED_STORE_ERROR.search(str(e))
    if quoted:
      return _unqualified(quoted[0])
  return None


def _unqualified(text: str) -> str:
  """'a.b.Name: message' -> 'Name: message'."""
  name, sep, rest = text.partition(':')
  return name.rsplit('.', 1)[-1] + sep + rest


# What the FnApiRunner's thread that watches a worker process raises when
# the process ends before the pipeline does (killed, crashed).
_WORKER_ENDED = re.compile(r'Worker subprocess exited with return code (-?\d+)')
# What the runner's threads and logs say when the connection to a worker
# process broke: the symptom of a worker that ended.
_CONNECTION_LOST = ('Channel closed prematurely',
                    'Failed to read inputs in the data plane')


def _lost_worker(exc: Optional[BaseException], text: str = '') -> bool:
  """Whether exc (or a log line's text) is the runner losing a worker
  process: a broken channel, a gRPC error of its threads."""
  if exc is not None:
    if type(exc).__module__.startswith('grpc'):
      return True
    text = str(exc)
  return any(t in text for t in _CONNECTION_LOST)


class _WorkerWatch:
  """While a build runs: the errors of the runner's own threads when a
  worker process ends (its exit status) or its connection breaks are
  recorded instead of printed (a traceback of each of Beam's threads,
  ~350 lines for one killed worker); other threads' errors print as
  before."""

  def __init__(self):
    self.ended, self.lost = [], False
    self._previous = None

  def __enter__(self):
    self._previous = threading.excepthook
    threading.excepthook = self._hook
    return self

  def __exit__(self, *exc):
    threading.excepthook = self._previous

  def _hook(self, args):
    ended = _WORKER_ENDED.search(str(args.exc_value))
    if ended:
      self.ended.append(int(ended[1]))
    elif _lost_worker(args.exc_value):
      self.lost = True
    else:
      self._previous(args)

  def error(self, exc: BaseException,
            progress: output_folder.Progress) -> Optional[BuildFailed]:
    """The one line when the build failed because a worker process ended
    (an exit status recorded, or the runner's error is the lost channel);
    None otherwise: a broken channel seen only by the runner's threads may
    follow another failure, which keeps its traceback."""
    if not (self.ended or any(_lost_worker(e) for e in _chain(exc))):
      return None
    how = 'its connection broke'
    code = next((c for c in self.ended if c), None)
    # The runner starts a worker through /bin/sh, which exits with 128 + N
    # when signal N ended its child.
    number = -code if code is not None and code < 0 else (
        code - 128 if code is not None and 128 < code < 160 else None)
    if number is not None:
      try:
        name = signal.Signals(number).name
      except ValueError:
        name = f'signal {number}'
      how = (f'killed by {name}, which the kernel sends when memory runs '
             'out' if number == signal.SIGKILL else f'killed by {name}')
    elif code is not None:
      how = f'exit status {code}'
    return BuildFailed(
        f'a worker process of the build ended before the build did ({how}); '
        'if memory ran out, rerun with fewer worker processes '
        '(--direct_num_workers) or with more memory, else rerun; '
        f'{progress.outcome()}')


@contextlib.contextmanager
def one_line_failures(progress: output_folder.Progress) -> Iterator[None]:
  """Turns a failure of the disk, a worker process that ended (killed, out
  of memory) and Ctrl-C/SIGTERM into a BuildFailed line that says what was
  kept; other errors (bugs) go on with their traceback."""
  workers = _WorkerWatch()
  try:
    with workers:
      yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Beam re-raises a KeyboardInterrupt that hit a step as a RuntimeError.
    interrupt = next((c for c in _chain(e)
                      if isinstance(c, KeyboardInterrupt)), None)
    if interrupt is not None:
      raise _interrupted(interrupt, progress) from None
    failure = disk_failure(e)
    if failure is not None:
      raise BuildFailed(disk_error(progress, *failure)) from None
    ended = workers.error(e, progress)
    if ended is not None:
      raise ended from None
    store = (store_failure(e) if paths.is_remote(progress.output_dir)
             or paths.is_remote(progress.input_dir) else None)
    if store is None:
      raise
    raise BuildFailed(
        f'the object store failed ({cli.one_line(store, 300)}): check that it '
        'can be reached and written with your credentials, then rerun; '
        f'{progress.outcome()}') from None
  except KeyboardInterrupt as e:
    raise _interrupted(e, progress) from None


def _interrupted(interrupt: KeyboardInterrupt,
                 progress: output_folder.Progress) -> BuildFailed:
  return BuildFailed(
      f'interrupted ({cli.signal_name(interrupt)}); {progress.outcome()}',
      exit_code=128 + cli.signal_number(interrupt))


class _DropDiskFailureLogs:
  """A logging filter: Beam logs a failing step with its traceback before
  it raises; when the failure is the disk's (or Ctrl-C, or a worker process
  that ended), the one-line error says it all."""

  def filter(self, record) -> bool:
    if not record.name.startswith('apache_beam'):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, KeyboardInterrupt) or _lost_worker(
        exc, record.getMessage()):
      return False  # A lost worker: one_line_failures says it.
    exc = exc or RuntimeError(record.getMessage())
    return disk_failure(exc) is None and store_failure(exc) is None


# The same for Beam's worker processes, which no filter here reaches:
# runner_options.run_args.


@contextlib.contextmanager
def quiet_disk_failure_logs(beam_args: Sequence[str]) -> Iterator[None]:
  """Beam's failure logs off while the pipeline runs, here and in the
  worker processes of the FnApiRunner."""
  import logging  # pylint: disable=g-import-not-at-top
  handlers = list(logging.getLogger().handlers)
  drop = _DropDiskFailureLogs()
  for handler in handlers:
    handler.addFilter(drop)
  try:
    with worker_log_levels(beam_args):
      yield
  finally:
    for handler in handlers:
      handler.removeFilter(drop)


@contextlib.contextmanager
def worker_log_levels(beam_args: Sequence[str]) -> Iterator[None]:
  """The FnApiRunner starts its worker processes
  (--direct_running_mode=multi_processing) with empty pipeline options, so
  no log level given as a flag reaches them; a worker reads the file named
  by PIPELINE_OPTIONS_FILE in its environment instead (Beam's
  sdk_worker_main). Only the log levels go there."""
  if 'PIPELINE_OPTIONS_FILE' in os.environ:
    yield  # The user's own.
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  given = PipelineOptions(runner_options.pipeline_args(
      beam_args)).get_all_options(drop_default=True)
  fd, path = tempfile.mkstemp(prefix='build-worker-options-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump({'options': {k: given[k]
                           for k in runner_options.WORKER_LOG_OPTIONS
                           if k in given}}, f)
  os.environ['PIPELINE_OPTIONS_FILE'] = path
  try:
    yield
  finally:
    del os.environ['PIPELINE_OPTIONS_FILE']
    os.unlink(path)
