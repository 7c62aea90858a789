"""The wire protocol: every message that crosses a connection, as frozen attrs classes.

Sans-IO: nothing here touches a socket or trio. A frame is one JSON object (one
message) or a JSON array of messages; ``codec`` turns frames into these classes and
back. Every message carries its ``type`` tag on the wire.

Names and limits that both ends rely on live here too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs

PROTOCOL_VERSION = 2

#: Fields of client messages that are JSON values held encoded (``bytes``) by the decoder.
RAW_FIELDS = {"snapshot": "state", "summary": "data"}
DEFAULT_MAX_FRAME = 1 << 20  # bytes; the reflector's limit is announced in its Welcome

#: Topics the reflector injects into a session's ordered stream.
VIEW_JOIN = "view-join"
VIEW_EXIT = "view-exit"

SESSION_NAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,200}")


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``code`` is one of ``ErrorCode``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ErrorCode:
    """The ``code`` of an ``Error`` message. Each is documented in docs/protocol.md."""

    MALFORMED = "malformed"  # not JSON, or a message that does not fit its type
    UNKNOWN_TYPE = "unknown-type"  # a ``type`` no message has
    UNEXPECTED = "unexpected"  # a valid message that is not allowed here or now
    VERSION = "version"  # the client speaks another protocol version
    UNAUTHORIZED = "unauthorized"  # missing or wrong token
    NOT_JOINED = "not-joined"  # publish/leave for a view this connection does not hold
    NOT_FOUND = "not-found"  # a join that may not create names a session that does not exist
    MODEL_MISMATCH = "model-mismatch"  # join names another model or options
    BAD_NAME = "bad-name"  # session name does not match SESSION_NAME
    LIMIT = "limit"  # a configured limit was exceeded
    READ_ONLY = "read-only"  # a connection with the view token may only read
    STORAGE = "storage"  # the reflector could not store the session's events: it takes none now
    SLOW_CONSUMER = "slow-consumer"  # the connection's send queue overflowed
    SHUTDOWN = "shutdown"  # the reflector is stopping


def check_session_name(name: str) -> None:
    if not SESSION_NAME.fullmatch(name):
        raise ProtocolError(
            ErrorCode.BAD_NAME,
            f"session name {name[:60]!r} must be 1-200 characters of letters, digits and _.:@+-",
        )


def state_digest(state: bytes) -> str:
    """The digest of a snapshot's state, encoded: what ``Snapshot.digest`` and ``Digest``
    carry. The reflector checks a snapshot's against the bytes it received."""
    return hashlib.sha256(state).hexdigest()[:32]


# --- client to reflector -------------------------------------------------------------


@attrs.frozen
class Hello:
    """First message of every connection."""

    version: int
    token: str | None = None
    client: str = ""  # free-form label for logs and status


@attrs.frozen
class Join:
    """Join ``session``; the first join of a session records ``model`` and ``options``.

    With ``create`` false the session must exist and ``options`` is not compared: the
    joiner takes the options it was created with (they come back in the Sync). ``have``
    is the seq of a replica of the session the client kept from an earlier membership
    on this connection: the Sync may then carry only the events after it.
    """

    ref: int  # echoed in the Sync or Error that answers it
    session: str
    model: str
    options: Any = None
    create: bool = True
    have: int | None = None


@attrs.frozen
class Leave:
    session: str
    view: str


@attrs.frozen
class Publish:
    """An event for the session's models; relayed to every participant once stamped."""

    session: str
    view: str
    topic: str
    data: Any = None


@attrs.frozen
class Snapshot:
    """The serialized model state after event ``seq``, answering a SnapshotRequest.

    ``state`` is any JSON value, held encoded: the reflector keeps and relays the bytes
    it received without decoding them.
    """

    session: str
    seq: int
    state: bytes
    digest: str


@attrs.frozen
class Digest:
    """The model digest after event ``seq``, answering a DigestRequest."""

    session: str
    seq: int
    digest: str


@attrs.frozen
class Ping:
    ref: int = 0


@attrs.frozen
class Summarize:
    """A participant's summary of its session (any JSON, small) as of event ``seq``: the
    one with the highest ``seq`` is kept and shown by ``status`` and the web page; the
    reflector never interprets it. ``data`` is held encoded, like ``Snapshot.state``."""

    session: str
    view: str
    seq: int
    data: bytes = b"null"


@attrs.frozen
class StatusRequest:
    ref: int = 0
    summaries: list[str] = attrs.field(factory=list)  # sessions whose summaries to include


# --- reflector to client -------------------------------------------------------------


@attrs.frozen
class Welcome:
    version: int
    connection: str
    server: str
    max_frame: int = DEFAULT_MAX_FRAME  # the largest frame the reflector accepts


@attrs.frozen
class Event:
    """One stamped event of a session's ordered stream."""

    session: str
    seq: int
    time: int  # session time in ms
    view: str  # the publishing view, or the view that joined/exited
    topic: str
    data: Any = None
    identity: str = ""  # ``ROLE:NAME`` of who published it (the view's), stamped by the reflector


@attrs.frozen
class SnapshotRecord:
    seq: int
    time: int
    state: Any
    digest: str


@attrs.frozen
class Sync:
    """Answer to a Join: who you are in the session and how to reach its present.

    ``full`` is false when the client's replica is to be kept: ``events`` are the ones
    after the Join's ``have`` (none when this connection already holds the session).
    """

    ref: int
    session: str
    view: str
    model: str
    options: Any
    time: int  # the session time now
    full: bool = True
    snapshot: SnapshotRecord | None = None
    events: list[Event] = attrs.field(factory=list)


@attrs.frozen
class Tick:
    """Session time advanced with no event; model timers due by ``time`` fire."""

    session: str
    time: int


@attrs.frozen
class SnapshotRequest:
    """Send a Snapshot of the replica as it is after event ``seq``."""

    session: str
    seq: int


@attrs.frozen
class DigestRequest:
    session: str
    seq: int


@attrs.frozen
class Left:
    """The reflector has processed a Leave."""

    session: str
    view: str


@attrs.frozen
class Error:
    code: str
    message: str
    session: str | None = None
    ref: int | None = None


@attrs.frozen
class Pong:
    ref: int = 0


@attrs.frozen
class Status:
    """Answer to a StatusRequest: a JSON description of the reflector."""

    ref: int
    info: Any


CLIENT_MESSAGES: dict[str, type] = {
    "hello": Hello,
    "join": Join,
    "leave": Leave,
    "publish": Publish,
    "snapshot": Snapshot,
    "digest": Digest,
    "ping": Ping,
    "status": StatusRequest,
    "summary": Summarize,
}

REFLECTOR_MESSAGES: dict[str, type] = {
    "welcome": Welcome,
    "sync": Sync,
    "event": Event,
    "tick": Tick,
    "snapshot-request": SnapshotRequest,
    "digest-request": DigestRequest,
    "left": Left,
    "error": Error,
    "pong": Pong,
    "status-info": Status,
}

MESSAGE_TYPES: dict[type, str] = {
    cls: tag for table in (CLIENT_MESSAGES, REFLECTOR_MESSAGES) for tag, cls in table.items()
}
