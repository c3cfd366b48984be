"""The validated settings a build's Beam graph runs with."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pipelines.preprocessing import image_quality
from pipelines.preprocessing import source_image


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """Validated build settings (see `pipelines.build` for the flags)."""
  input_dir: str
  dataset_name: str
  class_names: tuple[str, ...]
  layout: str
  image: source_image.ImageOptions
  validation_fraction: float
  test_fraction: float
  seed: int
  shard_size_bytes: int
  near_duplicate_distance: int = 0  # 0: no near-duplicate search.
  quality: image_quality.Thresholds = image_quality.Thresholds()
  # Exact per-class split shares (splits.stratify) instead of the hash.
  stratified: bool = False
  # An earlier build whose records unchanged files take (reuse.Source).
  reuse: Optional[Any] = None
