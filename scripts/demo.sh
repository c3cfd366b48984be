#!/usr/bin/env bash
# Fresh-machine main job on real bundled data: creates .venv, installs the
# project, exports scikit-learn's 1,797 handwritten digits into one folder
# per class, and builds sharded TFRecords from them with Beam.
# Everything lands in demo_output/ (override with DEMO_DIR=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${DEMO_DIR:-demo_output}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[demo]"
PY=.venv/bin/python

rm -rf "$OUT/digits_images"
$PY -m pipelines.sample_data --dataset=digits --output_dir="$OUT/digits_images"
$PY -m pipelines.build --input_dir="$OUT/digits_images" \
    --output_dir="$OUT/digits_dataset" --overwrite \
    --image_size=32 --channels=1 --image_format=png \
    --validation_fraction=0.2 --test_fraction=0.1 \
    --direct_num_workers=2 --direct_running_mode=multi_processing
