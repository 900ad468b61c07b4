#!/usr/bin/env bash
# Fail if pipelines/fleet_pipeline.yaml differs from a fresh compile.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q tests/test_pipeline_golden.py
