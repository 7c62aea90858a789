"""The reflector's web port: a live page of the runs, and Prometheus metrics.

``million reflector --http PORT`` serves, on the reflector's host:

- ``/``: the page (``million/page.html``): the lobby's runs with their progress and,
  for a chosen run, its partition tree, updated live;
- ``/live``: the websocket the page reads; every half second it sends the runs and,
  for the run the page asked for, the summaries of its root, its first level and a
  count of the sessions below;
- ``/metrics``: the reflector's counters in Prometheus' text format.

Everything comes from the summaries that participants publish (see
``Session.summarize``); the reflector itself never reads them. With a token, every
path needs it, as ``?token=...`` or an ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from million._version import __version__
from million.compute.computation import is_run_summary
from million.wire import tasks, transport
from million.wire.transport import RECEIVE_BUFFER, SansIOChannel

if TYPE_CHECKING:
    from million.relay.server import Reflector

__all__ = ["serve_web"]

log = logging.getLogger(__name__)

PUSH_EVERY = 0.5  # seconds between the page's updates
CHILDREN = 1000  # first-level sessions shown one by one; deeper ones are counted
PROGRESS = ":progress"  # suffix of a run's progress session (million.compute.computation)


async def serve_web(
    reflector: Reflector,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page, its websocket and the metrics until cancelled."""
    page = resources.files("million.compute").joinpath("runs.html").read_bytes()
    registry = CollectorRegistry()
    registry.register(_Collector(reflector))

    async def handle(stream: trio.abc.Stream) -> None:
        # Whatever happens here must never reach the server's nursery: the reflector goes on.
        try:
            request, ws = None, ServerProtocol(max_size=4096)
            with trio.move_on_after(transport.HANDSHAKE_TIMEOUT):
                request = await _read_request(stream, ws)
            if request is None:
                return
            target = urlsplit(request.path)
            if not _authorized(reflector.config.token, request, target.query):
                await _respond(stream, ws, 401, "text/plain", b"missing or wrong token\n")
            elif target.path == "/":
                await _respond(stream, ws, 200, "text/html; charset=utf-8", page)
            elif target.path == "/metrics":
                await _respond(stream, ws, 200, "text/plain; version=0.0.4", generate_latest(registry))
            elif target.path == "/live":
                if reflector.config.token is None and not _same_origin(request):
                    await _respond(stream, ws, 403, "text/plain", b"another site's page may not read this\n")
                else:
                    await _live(reflector, stream, ws, request)
            else:
                await _respond(stream, ws, 404, "text/plain", b"not found\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, transport.Closed):
            pass
        except Exception:
            log.exception("web request failed")
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await transport.listen(host, port, ssl_context)
    task_status.started(transport.port_of(listeners[0]))
    await trio.serve_listeners(handle, listeners)


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
    return secrets.compare_digest(given.encode(), token.encode())


async def _respond(stream: trio.abc.Stream, ws: ServerProtocol, status: int, kind: str, body: bytes) -> None:
    reasons = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    headers = Headers(
        [("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    ws.send_response(Response(status, reasons[status], headers, body))
    await stream.send_all(b"".join(ws.data_to_send()))


async def _live(reflector: Reflector, stream: trio.abc.Stream, ws: ServerProtocol, request: Request) -> None:
    """Push the runs (and the chosen run's tree) until the page goes away."""
    response = ws.accept(request)
    ws.send_response(response)
    await stream.send_all(b"".join(ws.data_to_send()))
    if response.status_code != 101:
        return
    channel = SansIOChannel(stream, ws)
    chosen: list[str | None] = [None]

    async def listen() -> None:
        while True:
            try:
                choice = json.loads(await channel.receive()).get("run")
            except (ValueError, AttributeError):
                continue
            chosen[0] = choice if isinstance(choice, str) else None

    async with tasks.open_nursery() as nursery:
        nursery.start_soon(listen)
        while True:
            await channel.send(json.dumps(view(reflector, chosen[0])).encode())
            await trio.sleep(PUSH_EVERY)


def view(reflector: Reflector, run: str | None) -> dict[str, Any]:
    """What the page shows: the reflector, the runs, and the tree of ``run``."""
    names = [name for name in reflector.summary_names() if name.endswith(PROGRESS)]
    runs = [run for run in reflector.summaries(names).values() if is_run_summary(run)]
    runs.sort(key=lambda run: run["run"])
    stats = reflector.statistics()
    return {
        "reflector": {"version": __version__, "statistics": attrs.asdict(stats)},
        "runs": runs,
        "tree": None if run is None else tree(reflector, run),
    }


def tree(reflector: Reflector, run: str) -> dict[str, Any]:
    """The run's root, its first-level children, and how many sessions below have finished."""
    prefix = f"{run}-"
    children: list[tuple[int, Any]] = []
    below = below_done = 0
    summaries = reflector.summaries_under(run)
    for name, summary in summaries.items():
        if name == run or not isinstance(summary, dict):
            continue
        rest = name[len(prefix) :]
        if rest.isdigit():
            children.append((int(rest), summary))
        else:
            below += 1
            below_done += summary.get("state") == "done"
    children.sort(key=lambda child: child[0])
    root = summaries.get(run)
    return {
        "run": run,
        "root": root if isinstance(root, dict) else None,
        "children": children[:CHILDREN],
        "more_children": max(0, len(children) - CHILDREN),
        "below": {"sessions": below, "done": below_done},
    }


class _Collector:
    """The reflector's counters as Prometheus metrics, read at each scrape."""

    def __init__(self, reflector: Reflector) -> None:
        self.reflector = reflector

    def collect(self) -> Any:
        stats = self.reflector.statistics()
        store = self.reflector.store
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
