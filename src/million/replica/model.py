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
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import logging
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import cattrs
import orjson

from million.wire.codec import strict_converter
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

#: Converter for model state. Register hooks here for field types cattrs does not know.
#: It is strict: a value that does not fit its field's type fails loudly on restore,
#: where a lenient conversion (0 into "0") would make replicas silently differ.
converter = strict_converter()

INT64_MAX = (1 << 63) - 1  # seq, now and future_count stay in a signed 64-bit integer
UINT64_MAX = (1 << 64) - 1  # the largest integer JSON (orjson) encodes
INT64_MIN = -(1 << 63)  # the smallest
#: Containers a value that models keep from events may nest. A replica's state wraps such
#: values in a few more levels, and a reflector refuses states nested beyond 64.
MAX_DEPTH = 32
_INT_KEY = re.compile(r"0|-?[1-9][0-9]{0,19}")  # what str() gives for a 64-bit integer


class StateError(ValueError):
    """A replica's state that cannot be encoded: a model kept a value JSON cannot hold."""


def _int_keyed(cls: Any) -> bool:
    return getattr(cls, "__origin__", None) is dict and cls.__args__[0] is int


def _int_keyed_hook(cls: Any) -> Callable[[Any, type], Any]:
    value_type = cls.__args__[1]

    def structure(value: dict[Any, Any], _: type) -> dict[int, Any]:
        # JSON object keys are strings: integer keys come back as digits.
        return {_int_key(key): converter.structure(item, value_type) for key, item in value.items()}

    return structure


def _int_key(key: Any) -> int:
    """The integer a key stands for; ``ValueError`` unless it is a 64-bit integer, or
    exactly what ``str`` writes for one (no setting of Python changes the answer)."""
    if type(key) is str and _INT_KEY.fullmatch(key):
        key = int(key)
    if type(key) is not int or not INT64_MIN <= key <= UINT64_MAX:
        raise ValueError(f"expected an integer key, got {describe(key)}")
    return key


converter.register_structure_hook_factory(_int_keyed, _int_keyed_hook)

_DUMP_OPTIONS = orjson.OPT_NON_STR_KEYS
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
        _check_state(model_cls, state, session)
        replica = cls(model_cls, session)
        replica.seq, replica.now = state["seq"], state["now"]
        replica.subscriptions = {topic: list(names) for topic, names in state["subscriptions"].items()}
        replica.futures = [(due, n, name, list(args)) for due, n, name, args in state["futures"]]
        heapq.heapify(replica.futures)
        replica.future_count = state["future_count"]
        replica.random.state = state["random"]
        replica.model = _structure(model_cls, state["model"], session)
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
        self._dispatch(event.topic, event.data)
        self.sender = None
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


def digest_of(snapshot: dict[str, Any]) -> str:
    """A digest of a snapshot's canonical encoding (field and insertion order kept)."""
    return digest_of_dump(dump_state(snapshot))


def digest_of_dump(dump: bytes) -> str:
    """The digest of a snapshot already encoded by ``dump_state``."""
    return hashlib.sha256(dump).hexdigest()[:32]


def dump_state(snapshot: dict[str, Any]) -> bytes:
    """A snapshot's canonical encoding; ``StateError`` if JSON cannot hold it (nested too
    deep, or an integer beyond 64 bits)."""
    try:
        return orjson.dumps(snapshot, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise StateError(f"the state cannot be encoded: {exc}") from None


# --- what restore takes ------------------------------------------------------------------

_STATE_KEYS = frozenset(("seq", "now", "model", "subscriptions", "futures", "future_count", "random"))
_COUNTERS = (("seq", INT64_MAX), ("now", INT64_MAX), ("future_count", INT64_MAX), ("random", UINT64_MAX))


def _check_state(model_cls: type[Model], state: Any, session: str) -> None:
    """``ValueError`` unless ``state`` has the shape ``Replica.snapshot`` writes for
    ``model_cls`` (its ``model`` member is checked by ``restore``)."""
    problem = _state_problem(model_cls, state)
    if problem is not None:
        raise ValueError(f"{session}: the snapshot is not a state of {model_cls.__name__}: {problem}")


def _state_problem(model_cls: type[Model], state: Any) -> str | None:
    if type(state) is not dict or state.keys() != _STATE_KEYS:
        return f"expected an object of exactly {', '.join(sorted(_STATE_KEYS))}, got {describe(state)}"
    for key, high in _COUNTERS:
        if not _whole(state[key], 0, high):
            return f"{key} must be an integer from 0 to {high}, not {describe(state[key])}"
    names = handler_names(model_cls)
    return _subscriptions_problem(state["subscriptions"], names) or _futures_problem(state, names)


def _subscriptions_problem(subscriptions: Any, names: frozenset[str]) -> str | None:
    if type(subscriptions) is not dict:
        return f"subscriptions must be an object, not {describe(subscriptions)}"
    for topic, subscribed in subscriptions.items():
        if not (
            type(subscribed) is list and subscribed and all(_is_handler(name, names) for name in subscribed)
        ):
            return f"subscribers must be methods of the model, not {describe(subscribed)}"
        if type(topic) is not str or len(set(subscribed)) != len(subscribed):
            return f"topic {describe(topic)} is not a string, or has a method subscribed twice"
    return None


def _futures_problem(state: dict[str, Any], names: frozenset[str]) -> str | None:
    futures = state["futures"]
    if type(futures) is not list:
        return f"futures must be a list, not {describe(futures)}"
    for future in futures:
        if not _is_future(future, state, names):
            return f"a future must be [due >= now, number, method of the model, args], not {describe(future)}"
    if len({future[1] for future in futures}) != len(futures):
        return "two futures have the same number"
    return None


def _is_future(future: Any, state: dict[str, Any], names: frozenset[str]) -> bool:
    return (
        type(future) is list
        and len(future) == 4
        and _whole(future[0], state["now"], INT64_MAX)
        and _whole(future[1], 1, state["future_count"])
        and _is_handler(future[2], names)
        and type(future[3]) is list
    )


def _is_handler(name: Any, names: frozenset[str]) -> bool:
    return type(name) is str and name in names


def _whole(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _structure(model_cls: type[Model], data: Any, session: str) -> Model:
    """The model ``data`` describes; ``ValueError`` if it does not fit ``model_cls``."""
    where = f"{session}: the snapshot does not fit {model_cls.__name__}"
    if attrs.has(model_cls):
        fields = {field.name for field in attrs.fields(model_cls) if field.init}
        if type(data) is not dict or data.keys() != fields:
            raise ValueError(f"{where}: expected an object of exactly {', '.join(sorted(fields))}")
    try:
        model: Model = converter.structure(data, model_cls)
    except cattrs.BaseValidationError as exc:
        raise ValueError(
            f"{where}: {'; '.join(cattrs.transform_error(exc, path=model_cls.__name__))}"
        ) from None
    except Exception as exc:
        raise ValueError(f"{where}: {type(exc).__name__}") from None
    return model


# --- values models keep ----------------------------------------------------------------------


def is_json(value: Any, depth: int = MAX_DEPTH) -> bool:
    """Whether ``value`` is a JSON value that a model may keep: null, a bool, a string, an
    integer JSON can hold, a finite float, or lists and objects (with string keys) of
    these nested at most ``depth`` deep. Decided by the value alone, the same everywhere."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(INT64_MIN <= value <= UINT64_MAX)
    if kind is float:
        return math.isfinite(value)
    if depth <= 0:
        return False
    if kind is list:
        return all(is_json(item, depth - 1) for item in value)
    if kind is dict:
        return all(type(key) is str and is_json(item, depth - 1) for key, item in value.items())
    return False


def describe(value: Any) -> str:
    """A short description of any value for a message, safe to build whatever the value
    is (no deep repr, no huge integer written out in digits)."""
    if type(value) is int and not INT64_MIN <= value <= UINT64_MAX:
        return f"an integer of {value.bit_length()} bits"
    if value is None or type(value) in (bool, int, float):
        return repr(value)
    if type(value) is str:
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if type(value) in (list, dict):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"
