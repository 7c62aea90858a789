"""Bytes <-> protocol messages: one cattrs converter and orjson.

A frame is a JSON object (one message) or an array of them. ``decode`` returns the
messages or raises ``ProtocolError``; it never lets another exception out. The
reflector's hot path encodes each event once and splices the same bytes into every
frame that carries it (``frame``). Fields of type ``bytes`` hold a JSON value already
encoded: they are written into the frame as they are, and a decoder gives the bytes
the value was received as (``RAW_FIELDS``), never decoding them into objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import attrs
import cattrs
import msgspec
import orjson

from million.wire.protocol import (
    CLIENT_MESSAGES,
    MESSAGE_TYPES,
    RAW_FIELDS,
    REFLECTOR_MESSAGES,
    ErrorCode,
    Event,
    Join,
    ProtocolError,
    Publish,
)

__all__ = [
    "compact",
    "converter",
    "decode",
    "decode_client",
    "decode_reflector",
    "dumps",
    "encode",
    "encode_event",
    "encode_publish",
    "encode_snapshot",
    "encode_tick",
    "fragment",
    "frame",
    "frames",
    "loads",
    "strict_converter",
]


def strict_converter() -> cattrs.Converter:
    """A converter that refuses, rather than converts, a value of the wrong primitive type."""
    strict = cattrs.Converter()
    for kind in (str, int, bool, bytes):
        strict.register_structure_hook(kind, _strict(kind))
    strict.register_unstructure_hook(bytes, orjson.Fragment)
    return strict


def _strict(kind: type) -> Callable[[Any, type], Any]:
    def structure(value: Any, _: type) -> Any:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r:.40}")
        return value

    return structure


converter = strict_converter()

_structure_hooks: dict[type, Callable[[Any, type], Any]] = {}
#: A join's ``options`` is any JSON value: cattrs would walk it item by item (about 60 µs
#: for a computation's options), orjson takes it as it is.
_unstructure_hooks: dict[type, Callable[[Any], Any]] = {Join: partial(attrs.asdict, recurse=False)}


_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """JSON bytes; dict keys that are not strings (model state) become strings."""
    return orjson.dumps(value, option=_OPTIONS)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def encode(message: Any) -> bytes:
    """Encode one message as a JSON object tagged with its ``type``."""
    cls = type(message)
    hook = _unstructure_hooks.get(cls)
    if hook is None:
        hook = _unstructure_hooks[cls] = converter.get_unstructure_hook(cls)
    body = hook(message)
    body["type"] = MESSAGE_TYPES[cls]
    return orjson.dumps(body, option=_OPTIONS)


def compact(data: bytes) -> bytes:
    """An exact-size copy: orjson's results reserve at least 4 KiB, too much to keep."""
    return bytes(memoryview(data))


def encode_publish(session: str, view: str, topic: str, data: Any) -> bytes:
    """The hot path's encoder for a ``Publish``: the same bytes as ``encode(Publish(...))``."""
    return orjson.dumps(
        {"session": session, "view": view, "topic": topic, "data": data, "type": "publish"},
        option=_OPTIONS,
    )


def encode_event(
    session: str, seq: int, time: int, view: str, topic: str, data: Any, identity: str = ""
) -> bytes:
    """The hot path's encoder for an ``Event``: the same bytes as ``encode(Event(...))``,
    compacted because the reflector keeps them."""
    return compact(
        orjson.dumps(
            {
                "session": session,
                "seq": seq,
                "time": time,
                "view": view,
                "topic": topic,
                "data": data,
                "identity": identity,
                "type": "event",
            },
            option=_OPTIONS,
        )
    )


def encode_tick(session: str, time: int) -> bytes:
    """The hot path's encoder for a ``Tick``: the same bytes as ``encode(Tick(...))``."""
    return orjson.dumps({"session": session, "time": time, "type": "tick"})


def encode_snapshot(session: str, seq: int, state: bytes, digest: str) -> bytes:
    """A ``Snapshot`` whose state is already encoded: the same bytes as ``encode(Snapshot(...))``."""
    return orjson.dumps(
        {
            "session": session,
            "seq": seq,
            "state": orjson.Fragment(state),
            "digest": digest,
            "type": "snapshot",
        },
        option=_OPTIONS,
    )


def frame(parts: Iterable[bytes]) -> bytes:
    """Join encoded messages into one frame (a JSON array)."""
    return b"[" + b",".join(parts) + b"]"


def frames(parts: list[bytes], limit: int) -> list[bytes]:
    """Pack encoded messages into as few frames of at most ``limit`` bytes as fit.

    A single message over the limit still goes alone: the reflector refuses it, loudly.
    """
    chunks: list[bytes] = []
    start = size = 0
    for i, part in enumerate(parts):
        if size and size + len(part) + 2 > limit:
            chunks.append(frame(parts[start:i]))
            start, size = i, 0
        size += len(part) + 1
    if start < len(parts):
        chunks.append(frame(parts[start:]))
    return chunks


def fragment(raw: bytes) -> Any:
    """Embed already-encoded JSON inside a value passed to ``dumps``."""
    return orjson.Fragment(raw)


def decode(data: bytes | str, table: Mapping[str, type]) -> list[Any]:
    """Decode a frame into messages whose ``type`` is in ``table``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"frame is not valid JSON: {exc}") from None
    items = value if type(value) is list else [value]
    if _may_hold_raw(data) and any(_raw_field(item) for item in items):
        _keep_raw(data, value, items)
    return [_structure(item, table) for item in items]


_RAW_TAGS = tuple(f'"{tag}"'.encode() for tag in RAW_FIELDS)


def _may_hold_raw(data: bytes | str) -> bool:
    """A quick test that spares frames without raw fields (nearly all) a look at every item."""
    raw = data if isinstance(data, bytes) else data.encode()
    return any(tag in raw for tag in _RAW_TAGS)


def _raw_field(item: Any) -> str | None:
    tag = item.get("type") if type(item) is dict else None
    return RAW_FIELDS.get(tag) if type(tag) is str else None


def _keep_raw(data: bytes | str, value: Any, items: list[Any]) -> None:
    """Replace the decoded values of ``RAW_FIELDS`` by the bytes they were received as."""
    try:
        if type(value) is list:
            spans = msgspec.json.decode(data, type=list[msgspec.Raw])
        else:
            spans = [msgspec.json.decode(data, type=msgspec.Raw)]
        for item, span in zip(items, spans, strict=True):
            field = _raw_field(item)
            if field is not None and field in item:
                item[field] = bytes(msgspec.json.decode(span, type=dict[str, msgspec.Raw])[field])
    except (msgspec.DecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"frame is not valid JSON: {exc}") from None


def _structure(item: Any, table: Mapping[str, type]) -> Any:
    if type(item) is not dict:
        raise ProtocolError(ErrorCode.MALFORMED, "a message must be a JSON object")
    tag = item.get("type")
    cls = table.get(tag) if type(tag) is str else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {tag!r}")
    fast = _FAST.get(cls)
    if fast is not None and (message := fast(item)) is not None:
        return message
    hook = _structure_hooks.get(cls)
    if hook is None:
        hook = _structure_hooks[cls] = converter.get_structure_hook(cls)
    try:
        return hook(item, cls)
    except Exception as exc:  # cattrs raises several kinds; all mean the same here
        raise ProtocolError(ErrorCode.MALFORMED, f"bad {tag!r} message: {_describe(exc)}") from None


def _fast_publish(item: dict[str, Any]) -> Publish | None:
    session, view, topic = item.get("session"), item.get("view"), item.get("topic")
    if type(session) is str and type(view) is str and type(topic) is str:
        return Publish(session, view, topic, item.get("data"))
    return None  # let the converter say what is wrong


def _fast_event(item: dict[str, Any]) -> Event | None:
    session, view, topic = item.get("session"), item.get("view"), item.get("topic")
    seq, time, identity = item.get("seq"), item.get("time"), item.get("identity", "")
    strings = isinstance(session, str) and isinstance(view, str) and isinstance(topic, str)
    if strings and type(identity) is str and type(seq) is int and type(time) is int:
        return Event(session, seq, time, view, topic, item.get("data"), identity)  # type: ignore[arg-type]
    return None


# The messages of the hot path skip the converter (same result, a third of the time).
_FAST: dict[type, Callable[[dict[str, Any]], Any]] = {Publish: _fast_publish, Event: _fast_event}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(
            f"{note}: {_describe(sub)}" if note else _describe(sub)
            for sub, note in ((e, _note(e)) for e in exc.exceptions)
        )
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc) or type(exc).__name__


def _note(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    return str(notes[0]) if notes else ""


def decode_client(data: bytes | str) -> list[Any]:
    """Decode a frame sent by a client (what the reflector receives)."""
    return decode(data, CLIENT_MESSAGES)


def decode_reflector(data: bytes | str) -> list[Any]:
    """Decode a frame sent by the reflector (what a client receives)."""
    return decode(data, REFLECTOR_MESSAGES)
