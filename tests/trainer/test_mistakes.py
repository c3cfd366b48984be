"""trainer.mistakes: the suspect-label rule against cleanlab, the CSV, the
gallery order (no TensorFlow, no training)."""

import csv

import numpy as np
import pytest

from trainer import mistakes


def _noisy_probabilities(rng, n: int, k: int, *, sharp: float):
  """Random softmax outputs that mostly agree with random labels."""
  labels = rng.integers(0, k, size=n)
  logits = rng.normal(size=(n, k))
  logits[np.arange(n), labels] += sharp
  flip = rng.random(n) < 0.1  # 10% of the labels are wrong.
  labels[flip] = rng.integers(0, k, size=int(flip.sum()))
  return labels, mistakes.probabilities(logits, num_classes=k)


@pytest.mark.parametrize('seed, n, k, sharp', [
    (0, 400, 10, 3.0), (1, 300, 3, 1.0), (2, 200, 2, 2.0), (3, 50, 7, 0.5),
    (4, 1000, 5, 6.0)])
def test_suspects_are_cleanlabs_confident_learning_issues(seed, n, k, sharp):
  from cleanlab import filter as cleanlab_filter  # Test-only reference.
  labels, probs = _noisy_probabilities(np.random.default_rng(seed), n, k,
                                       sharp=sharp)
  if k > 3:
    labels[labels == k - 1] = 0  # A class no image is labelled with.
  ours = mistakes.suspects(labels, probs)
  theirs = cleanlab_filter.find_label_issues(
      labels, probs, filter_by='confident_learning',
      return_indices_ranked_by='self_confidence')
  assert len(ours) > 0
  assert sorted(ours.tolist()) == sorted(np.asarray(theirs).tolist())
  # Least self-confident first, as cleanlab ranks them.
  self_confidence = probs[ours, labels[ours]]
  assert np.all(np.diff(self_confidence) >= 0)


def test_two_class_probabilities_come_from_the_sigmoid_unit():
  probs = mistakes.probabilities(np.array([[0.9], [0.5], [0.2]]),
                                 num_classes=2)
  np.testing.assert_allclose(probs, [[0.1, 0.9], [0.5, 0.5], [0.8, 0.2]])
  # A tie is the first class, as the serving export's argmax.
  assert mistakes.predicted(probs).tolist() == [1, 0, 0]


def test_gallery_puts_confident_mistakes_first_then_close_calls():
  labels = np.array([0, 0, 1, 1, 2])
  probs = np.array([[0.9, 0.05, 0.05],   # right, sure
                    [0.2, 0.7, 0.1],     # wrong, 0.7
                    [0.05, 0.5, 0.45],   # right, close call
                    [0.95, 0.03, 0.02],  # wrong, 0.95
                    [0.1, 0.1, 0.8]])    # right
  assert mistakes.gallery_order(labels, probs).tolist() == [3, 1, 2, 4, 0]


def test_predictions_csv_has_a_row_per_image_and_every_probability(tmp_path):
  names = ('cat, striped', 'dog "big"', 'fish')
  evaluated = mistakes.Evaluated(
      files=['cat, striped/a,1.jpg', 'fish/\u00e9\u00e8.png'],
      splits=['validation', 'test'], labels=np.array([0, 2]),
      probs=np.array([[0.2, 0.7, 0.1], [0.0, 0.25, 0.75]]))
  path = tmp_path / 'predictions.csv'
  mistakes.write_predictions(str(path), evaluated, names)
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['file', 'split', 'given', 'predicted', 'correct',
                     'confidence', *names]
  assert rows[1][:6] == ['cat, striped/a,1.jpg', 'validation', 'cat, striped',
                         'dog "big"', 'false', '0.700000']
  assert rows[2][:5] == ['fish/\u00e9\u00e8.png', 'test', 'fish', 'fish',
                         'true']
  assert [float(p) for p in rows[2][6:]] == [0.0, 0.25, 0.75]


def test_suspect_report_names_files_and_thresholds():
  labels = np.array([0, 0, 0, 1, 1, 1])
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.05, 0.95], [0.1, 0.9],
                    [0.2, 0.8], [0.3, 0.7]])
  evaluated = mistakes.Evaluated([f'f{i}' for i in range(6)], ['test'] * 6,
                                 labels, probs)
  report = mistakes.suspect_report(
      evaluated, ('a', 'b'), splits=['test'],
      found=mistakes.suspects(labels, probs))
  assert report['suspects'] == 1 and report['evaluated'] == 6
  assert report['files'] == [{
      'file': 'f2', 'split': 'test', 'given': 'a', 'model_says': 'b',
      'probability_of_given': 0.05, 'probability_of_model_class': 0.95}]
  assert report['thresholds'] == {'a': pytest.approx(0.5833333),
                                  'b': pytest.approx(0.8)}
  empty = mistakes.Evaluated([], [], np.zeros(0, np.int64), np.zeros((0, 2)))
  assert mistakes.suspect_report(
      empty, ('a', 'b'), splits=[],
      found=mistakes.suspects(empty.labels, empty.probs))['suspects'] == 0
