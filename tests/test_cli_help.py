"""``--help`` of every command, and ``--version``, as ``lorafleet`` prints them."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import click
import pytest
from typer.main import get_command

from lorafleet import __version__
from lorafleet.cli import app
from lorafleet.commands.runner import run_app


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and group under ``command``, as the words that name it."""
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


COMMANDS = list(_command_paths(get_command(app)))


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        run_app(app, args=list(args), prog_name="lorafleet")
    return done.value.code, capsys.readouterr().out


def test_the_walk_finds_the_commands() -> None:
    assert {("serve",), ("spec", "reference"), ("data", "synthesize")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "lorafleet")
def test_help_shows_no_type_for_a_flag(path: tuple[str, ...], capsys) -> None:
    code, text = _run(capsys, *path, "--help")
    assert code == 0
    help_line = next(line for line in text.splitlines() if "--help" in line)
    assert "Show this message" in help_line
    assert "<bool>" not in text


def test_options_that_take_a_value_keep_their_type(capsys) -> None:
    code, text = _run(capsys, "serve", "--help")
    assert code == 0
    port = next(line for line in text.splitlines() if "--port" in line)
    assert "<int>" in port


def test_version_is_the_installed_distributions(capsys) -> None:
    code, text = _run(capsys, "--version")
    assert (code, text) == (0, f"lorafleet {__version__}\n")
    assert __version__ == importlib.metadata.version("lorafleet")
