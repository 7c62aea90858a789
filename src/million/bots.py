"""Headless workers: many bots in one process, and processes of bots.

``run_bots`` works one run with M bots sharing this process's connection until the
run has its answer. ``million work`` runs it; ``million run`` starts such processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import trio

from million.client import open_client
from million.computation import Computation, Context, Progress, Spec, progress_session, work
from million.plugins import PluginError, load_plugin
from million.session import join

__all__ = ["run_bots", "worker_command"]

log = logging.getLogger(__name__)


async def run_bots(url: str, run: str, bots: int, *, detach: bool = True, token: str | None = None) -> Any:
    """Work run ``run`` with ``bots`` bots until it is done; returns its answer.

    Raises ``PluginError`` when this machine lacks the run's plugin or has another
    version of it: the run is left untouched.
    """
    async with (
        open_client(url, token=token, label=f"bots-{os.getpid()}") as client,
        join(client, run, Computation, create=False) as root,
    ):
        spec = Spec.from_options(root.options)
        plugin = load_plugin(spec.plugin)
        if plugin.version != spec.version:
            raise PluginError(
                f"run {run} needs plugin {spec.plugin} {spec.version}; this machine has {plugin.version}"
            )
        async with join(client, progress_session(run), Progress, create=False) as progress:
            progress.publish("bots", bots)

            def leaf_done(name: str, count: int) -> None:
                progress.publish("leaf", {"name": name, "count": count})

            ctx = Context(client, plugin, detach, leaf_done)
            async with trio.open_nursery() as nursery:
                for _ in range(bots):
                    nursery.start_soon(work, ctx, run)
        return root.model.output


def worker_command(url: str, run: str, bots: int, *, detach: bool = True) -> list[str]:
    """The command line of one worker process for ``run``."""
    command = [sys.executable, "-m", "million", "work", "--reflector", url, "--run", run, "--bots", str(bots)]
    return command if detach else [*command, "--no-detach"]


async def run_worker_processes(
    commands: list[list[str]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Run worker processes until they end or this task is cancelled (then they are stopped)."""
    async with trio.open_nursery() as nursery:
        for command in commands:
            nursery.start_soon(_worker_process, command)
        task_status.started()


async def _worker_process(command: list[str]) -> None:
    result = await trio.run_process(command, check=False, stdin=subprocess.DEVNULL, stderr=None)
    if result.returncode not in (0, -2, -15, 130):
        log.warning("worker process %s exited with %s", command, result.returncode)


async def run_worker_processes_to_end(commands: list[list[str]]) -> bool:
    """Run worker processes until all have ended."""
    await run_worker_processes(commands)
    return True
