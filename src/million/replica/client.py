"""The client's trio shell: one websocket per process, many sessions over it.

``open_client(url)`` connects and keeps connecting: a dropped connection is
re-established with backoff, and the client core (``million.replica.core``) joins every
session again and rebuilds it from the reflector's snapshot and events. This module
owns the socket, the reader and writer tasks and the waiting; the core owns the rules.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from million.replica.core import ClientCore, ClientError, ClientStatistics, Membership, State
from million.replica.model import Model
from million.wire import tasks, transport
from million.wire.protocol import Error, Pong, ProtocolError, Status

__all__ = ["Client", "ClientError", "open_client", "ssl_context"]

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0


class Client:
    """A connection to a reflector, kept up until closed. Use ``open_client``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        label: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        # The label names this client's identity on a reflector without --tokens: unique
        # per client, kept across reconnections.
        self.core = ClientCore(token=token, label=f"{label or 'client'}-{secrets.token_hex(4)}")
        self.core.on_output = self._wake_writer
        self._waiting: dict[str, trio.Event] = {}  # session -> set when its group changes
        self._watching: dict[str, list[Watch]] = {}  # session -> conditions awaited on it
        self._replies: dict[int, trio.MemorySendChannel[Pong | Status]] = {}
        self._moved: trio.Event | None = None  # set when a frame was handled or the connection dropped
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()

    @property
    def connected(self) -> bool:
        return self.core.connected

    @property
    def connection(self) -> int:
        """The number of the current (or last) connection, counting from 1."""
        return self.core.connection

    @property
    def errors(self) -> deque[Error]:
        """The latest errors the reflector sent."""
        return self.core.errors

    def statistics(self) -> ClientStatistics:
        return self.core.statistics()

    # --- sessions --------------------------------------------------------------------------

    async def join(
        self, name: str, model_cls: type[Model], options: Any = None, *, create: bool = True
    ) -> Membership:
        """Join ``name`` and wait until this membership's replica is at the present.

        ``JoinError`` if the reflector refuses. ``million.join`` is the usual way in: it
        also builds and runs a view.
        """
        member = self.core.join(name, model_cls, options, create=create)
        try:
            while member.state is State.JOINING:
                await self.wait_changed(name)
        except BaseException:  # given up, e.g. cancelled: its sync may have come meanwhile
            self.core.leave(member)  # then the reflector holds it: leave, or it stays a ghost
            raise
        if member.error is not None:
            self.core.forget(member)
            raise member.error
        return member

    def leave(self, member: Membership) -> None:
        """Leave without waiting; ``settle`` waits until the reflector has confirmed it."""
        self.core.leave(member)

    async def wait_changed(self, name: str) -> None:
        """Wait until session ``name`` changes here: an event or tick applied, a join answered."""
        event = self._waiting.get(name)
        if event is None:
            event = self._waiting[name] = trio.Event()
        await event.wait()

    async def wait_until(self, name: str, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds, checked here whenever session ``name`` changes: a
        task waiting for its own condition is woken once it holds (or raises), not at each
        change. Many views of one session each waiting for theirs cost a call each per change."""
        if ready():
            return
        watch = Watch(ready)
        self._watching.setdefault(name, []).append(watch)
        try:
            await watch.event.wait()
        finally:
            if not watch.event.is_set():  # cancelled
                self._unwatch(name, watch)

    def _unwatch(self, name: str, watch: Watch) -> None:
        watching = self._watching.get(name, [])
        if watch in watching:
            watching.remove(watch)
        if not watching:
            self._watching.pop(name, None)

    def changed(self, name: str) -> None:
        """Wake whoever waits on session ``name`` (``wait_changed``), and whoever waits
        until a condition that now holds (``wait_until``)."""
        event = self._waiting.pop(name, None)
        if event is not None:
            event.set()
        watching = self._watching.get(name)
        if watching:
            waiting = [watch for watch in watching if not watch.check()]
            if waiting:
                self._watching[name] = waiting
            else:
                del self._watching[name]

    async def settle(self) -> None:
        """Wait until every leave is confirmed and everything queued is sent."""
        while self.core.connected and self.core.departing:
            if self._moved is None:
                self._moved = trio.Event()
            await self._moved.wait()
        await self.drain()

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the connection (or it is gone)."""
        while self.core.connected and not self._drained.is_set():
            await self._drained.wait()

    async def ping(self) -> None:
        """A round trip to the reflector."""
        await self._request(self.core.ping)

    async def status(self, summaries: list[str] | None = None) -> Any:
        """The reflector's description of itself and its sessions, with the latest
        summaries of the sessions named in ``summaries``."""
        reply = await self._request(lambda: self.core.status(summaries or []))
        assert isinstance(reply, Status)
        return reply.info

    async def _request(self, send: Any) -> Pong | Status:
        """Send a request and wait for its answer; ``ClientError`` if the connection is
        down or goes down first."""
        if not self.core.connected:
            raise ClientError(f"not connected to the reflector at {self.url}")
        reply, receive = trio.open_memory_channel[Pong | Status](1)
        ref = send()
        self._replies[ref] = reply
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            raise ClientError(f"the connection to {self.url} was lost before it answered") from None
        finally:
            self._replies.pop(ref, None)

    def _wake_writer(self) -> None:
        self._wake.set()
        if self._drained.is_set():
            self._drained = trio.Event()

    def _moving(self) -> None:
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    # --- the connection --------------------------------------------------------------------

    async def run(
        self, *, first_timeout: float = 10.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay connected until cancelled; ``task_status`` is reported once first connected."""
        delay = 0.05
        deadline = trio.current_time() + first_timeout
        started = False
        while True:
            try:
                async with transport.connect(self.url, ssl_context=self.ssl_context) as channel:
                    await self._handshake(channel)
                    delay = 0.05
                    async with tasks.open_nursery() as nursery:
                        nursery.start_soon(self._writer, channel, nursery.cancel_scope)
                        if not started:
                            started = True
                            task_status.started()
                        reason = await self._reader(channel)
                        nursery.cancel_scope.cancel()
                    log.info("connection to %s closed: %s", self.url, reason)
            except ClientError as exc:  # refused for good: another protocol version, a wrong token
                raise ClientError(f"the reflector at {self.url} refused us: {exc}") from None
            except (
                OSError,
                transport.Closed,
                trio.BrokenResourceError,
                trio.TooSlowError,
                ProtocolError,
            ) as exc:
                if not started and trio.current_time() > deadline:
                    raise ClientError(f"cannot reach the reflector at {self.url}: {exc}") from None
                log.info("connection to %s lost: %s; reconnecting in %.2fs", self.url, exc, delay)
            finally:
                self._disconnected()
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _handshake(self, channel: transport.Channel) -> None:
        await channel.send(self.core.hello())
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            data = await channel.receive()
        self.core.welcome(data)

    def _disconnected(self) -> None:
        self.core.disconnected()
        self._drained.set()
        for reply in self._replies.values():
            reply.close()
        self._moving()

    async def _writer(self, channel: transport.Channel, scope: trio.CancelScope) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                for frame in self.core.data_to_send():
                    await channel.send(frame)
            except transport.Closed:
                scope.cancel()
                return
            if not self.core.pending:
                self._drained.set()

    async def _reader(self, channel: transport.Channel) -> transport.Closed:
        """Hand what the reflector sends to the core until the connection closes; returns why."""
        while True:
            try:
                data = await channel.receive()
            except transport.Closed as closed:
                return closed
            received = self.core.receive(data)
            for group in received.changed:
                self.changed(group.name)
            for reply in received.replies:
                send = self._replies.pop(reply.ref, None)
                if send is not None:
                    send.send_nowait(reply)
            self._moving()


class Watch:
    """A condition awaited on a session (``Client.wait_until``)."""

    __slots__ = ("event", "ready")

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready
        self.event = trio.Event()

    def check(self) -> bool:
        """Whether the wait is over: the condition holds, or raised (its task then calls it
        again, and raises there); then its task is woken."""
        try:
            if not self.ready():
                return False
        except Exception:
            pass
        self.event.set()
        return True


def ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    """The context for ``wss://`` URLs that also trusts ``cafile``; None: the system's."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    label: str = "",
    ssl_context: ssl.SSLContext | None = None,
    first_timeout: float = 10.0,
) -> AsyncIterator[Client]:
    """Connect to the reflector at ``url``; raises ``ClientError`` if it cannot be reached."""
    try:
        transport.address(url)
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    client = Client(url, token=token, label=label, ssl_context=ssl_context)
    async with tasks.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: client.run(first_timeout=first_timeout, task_status=task_status)
        )
        yield client
        with trio.move_on_after(LEAVE_TIMEOUT):
            await client.settle()
        nursery.cancel_scope.cancel()
