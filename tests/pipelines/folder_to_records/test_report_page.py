"""report.html: every planted file listed, every thumbnail decodes (in
Pillow and in a real browser), hostile names escaped, every section capped
at any file count, and a page that fails to draw never fails the build."""

import base64
import collections
import html.parser
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import time

from PIL import Image
import numpy as np
import pytest

from pipelines.folder_to_records import builder
from pipelines.folder_to_records import near_duplicates as near_lib
from pipelines.folder_to_records import report_page
from pipelines.folder_to_records import summary
from tests import helpers
from tfrecords_schema import metadata
from tfrecords_schema import report as report_lib
from tfrecords_schema import schema

HOSTILE = '<b>&"\'x'  # A file name that must stay text.
DATA_URI = 'data:image/jpeg;base64,'
# What the fixture plants, relpath -> where the page must list it.
PLANTED = {
    'train/cat/chelsea_0.jpg': 'duplicate (kept)',
    'train/cat/chelsea_0_copy.jpg': 'duplicate (left out)',
    'train/cat/camera.png': 'label conflict',
    'train/coffee/camera.png': 'label conflict',
    'train/coffee/truncated.jpg': 'rejected_corrupt',
    f'train/rocket/{HOSTILE}.jpg': 'rejected_corrupt',
    'train/rocket/png_inside.jpg': 'warning',
    'train/rocket/astronaut.jpg': 'near-duplicate (train)',
    'validation/rocket/astronaut_small.jpg': 'near-duplicate leak',
}


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  image.convert('RGB').save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _plant(images: pathlib.Path) -> None:
  copy = images / 'train/cat/chelsea_0_copy.jpg'
  shutil.copyfile(images / 'train/cat/chelsea_0.jpg', copy)
  camera = _jpeg(Image.fromarray(helpers.photo('camera')))
  for cls in ('cat', 'coffee'):  # Same bytes in two classes.
    helpers.write(images / f'train/{cls}/camera.png', camera)
  good = _jpeg(Image.fromarray(helpers.photo('coins')))
  helpers.write(images / 'train/coffee/truncated.jpg', good[:len(good) // 3])
  helpers.write(images / f'train/rocket/{HOSTILE}.jpg', b'not a picture')
  helpers.save(images / 'train/rocket/png_inside.jpg',
               Image.fromarray(helpers.photo('moon')), format='PNG')
  astronaut = Image.fromarray(helpers.photo('astronaut'))
  helpers.write(images / 'train/rocket/astronaut.jpg', _jpeg(astronaut))
  helpers.write(images / 'validation/rocket/astronaut_small.jpg',
                _jpeg(astronaut.resize((200, 200)), 60))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(input folder, dataset folder, build report) of a pre-split build of
  real photos with every planted file."""
  root = tmp_path_factory.mktemp('report_page')
  images = root / 'images'
  helpers.photo_folder(images, layout='splits', size=96,
                       per_class={'train': 3, 'validation': 2, 'test': 2})
  _plant(images)
  out = root / 'dataset'
  report = builder.build(input_dir=str(images), output_dir=str(out),
                         image_size='32', quiet=True)
  return images, out, report


class _Page(html.parser.HTMLParser):
  """The text, the tags and every <img> src of a page."""

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.tags, self.srcs, self.hrefs, self.chunks = [], [], [], []
    self.feed(text)
    self.close()

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    if tag == 'img':
      self.srcs.append(dict(attrs)['src'])
    if 'href' in dict(attrs):
      self.hrefs.append(dict(attrs)['href'])

  def handle_data(self, data):
    self.chunks.append(data)

  @property
  def text(self) -> str:
    return ''.join(self.chunks)


def _decoded(src: str) -> Image.Image:
  assert src.startswith(DATA_URI), src[:40]
  image = Image.open(io.BytesIO(base64.b64decode(src[len(DATA_URI):])))
  image.load()
  return image


def test_the_build_writes_the_page_and_the_summary_points_at_it(built):
  _, out, report = built
  assert (out / metadata.REPORT_PAGE_FILE).is_file()
  lines = summary.format_summary(report).splitlines()
  assert (f'report: {out}/{metadata.REPORT_PAGE_FILE} (open in a browser: '
          'classes, rejected files, duplicates, near-duplicates)') in lines
  # The fixture holds what the page must show.
  assert report['counts'] == {
      'seen': 29, 'written': 23, 'duplicate': 1, 'label_conflict': 2,
      'near_duplicate_leak': 1, 'rejected_corrupt': 2}
  near = report['near_duplicates']  # A pair: two images, one left out.
  assert (near['leaks'], near['left_out']) == (2, 1)


def test_every_planted_file_is_listed_and_escaped(built):
  _, out, report = built
  raw = (out / metadata.REPORT_PAGE_FILE).read_text()
  page = _Page(raw)
  missing = [p for p in PLANTED if p not in page.text]
  assert not missing, missing
  # The hostile name is text: no <b> element anywhere, its escape in the
  # source, never its raw form.
  assert 'b' not in page.tags
  assert HOSTILE not in raw and '&lt;b&gt;&amp;&quot;&#x27;x' in raw
  # Self-contained: no script, nothing fetched, links only inside.
  assert not {'script', 'link', 'iframe', 'object'} & set(page.tags)
  assert page.hrefs and all(h.startswith('#') for h in page.hrefs)
  assert 'url(' not in raw and '@import' not in raw
  # The counts add up where the reader checks them.
  assert 'adds up' in page.text and 'does not add up' not in page.text
  for cls, n in report['splits']['train']['per_class'].items():
    assert f'{cls} ({n} in train)' in page.text


def test_every_thumbnail_is_a_jpeg_that_decodes(built):
  _, out, _ = built
  srcs = _Page((out / metadata.REPORT_PAGE_FILE).read_text()).srcs
  # 3 classes x 3 stored train images, 2 near-duplicate sides, and source
  # thumbnails of the duplicate, the conflict and the rejected leak.
  assert len(srcs) >= 9 + 2 + 3
  for src in srcs:
    image = _decoded(src)
    assert image.format == 'JPEG'
    assert max(image.size) <= report_page.THUMBNAIL_SIDE


def test_quality_flags_get_a_section_each(built, tmp_path):
  images, out, _ = built
  dataset = tmp_path / 'dataset'
  shutil.copytree(out, dataset)
  lines = [{'path': 'train/cat/chelsea_1.png', 'split': 'train',
            'flags': ['blurry']},
           {'path': 'train/coffee/coffee_0.jpg', 'split': 'train',
            'flags': ['blurry', 'dark']},
           {'path': 'train/rocket/rocket_0.jpg', 'split': 'train',
            'flags': []}]
  (dataset / metadata.IMAGES_FILE).write_text(
      ''.join(json.dumps(line) + '\n' for line in lines))
  page_path = tmp_path / 'page.html'
  report_page.write_report_page(str(dataset), str(images), str(page_path))
  page = _Page(page_path.read_text())
  assert 'blurry (2)' in page.text and 'dark (1)' in page.text
  assert '3 images checked' in page.text
  for src in page.srcs:
    _decoded(src)


def test_flag_counts_read_lines_the_build_wrote_without_parsing_them(
    built, tmp_path):
  """A line image_line wrote with no flag is counted unparsed (its check
  holds); any other line is parsed as before: flags are never lost to the
  shortcut, and a line that is not JSON is never counted."""
  from pipelines.folder_to_records import chunk_format  # pylint: disable=g-import-not-at-top
  _, out, _ = built
  written = (out / metadata.IMAGES_FILE).read_bytes().splitlines(True)
  want = collections.Counter(
      flag for line in written for flag in json.loads(line)['flags'])
  assert sum(b'"flags": [],' in line for line in written) > 2
  entry = chunk_format.IndexEntry(0, 10, 0, [1], [1], 1, None, 'a.png', None)
  flagged = chunk_format.image_line(
      'c/dark.png', 'train', 'ab' * 32, None, ('dark',), None,
      file_stat=(1, 2), entry=entry, original_size=(4, 4)) + '\n'
  # Edited after the build: still "flags": [] in a nested value, but the
  # real flags are ['blurry'] and the check no longer holds.
  edited = ('{"note": {"flags": [], "x": 1}, "path": "c/e.png", '
            '"split": "validation", "flags": ["blurry"], "check": 1}\n')
  not_json = b'{"flags": [], "check": 5\n'
  path = tmp_path / 'images.jsonl'
  path.write_bytes(b''.join(written) + flagged.encode() + edited.encode()
                   + not_json)
  counts, first, lines = report_page._flag_counts(str(path))  # pylint: disable=protected-access
  assert lines == len(written) + 2
  assert counts == want + collections.Counter(dark=1, blurry=1)
  assert first['dark'][-1] == ('c/dark.png', 'train') or len(
      first['dark']) == report_page.MAX_THUMBNAILS
  assert ('c/e.png', 'validation') in first['blurry'] or len(
      first['blurry']) == report_page.MAX_THUMBNAILS


@pytest.fixture(name='chromium')
def _chromium():
  """The Chromium binary; the test skips (before any build) without it."""
  binary = shutil.which('chromium') or shutil.which('chromium-browser')
  if not binary:
    pytest.skip('no chromium binary on PATH (scripts/test.sh installs the '
                'Debian package `chromium` when run as root with apt-get)')
  return binary


# Injected into a copy of the page: after load, each <img>'s decoded width
# into the DOM, which --dump-dom prints.
_PROBE = """<script>
window.addEventListener('load', () => {
  const pre = document.createElement('pre');
  pre.id = 'result';
  pre.textContent = JSON.stringify(
      Array.from(document.images, i => i.naturalWidth));
  document.body.appendChild(pre);
});
</script>"""


def test_a_browser_decodes_every_thumbnail(chromium, built, tmp_path):
  _, out, _ = built
  text = (out / metadata.REPORT_PAGE_FILE).read_text()
  probe = tmp_path / 'probe.html'
  probe.write_text(text.replace('</body>', _PROBE + '</body>'))
  # A page that kept the browser waiting (a fetch, a script) fails by the
  # timeout; how fast a loaded 2-core machine starts Chromium is no test
  # (a 10 s bound failed a CI run at 15.8 s).
  result = subprocess.run(
      [chromium, '--headless', '--disable-gpu', '--no-sandbox',
       '--virtual-time-budget=5000', f'--user-data-dir={tmp_path / "p"}',
       '--dump-dom', probe.as_uri()],
      capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout)
  assert found, result.stdout[-500:]
  widths = json.loads(found.group(1))
  assert len(widths) == len(_Page(text).srcs) > 0
  assert all(w > 0 for w in widths), widths


def _noise_jpeg(rng, size=200) -> bytes:
  return _jpeg(Image.fromarray(rng.integers(0, 256, (size, size, 3),
                                            np.uint8)), 95)


def _worst_case_folder(root: pathlib.Path, rejected_lines: int):
  """A fake build that fills every cap of the page with the longest text
  that escapes worst (`"` is 6 bytes as &quot;) and thumbnails of noise
  (the largest JPEGs), rejected_lines lines in rejected.jsonl: (input
  folder, dataset folder)."""
  rng = np.random.default_rng(0)
  images, dataset = root / 'images', root / 'dataset'
  dataset.mkdir(parents=True)
  long = '"' * 300
  # Source files for every section's thumbnails: 40 noise images with long
  # hostile names (hard links of one file).
  noise = helpers.write(images / 'noise.jpg', _noise_jpeg(rng))
  names = [f'c/{long[:150]}{i}.jpg' for i in range(report_page.MAX_THUMBNAILS)]
  (images / 'c').mkdir()
  for name in names:
    (images / name).hardlink_to(noise)
  rows = report_page.MAX_TABLE_ROWS + 10
  path = lambda i: names[i % len(names)]
  classes = [f'{long}{i:04d}' for i in range(rows)]
  spec = _noise_shards(dataset, classes, rng)
  finding = lambda i, kind: report_lib.Finding(
      kind=kind, sha256='0' * 64, kept=path(i),
      dropped=[path(i + k) + long for k in range(5)])
  report = report_lib.BuildReport(
      dataset_name='worst', input_dir=str(images), layout='classes',
      class_names=tuple(classes), image={'height': 32, 'width': 32},
      seed=0, validation_fraction=0.2, test_fraction=0.1, stratified=False,
      quality_flags={}, quality_thresholds={},
      counts={'seen': rejected_lines + rows, 'written': rows,
              'rejected_corrupt': rejected_lines},
      splits={s: report_lib.SplitSummary(
          total=rows, num_shards=1, per_class={c: int(s == 'train')
                                               for c in classes})
              for s in metadata.SPLITS},
      bytes_written=0, train_mean=None, train_std=None,
      duplicates=tuple(finding(i, 'duplicate') for i in range(rows)),
      leaks=tuple(finding(i, 'leak') for i in range(rows)),
      conflicts=tuple(report_lib.Finding(
          kind='label_conflict', sha256='0' * 64, classes=classes[:5],
          paths=[path(i + k) for k in range(5)]) for i in range(rows)),
      near_duplicates=report_lib.NearDuplicates(
          distance=8, images=2 * report_page.MAX_TABLE_ROWS,
          capped_groups=tuple(
              report_lib.CappedGroup(band=i, members=9999, compared=4096,
                                     example=path(i) + long)
              for i in range(rows))),
      warnings=tuple(report_lib.FileWarning(path=path(i) + long,
                                            warning=long)
                     for i in range(rows)),
      classes_without_examples={s: classes for s in metadata.SPLITS},
      empty_classes=tuple(report_lib.EmptyClass(class_name=c, warning=long)
                          for c in classes),
      write_stage_s=1.0, elapsed_s=2.0, images_per_s=1.0, software={})
  (dataset / metadata.REPORT_FILE).write_text(report.to_json())
  (dataset / metadata.METADATA_FILE).write_text(
      json.dumps(spec.to_json_dict()))
  with open(dataset / metadata.REJECTED_FILE, 'w') as f:
    for i in range(rejected_lines):
      f.write(json.dumps({'path': path(i), 'outcome': long,
                          'reason': long}) + '\n')
  # The other files fill their caps with fewer lines.
  other_lines = 2 * report_page.MAX_TABLE_ROWS
  with open(dataset / metadata.NEAR_DUPLICATES_FILE, 'w') as f:
    for i in range(other_lines):
      f.write(json.dumps({
          'kind': near_lib.LEAK, 'distance': 3,
          'paths': [path(i), path(i + 1)], 'splits': ['train', long],
          'classes': [long, long], 'label_conflict': True}) + '\n')
  with open(dataset / metadata.IMAGES_FILE, 'w') as f:
    # More flag names than are counted apart; the first ones the most
    # frequent (each gets a section).
    many = [f'{long}{k:03d}' for k in range(report_page.MAX_FLAG_NAMES + 10)]
    for i in range(other_lines):
      flags = many if i < 2 else many[:report_page.MAX_FLAG_SECTIONS + 2]
      f.write(json.dumps({'path': path(i), 'split': long,
                          'flags': flags}) + '\n')
  return images, dataset


def _noise_shards(dataset: pathlib.Path, classes, rng):
  """Train shards with SAMPLES_PER_CLASS noise images for each class of the
  sample grid; the DatasetSpec that lists them."""
  shown = classes[:report_page.SAMPLE_CLASSES]
  records = [schema.frame_record(schema.encode_example(
      image=_noise_jpeg(rng, 96), label=label, filename=f'{name}/{k}.jpg',
      sha256='0' * 64, original_height=96, original_width=96))
             for label, name in enumerate(shown)
             for k in range(report_page.SAMPLES_PER_CLASS)]
  shard = schema.shard_filename('worst', 'train', 0, 1)
  (dataset / shard).write_bytes(b''.join(records))
  counts = tuple(int(i < len(shown)) * report_page.SAMPLES_PER_CLASS
                 for i in range(len(classes)))
  return metadata.DatasetSpec(
      name='worst', class_names=tuple(classes), height=96, width=96,
      channels=3, image_format='jpeg', resize_mode='stretch',
      splits={'train': metadata.SplitSpec(
          name='train', shards=(shard,), shard_lengths=(len(records),),
          num_bytes=(dataset / shard).stat().st_size, class_counts=counts)})


def test_every_section_is_capped_whatever_the_file_count(tmp_path):
  lines = 50_000
  images, dataset = _worst_case_folder(tmp_path, lines)
  page_path = tmp_path / 'page.html'
  start = time.monotonic()
  report_page.write_report_page(str(dataset), str(images), str(page_path))
  took = time.monotonic() - start
  size = page_path.stat().st_size
  assert size < report_page.WORST_CASE_BYTES, size
  page = _Page(page_path.read_text())
  hidden = lines - report_page.MAX_TABLE_ROWS
  assert (f'{hidden:,} more not shown (see {metadata.REJECTED_FILE}'
          in page.text)
  assert (f'{report_page.MAX_TABLE_ROWS:,} more not shown (see '
          f'{metadata.NEAR_DUPLICATES_FILE}' in page.text)
  assert page.text.count('more not shown') >= 10
  # Every thumbnail a cap allows, each a decodable JPEG under the cap.
  caps = report_page
  expected = (caps.SAMPLE_CLASSES * caps.SAMPLES_PER_CLASS +
              5 * caps.MAX_THUMBNAILS +
              caps.MAX_FLAG_SECTIONS * caps.MAX_THUMBNAILS)
  assert len(page.srcs) == expected
  assert all(len(s) <= len(DATA_URI) + caps.MAX_THUMBNAIL_BYTES * 4 // 3 + 4
             for s in page.srcs)
  assert took < 15, f'{took:.1f} s'
  print(f'worst-case page: {size / 1e6:.1f} MB in {took:.1f} s')


def test_a_page_that_fails_to_draw_is_a_warning(tmp_path, monkeypatch,
                                                capsys):
  def broken(dataset_dir, input_dir, path):
    pathlib.Path(path).write_text('<html>half')
    raise MemoryError('no room')
  monkeypatch.setattr(report_page, 'write_report_page', broken)
  builder.draw_report_page(str(tmp_path), str(tmp_path / 'images'))
  assert not (tmp_path / metadata.REPORT_PAGE_FILE).exists()
  assert capsys.readouterr().err == (
      f'[build] warning: {metadata.REPORT_PAGE_FILE} could not be drawn '
      '(MemoryError: no room); the dataset is written\n')


def test_a_thumbnail_never_reads_a_huge_file_or_a_bomb(tmp_path):
  helpers.write(tmp_path / 'big.jpg', b'\xff\xd8' + bytes(
      report_page.MAX_SOURCE_BYTES))
  bomb = io.BytesIO()
  Image.new('L', (12000, 9000)).save(bomb, format='PNG')
  helpers.write(tmp_path / 'bomb.png', bomb.getvalue())
  os.mkfifo(tmp_path / 'fifo.jpg')
  for name in ('big.jpg', 'bomb.png', 'fifo.jpg', 'absent.jpg'):
    assert report_page.source_thumbnail(str(tmp_path / name)) is None, name
