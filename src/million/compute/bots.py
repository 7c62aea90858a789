"""Headless workers: many bots in one process, and processes of bots.

``run_bots`` works one run with M bots sharing this process's connection until the
run has its answer. ``run_lobby_bots`` watches the lobby and shares its bots among
the open runs, as long as it is left running. ``million work`` runs either;
``worker_command`` is its command line, with which ``million run`` starts processes of
the first kind and ``million work --processes N`` starts N of either.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import trio

from million.compute.computation import Computation
from million.compute.lobby import LOBBY, Lobby, bots_per_run, failed_event
from million.compute.plugins import Plugin, PluginError, find_plugins, load_plugin
from million.compute.progress import (
    MAX_LEAVES,
    SUMMARY_EVERY,
    Progress,
    progress_session,
    report_progress,
    summary,
)
from million.compute.worker import Context, RunFailed, RunRefused, Tracker, run_spec, work
from million.replica.client import Client, open_client
from million.replica.session import JoinError, Session, join
from million.replica.state import prime
from million.replica.view import View

__all__ = [
    "crew",
    "get_ready",
    "run_bots",
    "run_lobby_bots",
    "run_worker_processes",
    "worker_command",
    "worker_env",
]

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.5  # s between a process's progress events
HEARD_EVERY = 5.0  # s between them at most, even with nothing new
TELL_EVERY = 60.0  # s between the lines that say how much a process computed
Notify = Callable[[str], None]


def _quiet(message: str) -> None:
    log.info("%s", message)


async def run_bots(
    url: str,
    run: str,
    bots: int,
    *,
    detach: bool = True,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    notify: Notify = _quiet,
) -> Any:
    """Work run ``run`` with ``bots`` bots until it is done; returns its answer. ``notify``
    is told what a person watching should know: connected, joined, a line a minute.

    Raises ``PluginError`` when this machine lacks the run's plugin or has another
    version of it, ``RunRefused`` (one) when the run's root is no valid computation: the
    run is left untouched.
    """
    get_ready()
    async with open_client(url, token=token, label=f"bots-{os.getpid()}", ssl_context=ssl_context) as client:
        notify(f"connected to {url}")
        return await crew(client, run, bots, detach=detach, notify=notify)


def get_ready() -> None:
    """Do before the first run what its start would otherwise wait for (some 40 ms): make
    the hooks that snapshot and restore the models the bots replicate, and find the
    installed plugins."""
    prime(Computation)
    prime(Progress)
    find_plugins()


async def crew(client: Client, run: str, bots: int, *, detach: bool = True, notify: Notify = _quiet) -> Any:
    """``bots`` bots of this process working ``run`` until it is done; returns its answer.

    Raises ``PluginError`` (``RunRefused`` when the root's options describe no computation)
    if this process cannot work the run: the run is left untouched; ``RunFailed`` if the
    run failed for want of agreement.
    """
    async with join(client, run, Computation, View, create=False) as root:
        spec = run_spec(run, root.options)
        plugin = _plugin_for(run, spec.plugin, spec.version)
        await plugin.check_options(spec.input, spec.options)
        # Each bot runs one hook at a time: none waits for another's thread, in this run or in
        # another run of this process, even behind a hook abandoned in its thread.
        plugin.threads = trio.CapacityLimiter(math.inf)
        ctx = Context(client, plugin, detach)
        what = f"{spec.plugin} {spec.version}, {spec.partitions:,} partitions"
        notify(f"joined run {run} ({what}) with {bots} bots")
        refused: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(work, ctx, run)
                nursery.start_soon(_tell, ctx, run, root, bots, notify)  # joins the progress meanwhile
                await ctx.started.wait()  # the first claims the root's prepare before the others join
                for _ in range(bots - 1):
                    nursery.start_soon(work, ctx, run)
        except* (PluginError, JoinError, RunFailed) as group:  # e.g. a child made with other options
            refused = _first(group)
        computed = f"this process computed {ctx.tracker.total:,} partitions"
        if refused is not None:
            notify(f"left run {run}: {str(refused).splitlines()[0]}; {computed}")
            raise refused
        notify(f"run {run} is done; {computed}")
        return root.model.output


async def _tell(ctx: Context, run: str, root: Session[View], bots: int, notify: Notify) -> None:
    """Until the run ends, tell its progress session what this process's bots compute,
    the sessions' summaries what they are at, and ``notify`` a line a minute."""
    async with join(ctx.client, progress_session(run), Progress, View, create=False) as progress:
        progress.publish("bots", bots)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_progress, run, progress, root)
            nursery.start_soon(share_progress, progress, root, ctx.tracker, bots)
            nursery.start_soon(summarize_sessions, ctx, root)
            nursery.start_soon(_tell_progress, run, progress, root, ctx.tracker, notify)


async def _tell_progress(
    run: str, progress: Session[View], root: Session[View], tracker: Tracker, notify: Notify
) -> None:
    """Every ``TELL_EVERY`` s until the run ends, say how many partitions this process
    computed for ``run``."""
    told = 0
    while not await _ended_within(root, TELL_EVERY):
        model = progress.model
        notify(
            f"run {run}: this process computed {tracker.total - told:,} partitions in the last minute"
            f" ({tracker.total:,} in all); the run has {model.done:,} of {model.partitions:,} done"
        )
        told = tracker.total


async def share_progress(progress: Session[View], root: Session[View], tracker: Tracker, bots: int) -> None:
    """Publish what this process's workers computed, every ``PROGRESS_EVERY`` s and once
    the run has ended: a bounded rate of events however fast they compute. With nothing
    new, every ``HEARD_EVERY`` s all the same: the run's pages show when it was last heard."""
    told, ended = trio.current_time(), False
    while not ended:
        ended = await _ended_within(root, PROGRESS_EVERY)
        leaves, computed = tracker.take()
        if leaves or computed or trio.current_time() - told >= HEARD_EVERY:
            names = list(leaves)
            for at in range(0, max(len(names), 1), MAX_LEAVES):  # at least one event
                chunk = {name: leaves[name] for name in names[at : at + MAX_LEAVES]}
                event = {"leaves": chunk, "computed": computed if at == 0 else 0, "bots": bots}
                progress.publish("progress", event)
            told = trio.current_time()


async def summarize_sessions(ctx: Context, root: Session[View]) -> None:
    """Every ``SUMMARY_EVERY`` s until the run ends, summarize the sessions of the first
    levels that this process's workers are in, those that changed: what the pages show
    of each stays within half a second of its state, whatever its workers are doing."""
    shown: dict[str, tuple[Any, ...]] = {}  # session -> what its last summary showed
    while not await _ended_within(root, SUMMARY_EVERY):
        for session in list(ctx.shown):
            model = session.model
            state = (model.epoch, model.remaining, model.inputs is None, model.done, len(model.workers))
            if shown.get(session.name) != state:
                shown[session.name] = state
                session.summarize(summary(model))


async def _ended_within(root: Session[View], seconds: float) -> bool:
    """Whether the run ``root`` is of ended within ``seconds``."""
    with trio.move_on_after(seconds):
        await root.wait_for(lambda model: model.ended)
    return bool(root.model.ended)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of ``group`` that is not itself a group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _plugin_for(run: str, name: str, version: str) -> Plugin:
    plugin = load_plugin(name)
    if plugin.version != version:
        raise PluginError(f"run {run} needs plugin {name} {version}; this machine has {plugin.version}")
    return plugin


async def run_lobby_bots(
    url: str,
    bots: int,
    *,
    detach: bool = True,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    notify: Notify = _quiet,
) -> None:
    """Share ``bots`` bots among the lobby's open runs, moving on as runs finish or start.

    Runs whose plugin this machine lacks (or has in another version), and runs whose
    root is no valid computation, are skipped with one log line each. Returns only when
    cancelled.
    """
    get_ready()
    async with (
        open_client(url, token=token, label=f"lobby-bots-{os.getpid()}", ssl_context=ssl_context) as client,
        join(client, LOBBY, Lobby, View) as lobby,
        trio.open_nursery() as nursery,
    ):
        notify(f"connected to {url}; waiting for runs in the lobby")
        crews: dict[str, tuple[int, trio.CancelScope]] = {}
        refused: set[str] = set()

        async def staff(run: str, count: int, scope: trio.CancelScope) -> None:
            with scope:
                await work_run(run, count)
            if scope.cancelled_caught:
                notify(f"left run {run}: it is no longer open in the lobby, or its share of bots changed")

        async def work_run(run: str, count: int) -> None:
            try:
                answer = await crew(client, run, count, detach=detach, notify=notify)
            except RunFailed as exc:  # the lobby lists it as failed, until it is resumed
                lobby.publish("failed", failed_event(run, str(exc)))
                return
            except (PluginError, RunRefused, JoinError) as exc:
                log.warning("skipping run %s: %s", run, exc)
                refused.add(run)
                client.changed(lobby.name)
                return
            lobby.publish("done", {"name": run, "answer": answer})

        while True:
            wanted = bots_per_run(bots, [run for run in lobby.model.open_runs() if run not in refused])
            for run, (count, scope) in list(crews.items()):
                if wanted.get(run) != count:
                    scope.cancel()
                    del crews[run]
            for run, count in wanted.items():
                if run not in crews:
                    crews[run] = (count, trio.CancelScope())
                    nursery.start_soon(staff, run, count, crews[run][1])
            await lobby.wait_changed()


def worker_env(token: str | None, cafile: str | None) -> dict[str, str]:
    """Environment variables that give a worker process the same token and trust."""
    env = {"MILLION_TOKEN": token, "MILLION_CAFILE": cafile}
    return {key: value for key, value in env.items() if value}


def worker_command(
    url: str,
    run: str | None,
    bots: int,
    *,
    detach: bool = True,
    exit_with_parent: bool = True,
    log_level: str | None = None,
) -> list[str]:
    """The command line of one ``million work`` process with ``bots`` bots, for ``run``
    or (if None) the lobby's runs. With ``exit_with_parent`` it ends once this process
    is gone, as the workers of a ``million run`` must."""
    command = [sys.executable, "-m", "million", *(["--log-level", log_level] if log_level else [])]
    command += ["work", "--reflector", url, "--bots", str(bots)]
    command += ["--run", run] if run is not None else []
    command += [] if detach else ["--no-detach"]
    return command + (["--exit-with-parent"] if exit_with_parent else [])


async def run_worker_processes(
    commands: list[list[str]],
    *,
    env: dict[str, str] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker processes until they end or this task is cancelled (then they are stopped).

    ``env`` is added to this process's environment for them.
    """
    full_env = {**os.environ, **(env or {})}
    async with trio.open_nursery() as nursery:
        for command in commands:
            nursery.start_soon(_worker_process, command, full_env)
        task_status.started()


async def _worker_process(command: list[str], env: dict[str, str]) -> None:
    result = await trio.run_process(command, check=False, stdin=subprocess.DEVNULL, stderr=None, env=env)
    if result.returncode not in (0, -2, -15, 130):
        log.warning("worker process %s exited with %s", command, result.returncode)
