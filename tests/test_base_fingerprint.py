"""A hub base's fingerprint names the commit its revision resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from lorafleet.base import fingerprint_model, hub_commit

SHA_A = "a" * 40
SHA_B = "b" * 40


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache as downloads leave it: refs/<branch or tag> holds the commit."""
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA_A)
    (refs / "v2").write_text(SHA_B)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_a_revision_resolves_through_the_cache(hub_cache: Path) -> None:
    assert hub_commit("org/model") == SHA_A
    assert hub_commit("org/model", "v2") == SHA_B
    assert hub_commit("org/model", SHA_B) == SHA_B  # a commit is its own answer
    assert hub_commit("org/model", "never-downloaded") is None  # offline, unknown


def test_two_revisions_of_one_hub_model_fingerprint_apart(hub_cache: Path) -> None:
    """Adapters trained on one revision must not pass as adapters of another."""
    main, v2 = fingerprint_model("org/model"), fingerprint_model("org/model", "v2")
    assert main != v2
    # the tag and the commit it names are the same base
    assert fingerprint_model("org/model", SHA_B) == v2
    assert fingerprint_model("org/model", "main") == main


def test_a_local_directory_ignores_the_revision(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert fingerprint_model(tmp_path, "v2") == fingerprint_model(tmp_path)
