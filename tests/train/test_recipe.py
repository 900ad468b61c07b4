"""The LoRA recipe lowers the loss and writes a loadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.records import Record
from lorafleet.train.recipe import LoRARecipe, train_adapter


def _records(n: int = 12) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            task="chat",
            source="human",
            messages=[
                {"role": "user", "content": f"What is the budget of job {i}?"},
                {"role": "assistant", "content": f"The budget of job {i} is {100 * i} dollars."},
            ],
        )
        for i in range(n)
    ]


def test_training_lowers_the_loss_and_saves_an_adapter(tiny_base: Path, tmp_path: Path) -> None:
    result = train_adapter(
        tiny_base,
        _records(),
        LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
        TrainingSettings(epochs=20, learning_rate=1e-2, batch_size=4, warmup_ratio=0.0),
        tmp_path / "adapter",
    )
    assert result.steps == 60  # ceil(12 / 4) x 20 epochs
    assert len(result.losses) == result.steps
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses  # seen: about 0.70 with this seed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
    lines = (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.steps and json.loads(lines[0])["step"] == 1


def test_the_recipe_checks_its_inputs(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training records"):
        LoRARecipe(tiny_base, [], LoraSettings(), TrainingSettings(), tmp_path)
    no_answers = [Record(id="a", task="chat", source="human", messages=[{"role": "user", "content": "hi"}])]
    with pytest.raises(ValueError, match="no assistant turns"):
        LoRARecipe(tiny_base, no_answers, LoraSettings(), TrainingSettings(), tmp_path)
