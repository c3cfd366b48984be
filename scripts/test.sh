#!/usr/bin/env bash
# Fresh-machine test run: creates .venv, installs the project with its test
# extras from setup.py, lints (ruff.toml), runs the whole pytest suite with
# its files spread over 4 processes (most slow tests wait on the processes
# they start; a file's tests stay together so its fixtures are made once).
# Extra args go to pytest, e.g. `bash scripts/test.sh -n 0 -k predict`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Installed once per setup.py and C source: a stamp in the venv holds what it
# installed (pip takes ~11 s to find that nothing changed). The install
# compiles the C files (pipelines/preprocessing/_measures.c,
# pipelines/folder_to_records/_near_pairs.c) in place; build/ is removed
# first so a changed source is always compiled again.
STAMPED="setup.py pipelines/preprocessing/_measures.c pipelines/folder_to_records/_near_pairs.c"
if ! cat $STAMPED | cmp -s - .venv/.installed-setup.py; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  rm -rf build
  .venv/bin/python -m pip install --quiet -e ".[test]"
  cat $STAMPED > .venv/.installed-setup.py
fi
# The report page's browser test needs Chromium: installed quietly where it
# is missing and this is a root shell with apt-get. A failed install never
# stops the run; the test then skips and says why.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (export DEBIAN_FRONTEND=noninteractive; timeout 300 apt-get update -qq \
    && timeout 300 apt-get install -y -qq chromium) </dev/null >/dev/null 2>&1 \
    || echo "scripts/test.sh: chromium could not be installed; the report" \
      "page's browser test will skip" >&2
fi
.venv/bin/ruff check --quiet .
# The project's modules byte-compiled once (an editable install does not,
# and with PYTHONDONTWRITEBYTECODE set no process writes them): every test
# process and every Beam worker it starts would compile them again.
.venv/bin/python -m compileall -q -j 0 pipelines trainer tfrecords_schema \
  benchmarks >/dev/null
exec .venv/bin/python -m pytest -q -n 4 --dist loadfile tests "$@"
