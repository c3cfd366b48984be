"""Shared absl entry-point helpers: one-line errors, quiet output, sizes.

Imports neither Beam nor TensorFlow, so every command starts fast.
"""

import atexit
import logging as logging_lib
import os
import re
import signal
import sys
import threading
from typing import Optional, Sequence

from absl import flags
from absl import logging

from pipelines.common.errors import UserError
from tfrecords_schema import files

MAX_IMAGE_SIDE = 8192

# Start-up chatter of TensorFlow's C++ runtime and Beam's worker processes
# that says nothing to a user (a CPU machine has no CUDA driver; a Beam
# worker announces its channels). Matched against whole stderr lines.
_NOISE = re.compile('|'.join([
    r'^INFO:',  # Python logging's default format: Beam worker processes.
    r'All log messages before absl::InitializeLog\(\) is called',
    r'Could not find cuda drivers on your machine',
    r'failed call to cuInit',
    r'cpu_feature_guard\.cc',
    r'^To enable the following instructions:',
    r'oneDNN custom operations are on',
    r'Unable to register cu(DNN|FFT|BLAS) factory',
    r'apitools not found',
    r'semi_persistent_directory',
    r'computation placer already registered',
    # CPUs without AVX-512: the uint8 ops run in Eigen instead; nothing lost.
    r'oneDNN supports DT_UINT8 only on platforms with AVX-512',
    # libjpeg's notes on the copies the serving export's JPEG strictness
    # check decodes on purpose (filler before markers, changed tails: see
    # serving/jpeg.py), printed for every good JPEG ("premature end of data
    # segment", "extraneous bytes before marker"). A damaged input is
    # refused by the export's own error, which names it.
    r'^Corrupt JPEG data: ',
]))


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_pending() -> bool:
  """Whether SIGINT or SIGTERM was sent to this process but its handler has
  not run yet (Linux: /proc/self/status; elsewhere False)."""
  try:
    with open('/proc/self/status') as f:
      masks = [int(line.split()[1], 16) for line in f
               if line.startswith(('SigPnd:', 'ShdPnd:'))]
  except (OSError, ValueError, IndexError):
    return False
  return any(mask >> (s - 1) & 1 for mask in masks for s in _STOP_SIGNALS)


def _interrupted(wakeup_fd: int) -> bool:
  """Whether SIGINT or SIGTERM reached this process: pending, or handled
  (the C-level handler wrote its number to the wakeup pipe). Never blocks."""
  try:
    data = os.read(wakeup_fd, 512)
  except BlockingIOError:
    data = b''
  return bool(set(_STOP_SIGNALS) & set(data)) or _stop_pending()


_TRACEBACK = b'Traceback (most recent call last):'
_ERROR = b'error:'


class _Forwarder:
  """Copies lines from a pipe to the real stderr, without noise.

  With `own` (the prefixes of the command's own lines, `error:` among
  them): once the process got SIGINT or SIGTERM, only its own lines; and a
  traceback (of this process, a thread or a child process) with everything
  after it that is not the command's own is held: dropped when the
  command's one-line `error:` follows (it already says what happened), else
  written at the end, so nothing of a real crash is lost.

  The signal is looked for after each read of the pipe: a child process hit
  by the same Ctrl-C can only write after the signal was sent, and from
  then on it is pending here or its number is in the wakeup pipe, so the
  child's lines are never forwarded.
  """

  def __init__(self, write_fd: int, wakeup_fd: Optional[int],
               own: tuple[bytes, ...], progress=None):
    self._write_fd, self._wakeup_fd, self._own = write_fd, wakeup_fd, own
    # Optional: turns some lines into one progress display; consume(line)
    # -> None (not its line) or the bytes to write; end_line() -> the bytes
    # that end a shown progress line before any other.
    self._progress = progress
    self._interrupted = False
    self._held = None  # Lines held since a traceback, or None.

  def run(self, read_fd: int) -> None:
    pending = b''
    while True:
      data = os.read(read_fd, 1 << 16)
      if self._wakeup_fd is not None and not self._interrupted:
        self._interrupted = _interrupted(self._wakeup_fd)
      lines = (pending + data).split(b'\n')
      pending = lines.pop() if data else b''
      for line in lines:
        if line or data:
          self._line(line + b'\n')
      if not data:
        self._write(self._held or [])
        if self._progress is not None:
          os.write(self._write_fd, self._progress.end_line())
        return

  def _line(self, line: bytes) -> None:
    if _NOISE.search(line.decode('utf-8', 'replace')):
      return
    if not self._own:
      self._write([line])
      return
    mine = line.startswith(self._own)
    if self._interrupted and not mine:
      return
    if self._progress is not None:
      shown = self._progress.consume(line)
      if shown is not None:
        os.write(self._write_fd, shown)
        return
    if mine and line.startswith(_ERROR):
      self._held = None  # The one-line error says it all.
    elif self._held is not None and not mine:
      self._held.append(line)
      return
    elif line.startswith(_TRACEBACK):
      self._held = [line]
      return
    self._write([line])

  def _write(self, lines: list[bytes]) -> None:
    if lines and self._progress is not None:
      lines = [self._progress.end_line(), *lines]
    for line in lines:
      os.write(self._write_fd, line)


_UNFILTERED_STDERR = 2  # The real stderr once filter_noise has run.


def unfiltered_stderr() -> int:
  """A file descriptor of the real stderr (for a helper process whose last
  words must get out even when this process is killed)."""
  return _UNFILTERED_STDERR


def filter_noise(*, own_lines: Sequence[str] = (), progress=None) -> None:
  """Drops known start-up chatter from this process's (and children's) stderr.

  TensorFlow's C++ runtime prints CUDA-driver lines before its log level is
  read, and Beam's worker processes log their set-up at INFO to the stderr
  they inherit, so neither can be silenced by a setting. stderr (fd 2) is
  routed through a pipe; a thread forwards every line that is not noise.
  Everything else, warnings and tracebacks included, still gets through.
  `--verbosity=...` (or -v) on the command line turns the filter off.

  own_lines: prefixes of the command's own lines (`error:` among them).
  Given, tracebacks wait for the end and go when the command ends with its
  one-line `error:` (a full disk in a Beam worker process prints one there
  and in this process), and after Ctrl-C (SIGINT) or SIGTERM only the
  command's own lines are shown: Ctrl-C reaches Beam's worker processes
  too, whose tracebacks, and those of the threads that watched them, say
  nothing to a user. See _Forwarder. Call it from the main thread: it takes
  signal.set_wakeup_fd. progress: an object that turns some lines into one
  progress display (e.g. folder_to_records.progress.ChunkProgress).
  """
  if any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  global _UNFILTERED_STDERR
  original = os.dup(2)
  _UNFILTERED_STDERR = original
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  wakeup_fd = None
  if own_lines:
    wakeup_fd, signal_fd = os.pipe()
    os.set_blocking(wakeup_fd, False)
    os.set_blocking(signal_fd, False)
    signal.set_wakeup_fd(signal_fd, warn_on_full_buffer=False)
  forwarder = _Forwarder(original, wakeup_fd,
                         tuple(p.encode() for p in own_lines), progress)
  thread = threading.Thread(target=forwarder.run, args=(read_fd,),
                            daemon=True)
  thread.start()

  def restore():
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)  # Closes the pipe's last write end held here.
    thread.join(timeout=2)

  atexit.register(restore)


# Packages a command never uses that TensorFlow's import would load anyway:
# Keras 3 imports scikit-learn, when installed, for keras.wrappers only.
_UNUSED_BY_COMMANDS = ('sklearn',)
# What the build (its launcher and its workers) never uses that Beam's import
# loads: Beam's typehints import pandas, and with it pyarrow, whenever
# installed, for DataFrame transforms the build has none of (~0.3 s of CPU
# at every Beam import). Not blocked in the trainer's commands: TFDS
# prepares some datasets (trainer --tfds=pet_finder, cifar10_h...) with
# pandas.
UNUSED_BY_THE_BUILD = ('pandas',)


def import_beam_quietly() -> None:
  """Imports Beam without its warning about optional GCP clients (logged on
  the root logger): the build's launcher and its workers started ahead."""
  import logging  # pylint: disable=g-import-not-at-top
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    import apache_beam  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    root.setLevel(level)


def skip_unused_imports(also: Sequence[str] = ()) -> None:
  """Keeps packages no command uses out of this command's process.

  Keras (imported with TensorFlow) imports scikit-learn whenever it is
  installed, only for its scikit-learn wrappers (it falls back when the
  import fails): 1.3 s of CPU at every start of a command on the 2-core VM
  (`import tensorflow`: 6.3 -> 5.0 s user). `also`: more names, e.g.
  UNUSED_BY_THE_BUILD for the build's launcher and workers. For commands
  only: a program importing this package keeps its modules.
  """
  for name in (*_UNUSED_BY_COMMANDS, *also):
    if name not in sys.modules:
      sys.modules[name] = None  # `import name` raises ImportError.


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same
  clean-up runs; `signum` gives the exit status (128 + signum)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_terminated(signum, frame):
  del frame
  raise Terminated(signum)


def interrupt_on_sigterm() -> None:
  """SIGTERM (kill, a scheduler stopping the job) raises Terminated in the
  main thread instead of ending the process on the spot, so a command
  cleans up as it does after Ctrl-C."""
  signal.signal(signal.SIGTERM, _raise_terminated)


def signal_number(interrupt: KeyboardInterrupt) -> int:
  """SIGTERM for Terminated, else SIGINT (Ctrl-C)."""
  return getattr(interrupt, 'signum', signal.SIGINT)


def signal_name(interrupt: KeyboardInterrupt) -> str:
  return signal.Signals(signal_number(interrupt)).name


def flags_parser(*, known_only: bool):
  """An `app.run(flags_parser=...)` that turns flag errors into one line.

  known_only=True leaves unknown flags in argv (the build passes them to
  Beam).
  """

  def parse(argv):
    check_flagfiles(argv[1:])
    try:
      return flags.FLAGS(argv, known_only=known_only)
    except flags.Error as e:
      sys.exit(f'error: {e}')
    except SystemExit as e:
      # absl prints --help/--helpfull/--helpshort and exits 1; asking for
      # help is not a failure.
      if e.code == 1 and _asks_for_help(argv):
        sys.exit(0)
      raise

  return parse


def exit_at_once(status: int = 0) -> None:
  """Ends the process now: logging and stdio flushed, `status`, no
  interpreter teardown (freeing ~2,000 modules: Beam, grpc, numpy,
  Pillow, TFDS took ~0.35 s of every build's launcher and ~0.25 s of
  every worker; BUILD_NOTES, "The build"). For a process whose work is
  done: every file it wrote is closed."""
  logging_lib.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(status)  # pylint: disable=protected-access


def run_and_exit(main, *, known_only: bool, module: str) -> None:
  """app.run(main) with flags_parser(known_only=...); then, in a process
  started as `python -m module` (not one that runs the module itself, as
  tests do with runpy), when main returned or exited (sys.exit) and no
  non-daemon thread is left, the atexit handlers run and the process ends
  at once (exit_at_once) with main's status, a sys.exit message printed as
  Python prints it. An uncaught exception, or a thread still running, ends
  it as Python does."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=flags_parser(known_only=known_only))
    code = None
  except SystemExit as e:
    code = e.code
  argv = sys.orig_argv
  started_as = any(a == '-m' and b == module for a, b in zip(argv, argv[1:]))
  if not started_as or any(
      t.is_alive() and not t.daemon for t in threading.enumerate()
      if t is not threading.main_thread()):
    sys.exit(code)
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  exit_at_once(code or 0)


# A flag file is a few lines; absl reads one whole, with open().
_FLAGFILE_BYTES = 1 << 20
_FLAGFILE_DEPTH = 10  # Flag files naming flag files: how deep this looks.


def check_flagfiles(args, *, depth: int = 0) -> None:
  """Exits with one line for a --flagfile (or one it names, nested) that is
  not a small regular text file: absl opens it with open(), so a FIFO would
  wait forever and /dev/zero fill the memory before any flag is read.
  Files that cannot be opened are left to absl's own error."""
  args = list(args)
  for i, arg in enumerate(args):
    if arg == '--' and not depth:  # absl reads on past it in a flag file.
      return
    name, equals, value = arg.partition('=')
    if name not in ('--flagfile', '-flagfile'):
      continue
    if not equals:  # --flagfile PATH
      if i + 1 >= len(args):
        return
      value = args[i + 1]
    value = value.strip()  # As absl strips it.
    if value == '/dev/stdin' or value.startswith('/dev/fd/'):
      continue  # A stream the shell feeds (a pipe, <(...)): it has a writer.
    try:
      text = files.read_text(os.path.expanduser(value),
                             max_bytes=_FLAGFILE_BYTES)
    except ValueError as e:
      sys.exit(f'error: --flagfile={value} {e}; pass a text file of flags, '
               'one --name=value a line')
    except OSError:
      continue
    if depth < _FLAGFILE_DEPTH:
      check_flagfiles([line.strip() for line in text.splitlines()],
                      depth=depth + 1)


_HELP_FLAGS = ('-?', '-h', '--help', '--helpfull', '--helpshort', '--helpxml')


def _asks_for_help(argv) -> bool:
  """Whether argv holds one of absl's help flags (before a bare `--`)."""
  for arg in argv[1:]:
    if arg == '--':
      return False
    if arg.split('=', 1)[0] in _HELP_FLAGS:
      return True
  return False


def quiet_logs() -> None:
  """WARNING and up from absl/Beam/TF Python loggers unless --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def image_shape(height: int, width: int, channels: int) -> str:
  """An image shape people cannot misread: '128 high x 192 wide x 3
  channels' (--image_size is HEIGHT,WIDTH; a bare 128x192x3 reads as
  width first to many)."""
  return (f'{height} high x {width} wide x {channels} '
          f'channel{"s" if channels != 1 else ""}')


def parse_image_size(text: str, flag: str = 'image_size') -> tuple[int, int]:
  """'150' -> (150, 150); '300,200' or '300x200' -> (height=300, width=200)."""
  parts = [p.strip() for p in re.split(r'[,x]', str(text).strip())]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) == 1:
    sizes = sizes * 2
  if len(sizes) != 2 or not all(1 <= s <= MAX_IMAGE_SIDE for s in sizes):
    raise UserError(
        f'--{flag}={text} is not a size; pass one number (150) or '
        f'HEIGHT,WIDTH (300,200), each between 1 and {MAX_IMAGE_SIDE}')
  return sizes[0], sizes[1]


def port_in_use(port: int) -> Optional[str]:
  """Why `port` cannot be listened on here (e.g. 'Address already in use'),
  or None when it is free."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(('', port))
    except OSError as e:
      return e.strerror or str(e)
  return None


def one_line(text, limit: Optional[int] = None) -> str:
  """Any message (an exception too) as one line, white space collapsed, cut
  at `limit` characters: error lines must stay one line."""
  return ' '.join(str(text).split())[:limit]
