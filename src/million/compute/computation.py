"""The ``Computation`` model: the replicated state of one session of the partition tree.

A session computes ``partitions`` partitions. If they fit in one session (at most
``fanout``) it is a leaf and its workers compute them with the plugin's ``compute``.
Otherwise it has children, named ``<session>-<i>``, as few as the minimal-depth split
allows (``million.compute.tree``), and are computed the same way, recursively.
Each session prepares its inputs once (``prepare_inputs``) and, when every partition
or child has an output, collects them (``collect_results``); that output is the
partition's output in the parent.

Nobody is taken at their word. A partition is handed to identities (the reflector's
stamp on each event, ``Model.identity``), and a value counts only from an identity it
was handed to: the partition's output from one of its assignees, the inputs and the
output from the identities that claimed preparing or collecting. Each value is taken
once ``verify`` distinct identities agree on it (``million.compute.votes``); on
disagreement it is asked of more identities, up to ``max_copies``, and then the run
fails, naming the partition and who disagreed. A plugin's hook that raises is a failed
attempt, reported by its worker (``failed``): the partition or step goes to another
worker first, and after ``max_failures`` attempts (from at least ``verify`` identities,
or the one a session is worked by alone) the session fails, saying where, and can be
retried (``retry``) when the run resumes. With ``adaptive``, a trusted identity's value
may be taken alone (BOINC's adaptive replication), decided with the model's seeded
random: the same on every replica. The ``tally`` of every identity's reports
travels upward with each child's output, so that the root's is the run's.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import attrs

from million.compute.reports import STEPS, is_batch, is_failure, is_inputs, is_request, voted_value
from million.compute.tree import Spec, SpecError, depth
from million.compute.votes import TRUSTED, Ballot, Tally, Task
from million.replica.model import Model
from million.replica.state import is_json
from million.wire.protocol import VIEW_EXIT, VIEW_JOIN

__all__ = ["CLAIMS", "Computation"]

log = logging.getLogger(__name__)

CLAIMS = ("prepare", "collect")  # the tasks a worker claims before doing them
RETRY_AFTER = 1000  # ms before a worker may try again what it failed: meanwhile others may


@attrs.define
class Computation(Model, name="million.computation.9"):
    """The replicated state of one session of the tree.

    The number in its name changes whenever its events change meaning, so that a worker
    of another version is refused at the join (``model-mismatch``) instead of diverging.
    Every handler checks every field of its event before it changes anything, and
    ignores a malformed or unfounded event whole (counting it against its identity).
    """

    leaf: bool = True
    root: bool = True
    count: int = 0
    verify: int = 1
    adaptive: bool = False
    copies: int = 3
    max_rejections: int = 3
    max_failures: int = 3
    start: int = 0  # global number of the first partition
    where: str = ""  # the session's name as its parent knows it ("" at the root)
    trust: dict[str, int] = attrs.Factory(dict)
    solo: str = ""  # the trusted identity this whole session was handed to alone (adaptive)
    inputs: list[Any] | None = None
    outputs: list[Any] = attrs.Factory(list)
    completed: list[bool] = attrs.Factory(list)
    remaining: int = 0
    wanted: list[int] = attrs.Factory(list)  # identities to ask for each partition
    alone: list[str] = attrs.Factory(list)  # the trusted identity a partition's value may come from alone
    assignees: list[list[str]] = attrs.Factory(list)  # identities each partition was handed to
    ballots: dict[int, Ballot] = attrs.Factory(dict)  # partition -> its votes, once it has one
    sole: dict[int, str] = attrs.Factory(dict)  # partition -> the identity whose first report was taken alone
    workers: dict[str, list[int]] = attrs.Factory(dict)  # view -> partitions it holds, oldest first
    answers: dict[str, list[Any]] = attrs.Factory(dict)  # view -> [request id, given, epoch]
    waiting: dict[str, list[int]] = attrs.Factory(dict)  # view -> [request id, want] asked before the inputs
    views: dict[str, str] = attrs.Factory(dict)  # present view -> its identity
    tasks: dict[str, Task] = attrs.Factory(dict)  # "prepare" and "collect"
    tally: dict[str, dict[str, int]] = attrs.Factory(dict)
    epoch: int = 0  # grows whenever a request could get what it could not before
    #: partition -> [[view, identity, session ms]] of its failed attempts; step -> the same
    attempts: dict[int, list[list[Any]]] = attrs.Factory(dict)
    step_attempts: dict[str, list[list[Any]]] = attrs.Factory(dict)
    output: Any = None
    done: bool = False
    failed: str | None = None
    retryable: bool = False  # the failure is a plugin's: a ``retry`` starts over where it failed
    failing: int = -1  # the child whose failure failed this session
    leaf_children: bool = False  # an interior session one level above the leaves
    handed: list[int] = attrs.Factory(list)  # session ms each child was last handed out at
    took: list[int] = attrs.Factory(list)  # ms each child done took from its hand-out, sorted
    waking: int = -1  # session ms at which asking in vain ends (-1: not set)

    def init(self, options: Any) -> None:
        try:
            spec = Spec.from_options(options)
        except SpecError as exc:
            log.warning("a computation with invalid options ignores every event: %s", exc)
            return
        self.leaf, self.root, self.count = spec.leaf, spec.parent is None, spec.count
        self.verify, self.adaptive, self.copies = spec.verify, spec.adaptive, spec.copies
        self.max_rejections, self.trust, self.solo = spec.max_rejections, dict(spec.trust), spec.alone
        self.max_failures, self.start = spec.max_failures, spec.start
        self.where = "" if spec.parent is None else f"{spec.parent}-{spec.index}"
        self.outputs = [None] * self.count
        self.completed = [False] * self.count
        self.wanted = [self.verify] * self.count
        self.alone = [""] * self.count
        self.tasks = {task: Task(1 if self.solo else self.verify) for task in CLAIMS}
        self.assignees = [[] for _ in range(self.count)]
        self.remaining = self.count
        self.leaf_children = not spec.leaf and depth(spec.partitions, spec.fanout) == 2
        self.handed = [0] * self.count if self.leaf_children else []
        for topic, handler in (
            ("request", self.request),
            ("end", self.end),
            ("claim", self.claim),
            ("inputs", self.set_inputs),
            ("output", self.set_output),
            ("failed", self.attempt_failed),
            ("retry", self.retry),
            (VIEW_JOIN, self.join),
            (VIEW_EXIT, self.exit),
        ):
            self.subscribe(topic, handler)

    # --- who is who -------------------------------------------------------------------------

    def join(self, view: str) -> None:
        """A view joins: remember its identity. Whoever joins a child session that needs
        preparers prepares it, without asking; a run's root is opened by whoever posts the
        run, so there the preparers ask (``claim``)."""
        if type(view) is not str:
            return
        self.views[view] = self.identity
        if not self.root and self.inputs is None:
            self._give_claim("prepare", view)

    def exit(self, view: str) -> None:
        if type(view) is not str or view not in self.views:
            return
        identity = self.views.pop(view)
        self.workers.pop(view, None)
        self.answers.pop(view, None)
        self.waiting.pop(view, None)
        for task in self.tasks.values():
            task.release(view, identity, self.views)
        self.epoch += 1

    def _unfounded(self) -> None:
        """An event for a claim its identity does not hold: counted against it."""
        self._tally().add(self.identity, rejected=1)

    def _tally(self) -> Tally:
        return Tally(self.tally)

    def _barred(self, identity: str) -> bool:
        return self._tally().rejected(identity) > self.max_rejections

    # --- handing out partitions -------------------------------------------------------------

    def request(self, data: Any) -> None:
        """A worker asks for up to ``want`` more partitions (``{"id": n, "want": k}``; a
        ``want`` below one asks for one); the answer is recorded under its view. Asked
        before the inputs, it is answered as they come, in the order asked: a run's
        workers then start at once, not one round trip after the inputs."""
        if not is_request(data) or self.sender not in self.views:
            return
        view, want = self.sender or "", max(1, min(data["want"], self.count))
        if self.inputs is None and not self.ended:
            self.waiting[view] = [data["id"], want]
        self._answer(view, data["id"], want)

    def _answer(self, view: str, request: int, want: int) -> None:
        identity = self.views[view]
        usable = not (self.done or self.failed or self.inputs is None or self._barred(identity))
        given = self._assign(view, identity, want) if usable else []
        if given:
            self.workers.setdefault(view, []).extend(given)
            for index in given:
                if self.leaf_children:
                    self.handed[index] = self.now
                if not self.assignees[index] and (identity == self.solo or self._trusted(identity)):
                    self.alone[index], self.wanted[index] = identity, 1
                if identity not in self.assignees[index]:
                    self.assignees[index].append(identity)
            copies = any(len(self.assignees[index]) < self.wanted[index] for index in given)
            if copies:
                self.epoch += 1  # a copy for another identity, or room for a child: ask again
        self.answers[view] = [request, given, self.epoch]

    def _assign(self, view: str, identity: str, want: int) -> list[int]:
        """Up to ``want`` partitions that need another identity than those they were
        handed to; else (in an interior session, only once every child has all the
        identities it needs, so that no worker waits in a child for a copy that every
        other identity is too busy to take) partitions nobody was handed, within this
        view's fair share; else the least-worked incomplete one this identity has not
        reported, from the last (its holder may have died: a copy then counts as the
        holder's would)."""
        assignees, completed = self.assignees, self.completed
        if max(self.wanted, default=1) > 1:  # some partition may want another identity
            short = [
                i
                for i in range(self.count)
                if assignees[i] and not completed[i] and len(assignees[i]) < self.wanted[i]
            ]
            copies = self._untried([i for i in short if identity not in assignees[i]], view)
            if copies:
                return copies[:want]
        fresh = [i for i in range(self.count) if not assignees[i] and not completed[i]]
        fresh = self._untried(fresh, view)
        if fresh:
            askers = len(self.answers) + (view not in self.answers)
            held = sum(len(indexes) for indexes in self.workers.values())
            quota = -(-(len(fresh) + held) // askers) - len(self.workers.get(view, ()))
            return fresh[: max(1, min(want, quota))]
        load = [0] * self.count
        for indexes in self.workers.values():
            for index in indexes:
                load[index] += 1
        incomplete = [i for i in range(self.count) if not completed[i]]
        if not self.leaf_children:
            open_ = self._open(incomplete, view, identity)
        else:  # a leaf child somebody holds only once it is overdue
            due, handed = self._overdue_below(), self.handed
            open_ = self._open([i for i in incomplete if not load[i] or 2 * handed[i] < due], view, identity)
            if not open_ and (waiting := self._open(incomplete, view, identity)):  # none overdue yet
                self._wake(min(handed[i] for i in waiting) + 3 * self._typical() // 2 + 1)
        steal = min(open_, key=lambda index: (load[index], -index), default=None)
        return [] if steal is None else [steal]

    def _open(self, indexes: list[int], view: str, identity: str) -> list[int]:
        """Those of ``indexes`` (incomplete) that ``view`` does not hold and may take."""
        mine = self.workers.get(view, ())
        return self._untried([i for i in indexes if i not in mine and not self.voted(i, identity)], view)

    def _overdue_below(self) -> int:
        """Twice the session time before which a held leaf child was handed out for another
        worker to take it on too: any, before a child is done (more workers than children
        share them); else one held half as long again as a child done typically took (the
        median: one slow or hostile holder does not set it). Workers that run out of
        children all at once, as a run ends, would only slow the last leaves by joining
        them; a holder that stalls, or is slow, gets help. (Children are handed out at
        session times up to ``now``, which never goes back.)"""
        return 2 * self.now + 1 if not self.took else 2 * self.now - 3 * self._typical()

    def _typical(self) -> int:
        return self.took[len(self.took) // 2]

    def _wake(self, at: int) -> None:
        """At session time ``at``, let the workers that asked in vain ask again (``epoch``)."""
        if 0 <= self.waking <= at:
            return
        self.waking = at
        self.future(at - self.now, self.woken)

    def woken(self) -> None:
        if self.now >= self.waking:
            self.waking = -1
        self.epoch += 1

    def _untried(self, indexes: list[int], view: str) -> list[int]:
        """``indexes`` but those that ``view`` failed and may not try again yet (``_resting``)."""
        if not self.attempts:
            return indexes
        return [index for index in indexes if not self._resting(self.attempts.get(index), view)]

    def _resting(self, attempts: list[list[Any]] | None, view: str) -> bool:
        """Whether ``view`` failed what ``attempts`` are of less than ``RETRY_AFTER`` ms ago:
        meanwhile it goes to another worker, if one asks."""
        return any(who == view and self.now < at + RETRY_AFTER for who, _, at in attempts or ())

    def resting(self, task: str, view: str) -> bool:
        """Whether ``view`` failed step ``task`` too recently to be given it (``_resting``)."""
        return self._resting(self.step_attempts.get(task), view)

    def rested(self) -> None:
        """``RETRY_AFTER`` ms after a failed attempt: whoever made it may ask again."""
        self.epoch += 1

    # --- reports ----------------------------------------------------------------------------

    def end(self, data: Any) -> None:
        """Outputs of partitions, ``{"results": [report, ...], "next"?: request}``, and with
        ``next`` the reporter's next request (``reports.is_batch``). A report counts only from an
        identity its partition was handed to, once, and only until the session ends: its
        tally is then what its parent is told."""
        if self.ended or not is_batch(data, self.count, self.leaf):
            return
        identity, view = self.identity, self.sender or ""
        reports = data["results"]
        indexes = {report["index"] for report in reports}
        self._release(indexes, [view])
        alone, alone_ms = 0, 0
        for report in reports:
            index = report["index"]
            if identity not in self.assignees[index]:
                self._unfounded()
            elif self.voted(index, identity):  # another view of it reported
                continue
            elif self._takes_alone(index, identity):  # the common case, kept cheap
                self.sole[index] = identity
                self._complete(index, report["output"])
                alone, alone_ms = alone + 1, alone_ms + report.get("ms", 0)
            else:
                self._vote(index, identity, voted_value(report), report.get("ms", 0), report.get("tally"))
                if self.failed is not None:  # a child failed
                    return
        if alone:
            self._tally().taken(identity, alone, alone_ms)
        completed = {index for index in indexes if self.completed[index]}
        if completed and self.workers:  # nobody else need hold them any more
            self._release(completed, list(self.workers))
        if self.remaining == 0 and self.sender in self.views:  # the last reporter collects
            self._give_claim("collect", view)
        if "next" in data:
            self.request(data["next"])

    def voted(self, index: int, identity: str) -> bool:
        """Whether ``identity`` reported partition ``index``."""
        ballot = self.ballots.get(index)
        return self.sole.get(index) == identity or (ballot is not None and identity in ballot.votes)

    def _takes_alone(self, index: int, identity: str) -> bool:
        """Whether a leaf's partition takes the first value reported, this one, without a
        ballot: nobody else reported it, and one identity is enough (``verify`` 1, or the
        one it was handed to alone)."""
        return (
            self.leaf
            and not self.completed[index]
            and index not in self.ballots
            and (self.verify == 1 or self.alone[index] == identity)
        )

    def _ballot(self, index: int) -> Ballot:
        """Partition ``index``'s ballot; for one taken alone, made from its reporter's value."""
        ballot = self.ballots.get(index)
        if ballot is None:
            ballot = self.ballots[index] = Ballot()
            if index in self.sole:
                ballot.take(ballot.vote(self.sole[index], self.outputs[index]))
        return ballot

    def _release(self, indexes: set[int], views: list[str]) -> None:
        """``views`` no longer hold ``indexes``."""
        for view in views:
            held = self.workers.get(view, ())
            if indexes.isdisjoint(held):
                continue
            held = [index for index in held if index not in indexes]
            if held:
                self.workers[view] = held
            else:
                self.workers.pop(view, None)

    def _vote(self, index: int, identity: str, value: Any, ms: int, work: Any = None) -> None:
        """Count ``identity``'s value for partition ``index`` (with ``work``, the tally of
        its copy of a child: credited once its value is the one taken)."""
        ballot = self._ballot(index)
        first = not ballot.votes
        ballot.vote(identity, value, ms)
        tally = self._tally()
        if work is not None:
            ballot.tallies[identity] = work
        tally.submit(identity, ms)
        if self.completed[index]:  # a late copy: judged by what was taken
            tally.judge(ballot, [identity])
            self._credit(index, ballot)
            return
        agreed = ballot.agreed(1 if first and self.alone[index] == identity else self.verify)
        if agreed is not None:
            self._complete(index, ballot.take(agreed))
            tally.judge(ballot)
            self._credit(index, ballot)
        elif ballot.split:
            self._ask_more(index, ballot)
        elif self.wanted[index] < self.verify:  # not the one it was handed to alone
            self.wanted[index] = self.verify
            self.epoch += 1

    def _trusted(self, identity: str) -> bool:
        """Adaptive replication, decided as a partition is first handed out: to an identity
        with ``c`` >= TRUSTED consecutive valid results, alone with probability 1 - 1/c. A
        child handed alone is ``solo`` for that identity: its steps and partitions are
        taken from it alone, and from anyone else only once ``verify`` agree."""
        streak = self.trust.get(identity, 0)
        return self.adaptive and streak >= TRUSTED and self.random.random() < 1 - 1 / streak

    def _ask_more(self, index: int, ballot: Ballot) -> None:
        if len(ballot.votes) >= self.copies:
            parts = ", ".join(f"{who}: {key[:40]}" for who, key in sorted(ballot.votes.items()))
            self.failed = f"no {self.verify} identities agreed on partition {index} ({parts})"
            self.epoch += 1
        elif self.wanted[index] < self.copies:
            self.wanted[index] += 1
            self.epoch += 1

    def _credit(self, index: int, ballot: Ballot) -> None:
        """Merge the tallies of the copies of child ``index`` that reported the value
        taken (once, when its reporters shared one child session); drop the others."""
        shared = self.verify == 1 or bool(self.alone[index])
        for identity, work in list(ballot.tallies.items()):
            if ballot.votes[identity] == ballot.taken and not (shared and ballot.credited):
                self._tally().merge(work)
                ballot.credited = True
            del ballot.tallies[identity]

    def _complete(self, index: int, value: Any) -> None:
        if not self.leaf:
            if "failed" in value:
                self.failed, self.retryable, self.failing = value["failed"], value["retryable"], index
                self.epoch += 1
                return
            value = value["output"]
            if self.leaf_children:
                before = self._typical() if self.took else None
                bisect.insort(self.took, self.now - self.handed[index])
                if self.waking >= 0 and before is not None and self._typical() < before:
                    self.epoch += 1  # overdue sooner than those who asked in vain were told
        self.completed[index] = True  # nobody asking gets more for it: ``epoch`` stays
        self.outputs[index] = value
        self.remaining -= 1

    # --- failed attempts --------------------------------------------------------------------

    def attempt_failed(self, data: Any) -> None:
        """A hook failed: ``{"index": i, "error": text}`` at partition ``i`` of a leaf, held by
        the sender; ``{"step": "prepare" | "collect", "error": text}`` at a step it holds
        (``reports.is_failure``). The partition or step is free again, for another view
        first; at ``max_failures`` attempts, from ``verify`` identities or more (one in a
        session worked alone), the session fails. An attempt at what the sender no longer
        holds, or has reported, is ignored."""
        if self.ended or not is_failure(data, self.count, self.leaf):
            return
        view, identity = self.sender or "", self.identity
        if "index" in data:
            index = data["index"]
            if (
                index not in self.workers.get(view, ())
                or self.completed[index]
                or self.voted(index, identity)
            ):
                return
            self._release({index}, [view])
            if not any(
                self.views.get(other) == identity and index in held for other, held in self.workers.items()
            ):
                self.assignees[index] = [who for who in self.assignees[index] if who != identity]
            attempts = self.attempts.setdefault(index, [])
            what, hook = (
                f"partition {self.start + index} (index {index} of {self.where or 'the root'})",
                "compute",
            )
        else:
            step = data["step"]
            task = self.tasks[step]
            if view not in task.holders:
                return
            task.drop(view, identity, self.views)
            attempts = self.step_attempts.setdefault(step, [])
            what, hook = f"the {step} step of {self.where or 'the root'}", STEPS[step]
        attempts.append([view, identity, self.now])
        self.epoch += 1
        self.future(RETRY_AFTER, self.rested)
        identities = 1 if self.solo else self.verify  # a copy of a child is worked by one identity
        if len(attempts) >= self.max_failures and len({who for _, who, _ in attempts}) >= identities:
            workers = len({who for who, _, _ in attempts})
            times = f"{len(attempts)} times" + (f" on {workers} workers" if workers > 1 else "")
            self.failed = f"{what} failed in {hook} {times}; the last time:\n{data['error']}"
            self.retryable = True

    def retry(self, data: Any) -> None:
        """Start over where a plugin's failure failed the session: its attempts are
        forgotten, and a failed child is handed out again. Any view may ask, once the
        session failed so (``retryable``)."""
        if not self.retryable or self.sender not in self.views:
            return
        self.failed, self.retryable = None, False
        self.attempts.clear()
        self.step_attempts.clear()
        if self.failing >= 0:
            index, self.failing = self.failing, -1
            self.ballots.pop(index, None)
            self.assignees[index], self.wanted[index], self.alone[index] = [], self.verify, ""
        self.epoch += 1

    # --- preparing and collecting -----------------------------------------------------------

    def claim(self, task: Any) -> None:
        """A view asks to prepare or to collect: given while the task is open."""
        if type(task) is not str or task not in CLAIMS or self.sender not in self.views:
            return
        if (self.inputs is None) if task == "prepare" else (self.remaining == 0):
            self._give_claim(task, self.sender or "")

    def _give_claim(self, task: str, view: str) -> None:
        identity = self.views.get(view)
        if self._resting(self.step_attempts.get(task), view):
            return
        if identity is not None and not self._barred(identity):
            self.tasks[task].give(view, identity, self.views)

    def set_inputs(self, data: Any) -> None:
        """The prepared inputs, and with ``next`` the preparer's first request."""
        if not is_inputs(data, self.count):
            return
        self._settle("prepare", data["inputs"])
        if "next" in data:
            self.request(data["next"])
        if self.inputs is None:
            return
        waiting, self.waiting = self.waiting, {}
        for view, (request, want) in waiting.items():  # unless asked again since, or gone
            if view in self.views and self.answers.get(view, [None])[0] == request:
                self._answer(view, request, want)

    def set_output(self, output: Any) -> None:
        """The collected output: from a collector once every partition is complete."""
        if not is_json(output) or self.done:
            return
        if self.remaining == 0:
            self._settle("collect", output)
        else:
            self._unfounded()

    def _settle(self, name: str, value: Any) -> None:
        """Count a preparer's or collector's value; take it once ``verify`` agree."""
        identity, task = self.identity, self.tasks[name]
        ballot = task.ballot
        if identity in ballot.votes or ballot.taken:  # a repeat, or late: nothing to count
            return
        if identity not in task.claimants:
            self._unfounded()
            return
        ballot.vote(identity, value)
        tally = self._tally()
        tally.submit(identity)
        task.reported(identity, self.views)
        self.epoch += 1
        key = ballot.agreed(1 if identity == self.solo and len(ballot.votes) == 1 else self.verify)
        if key is None:
            if ballot.split and len(ballot.votes) >= self.copies:
                self.failed = f"no {self.verify} identities agreed on the {name} step of this session"
            elif ballot.split:
                task.wanted = min(self.copies, task.wanted + 1)
            elif task.wanted < self.verify:  # not the one the session was handed to alone
                task.wanted = self.verify
            return
        taken = ballot.take(key)
        tally.judge(ballot)
        task.holders.clear()
        if name == "prepare":
            self.inputs = taken
        else:
            self.output, self.done = taken, True

    @property
    def ended(self) -> bool:
        """Whether the session has its output, or has failed (a hook too often, or for want
        of agreement)."""
        return self.done or self.failed is not None

    def doing(self, task: str, view: str) -> bool:
        """Whether ``view`` holds the claim to ``task``."""
        return view in self.tasks[task].holders

    def needs(self, task: str, identity: str) -> bool:
        """Whether ``task`` would take ``identity`` (a claim from it would be given)."""
        return self.tasks[task].needs(identity, self.views)
