#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_check.sh needs on a lent GPU machine: that image has
# Python 3.12 with torch, tokenizers, accelerate and huggingface-hub, but not pydantic, and
# older transformers/peft than lorafleet pins. The versions are this venv's, so both sides
# run the same library code. Writes .whl/ (git-ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for pkg in pydantic pydantic_core annotated-types typing-inspection transformers peft; do
  pins+=("$pkg==$(version "$pkg")")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls -1 .whl
