#!/usr/bin/env bash
# Fresh-machine main job on real bundled data: creates .venv, installs the
# project, exports scikit-learn's 1,797 handwritten digits into one folder
# per class, builds sharded TFRecords from them with Beam, trains the course's
# small CNN with validation and early stopping, and prints the held-out
# accuracy and where the pictures are.
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
rm -rf "$OUT/digits_model"
$PY -m trainer.main --data_dir="$OUT/digits_dataset" \
    --model_dir="$OUT/digits_model" --model=small_cnn \
    --epochs=30 --early_stopping_patience=5 --seed=0
echo
echo "Try it on a few images:"
echo "  $PY -m trainer.predict --model_dir=$OUT/digits_model $OUT/digits_images/3/digit_0003.png"
