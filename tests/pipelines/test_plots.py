"""The image grids (plots._captioned_grid): hostile captions and titles."""

import numpy as np
from PIL import Image
from PIL import ImageDraw

from pipelines import plots


def test_grid_captions_fit_their_cells_and_odd_text_draws(tmp_path):
  """Each caption line is shortened to its cell with a gap to the next;
  lines past the caption band are cut; a title with line breaks, very long
  words and non-Latin text draw."""
  rng = np.random.default_rng(0)
  images = rng.random((8, 30, 50, 3)).astype(np.float32)
  images[:6] = 1.0  # White: any ink there is a caption's.
  name = 'class_folder_a/' + 'x' * 10_000 + '.jpg'
  captions = [f'golden_retriever_puppy 97%\n(given labrador)\n{name}',
              'a\nb\nc\nd\ne\nf\ng', '', '\n', '\u05e9\u05dc\u05d5\u05dd \U0001f600',
              '\x00\x07 tab\tcontrol', 'ok', '1\n2\n3\n4\n5\n6\n7\n8']
  path = tmp_path / 'gallery.png'
  plots.plot_prediction_gallery(images, captions, [True, False] * 4,
                                str(path), title='two\nlines\n' + 'y' * 5_000)
  # The 8-line caption under the first row stops at its band.
  with Image.open(path) as picture:
    assert picture.size == (6 * 170, 50 + 2 * (160 + 60 + 10))
    pixels = np.asarray(picture.convert('L'))
  assert (pixels[50 + 60:50 + 230] > 250).all()  # The first row's images.
  # A gap of white between neighbouring captions in every caption row.
  for row in range(2):
    band = pixels[50 + row * 230:50 + row * 230 + 60]
    for column in range(1, 6):
      edge = column * 170
      assert (band[:, edge - 6:edge + 6] > 250).all(), (row, column)
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  font = plots._font(11)  # pylint: disable=protected-access
  short = plots._fitted(draw, name, font, 154)  # pylint: disable=protected-access
  assert draw.textlength(short, font=font) <= 154
  assert short.startswith('class_folder_') and short.endswith('.jpg')
