"""The relay core and client cores paired in memory: no sockets, no trio, no clock.

``Relay`` holds a ``RelayCore`` and a dict standing in for the store. Connections are
any hashable: a plain label for a test that speaks the protocol itself (it sends with
``send`` and reads what it got with ``messages``), or a ``ClientCore`` made by
``connect``, which ``pump`` feeds. Time is ``relay.now``, set by the test.

As in the reflector's server, each output of the core is stored before its messages are
delivered, and every connection gets what was queued for it in one frame, in order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Any

import attrs

from million.relay.config import ReflectorConfig
from million.relay.core import RelayCore
from million.relay.records import Batch, StoredSession
from million.replica.core import ClientCore
from million.wire import codec
from million.wire.protocol import PROTOCOL_VERSION, Hello, ProtocolError, Welcome

__all__ = ["MemoryStore", "Relay", "connect"]


@attrs.define
class MemoryStore:
    """What the SQLite store would hold after the batches applied so far."""

    sessions: dict[str, tuple[str, bytes]] = attrs.Factory(dict)  # name -> (model, options)
    snapshots: dict[str, tuple[int, int, bytes, str]] = attrs.Factory(dict)  # (seq, time, state, digest)
    events: dict[str, dict[int, bytes]] = attrs.Factory(dict)  # name -> seq -> event
    presence: dict[str, list[str]] = attrs.Factory(dict)  # name -> the views present
    batches: list[Batch] = attrs.Factory(list)  # every batch, in order

    def commit(self, batch: Batch) -> None:
        self.batches.append(batch)
        for name, model, options in batch.created:
            self.sessions.setdefault(name, (model, options))
        for name, seq, raw in batch.events:
            self.events.setdefault(name, {}).setdefault(seq, raw)  # the first one stored stays
        for name, seq, time, state, digest in batch.snapshots:
            if seq > self.snapshots.get(name, (0,))[0]:
                self.snapshots[name] = (seq, time, state, digest)
                self.events[name] = {n: raw for n, raw in self.events.get(name, {}).items() if n > seq}
        for name, view in batch.joined:
            self.presence.setdefault(name, []).append(view)
        for name, view in batch.left:
            self.presence[name].remove(view)

    def load(self, name: str) -> StoredSession | None:
        if name not in self.sessions:
            return None
        seq, time, state, digest = self.snapshots.get(name, (0, 0, None, None))
        events = [raw for _, raw in sorted(self.events.get(name, {}).items())]
        return StoredSession(
            name, *self.sessions[name], seq, time, state, digest, list(self.presence.get(name, [])), events
        )

    def stream(self, name: str) -> list[dict[str, Any]]:
        """The stored events of ``name`` after its snapshot, decoded."""
        return [codec.loads(raw) for _, raw in sorted(self.events.get(name, {}).items())]


class Relay:
    """A relay core with an in-memory store and the connections it serves."""

    def __init__(self, config: ReflectorConfig | None = None, now: float = 0.0) -> None:
        self.config = config or ReflectorConfig()
        self.store = MemoryStore()
        self.now = now
        self.core = self._start()
        self.clients: list[ClientCore] = []
        self.store_fails: str | None = None  # while set, committing a batch fails for this reason
        self.cut: set[Hashable] = set()  # connections the server would have closed after a failed commit
        self.replies: dict[ClientCore, list[Any]] = defaultdict(list)  # Pong and Status received
        self._queued: dict[Hashable, list[bytes]] = defaultdict(list)  # sent by the core, not yet read

    # --- a connection that speaks the protocol itself ---------------------------------------

    def hello(self, conn: Hashable, hello: Hello | None = None) -> Welcome:
        """Admit ``conn`` (``ProtocolError`` if refused)."""
        self.core.open("")
        try:
            data = self.core.hello(conn, [hello or Hello(PROTOCOL_VERSION)], self.now, str(conn))
        except ProtocolError:
            self.core.drop(conn, self.now)
            raise
        (welcome,) = codec.decode_reflector(data)
        return welcome

    def send(self, conn: Hashable, *messages: Any) -> None:
        """``messages`` in one frame from ``conn``, through the codec, then the output flushed."""
        self.send_frame(conn, codec.frame(codec.encode(m) for m in messages))

    def send_frame(self, conn: Hashable, frame: bytes) -> None:
        """A frame from ``conn`` as it is (``ProtocolError`` if it does not decode)."""
        for message in codec.decode_client(frame):
            self._receive(conn, message)
        self.flush()

    def messages(self, conn: Hashable) -> list[Any]:
        """What ``conn`` was sent since the last call, decoded."""
        parts = self._queued.pop(conn, [])
        return codec.decode_reflector(codec.frame(parts)) if parts else []

    def drop(self, conn: Hashable) -> None:
        """The connection ends (a ``ClientCore`` is told too)."""
        self.core.drop(conn, self.now)
        self._queued.pop(conn, None)
        if isinstance(conn, ClientCore):
            self.clients.remove(conn)
            conn.disconnected()
        self.flush()

    def tick(self) -> None:
        self.core.tick(self.now)
        self.flush()

    def flush(self) -> None:
        """Store the core's batch, then queue its messages for their recipients."""
        output = self.core.take()
        if output.batch and self.store_fails is not None:
            self.cut |= self.core.store_failed(output.batch, self.store_fails)
            self.cut |= {conn for recipients, _ in output.sends for conn in recipients}
            self.core.stored_batch(output.emptied)
            return
        if output.batch:
            self.store.commit(output.batch)
        for recipients, data in output.sends:
            for conn in recipients:
                self._queued[conn].append(data)
        self.core.stored_batch(output.emptied)

    def restart(self) -> None:
        """The reflector is killed and started again on its store: every connection is lost."""
        for client in self.clients:
            client.disconnected()
        self.clients.clear()
        self._queued.clear()
        self.core = self._start()

    def _start(self) -> RelayCore[Hashable]:
        store = self.store.sessions
        return RelayCore(self.config, stored=store, now=self.now, version="test", store_path="memory")

    def _receive(self, conn: Hashable, message: Any) -> None:
        name = self.core.needs_load(message)
        stored = self.store.load(name) if name is not None else None
        if stored is not None:
            self.core.revive(stored, self.now)
        self.core.receive(conn, message, self.now)

    # --- client cores -----------------------------------------------------------------------

    def admit(self, client: ClientCore) -> None:
        """The hello/welcome exchange of a (new) connection of ``client``."""
        self.core.open("")
        welcome = self.core.hello(client, codec.decode_client(client.hello()), self.now, client.label)
        client.welcome(welcome)
        self.clients.append(client)

    def pump(self) -> None:
        """Move frames both ways until neither side has anything left to send."""
        moved = True
        while moved:
            moved = False
            for client in list(self.clients):
                for frame in client.data_to_send():
                    moved = True
                    for message in codec.decode_client(frame):
                        self._receive(client, message)
            self.flush()
            for client in list(self.clients):
                parts = self._queued.pop(client, [])
                if parts:
                    moved = True
                    self.replies[client] += client.receive(codec.frame(parts)).replies


def connect(relay: Relay, label: str = "", token: str | None = None) -> ClientCore:
    """A client core connected to ``relay``."""
    client = ClientCore(token=token, label=label)
    relay.admit(client)
    return client
