"""The lorafleet serving runtime's entry point and launcher.

``python -m lorafleet.serve.runtime --base DIR --adapter NAME=SOURCE ...`` (the runtime
image's entry point) runs the same command as ``lorafleet serve``
(:mod:`lorafleet.commands.serve`): load the base and adapters
(:mod:`lorafleet.serve.model`) and serve them (:mod:`lorafleet.serve.server`). Tests and
the pipeline start it in a child process with :func:`run_server_subprocess`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from lorafleet.commands.runner import run_app
from lorafleet.commands.serve import standalone_app

__all__ = ["main", "run_server_subprocess", "wait_ready"]


def wait_ready(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Wait until the server at ``url`` answers ``GET /v2/health/ready`` with 200.

    Args:
        url: the server's base URL.
        timeout: seconds to wait.
        process: the server's process, if known: waiting stops when it exits.

    Raises:
        TimeoutError: if the server is not ready in time.
        RuntimeError: if ``process`` exits first.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {process.returncode} before it was ready"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{url}/v2/health/ready").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} was not ready after {timeout:.0f} s")
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server_subprocess(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    port: int | None = None,
    name: str = "base",
    timeout: float = 120.0,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run the runtime in a child process on 127.0.0.1 for the length of a ``with`` block.

    Args:
        base_dir: the base model directory.
        adapters: adapter name -> adapter source.
        port: the port; a free one when ``None``.
        name: the base model's served name.
        timeout: seconds to wait for readiness.
        extra_args: more command-line options (see :func:`main`), e.g. ``["--max-queue", "8"]``.
        env: variables added to the child's environment (e.g. ``LORAFLEET_ADMIN_TOKEN``).

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        TimeoutError: if the server is not ready in time (the server's log is attached as a note).
        RuntimeError: if the server exits before it is ready (likewise).
    """
    port = port or _free_port()
    cmd = [sys.executable, "-m", "lorafleet.serve.runtime", "--base", str(base_dir), "--name", name]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
    for adapter, path in adapters.items():
        cmd += ["--adapter", f"{adapter}={path}"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            try:
                wait_ready(url, timeout, process)
            except (TimeoutError, RuntimeError) as exc:
                log.seek(0)
                exc.add_note("server log (end):\n" + log.read()[-4000:].decode(errors="replace"))
                raise
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.runtime --base DIR [--adapter NAME=DIR ...]``.

    The same options as ``lorafleet serve`` (:func:`lorafleet.commands.serve.serve`, one
    definition); a user mistake is one ``error:`` line and exit code 2.
    """
    run_app(
        standalone_app(),
        args=None if argv is None else list(argv),
        prog_name="python -m lorafleet.serve.runtime",
    )


if __name__ == "__main__":
    main()
