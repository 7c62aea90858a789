"""Running real processes from tests: a reflector and participants, with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from million.compute.bots import worker_command
from million.compute.tree import Spec

TESTS = Path(__file__).parent


class Process:
    """A child process whose stdout is read line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})},
        )
        self._stdout = trio.wrap_file(self.proc.stdout)
        self.errors = ""  # what it wrote to stderr, once it has ended

    async def line(self, prefix: str) -> str:
        """The next line of output that starts with ``prefix`` (without it); 20 s at most."""
        with trio.fail_after(20):
            while True:
                line = await self._stdout.readline()
                if not line:
                    err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                    raise AssertionError(f"{self.proc.args} ended before printing {prefix!r}: {err}")
                text = line.decode().strip()
                if text.startswith(prefix):
                    return text[len(prefix) :].strip()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush."""
        self.proc.kill()
        self.proc.wait()
        self._close()

    def stop(self) -> None:
        """SIGINT, and SIGKILL if that has not ended it within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        self.errors = self.proc.stderr.read().decode()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


async def finish(root: Any, workers: list[Process], seconds: float) -> None:
    """Wait until the run of ``root`` (a joined session) is done, ``seconds`` at most,
    then stop ``workers`` either way."""
    try:
        with trio.fail_after(seconds):
            await root.wait_for(lambda model: model.done)
    finally:
        for worker in workers:
            worker.stop()


async def start_reflector(store: str, port: int = 0, *extra: str) -> tuple[Process, str]:
    """A ``million reflector`` process; returns it and its URL once it listens."""
    process = Process(
        [sys.executable, "-m", "million", "reflector", "--port", str(port), "--store", store, *extra]
    )
    line = await process.line("million reflector")
    return process, line.split("listening on ")[1].split()[0]


def start_participant(url: str, session: str, count: int, target: int, hash_seed: str = "0") -> Process:
    return Process(
        [sys.executable, str(TESTS / "participant.py"), url, session, str(count), str(target)],
        env={"PYTHONHASHSEED": hash_seed},
    )


def million_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m million ARGS`` run to its end (120 s at most), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "million", *args], capture_output=True, text=True, timeout=120, env=env
    )


def ordered_spec(input: Any, partitions: int, fanout: int, **options: Any) -> Spec:
    """What a run of the test plugin ``ordered`` computes."""
    return Spec("ordered", "1.2.3", input, partitions, fanout, options)


def start_worker(url: str, run: str | None, bots: int, env: dict[str, str] | None = None) -> Process:
    """A ``million work`` process: for ``run``, or for the lobby's runs (None)."""
    return Process(worker_command(url, run, bots, exit_with_parent=False), env)


async def wait_for_markers(
    session: Any, directory: Path, *, name: str | None = None, count: int = 1, seconds: float = 60
) -> None:
    """Wait until the test plugin has left its marker ``name`` in ``directory`` (or ``count``
    markers), looking again whenever ``session`` changes."""

    def there() -> bool:
        return (directory / name).exists() if name else len(list(directory.iterdir())) >= count

    with trio.fail_after(seconds):
        while not there():
            await session.wait_changed()


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value
