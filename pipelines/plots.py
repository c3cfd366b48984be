"""Every picture the toolkit writes (PNG), in one place.

  samples.png               a grid of stored images of every class (build)
  train_samples.png         a training batch as the model receives it
  training_curves.png       accuracy and loss per epoch
  confusion_matrix.png      true vs predicted class on the evaluation split
  mistakes.png              evaluation images with the model's class, wrong
                            ones first (trainer.mistakes)
  suspect_labels.png        images whose label the model contradicts

The image grids (samples.png, train_samples.png, the galleries) are drawn
with Pillow: the build's launcher draws samples.png with every build and
never loads matplotlib (~0.3 s). The charts use matplotlib, loaded when
one is drawn; it draws to files only (Agg): no display is needed on servers.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
from typing import Sequence

import numpy as np

from tfrecords_schema import files


def _pyplot():
  """matplotlib.pyplot, loaded on first use, drawing to files only (Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # Files only; no display on servers.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


SAMPLES_FILE = 'samples.png'


MAX_GRID_IMAGES = 100
# Longest side of a sample grid's image: its cell, in pixels. Larger stored
# images are shrunk to it one by one as they are read (once: the grid then
# draws them at that size), so the grid holds thumbnails whatever
# --image_size (at 4096x4096, the 8 full-size images in float32 took
# 6.9 GB).
SAMPLE_SIDE = 200


def _save(fig, path: str) -> None:
  """Writes a figure as PNG (100 dpi) to a local or remote (gs://) path and
  closes it: matplotlib opens local paths only, so it renders into memory."""
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format='png', dpi=100)
  finally:
    _pyplot().close(fig)
  files.write_bytes(path, buffer.getvalue())


def _font(pixels: int):
  """DejaVu Sans, the charts' font (matplotlib's own file, found without
  loading matplotlib), `pixels` high; Pillow's font where it is missing."""
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('matplotlib')
  if spec is not None and spec.origin:
    with_matplotlib = os.path.join(os.path.dirname(spec.origin), 'mpl-data',
                                   'fonts', 'ttf', 'DejaVuSans.ttf')
    try:
      return ImageFont.truetype(with_matplotlib, pixels)
    except OSError:
      pass
  return ImageFont.load_default(pixels)


def _fitted(draw, text: str, font, width: float) -> str:
  """text on one line (whitespace runs as one space), shortened in its
  middle with an ellipsis to fit `width` pixels (a bisection: ~12
  measures whatever its length). Pillow's own bitmap font (no FreeType)
  draws Latin-1 only: other characters become '?'."""
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  text = ' '.join(text.split())
  if not isinstance(font, ImageFont.FreeTypeFont):
    text = text.encode('latin-1', 'replace').decode('latin-1')
  short = lambda keep: (text[:(keep + 1) // 2] + '\u2026' +
                        text[len(text) - keep // 2:])
  if draw.textlength(text, font=font) <= width:
    return text
  fits, over = 0, len(text)  # short(fits) fits; short(over) does not.
  while over - fits > 1:
    keep = (fits + over) // 2
    if draw.textlength(short(keep), font=font) <= width:
      fits = keep
    else:
      over = keep
  return short(fits)


def _captioned_grid(images: np.ndarray, captions: Sequence[str],
                    colours: Sequence[str], path: str, *, title: str,
                    cols: int, cell: int, band: int, font_pixels: int) -> None:
  """Images (float [N, H, W, C] in [0, 1]) in a grid of `cols` columns under
  a title, each fitted into a `cell`-pixel square (nearest-neighbour when
  enlarged 2x or more, so small images stay sharp) under its caption (lines
  in a `band` of pixels, each shortened to the cell's width with a gap to
  the next), as a PNG.

  Pillow only: ~0.05 s, where matplotlib took ~1 s with an axes per image
  (and ~0.3 s to load); every build draws samples.png.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n = len(images)
  rows = max(1, -(-n // cols))
  pad, top_band = 10, 50
  width = cols * (cell + pad)
  height = top_band + rows * (cell + band + pad)
  canvas = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(canvas)
  font, title_font = _font(font_pixels), _font(17)
  draw.text((width / 2, top_band / 2),
            _fitted(draw, title, title_font, width - 20), fill='black',
            font=title_font, anchor='mm')
  line_height = round(font_pixels * 1.25)
  most_lines = max(1, (band - 4) // line_height)  # A caption's lines.
  for i in range(n):
    pixels = np.round(np.clip(images[i], 0.0, 1.0) * 255).astype(np.uint8)
    thumb = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1
                            else pixels).convert('RGB')
    scale = cell / max(thumb.size)
    thumb = thumb.resize(
        (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
        Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR)
    r, c = divmod(i, cols)
    cell_top = top_band + r * (cell + band + pad)
    centre = c * (cell + pad) + pad // 2 + cell / 2
    canvas.paste(thumb, (round(centre - thumb.width / 2),
                         cell_top + band + (cell - thumb.height) // 2))
    lines = captions[i].split('\n')
    if len(lines) > most_lines:  # The first lines that fit, and an ellipsis.
      lines = lines[:most_lines - 1] + [lines[most_lines - 1] + ' \u2026']
    for k, line in enumerate(lines):  # The last line just above the image.
      draw.text((centre, cell_top + band - 4 - line_height * (len(lines) - 1 - k)),
                _fitted(draw, line, font, cell - 6), fill=colours[i],
                font=font, anchor='md')
  buffer = io.BytesIO()
  # zlib's fastest level: 0.09 s instead of 0.23 s for a 840x740 grid (a
  # fixed cost of every build's launcher), for a file ~14% larger.
  canvas.save(buffer, format='PNG', compress_level=1)
  files.write_bytes(path, buffer.getvalue())


def plot_sample_grid(images: np.ndarray, labels: Sequence[int],
                     class_names: Sequence[str], path: str, *,
                     title: str, max_images: int = 16) -> None:
  """Images (float [N, H, W, C] in [0, 1]) with their class names, in a grid.

  Shows the first `max_images` (at most MAX_GRID_IMAGES), 4 to 10 columns.
  """
  n = min(max_images, MAX_GRID_IMAGES, len(images))
  _captioned_grid(images[:n], [class_names[int(l)] for l in labels[:n]],
                  ['black'] * n, path, title=title,
                  cols=max(4, min(10, int(np.ceil(np.sqrt(n))))),
                  cell=SAMPLE_SIDE, band=20, font_pixels=13)


def plot_prediction_gallery(images: np.ndarray, captions: Sequence[str],
                            right: Sequence[bool], path: str, *,
                            title: str, cell: int = 160) -> None:
  """Images (float [N, H, W, C] in [0, 1]) captioned, in a grid of up to 6
  columns; a right caption is green and marked with a tick, a wrong one red
  with a cross (so the marks survive a grey print)."""
  n = len(images)
  _captioned_grid(
      images, [('\u2713 ' if ok else '\u2717 ') + caption
               for caption, ok in zip(captions, right)],
      ['#1a7f37' if ok else '#cf222e' for ok in right], path, title=title,
      cols=max(1, min(6, n)), cell=cell, band=60, font_pixels=11)


# The most records write_dataset_samples reads looking for a class's samples
# (a class with fewer train images than the grid shows would otherwise make
# it read the whole split).
MAX_SAMPLE_SCAN = 100_000
# And the most bytes of records: a split of 4,096 x 4,096 images stores
# ~50 MB a record, so 100,000 records could mean terabytes read.
MAX_SAMPLE_SCAN_BYTES = 1 << 30


def _stored_pixels(encoded: bytes, spec, size: tuple[int, int]
                   ) -> np.ndarray | None:
  """A record's stored image as float [h, w, C] in [0, 1], shrunk to `size`
  (width, height; Pillow's antialiased bilinear), or None when it does not
  decode to the dataset's stored size (schema.decode_stored)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  try:
    image = schema.decode_stored(
        encoded, image_format=spec.image_format, height=spec.height,
        width=spec.width, channels=spec.channels)
  except ValueError:  # Damaged: not shown.
    return None
  if image.size != size:
    image = image.resize(size, Image.Resampling.BILINEAR)
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  return pixels[..., None] if spec.channels == 1 else pixels


def write_dataset_samples(data_dir: str, path: str, *,
                          split: str = 'train') -> None:
  """A grid of the first stored images of every class of a split.

  4 images per class for up to 8 classes, fewer per class for more classes,
  so the grid (at most MAX_GRID_IMAGES) shows every class it can. The
  records are read and decoded without TensorFlow (schema.read_records,
  Pillow), as report.html reads them: the build's launcher never loads
  TensorFlow for a local folder (3-6 s of every build).
  """
  import tfrecords_schema  # pylint: disable=g-import-not-at-top
  from tfrecords_schema import schema  # pylint: disable=g-import-not-at-top
  spec = tfrecords_schema.read_dataset_spec(data_dir)
  if split not in spec.splits or not spec.splits[split].shards:
    return
  scale = min(1.0, SAMPLE_SIDE / max(spec.height, spec.width))
  size = (max(1, round(spec.width * scale)), max(1, round(spec.height * scale)))
  per_class = max(1, min(4, MAX_GRID_IMAGES // spec.num_classes // 2))
  wanted = range(min(spec.num_classes, MAX_GRID_IMAGES))
  found = collections.defaultdict(list)
  scanned = scanned_bytes = 0
  # A stored record is its image and a few small features. A JPEG of noise
  # at quality 100 is larger than its raw pixels (2048 px grey: 6.6 MB for
  # 4.2 MB raw; review): a record is skipped only past 4x raw + 1 MiB.
  most_bytes = 4 * spec.height * spec.width * spec.channels + (1 << 20)
  for example, record_bytes in schema.read_examples(
      spec.shard_paths(data_dir, split), max_record_bytes=most_bytes):
    scanned += 1
    scanned_bytes += record_bytes
    label = example.get(schema.LABEL)
    if label in wanted and len(found[label]) < per_class:
      pixels = _stored_pixels(example.get(schema.IMAGE, b''), spec, size)
      if pixels is not None:
        found[label].append(pixels)
    if (scanned >= MAX_SAMPLE_SCAN or scanned_bytes >= MAX_SAMPLE_SCAN_BYTES
        or all(len(found[c]) >= per_class for c in wanted)):
      break
  labels = [c for c in wanted for _ in found[c]]
  if not labels:
    return
  images = np.stack([image for c in wanted for image in found[c]])
  shown = len(set(labels))
  plot_sample_grid(images, labels, spec.class_names, path,
                   title=f'{spec.name}: {split} split, as stored '
                   f'({spec.height}x{spec.width}), {shown} of '
                   f'{spec.num_classes} classes', max_images=len(images))


def _integer_ticks():
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  return matplotlib.ticker.MaxNLocator(integer=True)


def plot_training_curves(rows: Sequence[dict], path: str) -> None:
  """Accuracy and loss per epoch, train vs validation, as the course plots."""
  plt = _pyplot()
  epochs = [r['epoch'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ('accuracy', 'loss')):
    for prefix, style in (('', 'o-'), ('val_', 's--')):
      values = [r.get(prefix + metric) for r in rows]
      if any(v is not None for v in values):
        ax.plot(epochs, values, style,
                label=('validation ' if prefix else 'training ') + metric)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_title(f'Training and validation {metric}')
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)


# Up to this many classes the whole matrix is drawn with a count per cell;
# beyond, the classes most involved in mistakes and the top confusions.
MAX_MATRIX_CLASSES = 20


def most_confused(matrix: np.ndarray, count: int) -> list[tuple[int, int, int]]:
  """(true, predicted, images) of the `count` largest off-diagonal cells,
  largest first (ties: by class indices). matrix: int [K, K]."""
  off = matrix.copy()
  np.fill_diagonal(off, 0)
  flat = np.flatnonzero(off)  # At most one per evaluated image.
  flat = flat[np.lexsort((flat, -off.ravel()[flat]))][:count]
  return [(int(i // off.shape[1]), int(i % off.shape[1]),
           int(off.ravel()[i])) for i in flat]


def _matrix_panel(ax, matrix: np.ndarray, names: Sequence[str]) -> None:
  k = len(names)
  ax.imshow(matrix, cmap='Blues')
  ax.set_xticks(range(k), names, rotation=45, ha='right')
  ax.set_yticks(range(k), names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  threshold = matrix.max() / 2 if matrix.size else 0
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(matrix[i, j]), ha='center', va='center',
              color='white' if matrix[i, j] > threshold else 'black')


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str],
                          path: str, *, title: str) -> None:
  """True vs predicted counts (matrix: int [K, K], rows are true classes).

  Up to MAX_MATRIX_CLASSES classes: the whole matrix. Beyond (a matrix of
  250 or 2,000 classes has no readable cell): the matrix of the
  MAX_MATRIX_CLASSES classes most involved in mistakes, and a bar chart of
  the most frequent (true -> predicted) confusions. The cost is bounded
  whatever the class count.
  """
  plt = _pyplot()
  k = len(class_names)
  if k <= MAX_MATRIX_CLASSES:
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    _matrix_panel(ax, matrix, class_names)
    ax.set_title(title)
  else:
    top = most_confused(matrix, MAX_MATRIX_CLASSES)
    # The classes of the top confusions, then those with most mistakes.
    errors = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
    order = [c for t, p, _ in top for c in (t, p)] + list(
        np.argsort(-errors, kind='stable'))
    chosen = sorted(list(dict.fromkeys(int(c) for c in order))[
        :MAX_MATRIX_CLASSES])
    fig, (left, right) = plt.subplots(1, 2, figsize=(22, 11))
    _matrix_panel(left, matrix[np.ix_(chosen, chosen)],
                  [class_names[i] for i in chosen])
    left.set_title(f'the {len(chosen)} classes of the top confusions')
    labels = [f'{class_names[t]} -> {class_names[p]}' for t, p, _ in top]
    right.barh(range(len(top)), [n for _, _, n in top], color='tab:red')
    right.set_yticks(range(len(top)), labels)
    right.invert_yaxis()
    right.set_xlabel('images')
    right.set_title('most frequent confusions (true -> predicted)')
    right.xaxis.set_major_locator(_integer_ticks())
    correct = int(np.trace(matrix))
    fig.suptitle(f'{title}: {k} classes, {correct} of {int(matrix.sum())} '
                 'images right')
  fig.tight_layout()
  _save(fig, path)
