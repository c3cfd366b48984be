"""Fixture builders shared by the tests: real photos and bad files on disk."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import threading

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


def run_cli_peak(module: str, *args: str, timeout: float = 300,
                 env: dict | None = None
                 ) -> tuple[subprocess.CompletedProcess, float]:
  """run_cli, and the peak RSS in MB of that process (and what it waited for).

  The figure comes from wait4 on this child alone, not RUSAGE_CHILDREN
  (the peak of every child the test process ever had).
  """
  command = [sys.executable, '-m', module, *args]
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, **(env or {})))
  output = {}
  readers = [threading.Thread(target=lambda n, s: output.__setitem__(
      n, s.read()), args=(name, stream)) for name, stream in (
          ('stdout', process.stdout), ('stderr', process.stderr))]
  for reader in readers:
    reader.start()
  timer = threading.Timer(timeout, process.kill)
  timer.start()
  _, status, usage = os.wait4(process.pid, 0)
  timed_out = not timer.is_alive()
  timer.cancel()
  for reader in readers:
    reader.join()
  process.returncode = os.waitstatus_to_exitcode(status)
  if timed_out:
    raise subprocess.TimeoutExpired(command, timeout, output['stdout'],
                                    output['stderr'])
  return (subprocess.CompletedProcess(command, process.returncode,
                                      output['stdout'], output['stderr']),
          usage.ru_maxrss / 1024)


def error_lines(stderr: str) -> list[str]:
  """Lines of stderr that are ours (not TensorFlow/Beam start-up noise)."""
  return [l for l in stderr.splitlines() if l.startswith('error:')]
