"""The reflector's trio shell around the relay core: sockets, tasks, time and the store.

Each connection has a reader task, which decodes frames and hands their messages to
the core, and a writer task, which sends everything queued for the connection as one
frame. The pump task takes what the core decided, commits its batch to the store
(its journal) and only then queues its messages, so nothing is relayed that a restart
could lose. The ticker feeds the core the passing of time; sessions in the store are
loaded before a join that names them reaches the core.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from million._version import __version__
from million.relay.config import ReflectorConfig, ReflectorStatistics
from million.relay.core import Output, RelayCore
from million.relay.origins import allowed_origins, origin_check
from million.relay.store import Store, StoreError, open_store
from million.relay.web import WebPage, serve_web
from million.wire import codec, tasks, transport
from million.wire.protocol import Error, ErrorCode, Join, ProtocolError

__all__ = ["Reflector", "open_reflector", "serve_reflector"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Queues:
    """The bytes queued for all connections: beyond ``limit``, the largest queue is dropped."""

    limit: int
    refused: Callable[[str], None]  # counts a connection dropped for its queue
    total: int = 0
    conns: set[Conn] = attrs.Factory(set)

    def grew(self, size: int) -> None:
        self.total += size
        if self.total > self.limit and self.conns:
            largest = max(self.conns, key=lambda conn: conn.out_bytes)
            self.refused("queue_total")
            largest.kill(
                transport.POLICY,
                f"{ErrorCode.SLOW_CONSUMER}: the reflector's send queues are over {self.limit} bytes",
            )


@attrs.define(eq=False, repr=False)
class Conn:
    """One client connection: its queue of encoded messages and how it ends."""

    id: str
    channel: transport.Channel
    max_queue_bytes: int
    queues: Queues
    out: list[bytes] = attrs.Factory(list)
    out_bytes: int = 0
    wake: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    close_code: int = transport.NORMAL
    close_reason: str = ""

    def __repr__(self) -> str:
        return self.id

    def enqueue(self, data: bytes) -> None:
        if self.close_reason:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.wake.set()
        if self.out_bytes > self.max_queue_bytes:
            self.queues.refused("queue")
            self.kill(
                transport.POLICY, f"{ErrorCode.SLOW_CONSUMER}: send queue over {self.max_queue_bytes} bytes"
            )
        else:
            self.queues.grew(len(data))

    def take(self) -> list[bytes]:
        """Everything queued, to send now."""
        parts, self.out = self.out, []
        self.queues.total -= self.out_bytes
        self.out_bytes = 0
        return parts

    def kill(self, code: int, reason: str) -> None:
        if not self.close_reason:
            log.warning("closing connection %s: %s", self.id, reason)
            self.close_code, self.close_reason = code, reason
            self.take()
            self.scope.cancel()

    async def refuse(self, exc: ProtocolError) -> None:
        """Tell the connection why it is refused; it is closed on the way out."""
        with trio.move_on_after(transport.CLOSE_TIMEOUT):
            await self.channel.send(codec.encode(Error(exc.code, exc.message)))
        self.close_code, self.close_reason = transport.POLICY, f"{exc.code}: {exc.message}"


class Reflector:
    """A running reflector; start one with ``open_reflector`` or ``serve_reflector``."""

    def __init__(self, config: ReflectorConfig, store: Store, pages: Sequence[WebPage] = ()) -> None:
        config.check()
        allowed_origins(config, None)  # ConfigError for an origin that is none
        self.config = config
        self.store = store
        self.pages = pages
        self.port = 0
        self.http_port: int | None = None
        self.core: RelayCore[Conn] = RelayCore(
            config, stored=(), now=0.0, version=__version__, store_path=store.path
        )
        self._loading: dict[str, trio.Event] = {}
        self._queues = Queues(config.max_queue_total, self.core.refuse)
        self._dirty = trio.Event()

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.ssl_context else "ws"
        return f"{scheme}://{self.config.host}:{self.port}"

    @property
    def web_url(self) -> str | None:
        """The web page's address, if it is served."""
        if self.http_port is None:
            return None
        scheme = "https" if self.config.ssl_context else "http"
        return f"{scheme}://{self.config.host}:{self.http_port}/"

    def statistics(self) -> ReflectorStatistics:
        return attrs.evolve(self.core.statistics(), queued_bytes=self._queues.total)

    def describe(self) -> dict[str, Any]:
        """What ``million status`` shows: the reflector and its occupied sessions."""
        return self.core.describe(trio.current_time())

    def summary_names(self) -> list[str]:
        """The sessions with a summary, least recently summarized first."""
        return self.core.summary_names()

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        """The latest summaries (encoded JSON, as received) of the sessions ``names`` that have one."""
        return self.core.summaries(names)

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Reflector] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on the way out, commit what is pending and tell clients."""
        self.core.started_at = trio.current_time()
        self.core.stored.update(await self.store.names())
        try:
            async with tasks.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                nursery.start_soon(self.store.keep_applying)
                nursery.start_soon(self._ticker)
                if self.config.http_port is not None:  # first: its origin is the main port's to allow
                    self.http_port = await nursery.start(
                        partial(
                            serve_web,
                            self,
                            self.config.host,
                            self.config.http_port,
                            pages=self.pages,
                            ssl_context=self.config.ssl_context,
                        )
                    )
                self.port = await nursery.start(self._listen)
                log.info("reflector listening on %s (store %s)", self.url, self.store.path)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()

    async def _listen(self, task_status: trio.TaskStatus[int]) -> None:
        await transport.serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl_context=self.config.ssl_context,
            max_frame=self.config.max_frame,
            engine=self.config.transport,
            origins=origin_check(self.config, self.http_port, partial(self.core.refuse, "origin")),
            handshake_timeout=self.config.handshake_timeout,
            max_handshakes=self.config.max_handshakes,
            on_refused=partial(self.core.refuse, "handshakes"),
            task_status=task_status,
        )

    async def _handle(self, channel: transport.Channel) -> None:
        # Whatever happens here must never reach the server's nursery: other clients go on.
        conn = Conn(secrets.token_hex(4), channel, self.config.max_queue_bytes, self._queues)
        ip = channel.remote
        try:
            self.core.open(ip)
        except ProtocolError as exc:
            await conn.refuse(exc)
            with trio.CancelScope(shield=True):
                await channel.close(conn.close_code, conn.close_reason)
            return
        self._queues.conns.add(conn)
        try:
            if await self._handshake(conn, ip):
                await self._serve_connection(conn)
        except transport.Closed:
            pass
        except Exception:
            log.exception("connection %s failed", conn.id)
        finally:
            self._queues.conns.discard(conn)
            conn.take()
            if trio.current_effective_deadline() == -math.inf and not conn.close_reason:
                conn.close_code = transport.GOING_AWAY
                conn.close_reason = f"{ErrorCode.SHUTDOWN}: the reflector is stopping"
            self.core.drop(conn, trio.current_time(), ip)
            self._dirty.set()
            if conn.close_reason:
                with trio.CancelScope(shield=True):
                    await channel.close(conn.close_code, conn.close_reason)

    async def _handshake(self, conn: Conn, ip: str) -> bool:
        timeout = self.config.handshake_timeout
        with trio.move_on_after(timeout):
            data = await conn.channel.receive()
            try:
                welcome = self.core.hello(conn, codec.decode_client(data), trio.current_time(), conn.id, ip)
            except ProtocolError as exc:
                await conn.refuse(exc)
                return False
            await conn.channel.send(welcome)
            return True
        conn.close_code, conn.close_reason = transport.POLICY, f"no hello within {timeout:g} s"
        self.core.refuse("hello_timeout")
        return False

    async def _serve_connection(self, conn: Conn) -> None:
        with conn.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn, nursery.cancel_scope)
                await self._reader(conn)
                nursery.cancel_scope.cancel()

    async def _reader(self, conn: Conn) -> None:
        core, counters = self.core, self.core.counters
        while True:
            try:
                data = await conn.channel.receive()
            except transport.Closed:
                return
            counters["frames_in"] += 1
            counters["bytes_in"] += len(data)
            try:
                messages = codec.decode_client(data)
            except ProtocolError as exc:
                core.error(conn, exc)
                self._dirty.set()
                continue
            now = trio.current_time()
            pause = core.charge(conn, messages, now)
            if pause:
                await trio.sleep(pause)  # its socket backs up: the sender slows, nobody else does
                now = trio.current_time()
            for message in messages:
                if type(message) is Join and (name := core.needs_load(message)) is not None:
                    try:
                        await self._load(name)
                    except StoreError as exc:
                        error = ProtocolError(ErrorCode.STORAGE, f"cannot load session {name!r}: {exc}")
                        core.error(conn, error, name, message.ref)
                        continue
                    now = trio.current_time()
                core.receive(conn, message, now)
            self._dirty.set()

    async def _load(self, name: str) -> None:
        """Bring a stored session into the core; joins that name it meanwhile wait."""
        while name in self._loading:
            await self._loading[name].wait()
        if name in self.core.sessions:
            return
        self._loading[name] = loaded = trio.Event()
        try:
            stored = await self.store.load(name)
        finally:
            del self._loading[name]
            loaded.set()
        if stored is not None:
            self.core.revive(stored, trio.current_time())

    async def _writer(self, conn: Conn, scope: trio.CancelScope) -> None:
        counters = self.core.counters
        while True:
            await conn.wake.wait()
            conn.wake = trio.Event()
            parts = conn.take()
            if not parts:
                continue
            data = parts[0] if len(parts) == 1 else codec.frame(parts)
            counters["frames_out"] += 1
            counters["bytes_out"] += len(data)
            try:
                await conn.channel.send(data)
            except transport.Closed:
                scope.cancel()
                return

    # --- the pipeline ----------------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            await self._dirty.wait()
            await self._flush()

    async def _flush(self) -> None:
        self._dirty = trio.Event()
        output = self.core.take()
        if output.batch:
            try:
                with trio.CancelScope(shield=True):  # once taken, a batch is always written
                    await self.store.commit(output.batch)
            except StoreError as exc:
                self._store_failed(output, str(exc))
                return
        for recipients, data in output.sends:
            for conn in recipients:
                conn.enqueue(data)
        self.core.stored_batch(output.emptied)

    def _store_failed(self, output: Output[Conn], reason: str) -> None:
        """Relay nothing of a batch the store could not keep: its sessions take no more
        events, and whoever would have heard of it is disconnected, so that nobody waits
        for what was not sent (clients come back, and are told why their joins fail)."""
        told = self.core.store_failed(output.batch, reason)
        told.update(conn for recipients, _ in output.sends for conn in recipients)
        for conn in told:
            conn.kill(transport.GOING_AWAY, f"{ErrorCode.STORAGE}: the reflector could not store: {reason}")
        self.core.stored_batch(output.emptied)

    async def _ticker(self) -> None:
        interval = self.config.tick_ms / 1000
        while True:
            await trio.sleep(interval)
            self.core.tick(trio.current_time())
            self._dirty.set()


@asynccontextmanager
async def open_reflector(
    config: ReflectorConfig | None = None, *, pages: Sequence[WebPage] = ()
) -> AsyncIterator[Reflector]:
    """Run a reflector in this process for the duration of the block.

    ``ConfigError`` if ``config`` is refused (``ReflectorConfig.check``); ``pages`` are
    served on its web port besides the generic one.
    """
    config = config or ReflectorConfig(port=0)
    config.check()
    store = open_store(config.store, fsync=config.fsync)
    try:
        async with tasks.open_nursery() as nursery:
            reflector = await nursery.start(partial(serve_reflector, config, store, pages=pages))
            yield reflector
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def serve_reflector(
    config: ReflectorConfig,
    store: Store,
    *,
    pages: Sequence[WebPage] = (),
    task_status: trio.TaskStatus[Reflector] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` with ``store`` until cancelled; ``task_status`` gets the Reflector."""
    await Reflector(config, store, pages).serve(task_status=task_status)
