"""report.html: the one page a person reads after a build.

`write_report_page` reads a finished dataset folder (build_report.json,
metadata.json, rejected.jsonl, near_duplicates.jsonl, the train shards and,
when present, images.jsonl) and writes one self-contained HTML file: inline
CSS, thumbnails as base64 JPEG data URIs, no script, nothing fetched.

Sections, in page order:
  header       dataset, input folder, settings (image, seed, fractions,
               near-duplicate distance), timings
  counts       seen = written + each outcome, with the sum checked
  classes      images per class and split; 0 or few in validation/test
               highlighted; classes a model cannot learn
  samples      stored train images per class, decoded from the shards
  rejected     path / outcome / reason, a thumbnail of the source file
  duplicates, label conflicts, leaks (same bytes, build_report.json)
  near-duplicates  both thumbnails, paths, splits, classes, distance, and
               which file was left out (near_duplicates.jsonl)
  quality flags    one section per flag of images.jsonl (when present)
  capped groups of the near-duplicate search; warnings

Every section is capped: JSONL files are streamed (the lines past a cap are
counted, not parsed) and a line says how many were not shown and where they
are. Source files are read for thumbnails only up to MAX_SOURCE_BYTES and
MAX_SOURCE_PIXELS (devices and FIFOs never: source_image.read_source, the
build's own read); anything Pillow cannot decode has no thumbnail. Every text from a file goes through
html.escape, cut to MAX_SHOWN_CHARS.

Worst-case size, whatever the file count (a million files included), for
the build's own files with file and class names of any length and
characters: a shown path, class or outcome is cut to MAX_SHOWN_CHARS (100)
characters, a reason or warning to MAX_REASON_CHARS (240), each character
at most 6 bytes (`"` escapes to `&quot;`); a thumbnail is at most
MAX_THUMBNAIL_BYTES (6 KiB), 8.2 KB as base64.
  thumbnails: sample grid SAMPLE_CLASSES x SAMPLES_PER_CLASS (40 x 6),
    MAX_THUMBNAILS (40) for rejected files, duplicates, label conflicts,
    leaks and near-duplicates (20 pairs), and for each of
    MAX_FLAG_SECTIONS (6) quality flags: 680 x 8.3 KB             <=  5.7 MB
  text, MAX_TABLE_ROWS (500) rows a table, every text at its cap
    (measured): classes 1.3 MB (counts and classes a model cannot
    learn), rejected 1.3 MB, duplicates + conflicts + leaks 4.3 MB
    (MAX_PATHS_PER_FINDING, 3, paths a row), near-duplicates 1.8 MB,
    warnings and capped groups 1.4 MB, captions 0.5 MB             10.7 MB
  total                                     <= 16.4 MB (WORST_CASE_BYTES: 17 MB)
tests/pipelines/folder_to_records/test_report_page.py builds that worst case
(every cap full, every text `"` past its cap, thumbnails of noise, 50,000
lines in rejected.jsonl): 14.3 MB in about 1 s. A real build's page is far
smaller (tens of KB for a few hundred files).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import json
import posixpath
import warnings
from typing import Iterable, Optional, Sequence

from PIL import Image
from PIL import ImageOps

from pipelines import plots
from pipelines.folder_to_records import chunk_format
from pipelines.folder_to_records import near_duplicates as near_lib
from pipelines.folder_to_records import summary as summary_lib
from pipelines.preprocessing import source_image
from tfrecords_schema import files
from tfrecords_schema import metadata as metadata_lib
from tfrecords_schema import report as report_lib
from tfrecords_schema import schema

# Thumbnails: longest side, JPEG quality; one over MAX_THUMBNAIL_BYTES is
# encoded again at _SMALLER_QUALITY, and left out if still over.
THUMBNAIL_SIDE = 96
THUMBNAIL_QUALITY = 70
_SMALLER_QUALITY = 30
MAX_THUMBNAIL_BYTES = 6 << 10
# Source files read for a thumbnail: larger ones get none (never read past
# this), nor do images of more pixels (decompression bombs).
MAX_SOURCE_BYTES = 20 << 20
MAX_SOURCE_PIXELS = 50_000_000
# Caps of each section.
MAX_THUMBNAILS = 40       # source files read per section
MAX_TABLE_ROWS = 500      # rows per table
MAX_SHOWN_CHARS = 100     # characters of one path, class name, outcome
MAX_REASON_CHARS = 240    # characters of one reason or warning
MAX_PATHS_PER_FINDING = 3  # copies named per duplicate / conflict / leak
SAMPLE_CLASSES = 40       # classes of the sample grid
SAMPLES_PER_CLASS = 6
MAX_FLAG_SECTIONS = 6     # quality flags shown (the most frequent)
MAX_FLAG_NAMES = 200      # distinct flag names counted (the rest: 'other')
# The sample grid reads train records until every shown class is full, or
# this many records or bytes (a 4096-px raw record is 50 MB) were read.
MAX_SCANNED_RECORDS = 20_000
MAX_SCANNED_BYTES = 256 << 20
# Fewer evaluation images than this for a class are highlighted: its
# accuracy then moves in steps of more than 20%.
FEW_EVALUATION_IMAGES = 5
# The bound of the module docstring, rounded up (the tests check it).
WORST_CASE_BYTES = 17_000_000

_NOT_DECODED = '&ndash;'
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1300px;
 padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}
h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em;
 padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .3em}
nav{margin:1em 0;line-height:2}
nav a{margin-right:1.2em;white-space:nowrap}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.zero{background:#f6c6c6;font-weight:bold}
.few{background:#fde3b0}
td.total{font-weight:bold;border-top:2px solid #999}
.path{font-family:ui-monospace,monospace;font-size:12px;overflow-wrap:anywhere}
td{min-width:4em}
.more{color:#555;font-style:italic}
.ok{color:#176b17;font-weight:bold}
.bad{color:#b00;font-weight:bold}
.legend span{padding:1px 6px;margin-right:.6em}
.grid{display:flex;flex-wrap:wrap;gap:4px;margin:.2em 0 .8em}
figure{margin:0;width:100px;text-align:center}
figcaption{font-size:10px;word-break:break-all;color:#444}
img{border:1px solid #bbb;image-rendering:pixelated;background:#eee}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}
dt{font-weight:bold}
dd{margin:0}
"""


# --- Reading the dataset folder ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Capped:
  """The first items of a stream, and how many it held in all."""
  shown: list
  total: int

  @property
  def hidden(self) -> int:
    return self.total - len(self.shown)


def stream_jsonl(path: str, cap: int, *,
                 total: Optional[int] = None) -> Optional[Capped]:
  """The first `cap` JSON objects of a JSONL file and its count of lines:
  the lines past the cap are counted, never parsed or kept (a million-line
  file costs one read), unless `total` (the count the build wrote) is
  given: then they are not read. A line that is no JSON object is skipped.
  None when the file is absent."""
  if not files.exists(path):
    return None
  shown, counted = [], 0
  with files.open_binary(path) as f:
    for line in f:
      if not line.strip():
        continue
      counted += 1
      if len(shown) >= cap and total is not None:
        break
      if len(shown) < cap:
        with contextlib.suppress(ValueError):
          value = json.loads(line)
          if isinstance(value, dict):
            shown.append(value)
  return Capped(shown, counted if total is None else max(total, len(shown)))


# --- Thumbnails -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Thumbnail:
  """A JPEG thumbnail: its data URI and pixel size."""
  uri: str
  width: int
  height: int


def _rgb(image: Image.Image) -> Image.Image:
  """RGB, transparent parts on white (not on whatever the pixels hold)."""
  if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
    rgba = image.convert('RGBA')
    background = Image.new('RGB', rgba.size, 'white')
    background.paste(rgba, mask=rgba.getchannel('A'))
    return background
  return image.convert('RGB')


def thumbnail(image: Image.Image) -> Optional[Thumbnail]:
  """image shrunk to THUMBNAIL_SIDE as a JPEG data URI, at most
  MAX_THUMBNAIL_BYTES (None if even _SMALLER_QUALITY is over)."""
  image = _rgb(image)
  image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
  for quality in (THUMBNAIL_QUALITY, _SMALLER_QUALITY):
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=quality)
    if buffer.tell() <= MAX_THUMBNAIL_BYTES:
      uri = ('data:image/jpeg;base64,' +
             base64.b64encode(buffer.getvalue()).decode('ascii'))
      return Thumbnail(uri, *image.size)
  return None


def source_thumbnail(path: str) -> Optional[Thumbnail]:
  """A thumbnail of a source image file, or None: over MAX_SOURCE_BYTES or
  MAX_SOURCE_PIXELS, not a regular file, or anything Pillow cannot do."""
  try:
    # The build's own safe read: regular files only, at most
    # MAX_SOURCE_BYTES, an image signature first (ImageRejected otherwise).
    data = source_image.read_source(path, max_bytes=MAX_SOURCE_BYTES)
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_SOURCE_PIXELS:
          return None
        # JPEGs decode at 1/2..1/8 scale: a 50 MP photo costs little.
        image.draft('RGB', (THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))
        return thumbnail(ImageOps.exif_transpose(image))
  except Exception:  # pylint: disable=broad-except
    return None  # Whatever went wrong, the row stays without a picture.


def stored_thumbnail(encoded: bytes, spec: metadata_lib.DatasetSpec
                     ) -> Optional[Thumbnail]:
  """A thumbnail of a stored image (the record's `image`), or None when it
  does not decode to the dataset's stored size (schema.decode_stored)."""
  try:
    return thumbnail(schema.decode_stored(
        encoded, image_format=spec.image_format, height=spec.height,
        width=spec.width, channels=spec.channels))
  except ValueError:
    return None


class SourceImages:
  """Thumbnails of the source files of one section: at most `cap` files are
  read (time and size stay bounded), the rest show none."""

  def __init__(self, input_dir: str, cap: int = MAX_THUMBNAILS):
    self._input_dir = input_dir
    self._left = cap

  def img(self, relpath: str) -> str:
    """An <img> of input_dir/relpath, or a dash."""
    if self._left <= 0 or posixpath.splitext(
        relpath.lower())[1] not in files.IMAGE_EXTENSION_FORMATS:
      return _NOT_DECODED
    self._left -= 1
    thumb = source_thumbnail(posixpath.join(self._input_dir, relpath))
    return _img(thumb) if thumb else _NOT_DECODED


# --- HTML pieces ----------------------------------------------------------


def _shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
  if len(text) <= limit:
    return text
  half = (limit - 1) // 2
  return text[:half] + '\u2026' + text[-half:]


def _e(value, limit: int = MAX_SHOWN_CHARS) -> str:
  """Any value from a file as safe HTML text, cut to `limit` characters."""
  return html.escape(_shorten(str(value), limit))


def _reason(value) -> str:
  return _e(value, MAX_REASON_CHARS)


def _path(value) -> str:
  return f'<span class="path">{_e(value)}</span>'


def _img(thumb: Thumbnail) -> str:
  # Shown with its longest side at THUMBNAIL_SIDE: small stored images
  # (32 px) are enlarged on screen, not in bytes.
  scale = THUMBNAIL_SIDE / max(thumb.width, thumb.height)
  return (f'<img src="{thumb.uri}" width="{round(thumb.width * scale)}" '
          f'height="{round(thumb.height * scale)}" alt="">')


def _figure(image_html: str, caption: str) -> str:
  return f'<figure>{image_html}<figcaption>{caption}</figcaption></figure>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
           numeric: Sequence[int] = ()) -> str:
  """A table of already-escaped cells; columns in `numeric` align right.
  A cell given as (html, css class) gets that class."""
  def cell(i, value, tag):
    css = value[1] if isinstance(value, tuple) else ''
    css = ' '.join(filter(None, (css, 'n' if i in numeric else '')))
    text = value[0] if isinstance(value, tuple) else value
    attribute = f' class="{css}"' if css else ''
    return f'<{tag}{attribute}>{text}</{tag}>'
  head = ''.join(cell(i, h, 'th') for i, h in enumerate(headers))
  body = ''.join('<tr>' + ''.join(cell(i, v, 'td') for i, v in enumerate(r))
                 + '</tr>' for r in rows)
  return f'<table><tr>{head}</tr>{body}</table>'


def _more(hidden: int, where: str) -> str:
  if hidden <= 0:
    return ''
  return f'<p class="more">{hidden:,} more not shown (see {where})</p>'


def _section(anchor: str, title: str, body: str) -> str:
  return f'<section id="{anchor}"><h2>{title}</h2>{body}</section>'


def _names(paths: Sequence[str], limit: int = MAX_PATHS_PER_FINDING) -> str:
  shown = '<br>'.join(_path(p) for p in paths[:limit])
  if len(paths) > limit:
    shown += f'<br><span class="more">and {len(paths) - limit:,} more</span>'
  return shown


# --- Sections -------------------------------------------------------------


def _header(report: report_lib.BuildReport, input_dir: str) -> str:
  fraction = lambda f: 'n/a (split folders)' if f is None else _e(f)
  settings = {
      'input folder': _path(input_dir),
      'layout': _e(report.layout),
      'classes': _e(len(report.class_names)),
      'image': ', '.join(f'{_e(k)}={_e(v)}' for k, v in report.image.items()),
      'seed': _e(report.seed),
      'validation_fraction': fraction(report.validation_fraction),
      'test_fraction': fraction(report.test_fraction),
      'near_duplicate_distance': _e(report.near_duplicates.distance),
      'elapsed': f'{_e(report.elapsed_s)} s ({_e(report.images_per_s)} '
                 f'images/s; writing {_e(report.write_stage_s)} s)',
      'bytes written': f'{report.bytes_written / 1e6:.1f} MB',
  }
  items = ''.join(f'<dt>{k}</dt><dd>{v}</dd>' for k, v in settings.items())
  return (f'<h1>Build report: {_e(report.dataset_name)}</h1>'
          f'<section id="settings"><dl>{items}</dl></section>')


def _counts(report: report_lib.BuildReport) -> str:
  rows = [('written', f'{report.written:,}')]
  rows += [(_e(k), f'{n:,}') for k, n in report.not_written.items()]
  rows.append((('seen', 'total'), (f'{report.seen:,}', 'total')))
  total = report.written + sum(report.not_written.values())
  check = ('<span class="ok">adds up</span>' if total == report.seen else
           f'<span class="bad">does not add up ({total:,} != '
           f'{report.seen:,})</span>')
  return _section('counts', 'Counts', (
      '<p>Every file the build looked at is written or has one outcome: '
      f'written + each outcome = seen ({check}).</p>' +
      _table(('outcome', 'files'), rows, numeric=(1,))))


def _class_highlights(report: report_lib.BuildReport) -> dict:
  """(class, split) -> 'zero' or 'few' for the cells to highlight."""
  thin = {(name, split) for name, split, _, _ in
          summary_lib.thin_evaluation_classes(report)}
  marks = {}
  for split, info in report.splits.items():
    evaluation = split != 'train'
    if evaluation and not info.total:
      continue  # A split the build has no images for: nothing to flag.
    for name in report.class_names:
      n = info.per_class.get(name, 0)
      if n == 0:
        marks[name, split] = 'zero'
      elif evaluation and (n < FEW_EVALUATION_IMAGES or (name, split) in thin):
        marks[name, split] = 'few'
  return marks


def _classes(report: report_lib.BuildReport) -> str:
  splits = [s for s, info in report.splits.items()
            if info.total or s == 'train']
  marks = _class_highlights(report)
  flagged = {name for name, _ in marks}
  # Over the cap, the highlighted classes are the ones kept.
  names = sorted(report.class_names, key=lambda c: (c not in flagged, c))
  names = sorted(names[:MAX_TABLE_ROWS])
  rows = [[_e(name)] + [(f'{report.splits[s].per_class.get(name, 0):,}',
                         marks.get((name, s), '')) for s in splits]
          for name in names]
  rows.append([('all', 'total')] + [(f'{report.splits[s].total:,}', 'total')
                                     for s in splits])
  legend = (
      '<p class="legend"><span class="zero">0 images</span>'
      '<span class="few">few in validation/test '
      f'(under {FEW_EVALUATION_IMAGES}, or at most half the class\'s share)'
      '</span></p>')
  empty_classes = report.empty_classes or ()
  empty = ''.join(f'<li>{_e(c.class_name)}: {_reason(c.warning)}</li>'
                  for c in empty_classes[:MAX_TABLE_ROWS])
  # The red cells name them; a line per split gives the count.
  missing = ''.join(
      f'<li>{_e(split)}: {len(absent):,} classes without an image</li>'
      for split, absent in report.classes_without_examples.items() if absent)
  body = (legend + _table(['class', *splits], rows,
                          numeric=range(1, len(splits) + 1)) +
          _more(len(report.class_names) - len(names),
                f'{metadata_lib.REPORT_FILE}: splits, per_class'))
  if empty:
    body += (f'<h3>Classes a model cannot learn</h3><ul>{empty}</ul>' + _more(
        len(empty_classes) - MAX_TABLE_ROWS,
        f'{metadata_lib.REPORT_FILE}: empty_classes'))
  if missing:
    body += f'<ul>{missing}</ul>'
  return _section('classes', 'Images per class', body)


def _sample_scan(dataset_dir: str, spec: metadata_lib.DatasetSpec,
                 labels: set) -> tuple[dict, int]:
  """label -> [(Thumbnail, source path)] of the first SAMPLES_PER_CLASS
  train records of each of `labels`, and the records read (stops at
  MAX_SCANNED_RECORDS or MAX_SCANNED_BYTES)."""
  found = {label: [] for label in labels}
  scanned = read_bytes = 0
  for example, size in schema.read_examples(
      spec.shard_paths(dataset_dir, 'train'),
      max_record_bytes=MAX_SCANNED_BYTES):
    scanned += 1
    read_bytes += size
    label = example.get(schema.LABEL)
    if label in found and len(found[label]) < SAMPLES_PER_CLASS:
      thumb = stored_thumbnail(example.get(schema.IMAGE, b''), spec)
      name = example.get(schema.FILENAME, b'').decode('utf-8', 'replace')
      if thumb:
        found[label].append((thumb, name))
    if (all(len(v) >= SAMPLES_PER_CLASS for v in found.values()) or
        scanned >= MAX_SCANNED_RECORDS or read_bytes >= MAX_SCANNED_BYTES):
      break
  return found, scanned


def _samples(dataset_dir: str) -> str:
  title = 'Stored train images per class'
  try:
    spec = metadata_lib.read_dataset_spec(dataset_dir)
  except metadata_lib.DatasetError as e:
    return _section('samples', title, f'<p>No samples: {_e(e)}</p>')
  if 'train' not in spec.splits:
    return _section('samples', title, '<p>No train split.</p>')
  labels = range(min(spec.num_classes, SAMPLE_CLASSES))
  found, scanned = _sample_scan(dataset_dir, spec, set(labels))
  body = (f'<p>Up to {SAMPLES_PER_CLASS} images per class as stored '
          f'({spec.height}x{spec.width} {_e(spec.image_format)}), read from '
          f'the first {scanned:,} train records; caption: the source '
          'file\'s name.</p>')
  for label in labels:
    name = spec.class_names[label]
    figures = ''.join(_figure(_img(t), _path(posixpath.basename(p)))
                      for t, p in found[label])
    body += (f'<h3>{_e(name)} ({spec.splits["train"].class_counts[label]:,} '
             f'in train)</h3><div class="grid">{figures or "none found"}'
             '</div>')
  body += _more(spec.num_classes - len(labels),
                f'{plots.SAMPLES_FILE} for a grid of every class')
  return _section('samples', title, body)


def _rejected(dataset_dir: str, input_dir: str) -> str:
  lines = stream_jsonl(posixpath.join(dataset_dir, metadata_lib.REJECTED_FILE),
                       MAX_TABLE_ROWS)
  title = 'Files not written'
  if lines is None:
    return _section('rejected', title, f'<p>No {metadata_lib.REJECTED_FILE}.'
                    '</p>')
  images = SourceImages(input_dir)
  rows = [(images.img(str(line.get('path', ''))), _path(line.get('path', '')),
           _e(line.get('outcome', '')), _reason(line.get('reason', '')))
          for line in lines.shown]
  body = (f'<p>{lines.total:,} files; thumbnails of the source files (the '
          f'first {MAX_THUMBNAILS} images; none where Pillow cannot decode '
          'the file).</p>' if lines.total else '<p>None.</p>')
  if rows:
    body += _table(('', 'path', 'outcome', 'reason'), rows)
  body += _more(lines.hidden, f'{metadata_lib.REJECTED_FILE}: one line per '
                'file with its path, outcome and reason')
  return _section('rejected', f'{title} ({lines.total:,})', body)


def _kept_row(finding: report_lib.Finding, images: SourceImages) -> tuple:
  """A duplicate or leak: the copy written and those left out."""
  kept = finding.kept or ''
  return images.img(kept), _path(kept), _names(finding.dropped or [])


def _conflict_row(finding: report_lib.Finding, images: SourceImages
                  ) -> tuple:
  """A label conflict: its classes and copies (all left out)."""
  paths = finding.paths or ['']
  return images.img(paths[0]), _names(finding.classes or []), _names(paths)


# Files of the same bytes (build_report.json): title, field, headers, row.
_SAME_BYTES = (
    ('Duplicates (same class: one copy written)', 'duplicates',
     ('', 'written', 'copies left out'), _kept_row),
    ('Label conflicts (several classes: every copy left out)', 'conflicts',
     ('', 'classes', 'copies (all left out)'), _conflict_row),
    ('Leaks (also in train: the evaluation copy left out)', 'leaks',
     ('', 'written (train)', 'left out of validation/test'), _kept_row))


def _findings(report: report_lib.BuildReport, input_dir: str) -> str:
  """Exact duplicates, label conflicts and leaks, a thumbnail each (the
  copies hold the same bytes)."""
  body = ''
  for title, field, headers, row in _SAME_BYTES:
    findings = getattr(report, field)
    images = SourceImages(input_dir)
    rows = [row(f, images) for f in findings[:MAX_TABLE_ROWS]]
    body += f'<h3>{title}: {len(findings):,}</h3>'
    if rows:
      body += _table(headers, rows) + _more(
          len(findings) - len(rows), f'{metadata_lib.REPORT_FILE}: {field}')
  return _section('same-bytes', 'Same bytes: duplicates, label conflicts, '
                  'leaks', body)


def _near_row(pair: dict, images: SourceImages) -> list[str]:
  paths = [str(p) for p in (pair.get('paths') or ['', ''])[:2]]
  splits = list(pair.get('splits') or ['', ''])[:2]
  classes = list(pair.get('classes') or ['', ''])[:2]
  left_out = 'none (reported only)'
  if pair.get('kind') == near_lib.LEAK and 'train' in splits:
    left_out = _path(paths[1 - splits.index('train')])
  sides = [f'{_path(p)}<br>{_e(s)}, class {_e(c)}'
           for p, s, c in zip(paths, splits, classes)]
  conflict = ' <span class="bad">label conflict</span>' if pair.get(
      'label_conflict') else ''
  return [images.img(paths[0]), images.img(paths[-1]), *sides,
          (_e(pair.get('distance', '')), ''), _e(pair.get('kind', '')) +
          conflict, left_out]


def _near(report: report_lib.BuildReport, dataset_dir: str,
          input_dir: str) -> str:
  near = report.near_duplicates
  title = 'Near-duplicates'
  if not near.distance:
    return _section('near', title, '<p>Not searched '
                    '(--near_duplicate_distance=0).</p>')
  # Counted by the build: the file is not read past the rows shown.
  pairs = stream_jsonl(posixpath.join(
      dataset_dir, metadata_lib.NEAR_DUPLICATES_FILE), MAX_TABLE_ROWS,
                       total=near.listed or None)
  counts = (('images with a near copy', near.images),
            (f'pairs listed in {metadata_lib.NEAR_DUPLICATES_FILE} (each '
             "image's nearest in each split and of another class)",
             near.listed),
            ('leaks: images with a copy across train and validation/test',
             near.leaks),
            ('evaluation images left out for them', near.left_out),
            ('images with a copy in their own split (reported only)',
             near.within_split),
            ('validation images with a copy in test, and the reverse '
             '(reported only)', near.across_evaluation_splits),
            ('images with a copy of another class (possible label '
             'conflicts)', near.label_conflicts))
  body = (f'<p>Images whose perceptual hashes differ in at most '
          f'{near.distance} of 64 bits.</p>' + _table(
              ('', 'count'), [(k, f'{n:,}') for k, n in counts], numeric=(1,)))
  if pairs is None:
    body += f'<p>No {metadata_lib.NEAR_DUPLICATES_FILE}.</p>'
  elif pairs.shown:
    images = SourceImages(input_dir)
    rows = [_near_row(pair, images) for pair in pairs.shown]
    body += _table(('a', 'b', 'file a', 'file b', 'distance', 'kind',
                    'left out'), rows, numeric=(4,))
    body += _more(pairs.hidden, f'{metadata_lib.NEAR_DUPLICATES_FILE}: one '
                  'pair a line')
  return _section('near', f'{title} ({near.images:,} images)', body)


# How chunk_format.image_line writes an image with no flag: in a line it
# wrote (its check holds), these bytes can be nothing else (a quote inside
# a JSON string is escaped), so the line needs no parse (~10 µs a line:
# 0.3-0.8 s of every 30,000-image build's wall time).
_NO_FLAGS = b'"flags": [],'


def _flag_counts(path: str) -> tuple[dict, dict, int]:
  """images.jsonl streamed: flag -> count, flag -> its first MAX_THUMBNAILS
  (path, split), and the lines read."""
  counts, first, lines = {}, {}, 0
  with files.open_binary(path) as f:
    for line in f:
      if _NO_FLAGS in line and chunk_format.checked_text(line) is not None:
        lines += 1  # As the build wrote it (a JSON object), no flag.
        continue
      with contextlib.suppress(ValueError):
        entry = json.loads(line)
        if not isinstance(entry, dict):
          continue
        lines += 1
        flags = entry.get('flags')
        for flag in flags if isinstance(flags, list) else ():
          flag = str(flag)
          if flag not in counts and len(counts) >= MAX_FLAG_NAMES:
            flag = 'other'
          counts[flag] = counts.get(flag, 0) + 1
          shown = first.setdefault(flag, [])
          if len(shown) < MAX_THUMBNAILS:
            shown.append((str(entry.get('path', '')),
                          str(entry.get('split', ''))))
  return counts, first, lines


def _quality(dataset_dir: str, input_dir: str) -> str:
  title = 'Image-quality flags'
  path = posixpath.join(dataset_dir, metadata_lib.IMAGES_FILE)
  if not files.exists(path):
    return _section('quality', title, f'<p>No {metadata_lib.IMAGES_FILE} '
                    'in this dataset: no quality flags.</p>')
  counts, first, lines = _flag_counts(path)
  ranked = sorted(counts, key=lambda k: (-counts[k], k))
  body = (f'<p>{lines:,} images checked; ' + (', '.join(
      f'{_e(k)}: {counts[k]:,}' for k in ranked[:MAX_TABLE_ROWS]) or
      'none flagged') + '.</p>')
  for flag in ranked[:MAX_FLAG_SECTIONS]:
    images = SourceImages(input_dir)
    figures = ''.join(_figure(images.img(p), f'{_path(p)}<br>{_e(s)}')
                      for p, s in first[flag])
    body += (f'<h3>{_e(flag)} ({counts[flag]:,})</h3>'
             f'<div class="grid">{figures}</div>' +
             _more(counts[flag] - len(first[flag]),
                   f'{metadata_lib.IMAGES_FILE}: the flags of every image'))
  body += _more(len(ranked) - MAX_FLAG_SECTIONS,
                f'{metadata_lib.IMAGES_FILE}; flags above are the most '
                'frequent')
  return _section('quality', title, body)


def _capped_and_warnings(report: report_lib.BuildReport) -> str:
  where = metadata_lib.REPORT_FILE
  capped = report.near_duplicates.capped_groups
  body = (f'<h3>Capped groups of the near-duplicate search: {len(capped):,}'
          '</h3>')
  if capped:
    body += ('<p>Groups of images sharing one hash band too large to compare '
             f'whole (over {near_lib.MAX_GROUP:,} hashes, e.g. many blank '
             'images): only the first (by a hash of their path) were '
             'compared there. Two images that no group compared are not '
             'found as near copies.</p>' + _table(
                 ('band', 'members', 'compared', 'example'),
                 [(_e(c.band), _e(c.members), _e(c.compared),
                   _path(c.example))
                  for c in capped[:MAX_TABLE_ROWS]],
                 numeric=(0, 1, 2)) +
             _more(len(capped) - MAX_TABLE_ROWS, f'{where}: near_duplicates'))
  file_warnings = report.warnings
  body += f'<h3>Warnings about written images: {len(file_warnings):,}</h3>'
  if file_warnings:
    body += _table(('path', 'warning'), [
        (_path(w.path), _reason(w.warning))
        for w in file_warnings[:MAX_TABLE_ROWS]])
    body += _more(len(file_warnings) - MAX_TABLE_ROWS, f'{where}: warnings')
  if report.class_gap_error:
    body += f'<p class="bad">{_reason(report.class_gap_error)}</p>'
  return _section('warnings', 'Capped groups and warnings', body)


def _nav(report: report_lib.BuildReport) -> str:
  links = (('counts', 'Counts'), ('classes', 'Classes'),
           ('samples', 'Samples'),
           ('rejected', f'Not written ({report.seen - report.written:,})'),
           ('same-bytes', 'Same bytes ({:,})'.format(
               len(report.duplicates) + len(report.conflicts) +
               len(report.leaks))),
           ('near', f'Near-duplicates ({report.near_duplicates.images:,})'),
           ('quality', 'Quality flags'),
           ('warnings', f'Warnings ({len(report.warnings):,})'))
  return '<nav>' + ''.join(f'<a href="#{a}">{t}</a>' for a, t in links) + (
      '</nav>')


def render(dataset_dir: str, input_dir: str) -> str:
  """The page's HTML. ValueError when dataset_dir has no build report."""
  report = report_lib.read_build_report(dataset_dir)
  if report is None:
    raise ValueError(f'{dataset_dir} holds no readable '
                     f'{metadata_lib.REPORT_FILE}')
  parts = (
      _header(report, input_dir), _nav(report), _counts(report),
      _classes(report), _samples(dataset_dir),
      _rejected(dataset_dir, input_dir), _findings(report, input_dir),
      _near(report, dataset_dir, input_dir), _quality(dataset_dir, input_dir),
      _capped_and_warnings(report))
  title = _e(f'Build report: {report.dataset_name}')
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>{title}</title><style>{_STYLE}</style></head><body>' +
          '\n'.join(parts) + '</body></html>\n')


def write_report_page(dataset_dir: str, input_dir: str, path: str) -> None:
  """Writes report.html for a finished build.

  Args:
    dataset_dir: the build's folder (build_report.json and the rest).
    input_dir: the image folder the build read (source thumbnails).
    path: the HTML file to write (one write, once the page is whole).
  """
  files.write_bytes(path, render(dataset_dir, input_dir).encode('utf-8'))
