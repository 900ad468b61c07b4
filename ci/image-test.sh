#!/usr/bin/env bash
# Build both images with podman from a local Debian base, offline, and run them:
#   1. a bookworm rootfs (debootstrap) imported as the base image (python3.11, no registry pull);
#   2. a wheelhouse of lorafleet's dependencies (CPU torch from the local wheel), mounted
#      read-only into the build, which runs with --network none;
#   3. hadolint on both Dockerfiles;
#   4. components/Dockerfile -> components.IMAGE, lorafleet/serve/Dockerfile -> the runtime;
#   5. the validate component's CLI on a shipped seed file inside the component image, and the
#      runtime's /v2/health/ready and /openai/v1/models on a tiny base inside the runtime image.
# Called by `make image-test` (and .ci/run). Needs root, podman, runc and debootstrap
# (Debian packages); caches in $IMAGE_TEST_DIR (default build/image-test). See docs/images.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
WORK=${IMAGE_TEST_DIR:-build/image-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/lorafleet-base:bookworm
RUNTIME_IMAGE=localhost/lorafleet-runtime:test
PORT=${IMAGE_TEST_PORT:-18080}
CONTAINER=lorafleet-image-test-$$
export CONTAINERS_CONF=$ROOT/ci/containers.conf HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() { printf '\n== %s\n' "$*"; }
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || { echo "image-test: $tool not found (apt-get install podman runc debootstrap)" >&2; exit 1; }
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
IMAGE=$("$PY" -c 'from lorafleet.components import IMAGE; print(IMAGE)')

step "base image $BASE_IMAGE (debootstrap bookworm + podman import)"
if ! podman image exists "$BASE_IMAGE"; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3.11" ]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" "$MIRROR"
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    fi
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE"
fi

step "wheelhouse (the host's pip config: local CPU torch wheel, local indexes, PyPI)"
# (pip warns once per package about the local index folders it does not have: drop those lines.)
"$PY" -m pip wheel -q --wheel-dir "$WORK/wheelhouse" torch==2.13.0 'setuptools>=69' wheel . \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
# The image builds lorafleet from source; a wheel of it here would only go stale.
rm -f "$WORK"/wheelhouse/lorafleet-*.whl

step "hadolint"
# This also lints the CUDA variant (make image-gpu): the same files, only build args differ.
"$(dirname "$PY")/hadolint" components/Dockerfile lorafleet/serve/Dockerfile

# Docker format keeps the runtime's HEALTHCHECK (the OCI format has no field for it).
OFFLINE=(--format docker --network none --volume "$WORK/wheelhouse:/wheels:ro"
         --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg TORCH_FIND_LINKS=/wheels
         --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)

step "build $IMAGE (components/Dockerfile)"
podman build "${OFFLINE[@]}" -f components/Dockerfile -t "$IMAGE" .

step "build $RUNTIME_IMAGE (lorafleet/serve/Dockerfile)"
podman build --format docker --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "LORAFLEET_IMAGE=$IMAGE" \
    -f lorafleet/serve/Dockerfile -t "$RUNTIME_IMAGE" .

step "component image: non-root, CPU torch, validate a shipped seed file"
uid=$(podman run --rm --network none "$IMAGE" id -u)
[ "$uid" != 0 ] || { echo "image-test: $IMAGE runs as root" >&2; exit 1; }
podman run --rm --network none "$IMAGE" python -c \
    'import torch, kfp, lorafleet.components.stages; assert torch.version.cuda is None, torch.version.cuda; print("torch", torch.__version__, "kfp", kfp.__version__)'
podman run --rm --network none -v "$ROOT/examples:/examples:ro" "$IMAGE" \
    lorafleet data validate /examples/data/job-analyzer/seed.jsonl --task job-analyzer

step "runtime image: serve a tiny base, check readiness"
"$PY" - "$WORK/base-cache" > "$WORK/tiny-base.path" <<'EOF'
import sys
from pathlib import Path

from lorafleet.base import build_demo_base
from tests.conftest import CORPUS, TINY_BASE  # the test suite's tiny base: builds in seconds

print(build_demo_base(CORPUS, TINY_BASE, cache_dir=Path(sys.argv[1])))
EOF
TINY_BASE=$(cat "$WORK/tiny-base.path")
# The base is written through a private (0700) temp dir; the image runs as uid 10001.
chmod -R a+rX "$TINY_BASE"
trap 'podman rm -f "$CONTAINER" >/dev/null 2>&1 || true' EXIT
# podman logs that it has no systemd to time the image's HEALTHCHECK (harmless here): the
# check is run by hand once the runtime is ready.
podman run -d --name "$CONTAINER" -p "127.0.0.1:$PORT:8080" -v "$TINY_BASE:/models/base:ro" \
    "$RUNTIME_IMAGE" --base /models/base --name tiny >/dev/null
for _ in $(seq 120); do
    if curl -fsS "http://127.0.0.1:$PORT/v2/health/ready" 2>/dev/null; then ready=1; break; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then break; fi
    sleep 1
done
if [ -z "${ready:-}" ]; then
    podman logs "$CONTAINER" >&2
    echo "image-test: the runtime was not ready" >&2
    exit 1
fi
echo
curl -fsS "http://127.0.0.1:$PORT/openai/v1/models" | "$PY" -c \
    'import json, sys; ids = [m["id"] for m in json.load(sys.stdin)["data"]]; assert "tiny" in ids, ids; print("models:", ids)'
podman healthcheck run "$CONTAINER" && echo "the image's HEALTHCHECK passes"
step "image-test passed"
