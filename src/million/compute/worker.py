"""The worker view: prepares, computes or coordinates partitions of a session, and collects.

``work`` walks the tree: in a leaf session it computes partitions with the plugin; in an
interior one it takes a child, works in it and reports the child's output upward. With
``detach`` a coordinator leaves the root while it works an interior child, so that the root
stays small; below the root, and for a leaf, it stays in the parent, where leaving and
joining again for each child would cost more than its membership (a million partitions:
17.9 s against 21.6 s).

A leaf child that its coordinator can compute whole in ``Context.hold`` s gets no session
(``Worker._whole``): a session costs more than a hundred quick partitions. Whatever stops
it (a slower pace than that, a hook that fails) hands the leaf to a session of its own,
with what was computed as its ``HeadStart``: the session's rules, for failures and for
sharing the leaf among workers, take over from there, and nothing is computed twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from functools import partial
from typing import Any

import attrs
import trio

from million.compute.computation import Computation
from million.compute.plugins import Batch, HookFailed, Plugin, PluginError, Result
from million.compute.progress import summary
from million.compute.tree import Spec, SpecError, share
from million.compute.votes import COUNTS
from million.replica.client import Client
from million.replica.membership import JoinError
from million.replica.session import Session, join
from million.replica.view import View
from million.wire import codec, tasks
from million.wire.protocol import ErrorCode

__all__ = ["Context", "Finished", "Outcome", "RunFailed", "RunRefused", "Worker", "run_spec", "work"]

SUMMARY_DEPTH = 1  # levels below the root whose progress is summarized, not only their end
REPORT_EVERY = 0.25  # s: a leaf worker reports what it computed together, at least this often
HOLD = 1.0  # s of computing that a leaf worker holds once its pace is known, or computes whole
RESCUE = 3  # a leaf computed whole that takes this many times HOLD is stalled: others begin its session


class RunRefused(PluginError):
    """A session this worker declines, as it declines a run whose plugin it lacks: its
    options do not describe a session of the partition tree."""


class RunFailed(Exception):
    """The run failed: a hook failed too often, or identities did not agree on a value
    (``Computation.failed``)."""


def run_spec(name: str, options: Any) -> Spec:
    """The spec of session ``name`` from its options; ``RunRefused`` saying why not."""
    try:
        return Spec.from_options(options)
    except SpecError as exc:
        raise RunRefused(f"session {name} holds no valid computation: {exc}") from None


@attrs.define
class Context:
    """What the workers of one process share."""

    client: Client
    plugin: Plugin
    detach: bool = True  # leave the root while working in its child
    tracker: Tracker = attrs.Factory(lambda: Tracker())
    window: int = 16  # leaf partitions a worker holds before its pace is known
    hold: float = HOLD  # s of computing a leaf worker holds, or a coordinator computes a leaf in
    pace: float | None = None  # s per partition, as this process's workers computed the last batch
    shown: set[Session[Any]] = attrs.Factory(set)  # sessions of the first levels that views are in
    head_starts: dict[str, HeadStart] = attrs.Factory(dict)  # leaf session -> what was computed of it
    begun: set[str] = attrs.Factory(set)  # leaf sessions begun here: worked in them, never whole
    claims: dict[tuple[str, str], str] = attrs.Factory(dict)  # (session, task) -> the view here that asked
    started: trio.Event = attrs.Factory(trio.Event)  # a worker here knows what it does first
    reported: dict[str, dict[int, Any]] = attrs.Factory(dict)  # session -> outputs reported, not done yet


@attrs.define
class Tracker:
    """What this process's workers computed since the last ``take``: the leaves they
    worked in (their models, read when taken, or how many were done in a leaf computed
    whole), the batches they are computing, and how many partitions."""

    leaves: dict[str, Computation | int] = attrs.Factory(dict)
    batches: dict[str, tuple[int, Batch]] = attrs.Factory(dict)  # leaf -> done before the batch, the batch
    computed: int = 0
    total: int = 0  # partitions computed in all

    def note(self, leaf: str, model: Computation | int, computed: int) -> None:
        self.leaves[leaf] = model
        self.computed += computed
        self.total += computed

    @contextmanager
    def computing(self, leaf: str, done: int, batch: Batch) -> Iterator[None]:
        """While ``batch`` is computed in ``leaf``, after ``done`` of its partitions: a
        hook that takes long, or waits, does not hide what the batch did before it."""
        self.batches[leaf] = (done, batch)
        try:
            yield
        finally:
            if self.batches.get(leaf, (0, None))[1] is batch:
                del self.batches[leaf]

    def take(self) -> tuple[dict[str, int], int]:
        """Partitions done in each leaf noted or being computed, and partitions computed;
        then forget those noted."""
        leaves = {
            name: model if isinstance(model, int) else model.count - model.remaining
            for name, model in self.leaves.items()
        }
        for name, (done, batch) in self.batches.items():
            leaves[name] = max(leaves.get(name, 0), done + len(batch.outputs))
        computed, self.leaves, self.computed = self.computed, {}, 0
        return leaves, computed


@attrs.define
class HeadStart:
    """What a coordinator did of a leaf before handing it to a session: its inputs, the
    outputs of its first partitions, and the hook's failure that stopped it (at the
    step, or the partition after those outputs). The session's worker in this process
    takes the outputs instead of calling the hooks again (while the session's inputs
    are these), and reports the failure as the session's first failed attempt there."""

    inputs: Result | None  # None: preparing failed
    values: list[Any] | None  # the inputs decoded
    outputs: list[Any] = attrs.Factory(list)
    ms: list[int] = attrs.Factory(list)
    failure: tuple[str, str] | None = None  # (hook, error), reported once
    spent: float = 0.0  # s of computing the outputs took
    probe: trio.Event | None = None  # while the first partition is computed to learn the pace: unset

    @property
    def probing(self) -> bool:
        """Whether the first partition is still being computed."""
        return self.probe is not None and not self.probe.is_set()

    async def settled(self) -> None:
        """Wait until the first partition, if it is still being computed, is."""
        probe = self.probe
        if probe is not None and not probe.is_set():
            await probe.wait()

    def batch(self, todo: list[int]) -> Batch | None:
        """The outputs known of the first of ``todo`` (leading, in order), ending with the
        failure if the next one is where it happened; None if there is neither."""
        known = 0
        while known < len(todo) and todo[known] < len(self.outputs):
            known += 1
        failed = known < len(todo) and todo[known] == len(self.outputs) and self.failure is not None
        if not known and not failed:
            return None
        batch = Batch.of([self.outputs[i] for i in todo[:known]], [self.ms[i] for i in todo[:known]])
        if failed:
            batch.error = self.take_failure()[1]
        return batch

    def take_failure(self) -> tuple[str, str]:
        """The failure, to report once."""
        assert self.failure is not None
        failure, self.failure = self.failure, None
        return failure


@attrs.frozen
class Finished:
    """A session's end as its model holds it: its output and tally, or why it failed."""

    output: Result | None = None
    tally: dict[str, dict[str, int]] = attrs.Factory(dict)
    failed: str | None = None
    retryable: bool = False

    @classmethod
    def of(cls, model: Computation) -> Finished:
        if model.failed is not None:
            return cls(failed=model.failed, retryable=model.retryable)
        return cls(Result.of(model.output), {who: dict(counts) for who, counts in model.tally.items()})

    def report(self, index: int) -> dict[str, Any]:
        """The ``end`` event that reports this as partition ``index`` of the parent."""
        if self.failed is not None:
            return {"index": index, "failed": self.failed, "retryable": self.retryable}
        assert self.output is not None
        return {"index": index, "output": self.output.embed(), "tally": self.tally}


@attrs.frozen
class Outcome:
    """How a worker's time in a session ended: the session's end, or a child to work."""

    finished: Finished | None = None
    index: int = -1
    child: str = ""
    child_options: dict[str, Any] = attrs.Factory(dict)


async def work(ctx: Context, name: str, options: dict[str, Any] | None = None) -> Any:
    """Work in session ``name`` (and below it) until it has an output; return the output.

    ``options=None`` joins the session as it exists (a run's root, found by name).
    ``RunFailed`` if the session failed instead.
    """
    finished = await _work_in(ctx, name, options)
    if finished.output is None:
        raise RunFailed(f"session {name} failed: {finished.failed}")
    return finished.output.value()


async def _work_in(
    ctx: Context, name: str, options: dict[str, Any] | None, depth: int = 0, *, create: bool = True
) -> Finished:
    """``work``: the session's end as its model holds it. ``JoinError`` (``not-found``)
    without ``create`` if the session was not begun."""
    report = None
    while True:
        view = partial(Worker, ctx=ctx, report=report, depth=depth, retry=options is not None)
        made = create and options is not None
        async with join(ctx.client, name, Computation, view, options, create=made) as session:
            outcome = await session.view.outcome()
        if outcome.finished is not None:
            ctx.head_starts.pop(name, None)
            ctx.reported.pop(name, None)
            return outcome.finished
        report = (outcome.index, await _work_in(ctx, outcome.child, outcome.child_options, depth + 1))


class Worker(View):
    """A participant that prepares, computes or coordinates partitions, and collects."""

    session: Session[Worker]

    def __init__(
        self,
        session: Session[Worker],
        *,
        ctx: Context,
        report: tuple[int, Finished] | None = None,
        depth: int = 0,
        retry: bool = False,
    ) -> None:
        super().__init__(session)
        self.ctx = ctx
        self.report = report  # a child's end, to report as a partition of this session
        self.depth = depth  # levels below the session ``work`` started in
        self.retry = retry  # its parent handed it out: a plugin's failure here is retried
        self.spec = run_spec(session.name, session.options)
        self._asked = 0  # requests published, numbered from 1
        self._reported: set[int] = set()  # partitions this view has done or handed to a child
        self._cycle = trio.CancelScope()
        self._outcome: Outcome | None = None
        self._finished = trio.Event()
        self._ahead: tuple[list[Any], Result] | None = None  # outputs collected early, and their output

    @property
    def model(self) -> Computation:
        model: Computation = self.session.model
        return model

    @property
    def identity(self) -> str:
        """This view's identity, as the reflector stamped its join."""
        return self.model.views.get(self.view_id, "")

    async def outcome(self) -> Outcome:
        await self._finished.wait()
        assert self._outcome is not None
        return self._outcome

    async def run(self) -> None:
        if self.depth <= SUMMARY_DEPTH:  # below, only the end is summarized: the pages count those
            self.ctx.shown.add(self.session)
        try:
            while self._outcome is None:
                with trio.CancelScope() as self._cycle:
                    self._outcome = await self._work()
        finally:
            self.ctx.shown.discard(self.session)
            self.ctx.started.set()  # it ended before it had anything to do: a run already over
        self._finished.set()

    def resynced(self) -> None:
        self._cycle.cancel()  # requests made under the old view id will never be answered

    @property
    def _window(self) -> int:
        """Partitions this view may hold: in a leaf, about ``hold`` s of computing at its
        process's pace (at least two, at most the leaf); in an interior session, one child."""
        if not self.spec.leaf:
            return 1
        pace = self.ctx.pace
        hold = self.ctx.window if pace is None else math.ceil(self.ctx.hold / max(pace, 1e-6))
        return max(2, min(self.spec.count, hold))

    async def _work(self) -> Outcome:
        """Prepare, compute or coordinate partitions, collect. A leaf worker holds a window
        of partitions, reports their outputs together in one event, and its reports carry
        its next request: a batch of partitions costs one event and no round trip."""
        self._asked, self._reported = 0, set()
        await self.session.wait_seen()  # the join may have made this view a preparer
        if self.retry and self.model.retryable:
            self.retry = False
            self.publish("retry", None)
            await self.session.wait_for(lambda m: not m.retryable)
        if self.report is not None:
            reported, finished = self.report
            self._reported.add(reported)
            if self._unreported(reported):
                self.publish("end", {"results": [finished.report(reported)], "next": self._request(0)})
        while True:
            model = self.model
            if model.done:
                self.session.summarize(summary(model))  # at every level: the pages count the ends
            if model.ended:
                return Outcome(Finished.of(model))
            if model.inputs is None:
                await self._claim("prepare", lambda m: m.inputs is not None, self._prepare)
                continue
            self.ctx.started.set()
            held = await self._next()
            if not held:
                await self._claim("collect", lambda m: m.done, self._collect)
                continue
            if self.spec.leaf:
                await self._compute(held, model.inputs)
                continue
            outcome = await self._coordinate(held[0])
            if outcome is not None:
                return outcome

    async def _coordinate(self, index: int) -> Outcome | None:
        """Work child ``index`` and report its end; or the outcome that leaves the root to
        work it there. A leaf's coordinator stays: it is back soon, and joining again
        costs more than staying."""
        self._reported.add(index)
        child, options = self._child(index)
        leaf = share(self.spec.partitions, self.spec.fanout, index)[1] <= self.spec.fanout
        # Until the pace is known, a leaf's first partition may go on computing in ``probes``
        # while its session begins (``_compute_whole``); once known, no child needs them.
        probing = leaf and self.ctx.pace is None
        async with tasks.open_nursery() if probing else nullcontext() as probes:
            end = await self._leaf(index, child, options, probes) if leaf else None
            if end is None and (self.model.ended or not self._unreported(index)):
                self.ctx.head_starts.pop(child, None)
                return None  # reported meanwhile (a first partition still computed ends first)
            if end is None and not leaf and self.ctx.detach and self.spec.parent is None:
                return Outcome(index=index, child=child, child_options=options)
            if end is None:
                if leaf:
                    self.ctx.begun.add(child)
                end = await _work_in(self.ctx, child, options, self.depth + 1)
        if self._unreported(index):
            report = end.report(index)
            self.publish("end", {"results": [report], **self._refill()})
            if end.failed is None:
                await self._collect_ahead({index: report["output"]})
        return None

    async def _leaf(
        self, index: int, name: str, options: dict[str, Any], probes: trio.Nursery | None
    ) -> Finished | None:
        """Leaf child ``index``, decided by the first of the views holding this copy of it:
        computed whole, unless it was handed to another identity too (verification aside)
        or this process began its session. The others help in the session it begins, or
        wait while it computes the leaf whole, for up to ``RESCUE`` times ``hold`` s: then
        it is stalled, and they begin the session themselves. None when the leaf is for a
        session (begun by whoever works it to its end), or was reported meanwhile."""
        waited_since = trio.current_time()
        while True:
            model = self.model
            if model.ended or not self._unreported(index):
                return None
            if self._first_holder(index, model):
                alone = model.assignees[index] == [self.identity] or not _shared(index, model)
                whole = alone and name not in self.ctx.begun
                return await self._whole(name, options, probes) if whole else None
            try:
                return await _work_in(self.ctx, name, options, self.depth + 1, create=False)
            except JoinError as exc:
                if exc.code != ErrorCode.NOT_FOUND:
                    raise
            if trio.current_time() - waited_since > RESCUE * self.ctx.hold:
                return None
            with trio.move_on_after(self.ctx.hold):  # then look for its session again
                await self.session.wait_for(partial(self._let_go, index))

    def _let_go(self, index: int, model: Computation) -> bool:
        """Whether child ``index`` needs nothing more of this view, or it is now the first
        holding this copy."""
        return model.ended or not self._unreported(index) or self._first_holder(index, model)

    def _first_holder(self, index: int, model: Computation) -> bool:
        """Whether this view comes first, in the order the model keeps them (the same for
        all), among those holding child ``index`` to work the same session: under
        verification, each identity works a copy of its own."""
        shared = _shared(index, model)
        holders = (
            view
            for view, held in model.workers.items()
            if index in held and (shared or model.views.get(view) == self.identity)
        )
        return next(holders, None) == self.view_id

    def _unreported(self, index: int) -> bool:
        """Whether partition ``index`` still takes a report from this view's identity."""
        model = self.model
        return not model.completed[index] and not model.voted(index, self.identity)

    def _child(self, index: int) -> tuple[str, dict[str, Any]]:
        """Child ``index``: handed alone to a trusted identity, or under verification a
        copy of its own for each identity it was handed to, worked by it alone."""
        model, identity = self.model, self.identity
        inputs = model.inputs
        assert inputs is not None  # a partition is given out only once there are inputs
        if _shared(index, model):
            return self.spec.child(self.session.name, index, inputs[index], model.alone[index])
        copy = model.assignees[index].index(identity)
        return self.spec.child(self.session.name, index, inputs[index], identity, copy)

    async def _whole(
        self, name: str, options: dict[str, Any], probes: trio.Nursery | None
    ) -> Finished | None:
        """Leaf child ``name`` computed whole by this view, without a session, as its
        session's only worker would: its end, tallied to this identity. None once it looks
        like taking more than ``hold`` s of computing, or a hook fails: a session of its
        own then goes on from there, from the leaf's ``HeadStart`` (with the first
        partition still computed in ``probes`` when that is what showed it)."""
        spec, plugin = Spec.from_options(options), self.ctx.plugin
        if self._too_long(spec.count, 0.0):
            return None
        head = self.ctx.head_starts[name] = HeadStart(None, None)
        try:
            head.inputs = await plugin.prepare_inputs(spec.input, spec.count, spec.options)
            head.values = head.inputs.value()
            self._log("prepared", session=name)
            if not await self._compute_whole(name, spec, head, probes):
                return None
            output = await plugin.collect_results(head.outputs, spec.options)
        except HookFailed as exc:
            head.failure = (exc.hook, exc.error)
            return None
        self._log("collected", session=name)
        self.ctx.head_starts.pop(name, None)
        ms = sum(head.ms)
        counts = dict.fromkeys(COUNTS, 0) | {"submitted": spec.count + 2, "validated": spec.count + 2}
        return Finished(output, {self.identity: counts | {"claimed_ms": ms, "credit_ms": ms}})

    async def _compute_whole(
        self, name: str, spec: Spec, head: HeadStart, probes: trio.Nursery | None
    ) -> bool:
        """Compute the leaf's partitions into ``head``, in batches; whether all were, before
        a hook failed or the rest looked like taking too long. When the pace is not known
        yet, its first partition alone, in a task of ``probes``: if that takes longer than
        the pace allows (``hold`` s over the leaf), the leaf's session begins meanwhile."""
        items = [(value, spec.start + i) for i, value in enumerate(head.values or ())]
        while len(head.outputs) < spec.count:
            if self._too_long(spec.count - len(head.outputs), head.spent):
                return False
            todo = items[len(head.outputs) :]
            if self.ctx.pace is None:
                assert probes is not None  # the pace, once known, stays known: unknown in _coordinate too
                head.probe = trio.Event()
                await probes.start(self._compute_batch, name, todo[:1], head, spec.options)
                with trio.move_on_after(self.ctx.hold / spec.count):  # from the hook's call on
                    await head.probe.wait()
                if not head.probe.is_set():
                    return False
            else:
                await self._compute_batch(name, todo, head, spec.options)
            if head.failure is not None:
                return False
        return True

    async def _compute_batch(
        self,
        name: str,
        todo: list[tuple[Any, int]],
        head: HeadStart,
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """A batch of the leaf's partitions, from the first of ``todo``, into ``head``."""
        ctx = self.ctx
        try:
            started, batch = trio.current_time(), Batch(REPORT_EVERY)
            task_status.started()
            with ctx.tracker.computing(name, len(head.outputs), batch):
                await ctx.plugin.compute_some(todo, options, batch)
            head.spent += trio.current_time() - started
            head.outputs += batch.outputs
            head.ms += batch.ms
            if batch.outputs:
                ctx.pace = head.spent / len(head.outputs)
                indexes = [index for _, index in todo[: len(batch.outputs)]]
                self._log("computed", session=name, indexes=indexes)
            ctx.tracker.note(name, len(head.outputs), len(batch.outputs))
            if batch.error is not None:
                head.failure = ("compute", batch.error)
        finally:
            if head.probe is not None:
                head.probe.set()

    def _too_long(self, left: int, spent: float) -> bool:
        """Whether computing ``left`` more partitions at this process's pace would take a
        leaf computed whole beyond ``hold`` s."""
        return self.ctx.pace is not None and spent + left * self.ctx.pace > self.ctx.hold

    def _request(self, held: int, most: int | None = None) -> dict[str, int]:
        self._asked += 1
        window = self._window if most is None else min(most, self._window)
        return {"id": self._asked, "want": max(1, window - held)}

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

    async def _next(self) -> list[int]:
        """The partitions this view holds and has not done, oldest first; none once every
        one is complete (or the session failed)."""
        while True:
            model = self.model
            if model.remaining == 0 or model.failed is not None:
                return []
            held = self._held()
            if self._may_ask(model, len(held)):
                self.publish("request", self._request(len(held)))
                continue
            if held:
                return held
            await self.session.wait_for(partial(self._news, self._answered(model)))

    def _news(self, answered: int, model: Any) -> bool:
        """Whether ``_next`` may have something new to do."""
        return (
            model.remaining == 0
            or model.failed is not None
            or self._answered(model) != answered
            or self._may_ask(model, 0)
        )

    def _may_ask(self, model: Any, held: int) -> bool:
        """No request outstanding, room in the window, a partition that this view does not
        hold yet is incomplete, and the last answer was not empty since nothing changed
        (``epoch``): a request could get something."""
        answer = model.answers.get(self.view_id)
        starved = answer is not None and not answer[1] and answer[2] == model.epoch
        return (
            self._answered(model) == self._asked
            and not starved
            and held <= self._window // 2
            and model.remaining > len(model.workers.get(self.view_id, ()))
        )

    def _answered(self, model: Computation) -> int:
        answered: int = model.answers.get(self.view_id, [0])[0]
        return answered

    async def _claim(self, task: str, finished: Callable[[Any], bool], action: Callable[[], Any]) -> None:
        """Do ``task`` if this view holds its claim (asking for it if the task needs this
        view's identity), else wait until it is done or something changes."""

        def over(model: Any) -> bool:
            return bool(finished(model)) or model.failed is not None

        view, identity, epoch = self.view_id, self.identity, self.model.epoch
        asks = not self.model.doing(task, view) and self.model.needs(task, identity)
        if asks and self._first_to_claim(task):
            self.publish("claim", task)
            await self.session.wait_for(
                lambda m: over(m) or m.doing(task, view) or not m.needs(task, identity) or m.epoch != epoch
            )
        self.ctx.started.set()  # a run's root is prepared while the process's other bots join it
        if over(self.model):
            return
        doing = self.model.doing(task, view)
        if task == "prepare" and not doing and self._may_ask(self.model, 0):
            self.publish("request", self._request(0))  # answered as the inputs come
        if doing:
            self.ctx.claims.pop((self.session.name, task), None)  # should it fail, another asks
            await action()
            epoch = self.model.epoch
        await self.session.wait_for(lambda m: over(m) or m.epoch != epoch)

    def _first_to_claim(self, task: str) -> bool:
        """Whether this view asks for ``task``: no other view of this process (of one
        identity: one of them gets it) asked and is still here. A run's bots all reach its
        root's prepare at once."""
        key, model = (self.session.name, task), self.model
        if model.resting(task, self.view_id):  # it failed the step: another asks first
            return False
        asker = self.ctx.claims.get(key)
        if asker not in (None, self.view_id) and asker in model.views and not model.resting(task, asker):
            return False
        self.ctx.claims[key] = self.view_id
        return True

    async def _prepare(self) -> None:
        spec, head = self.spec, self.ctx.head_starts.get(self.session.name)
        if head is not None and head.inputs is not None:  # prepared before the leaf had a session
            # Its first partition, still computed, is too slow for the leaf: a small window till then.
            request = self._request(0, most=2 if head.probing else None)
            self.publish("inputs", {"inputs": head.inputs.embed(), "next": request})
            return
        if head is not None and head.failure is not None:  # preparing failed before
            self._failed(*head.take_failure(), step="prepare")
            return
        try:
            inputs = await self.ctx.plugin.prepare_inputs(spec.input, spec.count, spec.options)
        except HookFailed as exc:
            self._failed(exc.hook, exc.error, step="prepare")
            return
        self.publish("inputs", {"inputs": inputs.embed(), "next": self._request(0)})
        self._log("prepared")

    async def _compute(self, held: list[int], inputs: list[Any]) -> None:
        """Compute the partitions held that still need this view's output, in order, and
        report them together every ``REPORT_EVERY`` s and once they are all done (those
        of the leaf's head start at once)."""
        todo = self._needed(held)
        while todo:
            batch = await self._head_start(todo, inputs) or await self._compute_some(todo, inputs)
            outputs = batch.outputs
            done, todo = todo[: len(outputs)], todo[len(outputs) :]
            needed = set(self._needed(done))
            self._reported.update(done)
            results = [
                {"index": index, "output": output, "ms": took}
                for index, output, took in zip(done, outputs, batch.ms, strict=True)
                if index in needed
            ]
            if results:
                self.publish("end", {"results": results, **self._refill()})
                await self._collect_ahead({result["index"]: result["output"] for result in results})
            if batch.error is not None:  # the next one failed: it goes back, to another worker first
                failed, todo = todo[0], todo[1:]
                self._failed("compute", batch.error, index=failed)
                await self.session.wait_for(partial(self._released, failed))
            todo = self._needed(todo)

    async def _head_start(self, todo: list[int], inputs: list[Any]) -> Batch | None:
        """The outputs that this process computed before the leaf had a session, of the
        first of ``todo`` (once the first partition is, if it is being computed); none
        unless the session's inputs are the ones they came from."""
        head = self.ctx.head_starts.get(self.session.name)
        if head is None or head.values != inputs:
            return None
        if todo[0] == len(head.outputs):  # perhaps the one being computed
            await head.settled()
        return head.batch(todo)

    async def _compute_some(self, todo: list[int], inputs: list[Any]) -> Batch:
        """The plugin's outputs of the first of ``todo``, for ``REPORT_EVERY`` s at most."""
        start, options = self.spec.start, self.spec.options
        started = trio.current_time()
        items = [(inputs[index], start + index) for index in todo]
        batch, model = Batch(REPORT_EVERY), self.model
        # Under verification an output is done once identities agree, not when computed.
        shown = model.verify == 1 or model.solo == self.identity
        tracked = self.ctx.tracker.computing(self.session.name, model.count - model.remaining, batch)
        with tracked if shown else nullcontext():
            await self.ctx.plugin.compute_some(items, options, batch)
        if batch.outputs:
            self.ctx.pace = (trio.current_time() - started) / len(batch.outputs)
            self._log("computed", indexes=[start + index for index in todo[: len(batch.outputs)]])
        self.ctx.tracker.note(self.session.name, self.model, len(batch.outputs))
        return batch

    def _released(self, index: int, model: Computation) -> bool:
        """Whether the model took this view's failed attempt at ``index`` (or no longer needs it)."""
        return index not in model.workers.get(self.view_id, ()) or model.completed[index] or model.ended

    def _needed(self, indexes: list[int]) -> list[int]:
        """Those of ``indexes`` that still take this view's output; the others count as
        reported."""
        model, identity = self.model, self.identity
        needed = [index for index in indexes if not (model.completed[index] or model.voted(index, identity))]
        self._reported.update(set(indexes).difference(needed))
        return needed

    async def _collect_ahead(self, reported: dict[int, Any]) -> None:
        """Collect now if the outputs this view just reported (index: output), with those
        that this process's views reported before and the model has not taken yet,
        complete the session: its last reporter, this view, is given the collect, and the
        hook then runs while the reports go round. ``_collect`` takes the output if the
        model's outputs are the ones collected; else, or if the hook failed, it calls the
        hook again. Under verification a report completes nothing alone."""
        model = self.model
        if model.failed is not None or not (model.verify == 1 or model.solo == self.identity):
            return
        pending = self.ctx.reported.setdefault(self.session.name, {})
        pending.update(reported)
        for index in [index for index in pending if model.completed[index]]:
            del pending[index]
        if model.remaining != len(pending):
            return
        del self.ctx.reported[self.session.name]
        outputs = list(model.outputs)
        for index, output in pending.items():
            outputs[index] = codec.loads(codec.dumps(output))  # as the model will hold it
        with suppress(HookFailed):  # ``_collect`` then calls the hook again
            self._ahead = (outputs, await self.ctx.plugin.collect_results(outputs, self.spec.options))

    async def _collect(self) -> None:
        spec, head = self.spec, self.ctx.head_starts.get(self.session.name)
        if head is not None and head.failure is not None and len(head.outputs) == spec.count:
            self._failed(*head.take_failure(), step="collect")  # collecting failed before
            return
        ahead, self._ahead = self._ahead, None
        outputs = list(self.model.outputs)
        try:
            if ahead is not None and ahead[0] == outputs:
                output = ahead[1]
            else:
                output = await self.ctx.plugin.collect_results(outputs, spec.options)
        except HookFailed as exc:
            self._failed(exc.hook, exc.error, step="collect")
            return
        self.publish("output", output.embed())
        self._log("collected")
        if spec.leaf:
            self.ctx.tracker.note(self.session.name, self.model, 0)

    def _failed(self, hook: str, error: str, *, index: int | None = None, step: str = "") -> None:
        """Report a failed attempt at partition ``index`` or at ``step``; this worker goes on."""
        where: dict[str, Any] = {"step": step} if index is None else {"index": index}
        self.publish("failed", {**where, "error": error})
        at = {} if index is None else {"index": self.spec.start + index}
        self._log("failed", hook=hook, error=error, **at)

    def _log(self, event: str, **fields: Any) -> None:
        self.ctx.plugin.log({"event": event, "session": self.session.name, "view": self.view_id} | fields)


def _shared(index: int, model: Computation) -> bool:
    """Whether every identity handed child ``index`` works the same session of it; under
    verification, unless it was handed alone, each works a copy of its own."""
    return bool(model.alone[index]) or model.verify == 1
