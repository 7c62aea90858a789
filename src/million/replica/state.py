"""What a replica's state may hold, and the checks of a state restored from a snapshot.

Part of the client core (sans-IO). ``is_json`` says whether a value from an event may be
kept by a model, and ``describe`` names any value in a message. ``converter`` turns a
model's fields into JSON-ready values and back, strictly. A snapshot is restored only if
``check_state`` finds the shape ``Replica.snapshot`` writes, and ``structure_model`` a
``model`` member that fits its model class. ``dump_state`` is a snapshot's canonical
encoding (``StateError`` if JSON cannot hold it), and ``digest_of`` its digest: the wire's
``state_digest`` of that encoding, which the reflector checks too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cattrs
import orjson

from million.wire.codec import strict_converter
from million.wire.protocol import state_digest

__all__ = [
    "INT64_MAX",
    "MAX_DEPTH",
    "StateError",
    "check_state",
    "converter",
    "describe",
    "digest_of",
    "dump_state",
    "is_json",
    "prime",
    "structure_model",
]

M = TypeVar("M")

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

# --- the canonical encoding --------------------------------------------------------------

_DUMP_OPTIONS = orjson.OPT_NON_STR_KEYS


def digest_of(snapshot: dict[str, Any]) -> str:
    """A digest of a snapshot's canonical encoding (field and insertion order kept)."""
    return state_digest(dump_state(snapshot))


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


def check_state(model_cls: type, state: Any, session: str, names: frozenset[str]) -> None:
    """``ValueError`` unless ``state`` has the shape ``Replica.snapshot`` writes for
    ``model_cls``, whose methods that timers and subscriptions may name are ``names``
    (its ``model`` member is checked by ``structure_model``)."""
    problem = _state_problem(state, names)
    if problem is not None:
        raise ValueError(f"{session}: the snapshot is not a state of {model_cls.__name__}: {problem}")


def _state_problem(state: Any, names: frozenset[str]) -> str | None:
    if type(state) is not dict or state.keys() != _STATE_KEYS:
        return f"expected an object of exactly {', '.join(sorted(_STATE_KEYS))}, got {describe(state)}"
    for key, high in _COUNTERS:
        if not _whole(state[key], 0, high):
            return f"{key} must be an integer from 0 to {high}, not {describe(state[key])}"
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


_primed: set[type] = set()


def prime(model_cls: type) -> None:
    """Make the converter's hooks for ``model_cls`` now, once per process: for a large
    model that takes tens of milliseconds, which its first snapshot or restore would
    otherwise pay when sessions end, many at once. A model they cannot be made for fails
    as it would have, at its first snapshot."""
    if model_cls in _primed:
        return
    _primed.add(model_cls)
    try:
        converter.get_unstructure_hook(model_cls)
        converter.get_structure_hook(model_cls)
    except Exception:  # the same error comes again where the hook is used
        pass


def structure_model(model_cls: type[M], data: Any, session: str) -> M:
    """The model ``data`` describes; ``ValueError`` if it does not fit ``model_cls``."""
    where = f"{session}: the snapshot does not fit {model_cls.__name__}"
    if attrs.has(model_cls):
        fields = {field.name for field in attrs.fields(model_cls) if field.init}
        if type(data) is not dict or data.keys() != fields:
            raise ValueError(f"{where}: expected an object of exactly {', '.join(sorted(fields))}")
    try:
        model: M = converter.structure(data, model_cls)
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
