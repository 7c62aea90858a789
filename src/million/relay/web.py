"""The reflector's web port: live pages and Prometheus metrics.

``million reflector --http PORT`` serves, on the reflector's host:

- ``/sessions``: the generic page (``sessions.html``): the reflector's load over time
  (sampled here every ``SAMPLE_EVERY`` s, the last ``SAMPLES``), its statistics, its
  occupied sessions with their participants, and the latest summaries, as received;
- ``/metrics``: the reflector's counters in Prometheus' text format;
- ``/plotly.min.js``: plotly's offline bundle, which draws the pages' plots (read from
  the installed plotly on the first request; the browser may cache it);
- ``/token.js``: how every page takes the token from its address (``token.js``);
- every registered ``WebPage`` at its path and at the paths of its views, each with its
  websocket at ``<path>/live`` (``/live`` for ``/``). Without a page at ``/``, ``/`` is
  the generic page.

A page's websocket pushes what the page's ``live`` function returns every half second;
whatever JSON the page sends back is handed to the next call. The relay knows nothing
of what registered pages show (the computation registers its dashboard).

The pages themselves are static HTML with no data in them: they are served to anyone,
with a content security policy that lets only their own inline script and style and
the web port's own scripts run, and their own websocket connect. What holds data, the
websockets and ``/metrics``, needs the token or the view token when the reflector has
a token (``?token=...`` or an ``Authorization: Bearer`` header). A websocket opened by
a browser page from an origin the reflector does not allow (``million.relay.origins``)
is refused, token or not; at most ``max_live`` are open at once, each for
``live_lifetime`` seconds (the page then reconnects).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from collections import deque
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
from million.relay.origins import origin_check
from million.relay.store import Store
from million.wire import codec, tasks, transport
from million.wire.transport import RECEIVE_BUFFER, SansIOChannel

__all__ = ["Load", "Relay", "WebPage", "WebStatistics", "serve_web"]

log = logging.getLogger(__name__)

PUSH_EVERY = 0.5  # seconds between a page's updates
SAMPLE_EVERY = 2.0  # seconds between samples of the reflector's load
SAMPLES = 300  # samples of the load kept, the latest (ten minutes)
RECENT_SUMMARIES = 200  # summaries shown on the generic page, the most recent
LIFETIME_OVER = "the page's socket has lived its time: reconnect"
REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 503: "Service Unavailable"}
#: Sent with every response: no address leaks to another site, no type is guessed (so a
#: page's ``script-src 'self'`` loads nothing but what is served as JavaScript).
HEADERS = [
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
]
NO_STORE = "no-store"  # everything but the plotly bundle: pages and data are never cached
PLOTLY = "/plotly.min.js"
PLOTLY_CACHE = "public, max-age=86400"  # it changes only with the installed plotly
TOKEN_SCRIPT = "/token.js"
JAVASCRIPT = "text/javascript; charset=utf-8"
#: plotly adds its stylesheet as an empty ``<style>`` and fills it through the CSSOM, which
#: a policy does not govern: the hash of nothing lets it do that and no more.
EMPTY_STYLE = "'sha256-{}'".format(base64.b64encode(hashlib.sha256(b"").digest()).decode())


class Relay(Protocol):
    """What pages may read of the reflector."""

    config: ReflectorConfig
    store: Store

    def statistics(self) -> ReflectorStatistics: ...

    def describe(self) -> dict[str, Any]: ...

    def summary_names(self) -> list[str]: ...

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]: ...


Live = Callable[[Relay, Any], dict[str, Any]]


@attrs.frozen
class WebPage:
    """A page of the web port: its HTML at ``path``, and what its websocket pushes.

    ``live(relay, choice)`` returns what to push, as a dict of JSON values (pushed with
    the reflector's version and statistics under ``reflector``); ``choice`` is the latest
    JSON value the page sent (None until it sends one). ``views`` are more paths that
    serve the same HTML, each with its own ``live`` (the page tells them apart by its
    address). With ``load``, each push also has the reflector's load samples that the
    socket has not had yet, under ``load`` (all that are kept, on the first push).
    """

    path: str
    html: bytes
    live: Live
    views: tuple[tuple[str, Live], ...] = ()
    load: bool = False

    @property
    def live_path(self) -> str:
        return self.path.rstrip("/") + "/live"

    def expanded(self) -> list[WebPage]:
        """This page and one page per view."""
        return [self, *(WebPage(path, self.html, live, load=self.load) for path, live in self.views)]


@attrs.define
class WebStatistics:
    """The web port's page sockets and what it refused, for ``/metrics``."""

    live: int = 0  # page sockets open now
    live_refused: int = 0  # page sockets beyond ``max_live``
    origin_refused: int = 0  # websockets from a page of an origin not allowed
    unauthorized: int = 0  # requests for data without the token or the view token

    def refusals(self) -> dict[str, int]:
        """The refusals by reason, as ``/metrics`` labels them."""
        return {
            "max_live": self.live_refused,
            "origin": self.origin_refused,
            "unauthorized": self.unauthorized,
        }


@attrs.define(eq=False)
class Load:
    """The reflector's load over time: a sample every ``SAMPLE_EVERY`` s, the latest
    ``SAMPLES``, numbered from the first so that a page socket is sent each sample once.

    A sample: ``at`` (the wall clock, in s since the epoch), ``connections``, ``sessions``
    (with someone present), ``idle`` (in memory, nobody present), ``events_per_s``,
    ``bytes_in_per_s`` and ``bytes_out_per_s`` since the previous sample (None for the
    first), ``store_bytes`` (the SQLite file and its WAL; None for ``:memory:``) and
    ``journal_bytes`` (journaled, not yet in SQLite) and ``queued_bytes`` (waiting to be
    sent to clients).
    """

    samples: deque[dict[str, Any]] = attrs.Factory(lambda: deque(maxlen=SAMPLES))
    taken: int = 0  # samples taken since the start
    _previous: tuple[float, int, int, int] | None = None  # time, events, bytes in, bytes out

    def sample(self, relay: Relay, now: float, wall: float) -> None:
        """Take a sample at ``now`` (a monotonic clock) and ``wall`` (the wall clock)."""
        stats = relay.statistics()
        counters = (stats.events, stats.bytes_in, stats.bytes_out)
        rates: list[float | None] = [None, None, None]
        if self._previous is not None and now > self._previous[0]:
            elapsed, before = now - self._previous[0], self._previous[1:]
            rates = [round((new - old) / elapsed, 1) for new, old in zip(counters, before, strict=True)]
        self._previous = (now, *counters)
        self.samples.append(
            {
                "at": round(wall, 3),
                "connections": stats.connections,
                "sessions": stats.sessions,
                "idle": stats.idle,
                "events_per_s": rates[0],
                "bytes_in_per_s": rates[1],
                "bytes_out_per_s": rates[2],
                "store_bytes": store_bytes(relay.store.path),
                "journal_bytes": relay.store.pending_bytes,
                "queued_bytes": stats.queued_bytes,
            }
        )
        self.taken += 1

    def since(self, taken: int) -> list[dict[str, Any]]:
        """The samples kept that were taken after the first ``taken``."""
        new = min(self.taken - taken, len(self.samples))
        return list(self.samples)[len(self.samples) - new :] if new > 0 else []

    async def keep_sampling(self, relay: Relay) -> None:
        """Sample every ``SAMPLE_EVERY`` s until cancelled; a failure is logged, never raised."""
        while True:
            try:
                self.sample(relay, trio.current_time(), time.time())
            except Exception:
                log.exception("sampling the reflector's load failed")
            await trio.sleep(SAMPLE_EVERY)


def store_bytes(path: str) -> int | None:
    """The size of the store at ``path`` on disk: its file and its WAL (None in memory)."""
    if path == ":memory:":
        return None
    total = 0
    for name in (path, f"{path}-wal"):
        with contextlib.suppress(OSError):  # not there (yet), or gone
            total += os.stat(name).st_size
    return total


def content_policy(html: bytes) -> str:
    """A content security policy for ``html``: nothing loads or runs but its own inline
    scripts and styles (by hash) and the web port's scripts (``'self'``: only the plotly
    bundle and the token script are served as JavaScript), images only as ``data:``
    (plotly draws a heat map as one), and it connects only to its own server."""

    def hashes(tag: bytes) -> list[str]:
        pattern = rb"<%s(?:\s[^>]*)?>(.*?)</%s>" % (tag, tag)
        found = [hashlib.sha256(body).digest() for body in re.findall(pattern, html, re.S)]
        return [f"'sha256-{base64.b64encode(digest).decode()}'" for digest in found]

    scripts = " ".join(["'self'", *hashes(b"script")])
    styles = " ".join([*hashes(b"style"), EMPTY_STYLE])
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@functools.cache
def plotly_bundle() -> tuple[bytes, bytes]:
    """plotly's offline bundle, as it is and gzipped (read once, on first use: it is 4.8 MB)."""
    import plotly.offline  # type: ignore[import-untyped]  # only when asked for

    bundle = plotly.offline.get_plotlyjs().encode()
    return bundle, gzip.compress(bundle, 6)


def sessions_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """What the generic page shows: statistics, occupied sessions, the latest summaries."""
    info = relay.describe()
    recent = relay.summary_names()[-RECENT_SUMMARIES:]
    summaries = relay.summaries(reversed(recent))
    info["summaries"] = {name: codec.fragment(raw) for name, raw in summaries.items()}
    return info


TOKEN_JS = resources.files("million.relay").joinpath("token.js").read_bytes()
SESSIONS_PAGE = WebPage(
    "/sessions",
    resources.files("million.relay").joinpath("sessions.html").read_bytes(),
    sessions_view,
    load=True,
)


async def serve_web(
    relay: Relay,
    host: str,
    port: int,
    *,
    pages: Sequence[WebPage] = (),
    ssl_context: ssl.SSLContext | None = None,
    statistics: WebStatistics | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the pages, their websockets and the metrics until cancelled.

    ``statistics`` (a new record if None) counts the page sockets and the refusals.
    """
    listeners = await transport.listen(host, port, ssl_context)
    bound = transport.port_of(listeners[0])
    web = _Web(relay, _routes([SESSIONS_PAGE, *pages]), origin_check(relay.config, bound), statistics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(web.load.keep_sampling, relay)
        task_status.started(bound)
        await trio.serve_listeners(web.handle, listeners)


class _Web:
    """The web port's requests: who may have what, and the page sockets."""

    def __init__(
        self,
        relay: Relay,
        routes: dict[str, tuple[WebPage, bool]],
        origins: transport.OriginCheck,
        statistics: WebStatistics | None,
    ) -> None:
        self.relay = relay
        self.config = relay.config
        self.routes = routes
        self.origins = origins
        self.statistics = statistics if statistics is not None else WebStatistics()
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(relay, self.statistics))
        self.policies = {page.path: content_policy(page.html) for page, _ in routes.values()}
        self.load = Load()

    async def handle(self, stream: trio.abc.Stream) -> None:
        # Whatever happens here must never reach the server's nursery: the reflector goes on.
        try:
            request, ws = None, ServerProtocol(max_size=4096)
            with trio.move_on_after(self.config.handshake_timeout):
                request = await _read_request(stream, ws)
            if request is not None:
                await self.answer(stream, ws, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, transport.Closed):
            pass
        except Exception:
            log.exception("web request failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def answer(self, stream: trio.abc.Stream, ws: ServerProtocol, request: Request) -> None:
        target = urlsplit(request.path)
        page, live = self.routes.get(target.path, (None, False))
        if target.path == "/metrics":
            if self.authorized(request, target.query):
                await _respond(stream, ws, 200, "text/plain; version=0.0.4", generate_latest(self.registry))
            else:
                await _respond(stream, ws, 401, "text/plain", b"missing or wrong token\n")
        elif target.path == PLOTLY:
            await self.plotly(stream, ws, request)
        elif target.path == TOKEN_SCRIPT:
            await _respond(stream, ws, 200, JAVASCRIPT, TOKEN_JS)
        elif page is None:
            await _respond(stream, ws, 404, "text/plain", b"not found\n")
        elif not live:
            policy = [("Content-Security-Policy", self.policies[page.path])]
            await _respond(stream, ws, 200, "text/html; charset=utf-8", page.html, policy)
        elif refusal := self.refusal(request, target.query):
            await _respond(stream, ws, *refusal)
        else:
            self.statistics.live += 1
            try:
                await _live(self.relay, page, self.load, stream, ws, request)
            finally:
                self.statistics.live -= 1

    async def plotly(self, stream: trio.abc.Stream, ws: ServerProtocol, request: Request) -> None:
        """The plotly bundle, gzipped if the browser takes that; it holds no data."""
        plain, zipped = await trio.to_thread.run_sync(plotly_bundle)
        headers = [("Vary", "Accept-Encoding")]
        body = plain
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = zipped
            headers.append(("Content-Encoding", "gzip"))
        await _respond(stream, ws, 200, JAVASCRIPT, body, headers, cache=PLOTLY_CACHE)

    def refusal(self, request: Request, query: str) -> tuple[int, str, bytes] | None:
        """Why a page socket may not open (status, type, body), or None: it may."""
        if not transport.origin_allowed(self.origins, request.headers.get_all("Origin")):
            self.statistics.origin_refused += 1
            return 403, "text/plain", b"a page of this origin may not read this\n"
        if not self.authorized(request, query):
            return 401, "text/plain", b"missing or wrong token\n"
        if self.statistics.live >= self.config.max_live:
            self.statistics.live_refused += 1
            return 503, "text/plain", b"too many pages open: try again later\n"
        return None

    def authorized(self, request: Request, query: str) -> bool:
        """Whether the request carries a token the reflector takes (if it takes any)."""
        if not self.config.secured:
            return True
        given = parse_qs(query).get("token", [""])[0]
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer ") :]
        keys = self.config.web_tokens()
        accepted = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
        if not any(accepted):
            self.statistics.unauthorized += 1
        return any(accepted)


def _routes(pages: list[WebPage]) -> dict[str, tuple[WebPage, bool]]:
    """Path -> (page, whether it is the page's websocket); the generic page is also ``/``
    unless a registered page takes it."""
    routes = {"/": (pages[0], False), "/live": (pages[0], True)}
    for view in (view for page in pages for view in page.expanded()):
        routes[view.path] = (view, False)
        routes[view.live_path] = (view, True)
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


async def _respond(
    stream: trio.abc.Stream,
    ws: ServerProtocol,
    status: int,
    kind: str,
    body: bytes,
    extra: Sequence[tuple[str, str]] = (),
    *,
    cache: str = NO_STORE,
) -> None:
    headers = Headers(
        [
            ("Content-Type", kind),
            ("Content-Length", str(len(body))),
            ("Cache-Control", cache),
            *HEADERS,
            *extra,
        ]
    )
    ws.send_response(Response(status, REASONS[status], headers, body))
    await stream.send_all(b"".join(ws.data_to_send()))


async def _live(
    relay: Relay, page: WebPage, load: Load, stream: trio.abc.Stream, ws: ServerProtocol, request: Request
) -> None:
    """Push what ``page`` shows until the page goes away or the socket's lifetime is over."""
    response = ws.accept(request)
    ws.send_response(response)
    await stream.send_all(b"".join(ws.data_to_send()))
    if response.status_code != 101:
        return
    channel = SansIOChannel(stream, ws, transport.peer_address(stream))
    with trio.move_on_after(relay.config.live_lifetime):
        await _push(relay, page, load, channel)
    await channel.close(transport.NORMAL, LIFETIME_OVER)


async def _push(relay: Relay, page: WebPage, load: Load, channel: SansIOChannel) -> None:
    choice: list[Any] = [None]
    sent = 0  # load samples this socket has had

    async def listen() -> None:
        while True:
            try:
                choice[0] = codec.loads(await channel.receive())
            except ValueError:
                continue
            except transport.Closed:
                return  # the next push finds it closed too: one error, not a group of two

    async with tasks.open_nursery() as nursery:
        nursery.start_soon(listen)
        while True:
            reflector = {"version": __version__, "statistics": attrs.asdict(relay.statistics())}
            body = {**page.live(relay, choice[0]), "reflector": reflector}
            if page.load:
                body["load"] = {"every": SAMPLE_EVERY, "kept": SAMPLES, "samples": load.since(sent)}
                sent = load.taken
            await channel.send(codec.dumps(body))
            await trio.sleep(PUSH_EVERY)


class _Collector(Collector):
    """The reflector's counters as Prometheus metrics, read at each scrape."""

    def __init__(self, relay: Relay, web: WebStatistics) -> None:
        self.relay = relay
        self.web = web

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
        yield _labelled(
            "million_refusals", "Requests the reflector refused, by limit", "limit", stats.refused
        )
        yield GaugeMetricFamily("million_web_live", "Web page sockets open", value=self.web.live)
        refusals = self.web.refusals()
        yield _labelled("million_web_refusals", "Web port requests refused, by reason", "reason", refusals)
        yield SummaryMetricFamily(
            "million_store_apply_seconds",
            "Transactions moving journaled batches into SQLite",
            count_value=store.applies,
            sum_value=store.apply_seconds,
        )
        yield GaugeMetricFamily(
            "million_store_pending_bytes", "Journaled bytes not yet in SQLite", value=store.pending_bytes
        )


def _labelled(name: str, help_text: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
