"""The reflector's web port: live pages and Prometheus metrics.

``million reflector --http PORT`` serves, on the reflector's host:

- ``/sessions``: the generic page (``sessions.html``): the reflector's statistics, its
  occupied sessions with their participants, and the latest summaries, as received;
- ``/metrics``: the reflector's counters in Prometheus' text format;
- every registered ``WebPage`` at its path, with its websocket at ``<path>/live``
  (``/live`` for ``/``). Without a page at ``/``, ``/`` is the generic page.

A page's websocket pushes what the page's ``live`` function returns every half second;
whatever JSON the page sends back is handed to the next call. The relay knows nothing
of what registered pages show (the computation registers its runs page). With a token,
every path needs it, as ``?token=...`` or an ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from million._version import __version__
from million.relay.config import ReflectorConfig, ReflectorStatistics
from million.relay.store import Store
from million.wire import codec, tasks, transport
from million.wire.transport import RECEIVE_BUFFER, SansIOChannel

__all__ = ["Relay", "WebPage", "serve_web"]

log = logging.getLogger(__name__)

PUSH_EVERY = 0.5  # seconds between a page's updates
RECENT_SUMMARIES = 200  # summaries shown on the generic page, the most recent


class Relay(Protocol):
    """What pages may read of the reflector."""

    config: ReflectorConfig
    store: Store

    def statistics(self) -> ReflectorStatistics: ...

    def describe(self) -> dict[str, Any]: ...

    def summary_names(self) -> list[str]: ...

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]: ...


@attrs.frozen
class WebPage:
    """A page of the web port: its HTML at ``path``, and what its websocket pushes.

    ``live(relay, choice)`` returns what to push, as a dict of JSON values (pushed with
    the reflector's version and statistics under ``reflector``); ``choice`` is the latest
    JSON value the page sent (None until it sends one).
    """

    path: str
    html: bytes
    live: Callable[[Relay, Any], dict[str, Any]]

    @property
    def live_path(self) -> str:
        return self.path.rstrip("/") + "/live"


def sessions_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """What the generic page shows: statistics, occupied sessions, the latest summaries."""
    info = relay.describe()
    recent = relay.summary_names()[-RECENT_SUMMARIES:]
    summaries = relay.summaries(reversed(recent))
    info["summaries"] = {name: codec.fragment(raw) for name, raw in summaries.items()}
    return info


SESSIONS_PAGE = WebPage(
    "/sessions", resources.files("million.relay").joinpath("sessions.html").read_bytes(), sessions_view
)


async def serve_web(
    relay: Relay,
    host: str,
    port: int,
    *,
    pages: Sequence[WebPage] = (),
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the pages, their websockets and the metrics until cancelled."""
    routes = _routes([SESSIONS_PAGE, *pages])
    registry = CollectorRegistry()
    registry.register(_Collector(relay))
    token = relay.config.token

    async def handle(stream: trio.abc.Stream) -> None:
        # Whatever happens here must never reach the server's nursery: the reflector goes on.
        try:
            request, ws = None, ServerProtocol(max_size=4096)
            with trio.move_on_after(transport.HANDSHAKE_TIMEOUT):
                request = await _read_request(stream, ws)
            if request is None:
                return
            target = urlsplit(request.path)
            page, live = routes.get(target.path, (None, False))
            if not _authorized(token, request, target.query):
                await _respond(stream, ws, 401, "text/plain", b"missing or wrong token\n")
            elif target.path == "/metrics":
                await _respond(stream, ws, 200, "text/plain; version=0.0.4", generate_latest(registry))
            elif page is None:
                await _respond(stream, ws, 404, "text/plain", b"not found\n")
            elif not live:
                await _respond(stream, ws, 200, "text/html; charset=utf-8", page.html)
            elif token is None and not _same_origin(request):
                await _respond(stream, ws, 403, "text/plain", b"another site's page may not read this\n")
            else:
                await _live(relay, page, stream, ws, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, transport.Closed):
            pass
        except Exception:
            log.exception("web request failed")
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await transport.listen(host, port, ssl_context)
    task_status.started(transport.port_of(listeners[0]))
    await trio.serve_listeners(handle, listeners)


def _routes(pages: list[WebPage]) -> dict[str, tuple[WebPage, bool]]:
    """Path -> (page, whether it is the page's websocket); the generic page is also ``/``
    unless a registered page takes it."""
    routes = {"/": (pages[0], False), "/live": (pages[0], True)}
    for page in pages:
        routes[page.path] = (page, False)
        routes[page.live_path] = (page, True)
    return routes


async def _read_request(stream: trio.abc.Stream, ws: ServerProtocol) -> Request | None:
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            return None
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                return event
        if ws.handshake_exc is not None:
            return None


def _same_origin(request: Request) -> bool:
    """Whether the websocket was opened by a page of this server (or by no page at all):
    without a token, nothing else stops any site the user visits from reading the runs."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("Host")


def _authorized(token: str | None, request: Request, query: str) -> bool:
    if token is None:
        return True
    given = parse_qs(query).get("token", [""])[0]
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        given = header[len("Bearer ") :]
    return hmac.compare_digest(given.encode(), token.encode())


async def _respond(stream: trio.abc.Stream, ws: ServerProtocol, status: int, kind: str, body: bytes) -> None:
    reasons = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    headers = Headers(
        [("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    ws.send_response(Response(status, reasons[status], headers, body))
    await stream.send_all(b"".join(ws.data_to_send()))


async def _live(
    relay: Relay, page: WebPage, stream: trio.abc.Stream, ws: ServerProtocol, request: Request
) -> None:
    """Push what ``page`` shows until the page goes away."""
    response = ws.accept(request)
    ws.send_response(response)
    await stream.send_all(b"".join(ws.data_to_send()))
    if response.status_code != 101:
        return
    channel = SansIOChannel(stream, ws)
    choice: list[Any] = [None]

    async def listen() -> None:
        while True:
            try:
                choice[0] = codec.loads(await channel.receive())
            except ValueError:
                continue

    async with tasks.open_nursery() as nursery:
        nursery.start_soon(listen)
        while True:
            reflector = {"version": __version__, "statistics": attrs.asdict(relay.statistics())}
            body = {**page.live(relay, choice[0]), "reflector": reflector}
            await channel.send(codec.dumps(body))
            await trio.sleep(PUSH_EVERY)


class _Collector(Collector):
    """The reflector's counters as Prometheus metrics, read at each scrape."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Any:
        stats = self.relay.statistics()
        store = self.relay.store
        yield GaugeMetricFamily("million_connections", "Open client connections", value=stats.connections)
        yield GaugeMetricFamily("million_sessions", "Sessions with participants", value=stats.sessions)
        yield GaugeMetricFamily(
            "million_idle_sessions", "Sessions in memory, nobody present", value=stats.idle
        )
        counters = [
            ("million_events_relayed", "Events stamped and relayed", stats.events),
            ("million_frames_received", "Frames received from clients", stats.frames_in),
            ("million_frames_sent", "Frames sent to clients", stats.frames_out),
            ("million_bytes_received", "Bytes received from clients", stats.bytes_in),
            ("million_bytes_sent", "Bytes sent to clients", stats.bytes_out),
            ("million_divergences", "Snapshot digests that disagreed", stats.divergences),
            ("million_errors", "Error replies sent to clients", stats.errors),
            ("million_throttled", "Pauses of connections over the message rate", stats.throttled),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)
        yield SummaryMetricFamily(
            "million_store_apply_seconds",
            "Transactions moving journaled batches into SQLite",
            count_value=store.applies,
            sum_value=store.apply_seconds,
        )
        yield GaugeMetricFamily(
            "million_store_pending_bytes", "Journaled bytes not yet in SQLite", value=store.pending_bytes
        )
