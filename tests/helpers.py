"""Fixture builders shared by the tests: real photos, bad files, datasets."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

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


def _oriented(crop: np.ndarray, i: int) -> np.ndarray:
  """Crop i as is, mirrored, upside down or turned 180 degrees (i % 4).

  Crops of one photo a few pixels apart are near-duplicates (the build
  finds them, --near_duplicate_distance); in four orientations their
  perceptual hashes lie far apart (>= 16 of 64 bits for 12 crops of any
  CLASS_PHOTOS photo), so fixtures plant no near-duplicate by accident.
  """
  turn = i % 4
  return np.ascontiguousarray(
      crop[::-1 if turn in (2, 3) else 1, ::-1 if turn in (1, 3) else 1])


def variants(array: np.ndarray, count: int):
  """`count` distinct real-photo crops (distinct bytes, same content kind,
  no two near-duplicates for count <= 12)."""
  h, w = array.shape[:2]
  for i in range(count):
    top, left = (i * 7) % (h // 4), (i * 13) % (w // 4)
    yield _oriented(array[top:top + h * 3 // 4, left:left + w * 3 // 4], i)


# Photos for class k (cycled): colour photos first, then grey ones.
CLASS_PHOTOS = ('chelsea', 'coffee', 'rocket', 'astronaut',
                'immunohistochemistry', 'hubble_deep_field', 'camera', 'coins',
                'moon', 'clock')
DEFAULT_CLASSES = {'cat': 'chelsea', 'coffee': 'coffee', 'rocket': 'rocket'}


def _class_photos(classes) -> dict:
  """classes: names (photos assigned in CLASS_PHOTOS order) or name -> photo."""
  if isinstance(classes, int):
    classes = [f'class{k}' for k in range(classes)]
  if isinstance(classes, dict):
    return dict(classes)
  return {cls: CLASS_PHOTOS[k % len(CLASS_PHOTOS)]
          for k, cls in enumerate(classes)}


def _class_sources(photos: dict) -> dict:
  """class -> photo array; a photo shared by several classes is shifted by
  a row more for each, so no two classes hold the same bytes."""
  uses, sources = {}, {}
  for cls, name in photos.items():
    uses[name] = uses.get(name, -1) + 1
    sources[cls] = np.roll(photo(name), uses[name], axis=0)
  return sources


def distinct_crops(array: np.ndarray, count: int,
                   size: tuple[int, int] | None = None):
  """`count` crops of a photo, pairwise distinct in content (no two
  near-duplicates for count <= 12: see _oriented).

  The first ones are `variants`; a crop offset already used is replaced by
  the next unused one, so large counts never repeat. `size` (width,
  height) resizes each crop (bilinear).
  """
  h, w = array.shape[:2]
  rows, cols = h // 4, w // 4
  if count > rows * cols:
    raise ValueError(f'{count} crops asked, a {w}x{h} photo has {rows * cols}')
  used = set()
  for i in range(count):
    offset = ((i * 7) % rows, (i * 13) % cols)
    j = offset[0] * cols + offset[1]
    while offset in used:
      j = (j + 1) % (rows * cols)
      offset = divmod(j, cols)
    used.add(offset)
    top, left = offset
    crop = _oriented(array[top:top + h * 3 // 4, left:left + w * 3 // 4], i)
    if size is not None:
      crop = np.asarray(Image.fromarray(crop).resize(
          size, Image.Resampling.BILINEAR))
    yield crop


def photo_folder(root: pathlib.Path, *, classes=None, per_class=6,
                 layout: str = 'classes', formats=('jpg', 'png'),
                 size=None, name: str = '{photo}_{i}') -> dict:
  """Writes a labelled folder of real photo crops; returns relpath -> class.

  Args:
    root: the folder to write (the build's --input_dir).
    classes: class names (photos from CLASS_PHOTOS), a count, or a dict
      class -> scikit-image photo name; default cat/coffee/rocket.
    per_class: images per class; for layout 'splits' a dict split -> count
      (an int puts that many in both train and validation).
    layout: 'classes' (root/class/file) or 'splits'
      (root/split/class/file, the pre-split layout).
    formats: file extensions, used in turn (jpg, png, webp, bmp, gif).
    size: None (crops of the full photo) or N or (width, height).
    name: file stem, a format string of photo, cls, split and i (the index
      of the file in its folder).

  Every file of a class is a different crop (distinct bytes, no duplicate
  across splits either).
  """
  if layout not in ('classes', 'splits'):
    raise ValueError(f'layout={layout!r} is not classes or splits')
  if isinstance(size, int):
    size = (size, size)
  if layout == 'classes':
    if not isinstance(per_class, int):
      raise ValueError('layout=classes takes an int per_class')
    counts = {None: per_class}
  else:
    counts = (dict(per_class) if not isinstance(per_class, int)
              else {'train': per_class, 'validation': per_class})
  written = {}
  photos = _class_photos(classes or DEFAULT_CLASSES)
  sources = _class_sources(photos)
  for cls, photo_name in photos.items():
    crops = distinct_crops(sources[cls], sum(counts.values()), size)
    for split, count in counts.items():
      folder = root / split / cls if split else root / cls
      for i in range(count):
        ext = formats[i % len(formats)]
        stem = name.format(photo=photo_name, cls=cls, split=split, i=i)
        path = save(folder / f'{stem}.{ext}', Image.fromarray(next(crops)))
        written[path.relative_to(root).as_posix()] = cls
  return written


def make_photo_folder(root: pathlib.Path, per_class: int = 6) -> dict:
  """Three classes of real photos (JPEG and PNG), one folder per class."""
  return photo_folder(root, per_class=per_class)


@dataclasses.dataclass(frozen=True)
class TinyExample:
  """One record of a tiny dataset, as written."""
  filename: str
  label: int
  encoded: bytes        # The stored image bytes.
  pixels: np.ndarray    # uint8 [H, W, C], the pixels before encoding.
  original_height: int  # The crop's size before the resize.
  original_width: int


@dataclasses.dataclass(frozen=True)
class TinyDataset:
  """A dataset written by write_tiny_dataset."""
  path: str
  spec: Any  # tfrecords_schema.DatasetSpec
  examples: dict  # split -> [TinyExample], in file order, shard by shard.

  def __str__(self):
    return self.path


def write_tiny_dataset(root, *, classes=('cat', 'coffee', 'rocket'),
                       per_class=None, size=(32, 40), channels: int = 3,
                       image_format: str = 'jpeg', shards=1,
                       jpeg_quality: int = 95, seed: int = 0,
                       name: str = 'tiny') -> TinyDataset:
  """Writes a small built dataset directly, without Beam: shards + metadata.

  Records go through the schema's own encode_example / frame_record and the
  metadata through write_dataset_metadata, so readers see what a build
  writes; the images are crops of real photos resized with Pillow (and
  encoded with it). Milliseconds instead of a Beam run.

  Args:
    root: folder to create (must not exist or be empty).
    classes: class names (photos from CLASS_PHOTOS), a count, or a dict
      class -> scikit-image photo name.
    per_class: dict split -> images per class (splits left out are empty);
      default {'train': 6, 'validation': 2}.
    size: N or (height, width) of the stored images.
    channels: 1 or 3.
    image_format: 'jpeg', 'png' or 'raw'.
    shards: shards per non-empty split, an int or a dict split -> int.
    seed: record order inside a split (classes mixed, as the build does).

  Returns:
    TinyDataset: its path, its DatasetSpec and every example written.
  """
  from tfrecords_schema import metadata  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  per_class = per_class or {'train': 6, 'validation': 2}
  unknown = set(per_class) - set(metadata.SPLITS)
  if unknown:
    raise ValueError(f'unknown splits {sorted(unknown)}')
  height, width = (size, size) if isinstance(size, int) else size
  photos = _class_photos(classes)
  class_names = tuple(sorted(photos))  # Labels: sorted names, as the build.
  rng = np.random.default_rng(seed)
  sources = _class_sources(photos)
  crops = {cls: distinct_crops(sources[cls], sum(per_class.values()),
                               (width, height)) for cls in class_names}
  examples, split_specs, train_pixels = {}, {}, []
  for split in metadata.SPLITS:
    items = []
    for label, cls in enumerate(class_names):
      for i in range(per_class.get(split, 0)):
        image = Image.fromarray(next(crops[cls]))
        image = image.convert('L' if channels == 1 else 'RGB')
        pixels = np.asarray(image, np.uint8).reshape(height, width, channels)
        if image_format == 'raw':
          encoded = pixels.tobytes()
        else:
          buffer = io.BytesIO()
          image.save(buffer, format=image_format.upper(),
                     **({'quality': jpeg_quality}
                        if image_format == 'jpeg' else {}))
          encoded = buffer.getvalue()
        ext = 'jpg' if image_format == 'jpeg' else 'png'
        items.append(TinyExample(f'{cls}/{split}_{i}.{ext}', label, encoded,
                                 pixels, sources[cls].shape[0] * 3 // 4,
                                 sources[cls].shape[1] * 3 // 4))
    items = [items[k] for k in rng.permutation(len(items))]
    examples[split] = items
    if split == 'train':
      train_pixels = [e.pixels for e in items]
    count = shards.get(split, 1) if isinstance(shards, dict) else shards
    groups = ([list(g) for g in np.array_split(np.arange(len(items)),
                                                min(count, len(items)))]
              if items else [])
    filenames, lengths, num_bytes = [], [], 0
    for index, group in enumerate(groups):
      data = b''.join(schema.frame_record(schema.encode_example(
          image=items[k].encoded, label=items[k].label,
          filename=items[k].filename,
          sha256=hashlib.sha256(items[k].encoded).hexdigest(),
          original_height=items[k].original_height,
          original_width=items[k].original_width)) for k in group)
      filename = schema.shard_filename(name, split, index, len(groups))
      (root / filename).write_bytes(data)
      filenames.append(filename)
      lengths.append(len(group))
      num_bytes += len(data)
    split_specs[split] = metadata.SplitSpec(
        name=split, shards=tuple(filenames), shard_lengths=tuple(lengths),
        num_bytes=num_bytes, class_counts=tuple(
            per_class.get(split, 0) for _ in class_names))
  mean = std = None
  if train_pixels:
    values = np.stack(train_pixels).reshape(-1, channels).astype(np.float64)
    mean = tuple(round(float(m), 4) for m in values.mean(axis=0))
    std = tuple(round(float(s), 4) for s in values.std(axis=0))
  spec = metadata.DatasetSpec(
      name=name, class_names=class_names, height=height, width=width,
      channels=channels, image_format=image_format, resize_mode='stretch',
      splits=split_specs, mean=mean, std=std,
      jpeg_quality=jpeg_quality if image_format == 'jpeg' else None)
  metadata.write_dataset_metadata(str(root), spec,
                                  description='tests.helpers tiny dataset')
  return TinyDataset(str(root), spec, examples)


def written_filenames(out: pathlib.Path) -> set:
  """The source relpath of every record in a built dataset's shards."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tfrecords_schema  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  spec = tfrecords_schema.read_dataset_spec(str(out))
  names = set()
  for split in spec.splits:
    for record in tf.data.TFRecordDataset(spec.shard_paths(str(out), split)):
      names.add(schema.parse_examples(record)[schema.FILENAME].numpy().decode())
  return names


def decode_with_pillow(encoded: bytes, spec) -> np.ndarray:
  """A stored image decoded without TensorFlow: uint8 [H, W, C]."""
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  image = schema.decode_stored(
      encoded, image_format=spec.image_format, height=spec.height,
      width=spec.width, channels=spec.channels)
  return np.asarray(image).reshape(spec.height, spec.width, spec.channels)


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


def free_port() -> int:
  """A TCP port nothing listens on now."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def wait_for_port(port: int, process, timeout: float = 120) -> None:
  """Waits until something listens on localhost:port; fails if process
  exits first or the time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, 'the server exited early'
    with contextlib.suppress(OSError), socket.create_connection(
        ('localhost', port), timeout=1):
      return
    time.sleep(0.2)
  raise TimeoutError(f'nothing listens on port {port}')


RUN_CLI = """
import json, runpy, sys
sys.argv = {argv!r}
try:
  runpy.run_module({module!r}, run_name='__main__', alter_sys=True)
except SystemExit as e:
  print(json.dumps([str(e.code), sorted(
      m for m in ('tensorflow', 'keras', 'sklearn', 'matplotlib', 'pandas')
      if sys.modules.get(m) is not None)]))
"""


def refusal(module: str, *args: str, env=None) -> tuple[str, list[str]]:
  """(the error a command exits with, which of TF/Keras/scikit-learn/pandas/
  matplotlib it had loaded).

  For commands that must refuse before TensorFlow loads: the command runs
  in a fresh process until it exits.
  """
  result = subprocess.run(
      [sys.executable, '-c', RUN_CLI.format(argv=[module, *args],
                                            module=module)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      check=True, env=env)
  error, loaded = json.loads(result.stdout.strip().splitlines()[-1])
  if error.isdigit():  # Printed its error line, then exited with a status.
    (error,) = error_lines(result.stderr)
  return error, loaded


def run_main_in_process(module_name: str, *args: str
                        ) -> subprocess.CompletedProcess:
  """A command's `main` run in this process, as `run_cli` would see it.

  For commands whose behaviour, not their start-up, is under test: the
  TensorFlow this process has loaded already is reused (a fresh `python -m
  trainer.predict` spends ~8 s starting). Flags are parsed as the command
  parses them and reset afterwards; an exit message becomes stderr's last
  line and status 1, as absl's app.run does.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pipelines.common import cli  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(module_name)
  stdout, stderr = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      argv = cli.flags_parser(known_only=False)([module_name, *args])
      module.main(argv)
    except SystemExit as e:
      code = e.code
    finally:
      flags.FLAGS.unparse_flags()
  if isinstance(code, str):
    print(code, file=stderr)
    code = 1
  return subprocess.CompletedProcess([module_name, *args], code or 0,
                                     stdout.getvalue(), stderr.getvalue())
