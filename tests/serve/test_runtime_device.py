"""The serving runtime loads its base as the spec says (base.dtype, base.revision) and refuses
to serve on the CPU in a pod that was given GPUs (real on this CPU-only machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.engine.devices import GPUS_ENV, GpuNotVisibleError
from lorafleet.serve.model import LorafleetRuntime


@pytest.fixture(autouse=True)
def no_gpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPUS_ENV, raising=False)


def test_runtime_loads_the_base_in_the_spec_dtype(tiny_base: Path) -> None:
    runtime = LorafleetRuntime("base", tiny_base, {}, dtype="bfloat16")
    try:
        assert runtime.load()
        assert runtime._generator is not None
        assert runtime._generator.model.dtype is torch.bfloat16
    finally:
        runtime.stop()


def test_runtime_passes_the_revision_to_the_generator(
    monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    import lorafleet.serve.model as model_module

    seen = {}

    class Stop(Exception):
        pass

    def generator(base_dir, **kwargs):
        seen.update(kwargs, base_dir=base_dir)
        raise Stop

    monkeypatch.setattr(model_module, "Generator", generator)
    with pytest.raises(Stop):
        LorafleetRuntime("base", tiny_base, {}, revision="v3", dtype="float16").load()
    assert seen["revision"] == "v3" and seen["dtype"] == "float16", seen


def test_runtime_given_a_gpu_it_cannot_see_does_not_serve(
    monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    monkeypatch.setenv(GPUS_ENV, "1")
    runtime = LorafleetRuntime("base", tiny_base, {})
    with pytest.raises(GpuNotVisibleError, match="sees none"):
        runtime.load()
    assert not runtime.ready
