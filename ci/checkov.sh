#!/usr/bin/env bash
# Run checkov from its own tool environment (.venv-tools/): its pinned dependencies
# (boto3, networkx, packaging, ...) clash with the project's, so it never enters .venv.
# Usage: ci/checkov.sh [checkov args...]; the first call creates .venv-tools (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${LORAFLEET_TOOLS_VENV:-.venv-tools}"
if [ ! -x "$TOOLS/bin/checkov" ]; then
  python3.11 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check 'checkov>=3.2,<4'
fi
# Offline: no guideline download from the vendor API (it only fails and slows the run here).
export BC_SKIP_MAPPING=TRUE
exec "$TOOLS/bin/checkov" --skip-download "$@"
