"""What the relay core checks of the values clients send, and what each message costs.

Part of the relay core (sans-IO). Whatever the reflector stamps, stores or embeds in
another message must encode: values it re-embeds (join options, summaries) nest at most
``max_depth`` deep; values it relays as received (snapshot states) must be values a
client can encode again (orjson's limits: about 255 levels; integers beyond 64 bits
decode as floats and so always encode).
"""

from __future__ import annotations

from typing import Any

from million.wire import codec
from million.wire.protocol import ErrorCode, Join, ProtocolError, Snapshot, StatusRequest

__all__ = ["REPLY_BYTES_PER_UNIT", "check_json", "check_options", "cost", "nests_within"]

STATUS_COST_PER_SESSION = 0.1  # a status describes the occupied sessions: cost units per session
JOIN_COST = 10  # a join builds a sync: the snapshot and the events since
REPLY_BYTES_PER_UNIT = 100  # a status reply costs its sender a unit per this many bytes, once built


def nests_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` lists and objects deep."""
    if type(value) is not dict and type(value) is not list:
        return True
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return False
        for child in item.values() if type(item) is dict else item:
            if type(child) is dict or type(child) is list:
                stack.append((child, level + 1))
    return True


def check_json(raw: bytes, max_depth: int | None, what: str) -> None:
    """``ProtocolError`` unless ``raw`` holds a JSON value that nests at most ``max_depth``
    deep (None: that any client can encode again)."""
    value = codec.loads(raw)
    if max_depth is not None and not nests_within(value, max_depth):
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} may nest at most {max_depth} levels deep")
    if max_depth is None:
        try:
            codec.dumps(value)
        except TypeError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"{what} cannot be encoded again: {exc}") from None


def check_options(options: Any, max_depth: int) -> bytes:
    """A join's options, encoded once; ``ProtocolError`` if they nest too deep."""
    if not nests_within(options, max_depth):
        raise ProtocolError(ErrorCode.MALFORMED, f"join options may nest at most {max_depth} levels deep")
    return codec.compact(codec.dumps(options))


def cost(message: Any, occupied: int) -> int:
    """What ``message`` costs against its connection's rate (a ping or a publish: 1)."""
    if isinstance(message, StatusRequest):
        names = message.summaries
        patterns = sum(name.startswith("*") for name in names)
        return 1 + int(min(occupied, 1000) * STATUS_COST_PER_SESSION) + len(names) + 100 * patterns
    kind = type(message)
    if kind is Join:
        return JOIN_COST
    if kind is Snapshot:
        return 1 + len(message.state) // 4096
    return 1
