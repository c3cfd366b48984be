"""Shared benchmark helpers: photo-like JPEG folders and peak-RSS sampling."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time

import numpy as np
from PIL import Image

PHOTOS = {'cat': 'chelsea', 'coffee': 'coffee', 'rocket': 'rocket'}


# The project's packages (what byte_compile compiles).
PACKAGES = ('pipelines', 'trainer', 'tfrecords_schema', 'benchmarks')


def byte_compile(code_dir: pathlib.Path) -> None:
  """Writes the .pyc files of a checkout's packages, as a regular install
  does (an editable one does not). Where PYTHONDONTWRITEBYTECODE is set (as
  on the VM the benchmarks ran on) no process writes them, so every build's
  launcher and workers would compile the project's modules again: a cost
  of this environment (~0.1 s a process), not of the build."""
  import compileall  # pylint: disable=g-import-not-at-top
  for package in PACKAGES:
    if (code_dir / package).is_dir():
      compileall.compile_dir(str(code_dir / package), quiet=1)


def make_jpeg_folder(root: pathlib.Path, num_images: int, *,
                     seed: int = 0) -> pathlib.Path:
  """`num_images` photo-like JPEGs (300-500 px sides) in 3 class folders.

  Each image is a random crop of a real scikit-image photo, resized to a
  random size, flipped and colour-shifted, so every file has distinct bytes.
  Reuses the folder when it already holds the same number of images.
  """
  from skimage import data  # pylint: disable=g-import-not-at-top
  marker = root / f'.complete-{num_images}-{seed}'
  if marker.exists():
    return root
  rng = np.random.default_rng(seed)
  sources = {cls: getattr(data, name)() for cls, name in PHOTOS.items()}
  classes = sorted(sources)
  for i in range(num_images):
    cls = classes[i % len(classes)]
    photo = sources[cls]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[top:top + ch, left:left + cw].astype(np.int16)
    crop = np.clip(crop + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    size = (int(rng.integers(300, 501)), int(rng.integers(300, 501)))
    image = Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR)
    path = root / cls / f'{cls}_{i:06d}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format='JPEG', quality=int(rng.integers(80, 96)))
  marker.write_text('ok')
  return root


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a server a benchmark starts)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def photo_records(work_dir: str, num_images: int, size: int = 150
                  ) -> tuple[pathlib.Path, pathlib.Path]:
  """(JPEG folder, built records) of `num_images` photo-like images, made
  once under work_dir and reused (the input, train and service benchmarks
  share them)."""
  work = pathlib.Path(work_dir)
  images = make_jpeg_folder(work / f'jpegs_{num_images}', num_images)
  data = work / f'records_{num_images}'
  if not (data / 'metadata.json').exists():
    from pipelines.folder_to_records import builder  # pylint: disable=g-import-not-at-top
    builder.build(input_dir=str(images), output_dir=str(data),
                  image_size=str(size), validation_fraction=0.0,
                  overwrite=True, quiet=True)
  return images, data


def _descendants(pid: int) -> list[int]:
  """pid and all its descendants (Linux /proc)."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    children.setdefault(ppid, []).append(int(entry))
  out, stack = [], [pid]
  while stack:
    p = stack.pop()
    out.append(p)
    stack.extend(children.get(p, []))
  return out


def _high_water_mb(pid: int) -> float:
  """VmHWM (peak RSS so far) of one process, in MB; 0 if it is gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _tree_rss_bytes(pid: int) -> int:
  """Resident memory of `pid` and all its descendants (Linux /proc)."""
  total = 0
  page = os.sysconf('SC_PAGE_SIZE')
  for p in _descendants(pid):
    try:
      with open(f'/proc/{p}/statm') as f:
        total += int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
      pass
  return total


def run_measured(cmd: list[str], *, cwd=None, env=None,
                 interval_s: float = 0.2) -> dict:
  """Runs cmd; returns wall seconds, exit code, output, peak tree RSS, and
  each process's own peak (`peak_by_pid`: pid -> MB, the root first)."""
  start = time.perf_counter()
  process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  peak = [0]
  by_pid: dict[int, float] = {}
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _tree_rss_bytes(process.pid))
      for pid in _descendants(process.pid):
        by_pid[pid] = max(by_pid.get(pid, 0.0), _high_water_mb(pid))
      time.sleep(interval_s)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  stdout, stderr = process.communicate()
  done.set()
  thread.join()
  return {'wall_s': time.perf_counter() - start, 'returncode': process.returncode,
          'stdout': stdout, 'stderr': stderr, 'peak_rss_mb': peak[0] / 2**20,
          'root_pid': process.pid, 'peak_by_pid': by_pid}


def markdown_table(headers: list[str], rows: list[list]) -> str:
  """A Markdown table (the format BUILD_NOTES.md keeps results in)."""
  lines = ['| ' + ' | '.join(headers) + ' |',
           '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def report(headers: list[str], rows: list[list], results,
           results_path: str | None) -> None:
  """Prints the table; writes the raw results as JSON when asked."""
  print()
  print(markdown_table(headers, rows))
  if results_path:
    pathlib.Path(results_path).write_text(json.dumps(results, indent=2))
