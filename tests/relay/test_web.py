"""The reflector's web port: the pages in a real browser, the plotly bundle, the load
samples, metrics, its tokens, the origins whose pages may open its websockets, and its
limits. (The dashboard following a real run is in ``tests/compute/test_dashboard.py``.)"""

from __future__ import annotations

import gzip
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any

import attrs
import orjson
import pytest
import trio
from playwright.sync_api import expect, sync_playwright

import million
from browser import CHROMIUM, CHROMIUM_FLAGS, RECORD_VIOLATIONS, needs_chromium, violations
from million.compute import ledger
from million.compute.pages import RUNS_PAGE, workers_view
from million.relay import web
from million.relay.config import ConfigError, ReflectorConfig, ReflectorStatistics
from million.relay.origins import allowed_origins, normalize_origin, origin_check
from million.wire import transport
from models import Ledger

TOKEN = "web-secret-0123456789"
VIEW_TOKEN = "view-secret-0123456789"


UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def http_get(port: int, path: str, headers: str = "", host: str = "x") -> tuple[int, bytes]:
    status, _, body = await http_request(port, path, headers, host)
    return status, body


async def http_request(port: int, path: str, headers: str = "", host: str = "x") -> tuple[int, str, bytes]:
    """GET ``path``: the status, the head and the body (for a websocket: its first frame)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while not opened(data) and (chunk := await stream.receive_some(65536)):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode(), body


def opened(data: bytes) -> bool:
    """Whether ``data`` is a websocket's accepted handshake and the start of its first frame."""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 101") and bool(rest)


async def open_live(port: int, origin: str | None, host: str = "x", path: str = "/live") -> int:
    """The status of a websocket handshake on ``path`` from a page of ``origin``."""
    headers = UPGRADE + (f"Origin: {origin}\r\n" if origin else "")
    return (await http_request(port, path, headers, host))[0]


def metrics_of(body: bytes) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in body.decode().splitlines() if line[:1] != "#")
    }


@attrs.define
class FakeRelay:
    """What the web port reads of a reflector, with summaries set by the test."""

    config: ReflectorConfig
    named: dict[str, bytes] = attrs.Factory(dict)
    store: Any = attrs.Factory(
        lambda: SimpleNamespace(path=":memory:", applies=0, apply_seconds=0.0, pending_bytes=0)
    )
    counters: dict[str, int] = attrs.Factory(dict)  # statistics other than 0

    def statistics(self) -> ReflectorStatistics:
        fields = attrs.fields(ReflectorStatistics)
        zero = {f.name: {} if str(f.type).startswith("dict") else 0 for f in fields}
        return ReflectorStatistics(**{**zero, **self.counters})

    def describe(self) -> dict[str, Any]:
        return {"version": "test", "uptime_s": 1.0, "store": ":memory:", "sessions": [], "sessions_total": 0}

    def summary_names(self) -> list[str]:
        return list(self.named)

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        return {name: self.named[name] for name in names if name in self.named}


@asynccontextmanager
async def web_port(
    relay: FakeRelay, statistics: web.WebStatistics | None = None, page: web.WebPage = RUNS_PAGE
) -> AsyncIterator[int]:
    """The web port of ``relay``, with the dashboard (or ``page``), on 127.0.0.1; yields its port."""
    async with trio.open_nursery() as nursery:
        serve = partial(web.serve_web, relay, "127.0.0.1", 0, pages=[page], statistics=statistics)
        yield await nursery.start(serve)
        nursery.cancel_scope.cancel()


def headers_of(head: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in head.splitlines()[1:])


async def test_metrics_count_what_the_reflector_did():
    async with (
        million.open_reflector(ReflectorConfig(port=0, http_port=0)) as reflector,
        million.open_client(reflector.url) as client,
        million.join(client, "counted", Ledger) as session,
    ):
        for i in range(5):
            session.publish("add", i)
        await session.wait_for(lambda model: model.total == 5)
        status, body = await http_get(reflector.http_port, "/metrics")
        assert status == 200
        metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line[:1] != "#")
        assert float(metrics["million_events_relayed_total"]) == 6  # the join and five additions
        assert float(metrics["million_connections"]) == 1
        assert float(metrics["million_sessions"]) == 1
        assert "million_store_apply_seconds_count" in metrics
        status, page = await http_get(reflector.http_port, "/")
        assert status == 200 and b"<title>million reflector</title>" in page  # the generic page
        assert (await http_get(reflector.http_port, "/nothing"))[0] == 404


async def test_the_generic_page_shows_sessions_and_summaries_as_they_were_sent():
    async with (
        million.open_reflector(ReflectorConfig(port=0, http_port=0)) as reflector,
        million.open_client(reflector.url) as client,
        million.join(client, "shown", Ledger) as session,
    ):
        session.summarize({"anything": [1, "two"]})
        await client.ping()
        async with transport.connect(f"ws://127.0.0.1:{reflector.http_port}/sessions/live") as live:
            view = json.loads(await live.receive())
        assert [s["name"] for s in view["sessions"]] == ["shown"]
        assert view["sessions"][0]["participants"] == 1
        assert view["summaries"] == {"shown": {"anything": [1, "two"]}}
        assert view["reflector"]["statistics"]["connections"] == 1


async def test_a_registered_page_takes_the_root_and_its_views_and_the_generic_one_stays():
    async with million.open_reflector(ReflectorConfig(port=0, http_port=0), pages=[RUNS_PAGE]) as reflector:
        port = reflector.http_port
        for path in ["/", "/run?name=x", "/workers"]:
            assert (await http_get(port, path))[1] == RUNS_PAGE.html
        assert b"<title>million reflector</title>" in (await http_get(port, "/sessions"))[1]
        for path in ["/live", "/run/live", "/workers/live", "/sessions/live"]:
            assert await open_live(port, None, path=path) == 101
        assert (await http_get(port, "/run/other"))[0] == 404


async def test_with_a_token_the_web_port_asks_for_it_for_data_not_for_its_pages():
    config = ReflectorConfig(port=0, http_port=0, token=TOKEN)
    async with million.open_reflector(config) as reflector:
        port = reflector.http_port
        assert (await http_get(port, "/metrics"))[0] == 401
        assert (await http_get(port, "/metrics?token=guess-guess-guess"))[0] == 401
        assert (await http_get(port, "/metrics", f"Authorization: Bearer {TOKEN}\r\n"))[0] == 200
        assert await open_live(port, None) == 401
        assert await open_live(port, None, path=f"/live?token={TOKEN}") == 101
        assert (await http_get(port, "/"))[0] == 200  # static: no data, no token needed
        assert (await http_get(port, "/sessions?token=guess"))[0] == 200


async def test_idle_connections_and_odd_summaries_do_not_stop_the_web_port(mock_clock):
    mock_clock.rate = 1  # real speed, but it can jump
    async with (
        million.open_reflector(ReflectorConfig(port=0, http_port=0), pages=[RUNS_PAGE]) as reflector,
        million.open_client(reflector.url) as client,
        million.join(client, "odd:progress", Ledger) as progress,
        million.join(client, "odd", Ledger) as root,
    ):
        progress.summarize(5)  # anyone may publish anything: not a run's summary
        root.summarize("x")
        await client.ping()
        idle = await trio.open_tcp_stream("127.0.0.1", reflector.http_port)
        async with idle:
            mock_clock.jump(11)  # past the deadline for a request
            with trio.fail_after(5):
                assert await idle.receive_some() == b""  # closed, nothing else
        async with transport.connect(f"ws://127.0.0.1:{reflector.http_port}/run/live") as live:
            await live.send(json.dumps({"run": "odd"}).encode())
            with trio.fail_after(5):
                while (view := json.loads(await live.receive()))["tree"] is None:
                    pass
        assert view["run"] is None  # not a run's summary
        assert view["tree"]["root"] is None
        assert (await http_get(reflector.http_port, "/metrics"))[0] == 200


async def test_another_sites_page_may_not_read_the_runs_without_a_token():
    async with million.open_reflector(ReflectorConfig(port=0, http_port=0)) as reflector:
        port = reflector.http_port
        assert await open_live(port, "http://evil.example") == 403
        assert await open_live(port, f"http://127.0.0.1:{port}") == 101


# --- origins ------------------------------------------------------------------------------


def test_the_allowed_origins_come_from_the_configuration_only():
    local = ReflectorConfig(http_port=0, allow_origins=("https://Dashboard.example", "http://10.0.0.1:8080/"))
    assert allowed_origins(local, 8766) == {
        "https://dashboard.example:443",
        "http://10.0.0.1:8080",
        "http://127.0.0.1:8766",
        "http://localhost:8766",
        "http://[::1]:8766",
    }
    assert allowed_origins(local, None) == {"https://dashboard.example:443", "http://10.0.0.1:8080"}
    assert allowed_origins(attrs.evolve(local, token=TOKEN), 8766) == allowed_origins(local, 8766)
    anywhere = ReflectorConfig(host="0.0.0.0", token=TOKEN)
    assert allowed_origins(anywhere, 80) == {"http://127.0.0.1:80", "http://localhost:80", "http://[::1]:80"}
    named = ReflectorConfig(host="Million.example.org", token=TOKEN, ssl_context=ssl.create_default_context())
    assert allowed_origins(named, 443) == {"https://million.example.org:443"}
    with pytest.raises(ConfigError, match="not a web origin"):
        allowed_origins(ReflectorConfig(allow_origins=("example.org",)), None)


def test_an_origin_is_compared_whole_and_exactly():
    check = origin_check(ReflectorConfig(allow_origins=("https://dashboard.example",)), 8766)
    assert check(None)  # no page: a program
    for allowed in [
        "http://127.0.0.1:8766",
        "http://LOCALHOST:8766",
        "http://[0:0::1]:8766",
        "https://dashboard.example:443",
    ]:
        assert check(allowed), allowed
    refused = [
        "http://127.0.0.1:8765",
        "http://127.0.0.1",
        "https://127.0.0.1:8766",
        "http://dashboard.example",
        "https://dashboard.example.evil.example",
        "http://evil.example:8766",
        "http://127.0.0.1:8766@evil.example",
        "http://127.0.0.1:8766/path",
        "null",
        "",
    ]
    for origin in refused:
        assert not check(origin), origin
    assert normalize_origin("HTTPS://Example.ORG") == "https://example.org:443"


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_rebound_page_may_not_open_the_live_socket_even_with_a_matching_host(token):
    config = ReflectorConfig(token=token, allow_origins=("https://dashboard.example",))
    statistics = web.WebStatistics()
    async with web_port(FakeRelay(config), statistics) as port:
        live = f"/live?token={token}" if token else "/live"
        evil = f"evil.example:{port}"  # its DNS answers with 127.0.0.1: the browser sends this Host
        assert await open_live(port, f"http://{evil}", host=evil, path=live) == 403
        assert await open_live(port, f"http://{evil}", host=evil, path=f"/sessions{live}") == 403
        assert await open_live(port, f"http://127.0.0.1:{port}", host=evil, path=live) == 101
        assert await open_live(port, f"http://localhost:{port}", path=live) == 101
        assert await open_live(port, "https://dashboard.example", path=live) == 101
        assert await open_live(port, None, path=live) == 101
        assert statistics.origin_refused == 2


# --- tokens and pages ---------------------------------------------------------------------


async def test_data_needs_the_token_or_the_view_token_and_the_pages_are_static():
    statistics = web.WebStatistics()
    async with web_port(FakeRelay(ReflectorConfig(token=TOKEN, view_token=VIEW_TOKEN)), statistics) as port:
        assert await open_live(port, None) == 401
        assert await open_live(port, None, path="/live?token=guess-guess-guess") == 401
        assert await open_live(port, None, path=f"/live?token={VIEW_TOKEN}") == 101
        assert await open_live(port, None, path=f"/sessions/live?token={TOKEN}") == 101
        assert (await http_get(port, "/metrics"))[0] == 401
        assert (await http_get(port, "/metrics", f"Authorization: Bearer {VIEW_TOKEN}\r\n"))[0] == 200
        status, body = await http_get(port, f"/metrics?token={TOKEN}")
        assert status == 200
        metrics = metrics_of(body)
        assert metrics['million_web_refusals_total{reason="unauthorized"}'] == 3
        assert metrics['million_web_refusals_total{reason="origin"}'] == 0
        assert statistics.unauthorized == 3
        for path in ["/", "/run?name=x", "/workers", "/sessions"]:
            status, head, html = await http_request(port, path)
            assert status == 200 and b"<script>" in html
            assert b'<script src="/plotly.min.js"></script>' in html
            headers = headers_of(head)
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["Cache-Control"] == "no-store"
            policy = headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
            assert "script-src 'self' 'sha256-" in policy and "unsafe" not in policy
            assert "img-src data:;" in policy


def directive(policy: str, name: str) -> list[str]:
    return policy.split(f"{name} ")[1].split(";")[0].split()


def test_the_content_policy_names_each_inline_script_by_hash_and_lets_only_the_port_s_scripts_load():
    policy = web.content_policy(b"<style>a{}</style><script>go()</script><script type=module>x</script>")
    first, *scripts = directive(policy, "script-src")
    assert first == "'self'"  # the plotly bundle and token.js: nothing else is served as JavaScript
    assert len(scripts) == 2 and all(source.startswith("'sha256-") for source in scripts)
    assert directive(web.content_policy(b"<p>no script</p>"), "script-src") == ["'self'"]
    style, empty = directive(policy, "style-src")
    assert style.startswith("'sha256-") and empty == web.EMPTY_STYLE  # the hash of nothing
    assert directive(policy, "img-src") == ["data:"]  # plotly draws a heat map as an image


# --- the plotly bundle --------------------------------------------------------------------


async def test_the_plotly_bundle_is_served_as_javascript_gzipped_if_taken_and_may_be_cached():
    async with web_port(FakeRelay(ReflectorConfig(token=TOKEN))) as port:  # no token: it holds no data
        status, head, plain = await http_request(port, web.PLOTLY)
        headers = headers_of(head)
        assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert headers["Cache-Control"] == web.PLOTLY_CACHE and headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Encoding" not in headers and "Content-Security-Policy" not in headers
        assert plain.startswith(b"/**\n* plotly.js v") and b"window.Plotly = Plotly" in plain
        assert int(headers["Content-Length"]) == len(plain)
        status, head, zipped = await http_request(port, web.PLOTLY, "Accept-Encoding: gzip, br\r\n")
        assert status == 200 and headers_of(head)["Content-Encoding"] == "gzip"
        assert gzip.decompress(zipped) == plain and len(zipped) < len(plain) / 2
        assert web.plotly_bundle() is web.plotly_bundle()  # read once


# --- the reflector's load ----------------------------------------------------------------


def test_load_samples_the_reflector_and_keeps_the_latest(tmp_path):
    store = tmp_path / "store.db"
    store.write_bytes(b"x" * 100)
    (tmp_path / "store.db-wal").write_bytes(b"x" * 20)
    counters = {"connections": 3, "events": 10, "bytes_in": 100, "queued_bytes": 64}
    relay = FakeRelay(ReflectorConfig(), counters=counters)
    relay.store.path, relay.store.pending_bytes = str(store), 7
    load = web.Load()
    load.sample(relay, now=10.0, wall=1000.0)
    relay.counters.update(events=30, bytes_in=500)
    load.sample(relay, now=12.0, wall=1002.0)
    first, second = load.since(0)
    assert first == {
        "at": 1000.0, "connections": 3, "sessions": 0, "idle": 0, "events_per_s": None,
        "bytes_in_per_s": None, "bytes_out_per_s": None, "store_bytes": 120, "journal_bytes": 7,
        "queued_bytes": 64,
    }  # fmt: skip
    assert (second["events_per_s"], second["bytes_in_per_s"], second["bytes_out_per_s"]) == (10, 200, 0)
    assert load.since(1) == [second] and load.since(2) == []
    for i in range(web.SAMPLES + 5):
        load.sample(relay, now=14.0 + i, wall=1004.0 + i)
    assert load.taken == web.SAMPLES + 7 and len(load.since(0)) == web.SAMPLES  # the latest only
    assert load.since(load.taken - 1)[0]["at"] == 1004.0 + web.SAMPLES + 4
    assert web.store_bytes(":memory:") is None and web.store_bytes(str(tmp_path / "none.db")) == 0


async def test_the_generic_page_s_socket_has_every_load_sample_kept_then_only_new_ones(mock_clock):
    relay = FakeRelay(ReflectorConfig())  # the clock stands still but for jumps
    async with (
        web_port(relay) as port,
        transport.connect(f"ws://127.0.0.1:{port}/sessions/live") as live,
        transport.connect(f"ws://127.0.0.1:{port}/live") as runs,
    ):
        first = json.loads(await live.receive())["load"]
        assert first["every"] == web.SAMPLE_EVERY and first["kept"] == web.SAMPLES
        assert [sample["events_per_s"] for sample in first["samples"]] == [None]  # taken at the start
        assert "load" not in json.loads(await runs.receive())  # the dashboard did not ask for it
        received = []
        while not received:  # until the next sample is taken and pushed
            mock_clock.jump(web.SAMPLE_EVERY / 2)
            received = json.loads(await live.receive())["load"]["samples"]
        assert [sample["events_per_s"] for sample in received] == [0]  # the second, once


# --- limits -------------------------------------------------------------------------------


async def test_live_sockets_beyond_max_live_are_refused():
    statistics = web.WebStatistics()
    async with (
        web_port(FakeRelay(ReflectorConfig(max_live=2)), statistics) as port,
        transport.connect(f"ws://127.0.0.1:{port}/live") as first,
        transport.connect(f"ws://127.0.0.1:{port}/sessions/live") as second,
    ):
        await first.receive()
        await second.receive()  # both are open and counted
        assert await open_live(port, None) == 503
        metrics = metrics_of((await http_get(port, "/metrics"))[1])
        assert metrics['million_web_refusals_total{reason="max_live"}'] == 1
        assert metrics["million_web_live"] == 2
        assert statistics.live_refused == 1


async def test_a_live_socket_is_closed_after_its_lifetime(mock_clock):
    mock_clock.rate = 1  # real speed, but it can jump
    config = ReflectorConfig()
    async with (
        web_port(FakeRelay(config)) as port,
        transport.connect(f"ws://127.0.0.1:{port}/live") as live,
    ):
        await live.receive()
        mock_clock.jump(config.live_lifetime)
        with trio.fail_after(5), pytest.raises(transport.Closed) as closed:
            while True:
                await live.receive()
        assert closed.value.code == transport.NORMAL
        assert closed.value.reason == web.LIFETIME_OVER


# --- the pages against absurd summaries --------------------------------------------------

ABSURD_RUN = {
    "run": "<b>absurd</b>", "state": "open", "partitions": 10**18, "completed": -5, "rate": 10**18,
    "eta_s": 1e300, "elapsed_s": "forever", "bots": 10**18, "processes": None, "answer": None,
    "failure": None, "history": [[i, i * 10] for i in range(5000)] + ["junk", [None, 1]],
    "children": [[1, 2]] * 5000,
    "workers": [{"identity": "<img src=x>" * 50, "bots": 2, "done": 1, "rate": 1, "seen_s": 1.25,
                 "present": True}] * 5000,
}  # fmt: skip
ABSURD_TREE = {
    "run": "<b>absurd</b>",
    "root": {"state": "working", "leaf": True, "count": 1e9, "completed": "lots", "working": None},
    "children": [[i, {"state": "done", "count": 2, "completed": 2}] for i in range(5000)],
    "more_children": 10**18, "below": {"sessions": 3, "done": 1},
}  # fmt: skip
ABSURD_RUNS = [
    ABSURD_RUN,
    *(
        {**ABSURD_RUN, "run": f"run-{i}", "history": [[0, 0]], "children": [], "workers": []}
        for i in range(1500)
    ),
]
#: Each with more processes than are drawn of a run, and more than are drawn in all.
ABSURD_OPEN = [{**run, "workers": ABSURD_RUN["workers"][:60]} for run in ABSURD_RUNS[:30]]
#: The dashboard's HTML fed by views that bound nothing: the page's own bounds hold.
ABSURD_PAGE = web.WebPage(
    "/",
    RUNS_PAGE.html,
    lambda relay, choice: {"runs": ABSURD_RUNS, "more_runs": 5},
    views=(
        ("/run", lambda relay, choice: {"run": ABSURD_RUN, "tree": ABSURD_TREE}),
        ("/workers", lambda relay, choice: {"runs": ABSURD_OPEN, "ledger": [], "ledger_more": 0}),
    ),
)


def view_absurd_summaries(url: str) -> dict[str, Any]:
    """Open every page on the absurd summaries (token in the fragment, then in the old query)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_VIOLATIONS)
            page.goto(f"{url}/#token={VIEW_TOKEN}")
            row = page.locator("#runs tbody tr").first
            expect(row.locator(".state")).to_have_text("open", timeout=30_000)
            expect(page.locator("#runs-plot.js-plotly-plot .main-svg").first).to_be_attached()
            seen: dict[str, Any] = {
                "url": page.url,
                "rows": page.locator("#runs tbody tr").count(),
                "more": page.locator("#more").inner_text(),
                "row": [cell.strip() for cell in row.locator("td").all_inner_texts()],
                "traces": page.locator("#runs-plot .scatterlayer .trace").count(),
                "legend": page.locator("#runs-plot .legendtext").first.text_content(),
                "bold": page.locator("#runs-plot .legendtext tspan").count(),
                "refused": violations(page),
            }
            page.reload()  # the token stays with the tab, out of the address
            expect(row.locator(".state")).to_have_text("open", timeout=30_000)
            page.goto(f"{url}/run?name=absurd")
            expect(page.locator("#run-heat .heatmap-label text").first).to_be_attached(timeout=30_000)
            seen["run"] = {
                "cells": page.locator("#run-heat .heatmap-label text").count(),
                "processes": page.locator("#run-processes tr.process").count(),
                "identity": page.locator("#run-processes tr.process .identity").first.inner_text(),
                "sessions": page.locator("#run-sessions tbody tr").count(),
                "root": page.locator("#run-sessions tbody tr").first.locator("td").all_inner_texts(),
                "below": page.locator("#run-below").inner_text(),
                "progress": page.locator(".fact-progress").inner_text(),
                "ETA": page.locator(".fact-ETA").inner_text(),
                "elapsed": page.locator(".fact-elapsed").inner_text(),
                "text": page.locator("main").inner_text(),
                "refused": violations(page),
            }
            page.goto(f"{url}/workers")
            expect(page.locator(".run-processes").first).to_be_attached(timeout=30_000)
            seen["workers"] = {
                "runs": page.locator(".run-processes").count(),
                "processes": page.locator(".run-processes tr.process").count(),
                "images": page.locator("img").count(),
                "refused": violations(page),
            }
            other = browser.new_page()
            other.goto(f"{url}/sessions?token={VIEW_TOKEN}")
            load = other.locator("#load-sessions.js-plotly-plot .main-svg").first
            expect(load).to_be_attached(timeout=30_000)
            seen["sessions url"] = other.url
            return seen
        finally:
            browser.close()


@needs_chromium
async def test_the_pages_draw_absurd_summaries_within_bounds_and_keep_the_token_out_of_the_address():
    relay = FakeRelay(ReflectorConfig(token=TOKEN, view_token=VIEW_TOKEN))
    async with web_port(relay, page=ABSURD_PAGE) as port:
        url = f"http://127.0.0.1:{port}"
        seen = await trio.to_thread.run_sync(view_absurd_summaries, url)
    assert seen["url"] == f"{url}/"
    assert seen["sessions url"] == f"{url}/sessions"
    assert seen["rows"] == 1000 and seen["more"] == "and 506 more runs"
    huge = "1,000,000,000,000,000+"
    assert seen["row"][:4] == ["<b>absurd</b>", "open", f"0 of {huge}", f"{huge}/s"]
    assert seen["row"][5:8] == ["", "?", huge]  # elapsed: no number; processes: none; bots
    assert seen["traces"] == 10  # runs in the plot
    assert seen["legend"] == "<b>absurd</b>" and seen["bold"] == 0  # plotly shows the name as written
    run = seen["run"]
    assert run["cells"] == 200 and run["processes"] == 50 and run["sessions"] == 1001
    assert run["identity"] == "<img src=x>" * 27 + "<im…"  # 300 characters, as text
    assert run["root"] == ["root", "working", "? of 1,000,000,000 partitions", "?", "", ""]
    more = f"and {huge} more sessions at the first level; "
    assert run["below"] == f"{more}below the first level: 1 of 3 sessions seen are done"
    assert run["progress"] == f"0 of {huge}" and run["elapsed"] == ""
    assert run["ETA"].endswith(" min") and "NaN" not in run["text"] and "Infinity" not in run["text"]
    assert seen["workers"] == {"runs": 30, "processes": 1000, "images": 0, "refused": []}
    assert seen["run"]["refused"] == [] and seen["refused"] == []


# --- the ledger on the workers page ----------------------------------------------------------

ROW = ["worker:good", 12, 12, 0, 0, 2400, 12, "nightly", False]
FLAGGED = ["worker:<b>bad</b>", 5, 1, 4, 0, 200, 0, "nightly", True]  # shown as text, never as markup


def ledger_relay(rows: list[Any], identities: int) -> FakeRelay:
    summary = {"identities": identities, "rows": rows}
    return FakeRelay(ReflectorConfig(), {"million-ledger": orjson.dumps(summary)})


def test_the_workers_view_has_the_ledger_rows_that_are_rows():
    rows = [FLAGGED, ROW, ["worker:x", "many", 1, 0, 0, 1, 1, "r", False], "junk", [1] * 9, ROW[:-1]]
    view = workers_view(ledger_relay(rows, 10), None)
    assert [row["identity"] for row in view["ledger"]] == ["worker:<b>bad</b>", "worker:good"]
    assert view["ledger"][1] == dict(zip(ledger.COLUMNS, ROW, strict=True))
    assert view["ledger_more"] == 8
    empty = workers_view(FakeRelay(ReflectorConfig()), None)
    assert (empty["ledger"], empty["ledger_more"]) == ([], 0)


def view_ledger(url: str) -> dict[str, Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#credit")).to_be_visible(timeout=30_000)
            flagged = page.locator("#ledger tr.flagged").first
            return {
                "rows": page.locator("#ledger tbody tr").count(),
                "flagged": page.locator("#ledger tr.flagged").count(),
                "first": [cell.inner_text() for cell in flagged.locator("td").all()],
                "bold": flagged.locator("b").count(),
                "more": page.locator("#ledger-more").inner_text(),
            }
        finally:
            browser.close()


@needs_chromium
async def test_the_workers_page_shows_the_ledger_flagged_identities_marked_and_1000_rows_at_most():
    rows = [FLAGGED, *([*ROW[:-2], f"run-{i}", False] for i in range(1500))]
    async with web_port(ledger_relay(rows, 5000)) as port:
        seen = await trio.to_thread.run_sync(view_ledger, f"http://127.0.0.1:{port}/workers")
    assert seen["rows"] == 1000 and seen["flagged"] == 1
    assert seen["first"] == ["worker:<b>bad</b>", "5", "1", "4", "0", "0.2 s", "0", "nightly", "flagged"]
    assert seen["bold"] == 0
    assert seen["more"] == "and 4,000 more identities"
