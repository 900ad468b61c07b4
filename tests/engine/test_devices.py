"""Device and dtype choice (lorafleet.engine.devices), and the "given GPUs, sees none" stop.

This machine has no GPU: the CUDA cases monkeypatch ``torch.cuda.is_available``,
``torch.cuda.device_count`` and ``torch.cuda.is_bf16_supported``, so they test the choice
logic only, never a real CUDA device (docs/gpu.md says what still needs a GPU). The failure
cases are real: ``LORAFLEET_GPUS=1`` on this CPU-only torch.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.devices import (
    GPUS_ENV,
    GpuNotVisibleError,
    pick_device,
    pick_dtype,
    require_gpus,
)
from lorafleet.errors import LorafleetError


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend one CUDA device is visible; returns a setter for its bf16 support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    bf16 = {"supported": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16["supported"])
    return bf16


@pytest.fixture(autouse=True)
def no_gpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPUS_ENV, raising=False)


def test_cpu_machine_picks_cpu_and_float32() -> None:
    assert not torch.cuda.is_available()  # the premise of this test: a CPU-only machine
    device = pick_device()
    assert device == torch.device("cpu")
    assert pick_dtype("auto", device) is torch.float32
    assert pick_dtype(None, device) is torch.float32


def test_visible_gpu_is_picked_with_bf16_where_supported(fake_cuda) -> None:
    # CUDA functions monkeypatched (see the module docstring): the choice, not a real GPU.
    device = pick_device()
    assert device == torch.device("cuda:0")
    assert pick_dtype("auto", device) is torch.bfloat16
    fake_cuda["supported"] = False
    assert pick_dtype("auto", device) is torch.float32


def test_explicit_device_and_spec_dtype_win(fake_cuda) -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("float16", "cuda:0") is torch.float16
    assert pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert pick_dtype("float32", "cuda:0") is torch.float32
    assert pick_dtype(torch.float16, "cpu") is torch.float16


def test_unknown_dtype_name_is_one_line() -> None:
    with pytest.raises(LorafleetError, match=r"^base\.dtype: 'int8' is not one of auto, float32"):
        pick_dtype("int8", "cpu")


def test_given_gpus_but_none_visible_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: the pipeline gave this step one GPU; this machine's torch sees none (for real).
    monkeypatch.setenv(GPUS_ENV, "1")
    assert torch.cuda.device_count() == 0
    # When / Then: choosing a device, even an explicit CPU, stops with one line.
    for device in (None, "cpu"):
        with pytest.raises(GpuNotVisibleError) as caught:
            pick_device(device)
        message = str(caught.value)
        assert "\n" not in message
        assert "given 1 GPU(s) (LORAFLEET_GPUS=1)" in message and "sees none" in message


def test_given_gpus_and_visible_passes(monkeypatch: pytest.MonkeyPatch, fake_cuda) -> None:
    monkeypatch.setenv(GPUS_ENV, "1")
    assert require_gpus() == 1
    assert pick_device() == torch.device("cuda:0")


def test_no_gpus_given_runs_on_the_cpu() -> None:
    assert require_gpus({}) == 0
    assert require_gpus({GPUS_ENV: "0"}) == 0
    with pytest.raises(LorafleetError, match="not a whole number"):
        require_gpus({GPUS_ENV: "one"})


class _StubModel(torch.nn.Module):
    """Stands in for a model that cannot be built here: records where it was moved."""

    def __init__(self) -> None:
        super().__init__()
        self.moved_to: list[torch.device] = []

    def forward(self, input_ids=None, cache=None):  # the signature Generator inspects
        raise AssertionError("not run in this test")

    def to(self, device):
        self.moved_to.append(torch.device(device))
        return self


def test_generator_loads_on_the_visible_gpu_in_bf16_with_the_revision(
    monkeypatch: pytest.MonkeyPatch, fake_cuda, tiny_base
) -> None:
    # CUDA monkeypatched and the model stubbed: what the Generator asks transformers for.
    from transformers import AutoModelForCausalLM

    from lorafleet.engine.generation import Generator

    calls, stub = [], _StubModel()

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return stub

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    generator = Generator(tiny_base, revision="v1.2")
    assert calls and calls[0][1]["dtype"] is torch.bfloat16, calls
    assert calls[0][1]["revision"] == "v1.2"
    assert generator.device == torch.device("cuda:0") and stub.moved_to == [generator.device]


def test_generator_honours_the_spec_dtype_on_the_cpu(tiny_base) -> None:
    from lorafleet.engine.generation import Generator

    assert Generator(tiny_base).model.dtype is torch.float32
    generator = Generator(tiny_base, dtype="bfloat16")
    assert generator.device == torch.device("cpu")
    assert generator.model.dtype is torch.bfloat16


def test_generator_given_a_gpu_it_cannot_see_fails(monkeypatch: pytest.MonkeyPatch, tiny_base):
    from lorafleet.engine.generation import Generator

    monkeypatch.setenv(GPUS_ENV, "2")
    with pytest.raises(GpuNotVisibleError, match=r"given 2 GPU\(s\) .* sees none"):
        Generator(tiny_base)
