"""The standalone router's entry point: ``python -m lorafleet.serve.router``.

The KServe transformer container runs this (KServe appends ``--model_name``,
``--predictor_host`` and ``--http_port``); it is the same command as ``lorafleet router``
(:mod:`lorafleet.commands.router`), which serves :func:`~lorafleet.serve.proxy.proxy_app`
with the routes of :mod:`lorafleet.serve.routes`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorafleet.commands.router import standalone_app
from lorafleet.commands.runner import run_app

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.router --upstream URL [--routes FILE]``.

    The same options as ``lorafleet router`` (:func:`lorafleet.commands.router.router`, one
    definition); a user mistake is one ``error:`` line and exit code 2.
    """
    run_app(
        standalone_app(),
        args=None if argv is None else list(argv),
        prog_name="python -m lorafleet.serve.router",
    )


if __name__ == "__main__":
    main()
