"""The partition tree: the ``Computation`` model, the worker that runs it, and the arithmetic.

A session computes ``partitions`` partitions. If they fit in one session (at most
``fanout``) it is a leaf and its workers compute them with the plugin's ``compute``.
Otherwise it has ``fanout`` children, named ``<session>-<i>``, which split the
partitions evenly (``split``) and are computed the same way, recursively. Each
session prepares its inputs once (``prepare_inputs``) and, when every partition or
child has an output, collects them (``collect_results``); that output is the
partition's output in the parent.

Everything a session knows is its replicated model, so any worker can join any
session at any time, and every worker may leave: the work resumes where it stopped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio

from million.compute.plugins import Plugin
from million.replica.client import Client
from million.replica.model import Model
from million.replica.session import Session, join
from million.replica.view import View
from million.wire.codec import dumps
from million.wire.protocol import VIEW_EXIT, VIEW_JOIN

__all__ = [
    "Computation",
    "Progress",
    "Spec",
    "Worker",
    "depth",
    "progress_session",
    "report_progress",
    "split",
    "summary",
    "work",
]

TASKS = ("prepare", "collect")
SUMMARY_EVERY = 0.5  # seconds between a view's summaries of its session
SUMMARY_WORKERS = 200  # sessions with more partitions leave out who works on which
SUMMARY_DEPTH = 1  # levels below the root whose progress is summarized, not only their end


def split(total: int, fanout: int) -> list[tuple[int, int]]:
    """``(start, size)`` of each of ``fanout`` children sharing ``total`` partitions.

    Sizes differ by at most one, the larger first; integer arithmetic only.
    """
    return [share(total, fanout, index) for index in range(fanout)]


def share(total: int, fanout: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of child ``index`` in ``split(total, fanout)``."""
    base, extra = divmod(total, fanout)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def depth(total: int, fanout: int) -> int:
    """Levels of sessions for ``total`` partitions: the smallest k with fanout**k >= total."""
    levels, capacity = 1, fanout
    while capacity < total:
        levels, capacity = levels + 1, capacity * fanout
    return levels


@attrs.frozen
class Spec:
    """What one session computes; its JSON form is the session's creation options."""

    plugin: str
    version: str
    input: Any
    partitions: int
    fanout: int
    options: dict[str, Any] = attrs.Factory(dict)
    start: int = 0  # global number of the session's first partition
    parent: str | None = None
    index: int | None = None  # this session's index in its parent

    @property
    def leaf(self) -> bool:
        return self.partitions <= self.fanout

    @property
    def count(self) -> int:
        """Partitions (leaf) or children (interior) of this session."""
        return self.partitions if self.leaf else self.fanout

    def child(self, name: str, index: int, input: Any) -> tuple[str, dict[str, Any]]:
        """Name and options of child ``index`` of the session ``name``."""
        start, size = share(self.partitions, self.fanout, index)
        spec = attrs.evolve(
            self, input=input, partitions=size, start=self.start + start, parent=name, index=index
        )
        return f"{name}-{index}", spec.to_options()

    def to_options(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Spec:
        return cls(**options)


@attrs.define
class Computation(Model, name="million.compute.computation.2"):
    """The replicated state of one session of the tree.

    The number in its name changes whenever its events change meaning, so that a worker
    of another version is refused at the join (``model-mismatch``) instead of diverging.
    """

    leaf: bool = True
    root: bool = True
    count: int = 0
    inputs: list[Any] | None = None
    outputs: list[Any] = attrs.Factory(list)
    completed: list[bool] = attrs.Factory(list)
    started: list[bool] = attrs.Factory(list)
    done_by: list[str | None] = attrs.Factory(list)
    remaining: int = 0
    workers: dict[str, list[int]] = attrs.Factory(dict)  # view -> partitions it holds, oldest first
    answers: dict[str, list[Any]] = attrs.Factory(dict)  # view -> [request id, partitions given]
    claims: dict[str, str] = attrs.Factory(dict)  # "prepare" / "collect" -> view doing it
    output: Any = None
    done: bool = False

    def init(self, options: Any) -> None:
        spec = Spec.from_options(options)
        self.leaf, self.root, self.count = spec.leaf, spec.parent is None, spec.count
        self.outputs = [None] * self.count
        self.completed = [False] * self.count
        self.started = [False] * self.count
        self.done_by = [None] * self.count
        self.remaining = self.count
        self.subscribe("request", self.request)
        self.subscribe("end", self.end)
        self.subscribe("claim", self.claim)
        self.subscribe("inputs", self.set_inputs)
        self.subscribe("output", self.set_output)
        self.subscribe(VIEW_JOIN, self.join)
        self.subscribe(VIEW_EXIT, self.exit)

    def join(self, view: str) -> None:
        """Whoever joins a child session that nobody prepares prepares it, without asking.

        Only workers open child sessions; a run's root is opened by whoever posts the
        run, so there the preparer asks (``claim``).
        """
        if not self.root and self.inputs is None and "prepare" not in self.claims:
            self.claims["prepare"] = view

    def request(self, data: Any) -> None:
        """A worker asks for up to ``want`` more partitions (``{"id": n, "want": k}``); the
        answer is recorded under its view."""
        if not isinstance(data, dict):
            return
        view, want = self.sender, data.get("want")
        want = want if type(want) is int and want > 0 else 1
        given = [] if self.done or self.inputs is None else self._assign(view, want)
        if given:
            self.workers.setdefault(view, []).extend(given)
            for index in given:
                self.started[index] = True
        self.answers[view] = [data.get("id"), given]

    def _assign(self, view: str, want: int) -> list[int]:
        """Partitions nobody has started: at most ``want``, and no more than bring this view
        to its fair share of those and the ones held, among the views that ask. Else the
        incomplete one with the fewest workers that ``view`` does not hold yet, the last
        such one, since holders work from the first.

        A partition whose holder left is not handed out again before the unstarted ones:
        a coordinator leaves its parent while it works below (``detach``), so such a
        partition is usually still being worked on.
        """
        fresh = [i for i in range(self.count) if not self.started[i] and not self.completed[i]]
        if fresh:
            askers = len(self.answers) + (view not in self.answers)
            held = sum(len(indexes) for indexes in self.workers.values())
            quota = -(-(len(fresh) + held) // askers) - len(self.workers.get(view, ()))
            return fresh[: max(1, min(want, quota))]
        load = [0] * self.count
        for held in self.workers.values():
            for index in held:
                load[index] += 1
        mine = self.workers.get(view, ())
        incomplete = [i for i in range(self.count) if not self.completed[i] and i not in mine]
        steal = min(incomplete, key=lambda index: (load[index], -index), default=None)
        return [] if steal is None else [steal]

    def end(self, data: Any) -> None:
        """A partition's output, and with ``next`` the reporter's next request.

        The first output reported wins; later ones are ignored. Whoever completes the
        last partition collects, without asking.
        """
        if not isinstance(data, dict):
            return
        index, output = data.get("index"), data.get("output")
        if type(index) is int and 0 <= index < self.count and not self.completed[index]:
            self.completed[index] = True
            self.outputs[index] = output
            self.done_by[index] = self.sender
            self.remaining -= 1
            for view, held in list(self.workers.items()):
                if index in held:
                    held.remove(index)
                    if not held:
                        del self.workers[view]
            if self.remaining == 0 and "collect" not in self.claims:
                self.claims["collect"] = self.sender
        if "next" in data:
            self.request(data["next"])

    def claim(self, task: Any) -> None:
        if task in TASKS and task not in self.claims:
            self.claims[task] = self.sender

    def set_inputs(self, data: Any) -> None:
        """The prepared inputs, and with ``next`` the preparer's first request."""
        if not isinstance(data, dict):
            return
        inputs = data.get("inputs")
        if self.inputs is None and isinstance(inputs, list) and len(inputs) == self.count:
            self.inputs = inputs
            self.claims.pop("prepare", None)
        if "next" in data:
            self.request(data["next"])

    def set_output(self, output: Any) -> None:
        if not self.done and self.remaining == 0:
            self.output, self.done = output, True
            self.claims.pop("collect", None)

    def exit(self, view: str) -> None:
        self.workers.pop(view, None)
        self.answers.pop(view, None)
        for task in [task for task, holder in self.claims.items() if holder == view]:
            del self.claims[task]


@attrs.define
class Context:
    """What the workers of one process share."""

    client: Client
    plugin: Plugin
    detach: bool = True  # leave a session while working in its child
    on_leaf_done: Callable[[str, int], None] | None = None  # (leaf session, partitions)
    window: int = 16  # leaf partitions a worker may hold; it asks for more when half are done
    summarized: dict[str, float] = attrs.Factory(dict)  # session -> when it was last summarized


@attrs.frozen
class Outcome:
    """How a worker's time in a session ended: the session's output, or a child to work."""

    done: bool
    output: Any = None
    index: int = -1
    child: str = ""
    child_options: dict[str, Any] = attrs.Factory(dict)
    connection: int | None = None  # the connection that sent the output this worker collected


async def work(ctx: Context, name: str, options: dict[str, Any] | None = None) -> Any:
    """Work in session ``name`` (and below it) until it has an output; return the output.

    ``options=None`` joins the session as it exists (a run's root, found by name).
    """
    output, _ = await _work_in(ctx, name, options)
    return output


async def _work_in(
    ctx: Context, name: str, options: dict[str, Any] | None, depth: int = 0
) -> tuple[Any, int | None]:
    """``work``, and the connection that sent the output if this worker collected it
    (None when the output came back from the session)."""
    report = None
    while True:
        view = partial(Worker, ctx=ctx, report=report, depth=depth)
        async with join(ctx.client, name, Computation, view, options, create=options is not None) as session:
            outcome = await session.view.outcome()
        if outcome.done:
            return outcome.output, outcome.connection
        output, connection = await _work_in(ctx, outcome.child, outcome.child_options, depth + 1)
        report = (outcome.index, output, connection)


class Worker(View):
    """A participant that prepares, computes or coordinates partitions, and collects."""

    def __init__(
        self,
        session: Session,
        *,
        ctx: Context,
        report: tuple[int, Any, int | None] | None = None,
        depth: int = 0,
    ) -> None:
        super().__init__(session)
        self.ctx = ctx
        self.report = report
        self.depth = depth  # levels below the session ``work`` started in
        self.spec = Spec.from_options(session.options)
        self._asked = 0  # requests published, numbered from 1
        self._reported: set[int] = set()  # partitions this view has done or handed to a child
        self._window = ctx.window if self.spec.leaf else 1
        self._cycle = trio.CancelScope()
        self._outcome: Outcome | None = None
        self._output: Any = None  # what this view collected
        self._collected_on = 0  # the connection that sent it
        self._finished = trio.Event()

    async def outcome(self) -> Outcome:
        await self._finished.wait()
        assert self._outcome is not None
        return self._outcome

    async def run(self) -> None:
        while self._outcome is None:
            with trio.CancelScope() as self._cycle:
                self._outcome = await self._work()
        self._finished.set()

    def resynced(self) -> None:
        self._cycle.cancel()  # requests made under the old view id will never be answered

    async def _work(self) -> Outcome:
        """Prepare, compute or coordinate partitions, collect. A leaf worker holds up to a
        window of partitions and its reports carry its next request, so a partition costs
        one event and a fraction of a round trip."""
        self._asked, self._reported = 0, set()
        await self.session.wait_seen()  # the join may have made this view the preparer
        if self.report is not None:
            index, output, connection = self.report
            if not self._sent_on(connection):
                return self._child_outcome(index)
            self.publish("end", {"index": index, "output": output, "next": self._request(0)})
        while True:
            model = self.model
            self._summarize(force=model.done)
            if model.done:
                return Outcome(True, model.output)
            if model.inputs is None:
                if await self._claim("prepare", lambda m: m.inputs is not None, self._prepare):
                    await self.session.wait_for(lambda m: m.inputs is not None)
                continue
            index = await self._next()
            if index is None:
                if await self._claim("collect", lambda m: m.done, self._collect):
                    # No need to wait for it to come back: see _sent_on.
                    return Outcome(True, self._output, connection=self._collected_on)
                continue
            self._reported.add(index)
            if not self.spec.leaf:
                if self.ctx.detach:
                    return self._child_outcome(index)
                child, options = self.spec.child(self.session.name, index, model.inputs[index])
                output, connection = await _work_in(self.ctx, child, options, self.depth + 1)
                while not self._sent_on(connection):
                    output, connection = await _work_in(self.ctx, child, options, self.depth + 1)
            else:
                output = await self._compute(index, model.inputs[index])
            if not self.model.completed[index]:
                self.publish("end", {"index": index, "output": output, **self._refill()})

    def _child_outcome(self, index: int) -> Outcome:
        child, options = self.spec.child(self.session.name, index, self.model.inputs[index])
        return Outcome(False, index=index, child=child, child_options=options)

    def _sent_on(self, connection: int | None) -> bool:
        """Whether a child's output sent on ``connection`` is surely ahead of what this view
        sends now: same connection, same order. After a reconnect it may have been lost,
        and a parent must never hold an output its child does not: check the child again."""
        return connection is None or connection == self.ctx.client.connections

    def _request(self, held: int) -> dict[str, int]:
        self._asked += 1
        return {"id": self._asked, "want": max(1, self._window - held)}

    def _held(self) -> list[int]:
        """The partitions this view holds and has not done, oldest first."""
        return [index for index in self.model.workers.get(self.view_id, ()) if index not in self._reported]

    def _refill(self) -> dict[str, Any]:
        """The request a report carries: when no request is outstanding, at most half the
        window is left and there is more to get, so that the answer comes back while the
        rest is computed."""
        held = len(self._held())
        if self._may_ask(self.model, held):
            return {"next": self._request(held)}
        return {}

    async def _next(self) -> int | None:
        """A partition this view holds and has not done; None once every one is complete."""
        while True:
            model = self.model
            if model.remaining == 0:
                return None
            held = self._held()
            if self._may_ask(model, len(held)):
                self.publish("request", self._request(len(held)))
                continue
            if held:
                return held[0]
            await self.session.wait_for(partial(self._news, self._answered(model)))

    def _news(self, answered: int, model: Any) -> bool:
        """Whether ``_next`` may have something new to do."""
        return model.remaining == 0 or self._answered(model) != answered or self._may_ask(model, 0)

    def _may_ask(self, model: Any, held: int) -> bool:
        """No request outstanding, room in the window, and a partition that this view does
        not hold yet is incomplete (a request would get it)."""
        return (
            self._answered(model) == self._asked
            and held <= self._window // 2
            and model.remaining > len(model.workers.get(self.view_id, ()))
        )

    def _answered(self, model: Any) -> int:
        return model.answers.get(self.view_id, (0,))[0]

    async def _claim(self, task: str, finished: Callable[[Any], bool], action: Callable[[], Any]) -> bool:
        """Do ``task`` if this view holds its claim (asking for it if nobody does) and
        return True, else wait until it is done or its holder goes away."""
        holder = self.model.claims.get(task)
        if holder is None:
            self.publish("claim", task)
            await self.session.wait_for(lambda m: finished(m) or task in m.claims)
            if finished(self.model):
                return False
            holder = self.model.claims[task]
        if holder == self.view_id:
            await action()
            return True
        await self.session.wait_for(lambda m: finished(m) or m.claims.get(task) != holder)
        return False

    async def _prepare(self) -> None:
        spec = self.spec
        inputs = await self.ctx.plugin.prepare_inputs(spec.input, spec.count, spec.options)
        self.publish("inputs", {"inputs": inputs, "next": self._request(0)})
        self._log("prepared")

    async def _compute(self, index: int, input: Any) -> Any:
        output = await self.ctx.plugin.compute(input, self.spec.start + index, self.spec.options)
        self._log("computed", index=self.spec.start + index)
        return output

    async def _collect(self) -> None:
        spec = self.spec
        self._output = await self.ctx.plugin.collect_results(list(self.model.outputs), spec.options)
        self._collected_on = self.ctx.client.connections
        self.publish("output", self._output)
        # It describes the session after the output, which comes after all this replica has.
        seq = self.session.replica.seq + 1
        self.session.summarize(summary(self.model, done=True, output=self._output), seq)
        self._log("collected")
        if spec.leaf and self.ctx.on_leaf_done is not None:
            self.ctx.on_leaf_done(self.session.name, spec.partitions)

    def _summarize(self, *, force: bool = False) -> None:
        """Summarize the session, at most every ``SUMMARY_EVERY`` s per process, unless
        ``force``. Below the first level only the end is summarized: the web page counts
        those sessions rather than showing them."""
        if self.depth > SUMMARY_DEPTH and not force:
            return
        now, name = trio.current_time(), self.session.name
        if force or now - self.ctx.summarized.get(name, -math.inf) >= SUMMARY_EVERY:
            if not force:  # only the first levels' sessions are remembered: a bounded number
                self.ctx.summarized[name] = now
            self.session.summarize(summary(self.model))

    def _log(self, event: str, **fields: Any) -> None:
        self.ctx.plugin.log({"event": event, "session": self.session.name, "view": self.view_id, **fields})


def summary(model: Computation, *, done: bool = False, output: Any = None) -> dict[str, Any]:
    """What a session of the tree is doing, for ``million status`` and the web page."""
    done = done or model.done
    if done:
        state = "done"
    elif model.inputs is None:
        state = "preparing"
    elif model.remaining == 0:
        state = "collecting"
    else:
        state = "working"
    data: dict[str, Any] = {
        "state": state,
        "leaf": model.leaf,
        "count": model.count,
        "completed": model.count if done else model.count - model.remaining,
        "working": len(model.workers),
    }
    if model.count <= SUMMARY_WORKERS:
        data["completed_at"] = [i for i, completed in enumerate(model.completed) if completed or done]
        load: dict[int, int] = {}
        for held in model.workers.values():
            for index in held:
                load[index] = load.get(index, 0) + 1
        data["workers"] = load
    if done:
        data["output"] = short(model.output if model.done else output)
    return data


def short(value: Any, limit: int = 512) -> Any:
    """``value`` if its JSON is short enough for a summary, else a note of its size."""
    size = len(dumps(value))
    return value if size <= limit else f"<{size} bytes>"


def is_run_summary(summary: Any) -> bool:
    """Whether ``summary`` has the fields ``report_progress`` writes (anyone may write any)."""
    fields = {"run": str, "state": str, "partitions": int, "completed": int, "rate": int, "workers": int}
    return isinstance(summary, dict) and all(type(summary.get(key)) is kind for key, kind in fields.items())


async def report_progress(run: str, progress: Session, root: Session) -> None:
    """Summarize a run on its progress session, and its root, every ``SUMMARY_EVERY`` s
    until it is done."""
    seen: deque[tuple[float, int]] = deque()
    while True:
        now, model, finished = trio.current_time(), progress.model, root.model.done
        seen.append((now, model.done))
        while now - seen[0][0] > 5:
            seen.popleft()
        since, before = seen[0]
        progress.summarize(
            {
                "run": run,
                "state": "done" if finished else "open",
                "partitions": model.partitions,
                "completed": model.partitions if finished else model.done,
                "rate": round((model.done - before) / (now - since)) if now > since else 0,
                "workers": sum(model.bots.values()),
                "answer": short(root.model.output) if finished else None,
            }
        )
        root.summarize(summary(root.model))
        if finished:
            return
        with trio.move_on_after(SUMMARY_EVERY):
            await root.wait_for(lambda m: m.done)


def progress_session(run: str) -> str:
    """The name of the session that counts a run's finished partitions."""
    return f"{run}:progress"


@attrs.define
class Progress(Model, name="million.progress"):
    """Finished leaf sessions of a run, counted once each, and who is working."""

    root: str = ""
    partitions: int = 0
    done: int = 0
    leaves: dict[str, int] = attrs.Factory(dict)  # leaf session -> partitions
    by_child: dict[int, int] = attrs.Factory(dict)  # first-level child -> partitions done
    bots: dict[str, int] = attrs.Factory(dict)  # a process's view -> bots it runs

    def init(self, options: Any) -> None:
        self.root, self.partitions = options["root"], options["partitions"]
        self.subscribe("leaf", self.leaf)
        self.subscribe("bots", self.hello)
        self.subscribe(VIEW_EXIT, self.exit)

    def leaf(self, data: Any) -> None:
        name, count = data["name"], data["count"]
        if name in self.leaves or type(count) is not int:
            return
        self.leaves[name] = count
        self.done += count
        if name != self.root:
            first = int(name[len(self.root) + 1 :].split("-")[0])
            self.by_child[first] = self.by_child.get(first, 0) + count

    def hello(self, bots: Any) -> None:
        if type(bots) is int:
            self.bots[self.sender] = bots

    def exit(self, view: str) -> None:
        self.bots.pop(view, None)
