"""Near-duplicates: found by band groups exactly as by all pairs, and the
build's rules on real photos (evaluation copies of train images left out,
the rest reported, counts that reconcile)."""

import io
import collections
import itertools
import json
import zlib
import pathlib

import numpy as np
import pytest
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter
from skimage import data as skimage_data

from pipelines.common.errors import UserError
from pipelines.folder_to_records import builder
from pipelines.folder_to_records import file_io
from pipelines.folder_to_records import near_duplicates as nd
from tests import helpers
from tfrecords_schema import metadata

LEFT_OUT = nd.NEAR_LEAK


def _search(refs, distance, cap=nd.MAX_GROUP, buckets=1, compiled=None):
  """The band search in one process: every ref's band entries in
  `buckets` buckets, each bucket's slots (bucket_slots) kept over the
  buckets (_Nearest). ({relpath: its slots}, capped), the slots as
  nearest_partners gives them (SLOTS of (d, partner, partner's split) or
  None)."""
  masks = nd.band_masks(distance)
  nearest, capped = nd._Nearest(), []
  for _, data in nd.bucket_bytes(refs, masks=masks, buckets=buckets,
                                 layout='class_folders'):
    found = nd.bucket_slots(data, distance=distance, cap=cap,
                            use_compiled=compiled)
    nearest.add(found)
    capped += found.capped
  return _slots(b''.join(r for _, r in nearest.records())), capped


def _text(path: bytes) -> str:
  return path.decode('utf-8', 'surrogateescape')


def _slots(records: bytes) -> dict:
  """Slot records (nd.read_slots) as {relpath: SLOTS of (d, partner,
  partner's split) or None}."""
  return {_text(path): tuple(
      None if s is None else (s[0], _text(s[1]), nd._SPLITS[s[2]])
      for s in slots) for path, (_, _, slots) in nd.read_slots(
          records).items()}


def _brute_force(refs, distance):
  pairs = {}
  for a, b in itertools.combinations(refs, 2):
    d = nd.near_distance(a.phashes, b.phashes)
    if d <= distance:
      pairs[tuple(sorted((a.relpath, b.relpath)))] = d
  return pairs


def _class(relpath: str) -> str:
  return relpath.split('/')[0]  # class_folders: the first folder.


def _brute_slots(refs, distance) -> dict:
  """Every pair compared: {relpath: SLOTS of (d, partner, its split) or
  None}, each the least (d, partner path); images with no partner left
  out."""
  split = {ref.relpath: ref.split for ref in refs}
  slots = {}
  for (a, b), d in _brute_force(refs, distance).items():
    for x, y in ((a, b), (b, a)):
      mine = slots.setdefault(x, [None] * nd.SLOTS)
      for slot in {nd._SPLITS.index(split[y]),
                   *([nd.SLOTS - 1] if _class(x) != _class(y) else [])}:
        if mine[slot] is None or (d, y) < mine[slot][:2]:
          mine[slot] = (d, y, split[y])
  return {p: tuple(v) for p, v in slots.items()}


def _flipped(rng, h: int, most: int) -> int:
  flips = rng.choice(64, size=int(rng.integers(0, most + 1)), replace=False)
  return h ^ sum(1 << int(b) for b in flips)


@pytest.mark.parametrize('distance', [1, 4, 8, 13])
def test_band_groups_find_exactly_the_pairs_all_pairs_would(distance):
  masks = nd.band_masks(distance)
  assert len(masks) == distance + 1
  assert sum(masks) == (1 << nd.HASH_BITS) - 1  # Disjoint, every bit.
  rng = np.random.default_rng(distance)
  refs = []
  for i in range(300):  # Clusters: copies near the whole or the centre.
    whole, centre = (int(rng.integers(0, 1 << 63)) * 2 + 1 for _ in range(2))
    for j in range(3):
      if j == 0:
        hashes = (whole, centre)
      elif j == 1:  # A resized copy: whole near whole.
        hashes = (_flipped(rng, whole, distance + 3),
                  _flipped(rng, centre, 20))
      else:  # A cropped copy: its whole near the original's centre.
        hashes = (_flipped(rng, centre, distance + 3),
                  int(rng.integers(0, 1 << 63)))
      refs.append(nd.Ref(hashes, f'c{i}/{j}.jpg', 'train', 0, len(refs)))
  found, capped = _search(refs, distance)
  assert found == _brute_slots(refs, distance) and not capped
  assert len(found) > 100


def test_a_band_element_packs_its_reference_losslessly():
  ref = nd.Ref(((1 << 64) - 1, 5), 'cl\u00e4ss/x\udcff\n.jpg', 'test', 7,
               (1 << 40) + 3)  # An offset past 4 GiB, a non-UTF-8 name.
  for which in (nd.WHOLE, nd.CENTRE):
    data = nd.pack(which, ref, 'cl\u00e4ss\udcfe')
    assert isinstance(data, bytes) and nd.unpack(data) == (
        which, ref, 'cl\u00e4ss\udcfe')


@pytest.mark.parametrize('distance', [1, 8, nd.MAX_DISTANCE])
def test_a_flush_of_band_entries_is_bucket_entries_bucket_by_bucket(distance):
  """bucket_bytes (numpy, a flush at once) gives each bucket exactly the
  bytes of bucket_entries' entries in it, ref by ref: the same files as
  one ref at a time. Refs with flat hashes, one flat hash, odd and long
  paths, offsets past 4 GiB and past 2**63."""
  rng = np.random.default_rng(distance)
  masks = nd.band_masks(distance)
  paths = ('a/x.jpg', 'cl\u00e4ss/x\udcff\n.jpg', 'c/' + 'z' * 900 + '.png')
  for trial in range(60):
    layout = ('class_folders', 'split_folders')[trial % 2]
    refs = []
    for i in range(int(rng.integers(0, 30))):
      whole, centre = (int(h) for h in rng.integers(
          0, 1 << 64, size=2, dtype=np.uint64))
      kind = i % 4
      whole = 0 if kind == 1 else whole  # Flat: no entry.
      centre = (1 << 15) - 1 if kind == 2 else centre  # 15 bits: none.
      refs.append(nd.Ref((whole, centre), f'train/{paths[i % 3]}{i}',
                         nd._SPLITS[i % 3], int(rng.integers(0, 1 << 31)),
                         int(rng.integers(0, 1 << 50)) + (i % 5 == 0) * 2**63))
    buckets = int(rng.integers(1, 40))
    want = collections.defaultdict(list)
    for ref in refs:
      for bucket, entry in nd.bucket_entries(ref, masks=masks,
                                             buckets=buckets, layout=layout):
        want[bucket].append(entry)
    got = nd.bucket_bytes(refs, masks=masks, buckets=buckets, layout=layout)
    assert [b for b, _ in got] == sorted(want), trial
    assert dict(got) == {b: b''.join(e) for b, e in want.items()}, trial


# A hash with 32 bits set, as every pHash of a non-flat image has.
_SAME = ((1 << 32) - 1) << 32


def test_a_huge_group_is_capped_and_reported():
  # 50 near-identical frames share one hash: compared among 8 of their 100
  # hashes (4 images' whole and centre), chosen by a hash of the path.
  refs = [nd.Ref((_SAME, _SAME), f'frames/{i:02d}.png', 'train', 0, i)
          for i in range(50)]
  found, capped = _search(refs, 4, cap=8)
  kept = sorted(r.relpath for r in sorted(
      refs, key=lambda r: nd._rank(r, nd.WHOLE))[:4])
  assert found == {p: ((0, min(set(kept) - {p}), 'train'), None, None, None)
                   for p in kept}
  first = min(refs, key=lambda r: nd._rank(r, nd.WHOLE)).relpath
  assert capped == [{'band': band, 'members': 100, 'compared': 8,
                     'example': first} for band in range(5)]


def test_the_group_step_reads_the_member_cap_when_it_runs(monkeypatch):
  """bucket_slots takes MAX_GROUP at each call (the report page names the
  same one), not the value it had at import."""
  refs = [nd.Ref((_SAME, _SAME), f'frames/{i:02d}.png', 'train', 0, i)
          for i in range(50)]
  (_, data), = nd.bucket_bytes(refs, masks=nd.band_masks(4), buckets=1,
                               layout='class_folders')
  assert not nd.bucket_slots(data, distance=4).capped
  monkeypatch.setattr(nd, 'MAX_GROUP', 8)
  assert [c['compared'] for c in nd.bucket_slots(data, distance=4).capped
          ] == [8] * 5


def test_flat_images_are_never_near_anything():
  # A flat image's pHash sets 0 or 1 bit (white, black, any single colour):
  # they would all be "near" each other. A flat centre takes no part either.
  photo = (0x5A5A5A5A5A5A5A5A, 0x3C3C3C3C3C3C3C3C)
  refs = [nd.Ref((1 << 63, 1 << 63), 'cat/white.png', 'test', 0, 0),
          nd.Ref((0, 0), 'dog/black.png', 'train', 0, 1),
          nd.Ref((photo[0], 1 << 63), 'dog/photo_flat_centre.png', 'train',
                 0, 2),
          nd.Ref((photo[0] ^ 0b111, photo[1]), 'cat/photo_copy.png', 'test',
                 0, 3)]
  assert not nd.usable(1 << 63) and nd.usable(photo[0])
  found, _ = _search(refs, 8)
  copy, flat = (3, 'cat/photo_copy.png', 'test'), (
      3, 'dog/photo_flat_centre.png', 'train')
  assert found == {'cat/photo_copy.png': (flat, None, None, flat),
                   'dog/photo_flat_centre.png': (None, None, copy, copy)}
  assert nd.near_distance(refs[0].phashes, refs[1].phashes) == nd.NEVER


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _photo(name: str, box=None) -> Image.Image:
  image = Image.fromarray(helpers.photo(name))
  return image.crop(box) if box else image


def _sample(name: str) -> Image.Image:
  """scikit-learn's sample photo `name` (china or flower)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  sample = load_sample_images()
  return Image.fromarray(sample.images[[pathlib.Path(f).stem for f in
                                        sample.filenames].index(name)])


def _cropped(image: Image.Image, fraction: float) -> Image.Image:
  w, h = image.size
  dx, dy = int(w * fraction), int(h * fraction)
  return image.crop((dx, dy, w - dx, h - dy))


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """A pre-split folder of real photos with planted near-duplicates; the
  build's outputs."""
  root = tmp_path_factory.mktemp('near')
  images = root / 'images'
  astronaut = _photo('astronaut')
  files = {
      # A resized, re-encoded copy of a train photo in validation: a leak.
      'train/cat/chelsea.jpg': _jpeg(_photo('chelsea')),
      'validation/cat/chelsea_small.jpg': _jpeg(
          _photo('chelsea').resize((226, 150)), 60),
      # A brightened, lightly cropped copy in test: a leak too.
      'train/cup/coffee.png': _photo('coffee'),
      'test/cup/coffee_edit.jpg': _jpeg(ImageEnhance.Brightness(
          _cropped(_photo('coffee'), 0.03)).enhance(1.2), 80),
      # Two copies inside train: reported only.
      'train/cup/rocket.jpg': _jpeg(_photo('rocket')),
      'train/cup/rocket_again.jpg': _jpeg(_photo('rocket'), 50),
      # Across classes: a possible label conflict, reported.
      'train/cat/astronaut.jpg': _jpeg(astronaut),
      'train/cup/astronaut_copy.jpg': _jpeg(astronaut.resize((400, 400)), 70),
      # Validation against test: reported, nothing removed.
      'validation/cup/camera.png': _photo('camera'),
      'test/cup/camera_small.jpg': _jpeg(_photo('camera').resize((300, 300))),
      # Different photos and different parts of one photo: no pair.
      'validation/cat/astronaut_face.png': astronaut.crop((150, 0, 406, 256)),
      'test/cat/astronaut_hand.png': astronaut.crop((0, 256, 256, 512)),
      'validation/cat/motorcycle.png': Image.fromarray(
          skimage_data.stereo_motorcycle()[0]),
      'test/cat/immuno.png': _photo('immunohistochemistry'),
      # Quality flags, each planted once (PNG: decoded at full size).
      'train/cup/china_blurred.png': _sample('china').filter(
          ImageFilter.GaussianBlur(4)),
      'train/cat/flower_dark.png': Image.fromarray(
          (np.asarray(_sample('flower')) * 0.15).astype(np.uint8)),
      'train/cup/flat.png': Image.fromarray((np.full(
          (64, 64, 3), (120, 130, 140)) + np.random.default_rng(0).integers(
              0, 2, (64, 64, 3))).astype(np.uint8)),
      'train/cat/retina_tiny.png': _photo('retina', (700, 700, 724, 724)),
      # A thumbnail and its re-encoded copy in another class and split (2
      # bits apart): tiny sources are not searched (near_duplicates.
      # MIN_SOURCE_SIDE), so no pair and nothing left out; not even with
      # the full-size chelsea (the rule's cost, README).
      'train/cat/chelsea_tiny.png': _photo('chelsea').resize((24, 16)),
      'validation/cup/chelsea_tiny_copy.jpg': _jpeg(
          _photo('chelsea').resize((24, 16)), 70),
  }
  for relpath, content in files.items():
    if isinstance(content, Image.Image):
      helpers.save(images / relpath, content)
    else:
      helpers.write(images / relpath, content)
  reports = {}
  for distance in (nd.DEFAULT_DISTANCE, 0):
    reports[distance] = builder.build(
        input_dir=str(images), output_dir=str(root / f'd{distance}'),
        image_size='32', quiet=True, samples=False,
        near_duplicate_distance=distance,
        quality_thresholds='' if distance else 'off')
  return root, reports


def _lines(path: pathlib.Path) -> list:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_planted_pairs_are_found_and_no_other(planted):
  root, _ = planted
  pairs = {tuple(p['paths'][::1] if p['paths'][0] < p['paths'][1]
                 else p['paths'][::-1]): p
           for p in _lines(root / 'd8' / metadata.NEAR_DUPLICATES_FILE)}
  kinds = {k: v['kind'] for k, v in pairs.items()}
  assert kinds == {
      ('train/cat/chelsea.jpg', 'validation/cat/chelsea_small.jpg'): nd.LEAK,
      ('test/cup/coffee_edit.jpg', 'train/cup/coffee.png'): nd.LEAK,
      ('train/cup/rocket.jpg', 'train/cup/rocket_again.jpg'): nd.WITHIN_SPLIT,
      ('train/cat/astronaut.jpg', 'train/cup/astronaut_copy.jpg'):
          nd.WITHIN_SPLIT,
      ('test/cup/camera_small.jpg', 'validation/cup/camera.png'):
          nd.ACROSS_EVALUATION,
  }
  conflicts = [k for k, v in pairs.items() if v['label_conflict']]
  assert conflicts == [('train/cat/astronaut.jpg',
                        'train/cup/astronaut_copy.jpg')]
  assert all(0 <= p['distance'] <= nd.DEFAULT_DISTANCE
             for p in pairs.values())


def test_evaluation_copies_of_train_images_are_left_out_and_counted(planted):
  root, reports = planted
  report = reports[nd.DEFAULT_DISTANCE]
  rejected = {r['path']: r for r in _lines(root / 'd8' /
                                           metadata.REJECTED_FILE)}
  assert set(rejected) == {'validation/cat/chelsea_small.jpg',
                           'test/cup/coffee_edit.jpg'}
  line = rejected['validation/cat/chelsea_small.jpg']
  assert line['outcome'] == LEFT_OUT and line['near'] == 'train/cat/chelsea.jpg'
  assert str(line['distance']) in line['reason']
  counts = report['counts']
  assert counts == {'seen': 20, 'written': 18, LEFT_OUT: 2}
  assert report['splits']['validation']['total'] == 4
  assert report['splits']['test']['total'] == 3
  assert report['near_duplicates'] == {
      'distance': nd.DEFAULT_DISTANCE, 'images': 10, 'listed': 5,
      'leaks': 4, 'left_out': 2, 'within_split': 4,
      'across_evaluation_splits': 2, 'label_conflicts': 2,
      'capped_groups': [], 'lines_crc32': zlib.crc32((
          root / 'd8' / metadata.NEAR_DUPLICATES_FILE).read_bytes())}
  # The shards hold neither, and the report on disk says the same.
  names = helpers.written_filenames(root / 'd8')
  assert len(names) == 18 and not names & set(rejected)
  on_disk = json.loads((root / 'd8' / metadata.REPORT_FILE).read_text())
  assert on_disk['near_duplicates'] == report['near_duplicates']


def test_distance_0_and_no_flags_measure_nothing(planted):
  root, reports = planted
  assert reports[0]['counts'] == {'seen': 20, 'written': 20}
  assert reports[0]['near_duplicates']['distance'] == 0
  assert reports[0]['quality_flags'] == {}
  assert set(reports[0]['quality_thresholds'].values()) == {None}
  assert (root / 'd0' / metadata.NEAR_DUPLICATES_FILE).read_text() == ''
  for line in _lines(root / 'd0' / metadata.IMAGES_FILE):
    assert line['phash'] is line['quality'] is None and line['flags'] == []


@pytest.mark.parametrize('value', [-1, nd.MAX_DISTANCE + 1])
def test_a_distance_out_of_range_is_one_line(tmp_path, value):
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=1)
  with pytest.raises(UserError) as raised:
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  near_duplicate_distance=value, quiet=True)
  assert f'--near_duplicate_distance={value}' in str(raised.value)
  assert not (tmp_path / 'out').exists()


def test_images_jsonl_holds_every_file_and_its_hash(planted):
  root, _ = planted
  lines = {line['path']: line for line in _lines(root / 'd8' /
                                                 metadata.IMAGES_FILE)}
  assert len(lines) == 20
  for path, line in lines.items():
    assert line['split'] == path.split('/')[0]
    assert len(line['phash']) == len(line['phash_centre']) == 16
  for pair in _lines(root / 'd8' / metadata.NEAR_DUPLICATES_FILE):
    a, b = ((int(lines[p]['phash'], 16), int(lines[p]['phash_centre'], 16))
            for p in pair['paths'])
    assert nd.near_distance(a, b) == pair['distance']


def test_quality_flags_are_reported_per_file_and_counted(planted):
  root, reports = planted
  flagged = {line['path']: line['flags'] for line in _lines(
      root / 'd8' / metadata.IMAGES_FILE) if line['flags']}
  assert flagged == {
      'train/cup/china_blurred.png': ['blurry'],
      'train/cat/flower_dark.png': ['dark'],
      'train/cup/flat.png': ['low_information'],
      'train/cat/retina_tiny.png': ['tiny'],
      'train/cat/chelsea_tiny.png': ['tiny'],
      'validation/cup/chelsea_tiny_copy.jpg': ['tiny'],
      # A grey photo in a colour dataset, and its copy.
      'validation/cup/camera.png': ['grayscale'],
      'test/cup/camera_small.jpg': ['grayscale'],
  }
  report = reports[nd.DEFAULT_DISTANCE]
  assert report['quality_flags'] == {'blurry': 1, 'dark': 1, 'grayscale': 2,
                                     'low_information': 1, 'tiny': 3}
  summary = builder.format_summary(report)
  assert 'quality flags (reported, not removed' in summary
  assert 'grayscale 2' in summary and '2 left out of validation/test' in summary


def test_bad_quality_thresholds_are_one_line(tmp_path):
  images = tmp_path / 'images'
  helpers.photo_folder(images, per_class=1)
  with pytest.raises(UserError) as raised:
    builder.build(input_dir=str(images), output_dir=str(tmp_path / 'out'),
                  quality_thresholds='blury=0.1', quiet=True)
  assert '--quality_thresholds=blury=0.1' in str(raised.value)
  assert 'blurry' in str(raised.value) and '\n' not in str(raised.value)


@pytest.mark.parametrize('layout,a_path,b_path', [
    ('class_folders', 'cat/a "quoted".jpg', 'dog/b\u00e9\u2028.jpg'),
    ('split_folders', 'train/cat/x.jpg', 'validation/cat/x.jpg'),
])
def test_pair_lines_are_classify_lines_as_json(layout, a_path, b_path):
  """The build writes each pair's line as text (_Lines); it is exactly
  json.dumps of classify's dict."""
  for splits in (('train', 'validation'), ('test', 'test'),
                 ('validation', 'test')):
    a = nd.Ref((1, 2), a_path, splits[0], 0, 0)
    b = nd.Ref((1, 2), b_path, splits[1], 0, 0)
    want = nd.classify((a, b, 7) if a_path < b_path else (b, a, 7),
                       layout=layout)
    for x, y in ((a, b), (b, a)):  # Either end first: the paths in order.
      line = nd._Lines(layout).pair((x.relpath, x.split),
                                    (y.relpath, y.split), 7)
      assert line == json.dumps(want)


def _near_refs(rng, count=120):
  """count images whose hashes are a few bits from one base, in mixed
  splits and classes, with quoted names."""
  base = int(rng.integers(0, 2**63))
  splits = ('train', 'validation', 'test')
  refs = []
  for i in range(count):
    whole = base ^ sum(1 << int(b) for b in rng.integers(0, 64, size=3))
    name = f'{("cat", "dog", "cow")[i % 3]}/p "{i:03d}".jpg'
    refs.append(nd.Ref((whole, whole ^ 1), name,
                       splits[int(rng.integers(0, 3))], 0, i))
  return refs


def _groups(refs, masks):
  groups = {}
  for ref in refs:
    for key, value in nd.band_keys(ref, masks=masks, layout='class_folders'):
      groups.setdefault(key, []).append(value)
  return groups


@pytest.mark.parametrize('count', [150, 400])
def test_every_image_gets_its_nearest_in_each_slot_as_all_pairs_would(
    count):
  """Each image near others gets, over all its groups, its nearest partner
  (least near_distance, then path) in each split and of another class, as
  all pairs would give them; evaluation images' train slot is the leak
  rule's nearest train copy. Groups of more than one block of rows (400
  images, _ROWS 256), where every candidate counts, not only a first few
  (there is no cap on pairs)."""
  refs = _near_refs(np.random.default_rng(2), count=count)
  masks = nd.band_masks(8)
  largest = max(len(v) for v in _groups(refs, masks).values())
  found, capped = _search(refs, 8)
  assert found == _brute_slots(refs, 8) and not capped
  split = {ref.relpath: ref.split for ref in refs}
  leaks = {p: s[0][:2] for p, s in found.items()
           if split[p] != 'train' and s[0] is not None}
  assert len(leaks) > 50
  assert (largest > nd._ROWS) == (count == 400)


@pytest.mark.skipif(nd._compiled is None, reason='_near_pairs is not built')
def test_the_compiled_group_step_equals_the_reference():
  """bucket_slots compiled (with the AVX-512 scan where the CPU has it,
  and without) and in Python/numpy give the same images, slots and capped
  groups, in the same order: groups of 2 to 600 members
  (more than one block of rows), several groups a bucket, both hashes of
  an image in one group, flat (unusable) hashes, every split, several
  classes, odd names (bytes order is not str order for them), caps that
  bind."""
  rng = np.random.default_rng(7)
  cases = capped = 0
  names = ('a', 'b\u00e9', 'z\udcff', '\ue000x', 'Q')
  for size in (2, 3, 17, 60, 257, 600):
    for distance in (1, 8, 16):
      masks = nd.band_masks(distance)
      base = int(rng.integers(0, 1 << 63)) * 2 + 1
      refs = []
      for i in range(size):
        flips = rng.choice(64, size=int(rng.integers(0, distance + 6)),
                           replace=False)
        whole = base ^ sum(1 << int(b) for b in flips)
        centre = int(rng.integers(0, 1 << 63)) * 2 + 1
        if i % 11 == 3:
          whole = 0b111  # Flat: unusable.
        if i % 13 == 5:
          centre = whole ^ 0b1011  # The image's centre near its whole.
        refs.append(nd.Ref(
            (whole, centre), f'{names[i % 5]}/{names[i % 3]}{i}.jpg',
            ('train', 'validation', 'test')[int(rng.integers(0, 3))],
            int(rng.integers(0, 50)), i))
      for cap in (5, nd.MAX_GROUP):
        for _, data in nd.bucket_bytes(refs, masks=masks, buckets=2,
                                       layout='class_folders'):
          want = nd.bucket_slots(data, distance=distance, cap=cap,
                                 use_compiled=False)
          for vector in (True, False):  # AVX-512 where it runs; plain C.
            got = nd.bucket_slots(data, distance=distance, cap=cap,
                                  use_compiled=True, vector=vector)
            for x, y in zip(got, want):
              if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.tolist() == y.tolist()
              else:
                assert x == y
          cases += len(want.image)
          capped += len(want.capped)
  assert cases > 1000 and capped > 10  # Slots were filled, caps bound.


@pytest.mark.skipif(nd._compiled is None, reason='_near_pairs is not built')
def test_the_compiled_group_step_refuses_bad_entries():
  """A cut-short bucket is an OSError naming it; bad fields, distances or
  caps raise ValueError; never a crash."""
  ref = nd.Ref((_SAME, _SAME ^ 1), 'c/x.jpg', 'train', 0, 0)
  (_, data), = nd.bucket_bytes([ref], masks=nd.band_masks(2), buckets=1,
                               layout='class_folders')
  assert len(nd.bucket_slots(data, distance=2).ends) == 1
  for cut in (1, 11, 40, len(data) // 6 + 1):  # Entries of 55 bytes.
    with pytest.raises(OSError, match='cut short'):
      nd._compiled.bucket_slots(data[:-cut], 2, 10)
  entry = bytearray(data[:len(data) // 6])  # One entry of six.
  for at, value in ((11, 2), (40, 3), (45, 255)):  # which, split, length
    bad = bytearray(entry)
    bad[at] = value
    with pytest.raises(ValueError):
      nd._compiled.bucket_slots(bytes(bad), 2, 10)
  for distance, cap in ((-1, 10), (65, 10), (2, 0)):
    with pytest.raises(ValueError):
      nd._compiled.bucket_slots(data, distance, cap)
  # An entry too short for its fields, last in the data: refused before
  # they are read (they would lie past the data's end).
  for length in (0, 5, 35):
    short = bytes(9) + length.to_bytes(2, 'big') + bytes(length)
    with pytest.raises(ValueError):
      nd._compiled.bucket_slots(entry + short, 2, 10)


def _outputs(results):
  """A DoFn's outputs: main elements and (tag, value) of tagged ones, with
  finish_bundle's WindowedValues unwrapped."""
  main, tagged = [], []
  for out in results or ():
    if hasattr(out, 'tag'):
      value = out.value
      tagged.append((out.tag, value.value if hasattr(value, 'windows')
                     else value))
    else:
      main.append(out.value if hasattr(out, 'windows') else out)
  return main, tagged


def _nearest_pairs(pairs: dict, split: dict) -> dict:
  """The pairs near_duplicates.jsonl lists, from all pairs {(a, b): d}:
  each image's nearest partner (least d, then path) in each split and of
  another class (the class: the first folder)."""
  slots = {}
  for (a, b), d in pairs.items():
    for x, y in ((a, b), (b, a)):
      for slot in {split[y], 'other' if x.split('/')[0] != y.split('/')[0]
                   else split[y]}:
        key = (x, slot)
        slots[key] = min(slots.get(key, (d, y)), (d, y))
  return {tuple(sorted((x, y))): d for (x, _), (d, y) in slots.items()}


def _reported(keyed, run_dir):
  """What the search's last step makes of the group step's keyed slot
  records (per key, read_slots keeps each image's nearest over the
  bundles, then the lines, counts and leaks; the lines merged once each):
  ({(a, b): d} listed, the images' counts, {left-out relpath: (its split,
  the rejected line's near and distance)})."""
  by_key = collections.defaultdict(list)
  for key, where in keyed:
    by_key[key].append(where)
  report_step = nd._report_images(layout='class_folders',
                                  run_dir=str(run_dir))
  report_step.setup()
  report_step.start_bundle()
  runs, tagged = [], []
  for element in by_key.items():
    main, more = _outputs(report_step.process(element))
    runs += main
    tagged += more
  runs += _outputs(report_step.finish_bundle())[0]
  merged = run_dir / 'merged.jsonl'
  listed, crc = file_io.merge_runs(
      str(merged), [r.path for r in runs if r.path is not None], unique=True)
  assert crc == zlib.crc32(merged.read_bytes())
  found = {}
  for line in merged.read_text().splitlines():
    pair = json.loads(line)
    assert tuple(pair['paths']) not in found  # Each pair once.
    found[tuple(pair['paths'])] = pair['distance']
  assert listed == len(found)
  counts = collections.Counter()
  for run in runs:
    counts.update(run.counts)
  drops = {value[2]: value[0] for tag, value in tagged if tag == nd.DROPS}
  rejected = {r.relpath: (r.near, r.distance) for tag, r in tagged
              if tag == 'rejected'}
  assert set(drops) == set(rejected)
  return found, counts, {p: (drops[p], *rejected[p]) for p in drops}


def _image_counts(pairs: dict, split: dict) -> collections.Counter:
  """The report's counts from all pairs {(a, b): d}, image by image."""
  partners = collections.defaultdict(set)
  for a, b in pairs:
    partners[a].add(b)
    partners[b].add(a)
  counts = collections.Counter()
  for x, ys in partners.items():
    theirs = {split[y] for y in ys}
    counts['images'] += 1
    if split[x] == 'train':
      counts['leaks'] += bool(theirs - {'train'})
    else:
      counts['leaks'] += 'train' in theirs
      other = {'validation': 'test', 'test': 'validation'}[split[x]]
      counts['across_evaluation_splits'] += other in theirs
    counts['within_split'] += split[x] in theirs
    counts['label_conflicts'] += any(_class(y) != _class(x) for y in ys)
  return +counts


def test_the_band_step_through_bucket_files_finds_the_pairs_of_all_pairs(
    tmp_path, monkeypatch):
  """The band shuffle goes through files: each worker writes its entries
  as bucket ranges (flushed every _FLUSH_ENTRIES), the group step reads a
  bucket's ranges. Several flushes and buckets lose no entry, put a band
  key in one bucket only, and find exactly the all-pairs result; the
  nearest train copy of each evaluation image, kept per bundle and sent
  on in several flushes, is all-pairs' nearest."""
  monkeypatch.setattr(nd, '_FLUSH_ENTRIES', 500)
  distance, rng = 8, np.random.default_rng(5)
  refs = []
  for i in range(200):
    whole, centre = (int(rng.integers(0, 1 << 63)) * 2 + 1 for _ in range(2))
    for j, hashes in enumerate(((whole, centre),
                                (_flipped(rng, whole, 10), centre ^ 7),
                                (_flipped(rng, centre, 10),
                                 int(rng.integers(0, 1 << 63)) * 2 + 1))):
      refs.append(nd.Ref(hashes, f'c{i % 3}/{i}-{j}.jpg',
                         ('train', 'validation')[j == 2], 0, len(refs)))
  # An evaluation image with train copies at 3, 1 and 1 bits, in groups of
  # other bands: its nearest is the first path at 1.
  whole = int(rng.integers(0, 1 << 63)) * 2 + 1
  for path, flip, split in (('e/held.jpg', 0, 'test'),
                            ('e/t3.jpg', 0b111, 'train'),
                            ('e/t1b.jpg', 1 << 63, 'train'),
                            ('e/t1a.jpg', 1 << 40, 'train')):
    refs.append(nd.Ref((whole ^ flip, int(rng.integers(0, 1 << 63)) * 2 + 1),
                       path, split, 0, len(refs)))
  # A train image whose nearest is a copy of its class (1 bit), with a copy
  # of another class 3 bits off (and 2 from the first copy): only its
  # nearest of another class names that pair.
  whole = int(rng.integers(0, 1 << 63)) * 2 + 1
  for path, flip in (('k0/x.jpg', 0), ('k0/z.jpg', 1 << 5),
                     ('k1/y.jpg', (1 << 5) | (1 << 20) | (1 << 40))):
    refs.append(nd.Ref((whole ^ flip, int(rng.integers(0, 1 << 63)) * 2 + 1),
                       path, 'train', 0, len(refs)))
  masks = nd.band_masks(distance)
  bands = nd._bands_to_buckets(masks=masks, run_dir=str(tmp_path),
                               layout='class_folders')
  ranges = []
  for half in (refs[::2], refs[1::2]):  # Two bundles.
    bands.start_bundle()
    for ref in half:
      ranges += _outputs(bands.process((ref, False), (len(refs), 0)))[0]
    ranges += _outputs(bands.finish_bundle())[0]
  buckets = {}
  for bucket, where in ranges:
    buckets.setdefault(bucket, []).append(where)
  assert len(buckets) == nd.num_buckets(len(refs), masks) == nd.MIN_BUCKETS
  assert len({path for path, _, _ in (w for b in buckets.values() for w in b)}
             ) > 4  # Several flushes.
  want = {}
  for ref in refs:
    for key, value in nd.band_keys(ref, masks=masks, layout='class_folders'):
      want.setdefault(key, []).append(value)
  got, seen_keys = {}, set()
  for where in buckets.values():
    groups = nd.read_bucket(file_io.read_keyed(where))
    assert not seen_keys & set(groups)  # A key lives in one bucket.
    seen_keys |= set(groups)
    got.update(groups)
  assert {k: sorted(v) for k, v in got.items()} == {
      k: sorted(v) for k, v in want.items()}
  split = {ref.relpath: ref.split for ref in refs}
  want = collections.defaultdict(list)  # All-pairs' train copies.
  for (a, b), d in _brute_force(refs, distance).items():
    if split[a] == 'train' and split[b] != 'train':
      want[b].append((d, a))
    elif split[b] == 'train' and split[a] != 'train':
      want[a].append((d, b))
  want = {p: min(n) for p, n in want.items()}
  assert len(want) > 50 and want['e/held.jpg'] == (1, 'e/t1a.jpg')
  all_pairs = _brute_force(refs, distance)
  chunk = {ref.relpath: ref.chunk for ref in refs}
  for held in (20, 50_000):  # Flushed in mid-bundle / once, at its end.
    monkeypatch.setattr(nd, '_BUNDLE_IMAGES', held)
    # Each image's slots reduced after every group / once.
    monkeypatch.setattr(nd, '_REDUCE_ENTRIES', 0 if held == 20 else 10**6)
    slots_step = nd._group_slots(distance=distance, run_dir=str(tmp_path))
    slots_step.start_bundle()
    keyed = []
    for element in buckets.items():
      main, more = _outputs(slots_step.process(element, (len(refs), 0)))
      keyed += main
      assert not more  # No capped group.
    keyed += _outputs(slots_step.finish_bundle())[0]
    files = {where[0] for _, where in keyed}
    assert {key for key, _ in keyed} == set(range(nd.MIN_BUCKETS))
    records = [nd.read_slots(file_io.read_keyed([where]))
               for _, where in keyed]
    assert all(
        (nd._SPLITS[value[0]], value[1]) == (split[_text(p)], chunk[_text(p)])
        for part in records for p, value in part.items())
    if held > len(refs):  # One file; each image in one record.
      assert len(files) == 1
      assert sum(map(len, records)) == len(set().union(*records))
    else:  # Flushed mid-bundle: images in several records, merged.
      assert len(files) > 1
      assert sum(map(len, records)) > len(set().union(*records))
    listed, counts, left_out = _reported(keyed, tmp_path)
    assert listed == _nearest_pairs(all_pairs, split)
    assert 0 < len(listed) < len(all_pairs)  # The rule leaves pairs out.
    assert listed[('k0/x.jpg', 'k1/y.jpg')] == 3
    assert counts == _image_counts(all_pairs, split)
    assert {p: (d, near) for p, (_, near, d) in left_out.items()} == want
    assert all(left_out[p][0] == split[p] for p in left_out)


def _one_pair(image: str, partner: str, d: int) -> nd.BucketSlots:
  """A bucket's result naming image's nearest train partner (bytes order
  of the two paths decides their indices, as bucket_slots gives them)."""
  paths = sorted([image.encode('utf-8', 'surrogateescape'),
                  partner.encode('utf-8', 'surrogateescape')])
  at = paths.index(image.encode('utf-8', 'surrogateescape'))
  ints = lambda v: np.array(v, dtype=np.int64)
  return nd.BucketSlots(
      b''.join(paths), ints(np.cumsum([len(p) for p in paths])),
      np.array([2, 0] if at == 0 else [0, 2], dtype=np.uint8), ints([3, 3]),
      ints([at]), ints([0]), ints([1 - at]), ints([d]), [])


def test_ties_fall_to_the_first_path_in_bytes_order_on_any_bundle_cut():
  """Two partners at one distance: the one whose path's bytes come first
  wins, in one bundle (_Nearest) and across bundles (read_slots), also for
  names whose bytes order is not their str order (an undecodable byte
  against a character past U+E000)."""
  image, first, second = 'c/x.jpg', 'a/\ue000.jpg', 'a/\udcff.jpg'
  assert second < first  # As str; as bytes 0xEE... < 0xFF.
  want = {image: ((4, first, 'train'), None, None, None)}
  for order in ((first, second), (second, first)):
    one = nd._Nearest()
    for partner in order:
      one.add(_one_pair(image, partner, 4))
    assert {p: s for p, s in _slots(b''.join(
        r for _, r in one.records())).items() if p == image} == want
    records = b''
    for partner in order:  # Two bundles, then merged.
      bundle = nd._Nearest()
      bundle.add(_one_pair(image, partner, 4))
      records += b''.join(r for _, r in bundle.records())
    got = _slots(records)
    assert {image: got[image]} == want
    # A nearer partner wins over the tie, whatever its path.
    bundle = nd._Nearest()
    bundle.add(_one_pair(image, 'z/near.jpg', 3))
    got = _slots(records + b''.join(r for _, r in bundle.records()))
    assert got[image][0] == (3, 'z/near.jpg', 'train')
  with pytest.raises(OSError, match='cut short'):
    nd.read_slots(records[:-1])
