"""Train statistics: exact integer pixel sums (any order) -> mean and std."""

from __future__ import annotations

import fractions
import math
from typing import Optional

import apache_beam as beam


class PixelSums(beam.CombineFn):
  """Exact per-channel integer sums of train pixels: same in any order."""

  def create_accumulator(self):
    return None

  def add_input(self, acc, sums):
    """sums: (per-channel sums, per-channel sums of squares, pixel count)."""
    return self.add(acc, sums)

  @staticmethod
  def add(a, b):
    """The sum of two (sums, sums of squares, count) triples (None: 0)."""
    if a is None or b is None:
      return b if a is None else a
    return (tuple(x + y for x, y in zip(a[0], b[0])),
            tuple(x + y for x, y in zip(a[1], b[1])), a[2] + b[2])

  def merge_accumulators(self, accumulators):
    out = None
    for acc in accumulators:
      out = self.add(out, acc)
    return out

  def extract_output(self, acc):
    return acc


def mean_std(sums) -> tuple[Optional[tuple[float, ...]],
                            Optional[tuple[float, ...]]]:
  """Exact integer sums -> per-channel mean/std (0..255), or (None, None)."""
  if not sums or not sums[2]:
    return None, None
  total, total_sq, n = sums
  mean = [fractions.Fraction(t, n) for t in total]
  variance = [max(fractions.Fraction(q, n) - m * m, 0)
              for q, m in zip(total_sq, mean)]
  return (tuple(round(float(m), 4) for m in mean),
          tuple(round(math.sqrt(v), 4) for v in variance))
