"""``million run``: post a computation, have workers compute it, report the answer.

With no reflector URL the run is self-contained: a reflector starts in this process
(its store in a temporary file unless one is given) and worker processes start on
this machine. Running again with the same name and store resumes the run, or returns
its stored answer at once. A temporary store is removed once the run has its answer;
an interrupted run keeps it, so that it can be resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from million.compute import ledger, lobby
from million.compute.bots import run_worker_processes, worker_command, worker_env
from million.compute.computation import Computation
from million.compute.plugins import load_plugin
from million.compute.progress import Progress, progress_options, progress_session, report_progress
from million.compute.tree import Spec, SpecError
from million.relay.config import ReflectorConfig
from million.relay.server import open_reflector
from million.replica.client import Client, open_client, ssl_context
from million.replica.session import JoinError, Session, join
from million.replica.view import View
from million.wire import tasks
from million.wire.protocol import ErrorCode

__all__ = ["RunConfig", "RunError", "RunResult", "open_run", "run"]

WORKERS_GRACE = 5.0  # seconds worker processes get to notice the answer and exit
LOBBY_TIMEOUT = 10.0  # seconds to see a post or an answer in the lobby, or a run in the ledger
NO_WORKERS_HINT = 5.0  # seconds without a worker before a run without local ones says how to start some
FOLLOW_EVERY = 0.2  # seconds between looks at the local workers while the progress is silent
ADAPTIVE = "adaptive"  # ``--verify adaptive``: two identities, or one trusted by the ledger
ADAPTIVE_VERIFY = 2  # identities that must agree on a value of an untrusted one
SUMMARY_BYTES = ReflectorConfig().max_summary  # of the ledger's summary: what a reflector takes by default

log = logging.getLogger(__name__)


class RunError(Exception):
    """A run that cannot start or go on; the message says why."""


@attrs.frozen
class RunConfig:
    """What to compute and with whom. ``million run`` flags map onto it; its defaults are theirs."""

    plugin: str
    input: Any = 1
    partitions: int = 10_000
    fanout: int = 100
    options: dict[str, Any] = attrs.Factory(dict)
    name: str | None = None
    store: str | None = None  # embedded reflector's store; a temporary file if None
    reflector: str | None = None  # URL of a running reflector; embedded if None
    processes: int = attrs.Factory(lambda: os.cpu_count() or 1)  # local worker processes
    bots: int = 16  # bots (workers) per process
    detach: bool = True
    token: str | None = None
    cafile: str | None = None  # certificates to trust for wss:// besides the system's
    verify: int | str = 1  # distinct identities that must agree on a value, or "adaptive"
    max_copies: int | None = None  # identities a value may be asked of; None: 2 * verify + 1
    max_rejections: int = 3  # rejected results beyond which an identity gets no more work in the run
    max_failures: int = 3  # failed attempts at a partition or step before the run fails


@attrs.frozen
class RunResult:
    """A run's answer, and what this invocation did for it: ``computed`` partitions in
    ``elapsed_s`` (none if the answer was ``stored`` already; fewer than ``partitions`` if
    it ``resumed`` a run that had some done)."""

    name: str
    answer: Any
    partitions: int
    fanout: int
    elapsed_s: float
    computed: int
    partitions_per_s: float | None
    resumed: bool
    stored: bool
    store: str | None
    credit: dict[str, dict[str, int]] = attrs.Factory(dict)  # the run's tally: identity -> counts


@attrs.define
class RunState:
    """What a progress display reads while the run goes on."""

    name: str
    partitions: int
    fanout: int
    store: str | None
    root: Session[View] | None = None
    progress: Session[View] | None = None
    before: int = 0  # partitions done when this invocation joined the run
    started: float = 0.0  # trio time when it joined

    @property
    def done(self) -> int:
        return self.progress.model.done if self.progress is not None else 0

    @property
    def bots(self) -> int:
        return self.progress.model.bots if self.progress is not None else 0

    @property
    def processes(self) -> int:
        return self.progress.model.present if self.progress is not None else 0

    def by_child(self) -> dict[int, int]:
        return dict(self.progress.model.by_child) if self.progress is not None else {}

    def figures(self) -> dict[str, Any]:
        """Partitions done, the rate of this invocation (None in its first second), the
        seconds left at that rate, and the bots and processes present."""
        elapsed = trio.current_time() - self.started
        rate = (self.done - self.before) / elapsed if elapsed >= 1 else None
        left = self.partitions - self.done
        return {
            "run": self.name,
            "completed": self.done,
            "partitions": self.partitions,
            "rate": None if rate is None else round(rate),
            "eta_s": round(left / rate) if rate else None,
            "bots": self.bots,
            "processes": self.processes,
        }


async def run(
    config: RunConfig,
    *,
    watch: Callable[[RunState], None] | None = None,
    notify: Callable[[str], None] = log.warning,
) -> RunResult:
    """Run the computation described by ``config`` to its answer.

    ``watch`` is called with the run's state whenever it may have changed; ``notify``
    with what a person watching should know (no workers have come).
    """
    plugin = load_plugin(config.plugin)
    await plugin.check_options(config.input, config.options)
    name = config.name or f"run-{secrets.token_hex(4)}"
    spec = _spec(plugin.name, plugin.version, config)
    async with _reflector_url(config) as (url, store):
        state = RunState(name, config.partitions, config.fanout, store)
        async with open_client(
            url, token=config.token, label="run", ssl_context=ssl_context(config.cafile)
        ) as client:
            try:
                if spec.adaptive:
                    spec = attrs.evolve(spec, trust=await _trust(client, name))
                async with (
                    open_run(client, name, spec) as (root, progress),
                    join(client, lobby.LOBBY, lobby.Lobby, View) as board,
                ):
                    state.root, state.progress = root, progress
                    resumed, stored = root.replica.seq > 1, root.model.done
                    state.started, state.before = trio.current_time(), progress.model.done
                    if root.model.retryable:  # a plugin's failure: resuming retries
                        root.publish("retry", None)
                        await root.wait_for(lambda model: not model.retryable)
                    if not root.model.ended:
                        await _tell_lobby(board, "post", lobby.post_event(name, spec))
                        await _compute(config, url, name, state, watch, notify)
                    answer, elapsed = root.model.output, trio.current_time() - state.started
                    failed = root.model.failed
                    if failed is not None:
                        await _tell_lobby(board, "failed", lobby.failed_event(name, failed))
                    else:
                        await _tell_lobby(board, "done", {"name": name, "answer": answer})
                    credit = await _record_credit(client, name, root.model.tally, spec.max_rejections)
                    if failed is not None:
                        raise RunError(f"run {name} failed: {failed}")
            except JoinError as exc:
                if exc.code == ErrorCode.MODEL_MISMATCH:
                    problem = f"a run named {name!r} with other settings exists in this store"
                    raise RunError(f"{problem} ({exc})") from None
                raise
    if store is not None and config.store is None:
        remove_store(store)
        store = None
    computed = 0 if stored else spec.partitions - state.before
    rate = None if stored or elapsed <= 0 else round(computed / elapsed, 1)
    return RunResult(
        name,
        answer,
        spec.partitions,
        spec.fanout,
        round(elapsed, 3),
        computed,
        rate,
        resumed,
        stored,
        store,
        credit,
    )


@asynccontextmanager
async def open_run(
    client: Client, name: str, spec: Spec
) -> AsyncIterator[tuple[Session[View], Session[View]]]:
    """Create (or find) run ``name`` and observe it: its root session and its progress."""
    options = progress_options(name, spec.partitions, spec.fanout)
    async with (
        join(client, name, Computation, View, options=spec.to_options()) as root,
        join(client, progress_session(name), Progress, View, options=options) as progress,
    ):
        yield root, progress


def _spec(plugin: str, version: str, config: RunConfig) -> Spec:
    """What the run computes (an adaptive run's trust comes later: ``_trust``); ``RunError``
    for what no worker would compute."""
    adaptive = config.verify == ADAPTIVE
    verify = ADAPTIVE_VERIFY if adaptive else config.verify
    if type(verify) is not int:
        raise RunError(f"cannot run that: verify must be a whole number or {ADAPTIVE!r}, not {verify!r}")
    checks: dict[str, Any] = {
        "verify": verify,
        "adaptive": adaptive,
        "max_rejections": config.max_rejections,
        "max_failures": config.max_failures,
    }
    if config.max_copies is not None:
        checks["max_copies"] = config.max_copies
    spec = Spec(plugin, version, config.input, config.partitions, config.fanout, config.options, **checks)
    if config.reflector is None and 0 < config.processes < verify:
        raise RunError(
            f"cannot run that: --verify {config.verify} needs {verify} identities to agree, and each"
            f" worker process is one: start at least {verify} (--processes {verify})"
        )
    try:
        return Spec.from_options(spec.to_options())
    except SpecError as exc:
        raise RunError(f"cannot run that: {exc}") from None


async def _trust(client: Client, name: str) -> dict[str, int]:
    """An adaptive run's trust: what it was created with if it exists (so that it resumes),
    else the ledger's trusted identities now."""
    try:
        async with join(client, name, Computation, View, create=False) as root:
            options = root.options
            trust = options.get("trust") if type(options) is dict else None
            return trust if type(trust) is dict else {}
    except JoinError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
    async with join(client, ledger.LEDGER, ledger.Ledger, View) as session:
        trusted: dict[str, int] = session.model.trust()
        return trusted


async def _record_credit(
    client: Client, name: str, tally: dict[str, dict[str, int]], max_rejections: int
) -> dict[str, dict[str, int]]:
    """Record the run's tally in the ledger (once: a resumed run's again is ignored) and
    summarize the ledger for the workers page; the tally, as the run's credit."""
    event = ledger.run_event(name, tally, max_rejections)
    async with join(client, ledger.LEDGER, ledger.Ledger, View) as session:
        session.publish("run", event)
        with trio.move_on_after(LOBBY_TIMEOUT):
            await session.wait_for(lambda model: name in model.runs)
        if name not in session.model.runs:
            log.warning("the ledger did not record run %s (only an admin: identity may)", name)
        session.summarize(ledger.summary(session.model, SUMMARY_BYTES))
    return {identity: dict(counts) for identity, counts in tally.items()}


async def _tell_lobby(board: Session[View], topic: str, data: dict[str, Any]) -> None:
    """Post to the lobby, or mark a run done there; the lobby may refuse (it keeps a bounded
    number of open runs): then workers without ``--run`` will not see it."""
    board.publish(topic, data)
    with trio.move_on_after(LOBBY_TIMEOUT):
        await board.wait_for(lambda model: data["name"] in model.runs)
        return
    log.warning("the lobby did not take the %s of run %s", topic, data["name"])


async def _compute(
    config: RunConfig,
    url: str,
    name: str,
    state: RunState,
    watch: Callable[[RunState], None] | None,
    notify: Callable[[str], None],
) -> None:
    root = state.root
    assert root is not None and state.progress is not None
    commands = [worker_command(url, name, config.bots, detach=config.detach) for _ in range(config.processes)]
    env = worker_env(config.token, config.cafile)
    workers_ended = trio.Event()

    async def workers(task_status: trio.TaskStatus[None]) -> None:
        await run_worker_processes(commands, env=env, task_status=task_status)
        workers_ended.set()

    async def follow() -> None:
        """Show the progress as it changes; ``RunError`` once no local worker is left."""
        assert state.progress is not None
        while not root.model.ended:  # else ended by the root, however its workers went
            if watch is not None:
                watch(state)
            if commands and workers_ended.is_set() and config.reflector is None:
                raise RunError("every worker process ended before the run was done; see their errors above")
            with trio.move_on_after(FOLLOW_EVERY):
                await state.progress.wait_changed()

    async with tasks.open_nursery() as nursery:
        await nursery.start(workers)
        nursery.start_soon(report_progress, name, state.progress, root)
        async with tasks.open_nursery() as following:  # until the root ends, not its next progress
            following.start_soon(follow)
            if not commands:
                following.start_soon(_hint_without_workers, url, name, state.progress, notify)
            await root.wait_for(lambda model: model.ended)
            following.cancel_scope.cancel()
        if watch is not None:
            watch(state)
        nursery.cancel_scope.deadline = trio.current_time() + WORKERS_GRACE  # they stop by themselves


async def _hint_without_workers(
    url: str, name: str, progress: Session[View], notify: Callable[[str], None]
) -> None:
    """Say how to start workers if none has joined within ``NO_WORKERS_HINT`` s."""
    with trio.move_on_after(NO_WORKERS_HINT):
        await progress.wait_for(lambda model: model.bots > 0)
        return
    notify(
        f"no workers have joined run {name} yet; start some with:"
        f" million work --reflector {url} --run {name}  (or without --run: every run of the lobby)"
    )


@asynccontextmanager
async def _reflector_url(config: RunConfig) -> AsyncIterator[tuple[str, str | None]]:
    """The URL of the reflector to use, starting one in this process when none is given."""
    if config.reflector is not None:
        yield config.reflector, None
        return
    store = config.store or _temporary_store()
    try:
        async with open_reflector(ReflectorConfig(port=0, store=store)) as reflector:
            yield reflector.url, store
    except OSError as exc:
        raise RunError(f"cannot start a reflector on store {store}: {exc}") from None


TEMPORARY_PREFIX = "million-"  # of the private directory that holds a temporary store


def _temporary_store() -> str:
    """A store path in a new directory of its own (this user's, mode 0700): nobody else
    can have put a journal there."""
    directory = tempfile.mkdtemp(prefix=TEMPORARY_PREFIX)
    return str(Path(directory) / "run.db")


def remove_store(path: str) -> None:
    """Delete a store file and its companions, and the temporary directory that held it."""
    for suffix in ("", "-wal", "-shm", ".journal", ".journal-applying", ".lock"):
        Path(path + suffix).unlink(missing_ok=True)
    directory = Path(path).parent
    if directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith(TEMPORARY_PREFIX):
        with contextlib.suppress(OSError):  # not empty: somebody else's files stay
            directory.rmdir()
