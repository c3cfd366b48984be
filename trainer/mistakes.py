"""The model's mistakes by file: predictions, a gallery order, suspect labels.

No TensorFlow here: the trainer collects, for every image of the evaluation
splits, its file (the record's `image/filename`), given label and the model's
class probabilities, and this module turns them into

  predictions.csv      one row per image: file, split, given and predicted
                       class, whether it is right, every class's probability
  gallery order        wrong first, most confident first (mistakes.png)
  suspect labels       images whose given label the model contradicts with
                       confidence, by the confident-learning rule
                       (suspect_labels.json, suspect_labels.png)

The suspect rule is cleanlab's `find_label_issues(labels, pred_probs,
filter_by='confident_learning')` (Northcutt et al., "Confident Learning",
JAIR 2021), written out here so the trainer needs no cleanlab, pandas or
scikit-learn; tests/trainer/test_mistakes.py checks it against cleanlab on
the same probabilities. Its limits (README, "Mistakes by file"): the model
was trained on the same labels, so a wrong label it has memorised is not
contradicted; the evaluation images it scores were not trained on, which is
what makes the rule meaningful there.
"""

from __future__ import annotations

import csv
import dataclasses
from typing import Optional, Sequence

import numpy as np

PREDICTIONS_FILE = 'predictions.csv'
MISTAKES_FILE = 'mistakes.png'
SUSPECTS_FILE = 'suspect_labels.json'
SUSPECTS_PICTURE = 'suspect_labels.png'
GALLERY_SIZE = 36  # Images in mistakes.png and suspect_labels.png.

# cleanlab's constants (cleanlab.internal.constants): a probability counts
# as confident when >= threshold - _SLACK; thresholds are at least
# _MIN_THRESHOLD; a class no image is labelled with gets _NO_THRESHOLD (no
# probability reaches it).
_SLACK = 1e-6
_MIN_THRESHOLD = 2e-6
_NO_THRESHOLD = 2.0


def probabilities(outputs: np.ndarray, *, num_classes: int) -> np.ndarray:
  """The model's outputs -> class probabilities float64 [N, K].

  outputs: float [N, 1] sigmoid probability of class 1 (two classes, the
  trainer's single unit) or [N, K] logits (more classes).
  """
  outputs = np.asarray(outputs, dtype=np.float64)
  if num_classes == 2 and outputs.shape[-1] == 1:
    p = outputs[:, 0]
    return np.stack([1.0 - p, p], axis=1)
  shifted = outputs - outputs.max(axis=1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=1, keepdims=True)


def predicted(probs: np.ndarray) -> np.ndarray:
  """int64 [N]: the predicted class of each row of probs [N, K], the first
  most probable (the serving export's argmax: with two classes, class 1
  above probability 0.5)."""
  return probs.argmax(axis=1).astype(np.int64)


@dataclasses.dataclass
class Evaluated:
  """Every evaluated image, in record order, one split after the other.

  files: [N] paths relative to the build's --input_dir; splits: [N] split
  names; labels: int [N] given classes; probs: float [N, K]; losses: float
  [N], the training loss of each image (None when not known).
  """
  files: list[str]
  splits: list[str]
  labels: np.ndarray
  probs: np.ndarray
  losses: Optional[np.ndarray] = None

  @property
  def predicted(self) -> np.ndarray:
    return predicted(self.probs)

  @property
  def confidence(self) -> np.ndarray:
    """float [N]: probability of the predicted class."""
    return self.probs[np.arange(len(self.labels)), self.predicted]

  def of_split(self, split: str) -> 'Evaluated':
    keep = np.array([s == split for s in self.splits], dtype=bool)
    return Evaluated([f for f, k in zip(self.files, keep) if k],
                     [split] * int(keep.sum()), self.labels[keep],
                     self.probs[keep],
                     None if self.losses is None else self.losses[keep])


def write_predictions(path: str, evaluated: Evaluated,
                      class_names: Sequence[str]) -> None:
  """predictions.csv: file, split, given, predicted, correct, confidence,
  then one column per class (header: the class name) with its probability.

  Probabilities have 6 decimals; quoting follows the csv module, so class
  names and paths with commas, quotes or line breaks stay one field.
  """
  guess = evaluated.predicted
  confidence = evaluated.confidence
  with open(path, 'w', newline='', encoding='utf-8',
            errors='surrogateescape') as f:
    writer = csv.writer(f)
    writer.writerow(['file', 'split', 'given', 'predicted', 'correct',
                     'confidence', *class_names])
    for i, file in enumerate(evaluated.files):
      writer.writerow([
          file, evaluated.splits[i], class_names[evaluated.labels[i]],
          class_names[guess[i]], str(bool(guess[i] == evaluated.labels[i])
                                     ).lower(),
          f'{confidence[i]:.6f}', *(f'{p:.6f}' for p in evaluated.probs[i])])


def gallery_order(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Row indices for mistakes.png: wrong predictions first, most confident
  first; then right ones, least confident first (the closest calls). Ties
  keep record order."""
  guess = predicted(probs)
  confidence = probs[np.arange(len(labels)), guess]
  right = guess == labels
  # lexsort sorts by the last key first.
  return np.lexsort((np.where(right, confidence, -confidence), right))


def confident_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """float [K]: per class, the mean probability of that class over the
  images labelled with it (cleanlab.count.get_confident_thresholds)."""
  thresholds = np.full(probs.shape[1], _NO_THRESHOLD)
  for k in np.unique(labels):
    thresholds[k] = probs[labels == k, k].mean()
  return np.maximum(thresholds, _MIN_THRESHOLD)


def suspects(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Indices of images whose label the model confidently contradicts,
  least self-confident (probability of the given label) first.

  The confident-learning rule: an image counts for class j when its
  probability of j reaches j's threshold (confident_thresholds); its
  confident class is the one above threshold (the most probable if
  several). It is suspect when it has a confident class, that class is not
  its given label, and the given label is not (within 1e-6) the most
  probable class. cleanlab: find_label_issues(filter_by=
  'confident_learning', return_indices_ranked_by='self_confidence').
  """
  labels = np.asarray(labels, dtype=np.int64)
  if not len(labels):
    return np.zeros(0, dtype=np.int64)
  confident = probs >= confident_thresholds(labels, probs) - _SLACK
  count = confident.sum(axis=1)
  guess = np.where(count > 1, probs.argmax(axis=1), confident.argmax(axis=1))
  issue = (count > 0) & (guess != labels)
  nudged = probs.copy()
  nudged[np.arange(len(labels)), labels] += _SLACK
  issue &= nudged.argmax(axis=1) != labels
  found = np.flatnonzero(issue)
  self_confidence = probs[found, labels[found]]
  return found[np.argsort(self_confidence, kind='stable')]


def suspect_report(evaluated: Evaluated, class_names: Sequence[str],
                   *, splits: Sequence[str], found: np.ndarray) -> dict:
  """suspect_labels.json: the rule, the counts and one entry per suspect
  (file, split, given class, the model's class and both probabilities).
  found: suspects(evaluated.labels, evaluated.probs)."""
  guess = evaluated.predicted
  entries = []
  for i in found:
    given, other = int(evaluated.labels[i]), int(guess[i])
    entries.append({
        'file': evaluated.files[i], 'split': evaluated.splits[i],
        'given': class_names[given], 'model_says': class_names[other],
        'probability_of_given': round(float(evaluated.probs[i, given]), 6),
        'probability_of_model_class': round(float(evaluated.probs[i, other]),
                                            6)})
  return {
      'rule': ("confident learning (cleanlab find_label_issues, filter_by="
               "'confident_learning'), on the model's probabilities for the "
               'evaluation images; least self-confident first'),
      'splits': list(splits),
      'evaluated': len(evaluated.labels),
      'suspects': len(entries),
      'thresholds': {name: round(float(t), 6) for name, t in zip(
          class_names, confident_thresholds(evaluated.labels, evaluated.probs)
          if len(evaluated.labels) else [])},
      'files': entries,
  }
