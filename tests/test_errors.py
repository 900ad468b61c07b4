"""One wording for pydantic's findings everywhere a user reads them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.errors import first_problem, validation_problems
from lorafleet.fleet import CanaryPolicy, DataRules


def _error(model, **fields) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(fields)
    return info.value


def test_every_problem_is_listed_in_the_users_words() -> None:
    exc = _error(DataRules, min_chars=0, colour="red")
    assert validation_problems(exc) == [
        (("min_chars",), "Input should be greater than or equal to 1"),
        (("colour",), "unknown field"),
    ]


def test_a_cross_field_rule_is_named_by_its_root() -> None:
    # A model validator's error has no location: the root names the object instead
    exc = _error(DataRules, min_chars=100, max_chars=10)
    assert first_problem(exc, "data rules") == "data rules: min_chars must not exceed max_chars"


def test_a_dotted_root_prefixes_nested_paths() -> None:
    exc = _error(CanaryPolicy, steps=[50, 10])
    assert first_problem(exc, "canary.") == (
        "canary.steps: steps must be increasing percentages in (0, 100], ending at 100"
    )
    exc = _error(CanaryPolicy, mode="revision")
    assert first_problem(exc, "canary.").startswith("canary: mode 'revision' needs")
