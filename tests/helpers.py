"""Fixture builders shared by the tests: real photos and bad files on disk."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def photo(name: str) -> np.ndarray:
  """A real photo bundled with scikit-image, as uint8 HxWx3."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  image = getattr(data, name)()
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  return image[..., :3].astype(np.uint8)


def jpeg_bytes(array: np.ndarray, quality: int = 90, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='JPEG', quality=quality, **kwargs)
  return buffer.getvalue()


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def save(path: pathlib.Path, image: Image.Image, **kwargs) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)
  return path


def variants(array: np.ndarray, count: int):
  """`count` distinct real-photo crops (distinct bytes, same content kind)."""
  h, w = array.shape[:2]
  for i in range(count):
    top, left = (i * 7) % (h // 4), (i * 13) % (w // 4)
    yield array[top:top + h * 3 // 4, left:left + w * 3 // 4]


def make_photo_folder(root: pathlib.Path, per_class: int = 6) -> dict:
  """Three classes of real photos (JPEG and PNG), one folder per class."""
  classes = {'cat': 'chelsea', 'coffee': 'coffee', 'rocket': 'rocket'}
  written = {}
  for cls, name in classes.items():
    for i, crop in enumerate(variants(photo(name), per_class)):
      ext = 'jpg' if i % 2 == 0 else 'png'
      path = root / cls / f'{name}_{i}.{ext}'
      save(path, Image.fromarray(crop))
      written[f'{cls}/{path.name}'] = cls
  return written


def add_bad_files(root: pathlib.Path) -> dict:
  """Adds every kind of bad or ignorable file; returns relpath -> outcome."""
  good = jpeg_bytes(photo('astronaut'))
  outcomes = {}

  def put(rel, data, outcome):
    write(root / rel, data)
    outcomes[rel] = outcome

  put('cat/empty.jpg', b'', 'rejected_empty')
  put('cat/truncated.jpg', good[:len(good) // 3], 'rejected_corrupt')
  put('coffee/corrupt.png', b'\x89PNG\r\n\x1a\n' + os.urandom(300),
      'rejected_corrupt')
  put('rocket/notes.jpg', b'these are my notes, not a picture\n',
      'rejected_corrupt')
  put('cat/README.txt', b'about cats', 'ignored_not_image')
  put('coffee/labels.csv', b'a,b\n1,2\n', 'ignored_not_image')
  put('cat/.DS_Store', b'\x00\x00\x00\x01Bud1', 'ignored_hidden')
  put('.git/config', b'[core]', 'ignored_hidden')
  put('stray.jpg', good, 'ignored_outside_class_folder')
  os.symlink(root / 'cat' / 'deleted-since.jpg', root / 'cat' / 'dangling.jpg')
  outcomes['cat/dangling.jpg'] = 'rejected_unreadable'  # A broken link.
  bomb = io.BytesIO()
  Image.new('L', (12000, 9000)).save(bomb, format='PNG')
  put('rocket/bomb.png', bomb.getvalue(), 'rejected_too_large')
  return outcomes


def run_cli(module: str, *args: str, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` in a fresh process from the repo root."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, '-m', module, *args],
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, env=full_env, check=False)


# Runs argv[2:] and writes its peak RSS (KB) to argv[1]. A launcher because
# Linux carries a process's peak RSS across exec: a command forked straight
# from the test process would report the test process's own peak.
_PEAK_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], 'w') as f:
  f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_cli_peak(module: str, *args: str, timeout: float = 300,
                 env: dict | None = None
                 ) -> tuple[subprocess.CompletedProcess, float]:
  """run_cli, and the peak RSS in MB of that command alone."""
  with tempfile.NamedTemporaryFile(suffix='.peak') as peak:
    command = [sys.executable, '-c', _PEAK_LAUNCHER, peak.name,
               sys.executable, '-m', module, *args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env=dict(os.environ, **(env or {})))
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
      raise
    peak_kb = float(pathlib.Path(peak.name).read_text() or 0)
  return (subprocess.CompletedProcess(command[3:], process.returncode, stdout,
                                      stderr), peak_kb / 1024)


def error_lines(stderr: str) -> list[str]:
  """Lines of stderr that are ours (not TensorFlow/Beam start-up noise)."""
  return [l for l in stderr.splitlines() if l.startswith('error:')]
