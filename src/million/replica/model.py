"""Deterministic replicated models.

A ``Model`` subclass is an attrs class whose fields are the replicated state. Every
participant of a session holds a ``Replica``: the model plus the machinery that must
be replicated with it (the event counter, session time, timers, subscriptions, the
random generator). Applying the same events to the same snapshot gives the same
state, byte for byte, on every machine; ``digest`` checks it.

Rules for model code: no wall-clock time (use ``now``), no global ``random`` (use
``self.random``), no iteration over sets of strings, no I/O, integers where they do.
Events may carry anything: check every field before changing state (``is_json`` tells
whether a value may be kept). Subscriptions and timers name public methods of the
model class (``handler_names``); ``restore`` refuses a snapshot that names anything else.

What a state may hold, and the checks ``restore`` makes, are in ``million.replica.state``;
its names that models use (``is_json``, ``describe``, ``converter``, ``MAX_DEPTH``,
``StateError``) can also be imported from here.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from million.replica.state import (
    INT64_MAX,
    MAX_DEPTH,
    StateError,
    check_state,
    converter,
    describe,
    digest_of,
    dump_state,
    is_json,
    structure_model,
)
from million.wire.protocol import Event

__all__ = [
    "MAX_DEPTH",
    "Model",
    "Random",
    "Replica",
    "StateError",
    "converter",
    "describe",
    "handler_names",
    "is_json",
]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class Random:
    """A small deterministic generator (splitmix64) whose whole state is one integer."""

    def __init__(self, state: int) -> None:
        self.state = state & _MASK64

    def next64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def randbelow(self, n: int) -> int:
        """An integer in ``range(n)``, without modulo bias."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = (1 << 64) - (1 << 64) % n
        while True:
            value = self.next64()
            if value < limit:
                return value % n

    def randint(self, low: int, high: int) -> int:
        return low + self.randbelow(high - low + 1)

    def random(self) -> float:
        """A float in [0, 1) built from 53 bits: the same on every IEEE 754 machine."""
        return (self.next64() >> 11) / (1 << 53)

    def choice(self, items: list[Any]) -> Any:
        return items[self.randbelow(len(items))]

    def shuffle(self, items: list[Any]) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.randbelow(i + 1)
            items[i], items[j] = items[j], items[i]


class Model:
    """Base class of replicated models.

    Subclass it with ``@attrs.define`` and give every field a default; pass
    ``name=`` to give it a short name, the one joins send (default: module and class name)::

        @attrs.define
        class Counter(million.Model, name="counter"):
            count: int = 0

            def init(self, options):
                self.subscribe("add", self.add)

            def add(self, amount):
                self.count += amount
                self.publish("changed", self.count)
    """

    model_name: ClassVar[str]
    _replica: Replica

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # attrs rebuilds slotted classes, calling this again without ``name``: keep the first.
        name = name or cls.__dict__.get("model_name") or f"{cls.__module__}.{cls.__qualname__}"
        cls.model_name = name

    def init(self, options: Any) -> None:
        """Called once, when the session is created, with the options of its first join."""

    @property
    def now(self) -> int:
        """Session time in ms: the time of the event or timer being applied."""
        return self._replica.now

    @property
    def sender(self) -> str | None:
        """The view that published the event being applied (None inside a timer)."""
        return self._replica.sender

    @property
    def identity(self) -> str:
        """Who published the event being applied, as the reflector stamped it: ``ROLE:NAME``
        ("" inside a timer, or for an event the reflector made itself). Unlike anything in
        the event's data, a client cannot choose it."""
        return self._replica.identity

    @property
    def random(self) -> Random:
        return self._replica.random

    def subscribe(self, topic: str, method: Callable[..., Any]) -> None:
        """Call ``method(data)`` for each event on ``topic``, in subscription order."""
        self._replica.subscribe(topic, _method_name(self, method))

    def unsubscribe(self, topic: str, method: Callable[..., Any]) -> None:
        self._replica.unsubscribe(topic, _method_name(self, method))

    def publish(self, topic: str, data: Any = None) -> None:
        """Deliver at once to this model's subscribers, and to views once the event is applied."""
        self._replica.publish(topic, data)

    def future(self, ms: int, method: Callable[..., Any], *args: Any) -> None:
        """Call ``method(*args)`` when session time has advanced by ``ms``."""
        self._replica.future(ms, _method_name(self, method), args)


def _method_name(model: Model, method: Callable[..., Any]) -> str:
    name = getattr(method, "__name__", None)
    if getattr(method, "__self__", None) is not model or name not in handler_names(type(model)):
        raise TypeError("models subscribe and schedule their own public methods only")
    assert isinstance(name, str)
    return name


_HANDLERS: dict[type[Model], frozenset[str]] = {}


def handler_names(model_cls: type[Model]) -> frozenset[str]:
    """The methods a model may subscribe or schedule: functions that ``model_cls`` or its
    bases below ``Model`` define, whose names do not start with ``_``."""
    names = _HANDLERS.get(model_cls)
    if names is None:
        names = _HANDLERS[model_cls] = frozenset(_public_functions(model_cls))
    return names


def _public_functions(model_cls: type[Model]) -> set[str]:
    names: set[str] = set()
    for klass in model_cls.__mro__:
        if klass is Model:
            break
        names.update(
            name
            for name, value in vars(klass).items()
            if not name.startswith("_") and inspect.isfunction(value)
        )
    return names


class Replica:
    """A model with its replicated runtime state; built by ``create`` or ``restore``."""

    def __init__(self, model_cls: type[Model], session: str) -> None:
        self.model_cls = model_cls
        self.session = session
        self.seq = 0
        self.now = 0
        self.sender: str | None = None
        self.identity = ""
        self.subscriptions: dict[str, list[str]] = {}
        self.futures: list[tuple[int, int, str, list[Any]]] = []
        self.future_count = 0
        self.random = Random(int.from_bytes(hashlib.sha256(session.encode()).digest()[:8], "big"))
        self.view_events: list[tuple[str, Any]] = []
        self.model: Model

    @classmethod
    def create(cls, model_cls: type[Model], session: str, options: Any) -> Replica:
        replica = cls(model_cls, session)
        replica.model = model_cls()
        replica.model._replica = replica
        replica._guard("init", options)
        return replica

    @classmethod
    def restore(cls, model_cls: type[Model], session: str, state: Any) -> Replica:
        """The replica ``snapshot`` described. ``ValueError`` for a state that this model
        class could not have produced: anything but what ``snapshot`` writes, a timer or
        subscription naming something other than one of ``handler_names(model_cls)``, a
        counter that is not a non-negative 64-bit integer, or a state JSON cannot hold."""
        check_state(model_cls, state, session, handler_names(model_cls))
        replica = cls(model_cls, session)
        replica.seq, replica.now = state["seq"], state["now"]
        replica.subscriptions = {topic: list(names) for topic, names in state["subscriptions"].items()}
        replica.futures = [(due, n, name, list(args)) for due, n, name, args in state["futures"]]
        heapq.heapify(replica.futures)
        replica.future_count = state["future_count"]
        replica.random.state = state["random"]
        replica.model = structure_model(model_cls, state["model"], session)
        replica.model._replica = replica
        try:
            dump_state(replica.snapshot())
        except StateError as exc:
            raise ValueError(f"{session}: {exc}") from None
        return replica

    def snapshot(self) -> dict[str, Any]:
        """The replicated state as JSON-ready values; ``restore`` takes it back."""
        return {
            "seq": self.seq,
            "now": self.now,
            "model": converter.unstructure(self.model),
            "subscriptions": self.subscriptions,
            "futures": [list(f) for f in sorted(self.futures)],
            "future_count": self.future_count,
            "random": self.random.state,
        }

    def digest(self) -> str:
        return digest_of(self.snapshot())

    # --- applying the ordered stream ---------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Apply the next event; False for one already applied. A gap raises ``LookupError``."""
        if event.seq <= self.seq:
            return False
        if event.seq != self.seq + 1:
            raise LookupError(f"{self.session}: event {event.seq} after {self.seq}")
        self.advance(event.time)
        self.seq = event.seq
        self.sender = event.view
        self.identity = event.identity
        self._dispatch(event.topic, event.data)
        self.sender = None
        self.identity = ""
        return True

    def advance(self, time: int) -> None:
        """Move session time to ``time``, firing due timers in (due, scheduling) order."""
        futures = self.futures
        while futures and futures[0][0] <= time:
            due, _, name, args = heapq.heappop(futures)
            self.now = due
            self._guard(name, *args)
        if time > self.now:
            self.now = time

    def _dispatch(self, topic: str, data: Any) -> None:
        for name in self.subscriptions.get(topic, ()):
            self._guard(name, data)

    def _guard(self, name: str, *args: Any) -> None:
        # A failing handler fails identically everywhere; replicas stay equal.
        try:
            getattr(self.model, name)(*args)
        except Exception:
            log.exception("%s: model handler %s failed", self.session, name)

    # --- what models call --------------------------------------------------------------

    def subscribe(self, topic: str, name: str) -> None:
        names = self.subscriptions.setdefault(topic, [])
        if name not in names:
            names.append(name)

    def unsubscribe(self, topic: str, name: str) -> None:
        names = self.subscriptions.get(topic, [])
        if name in names:
            names.remove(name)
        if not names:
            self.subscriptions.pop(topic, None)

    def publish(self, topic: str, data: Any) -> None:
        self._dispatch(topic, data)
        self.view_events.append((topic, data))

    def future(self, ms: int, name: str, args: tuple[Any, ...]) -> None:
        if type(ms) is not int or not 0 <= ms <= INT64_MAX - self.now:
            raise ValueError("future() takes a whole, non-negative number of ms, due within 64 bits")
        self.future_count += 1
        heapq.heappush(self.futures, (self.now + ms, self.future_count, name, list(args)))

    def take_view_events(self) -> list[tuple[str, Any]]:
        events, self.view_events = self.view_events, []
        return events
