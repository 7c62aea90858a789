"""The reflector's web port: the live page in a real browser, metrics, its tokens, the
origins whose pages may open its websockets, and its limits."""

from __future__ import annotations

import json
import shutil
import ssl
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import million_testplugin
import orjson
import pytest
import trio
from playwright.sync_api import expect, sync_playwright

import million
from helpers import Process, start_reflector
from million.compute import ledger
from million.compute.pages import RUNS_PAGE
from million.relay import web
from million.relay.config import ConfigError, ReflectorConfig, ReflectorStatistics
from million.relay.origins import allowed_origins, normalize_origin, origin_check
from million.wire import transport
from models import Ledger

TOKEN = "web-secret-0123456789"
VIEW_TOKEN = "view-secret-0123456789"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a headless Chromium on a machine without a network beyond loopback.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
    store: Any = attrs.Factory(lambda: SimpleNamespace(applies=0, apply_seconds=0.0, pending_bytes=0))

    def statistics(self) -> ReflectorStatistics:
        fields = attrs.fields(ReflectorStatistics)
        return ReflectorStatistics(**{f.name: {} if str(f.type).startswith("dict") else 0 for f in fields})

    def describe(self) -> dict[str, Any]:
        return {"version": "test", "uptime_s": 1.0, "store": ":memory:", "sessions": [], "sessions_total": 0}

    def summary_names(self) -> list[str]:
        return list(self.named)

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        return {name: self.named[name] for name in names if name in self.named}


@asynccontextmanager
async def web_port(relay: FakeRelay, statistics: web.WebStatistics | None = None) -> AsyncIterator[int]:
    """The web port of ``relay``, with the runs page, on 127.0.0.1; yields its port."""
    async with trio.open_nursery() as nursery:
        serve = partial(web.serve_web, relay, "127.0.0.1", 0, pages=[RUNS_PAGE], statistics=statistics)
        yield await nursery.start(serve)
        nursery.cancel_scope.cancel()


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


async def test_a_registered_page_takes_the_root_and_the_generic_one_stays():
    async with million.open_reflector(ReflectorConfig(port=0, http_port=0), pages=[RUNS_PAGE]) as reflector:
        assert b"<title>million</title>" in (await http_get(reflector.http_port, "/"))[1]
        assert b"<title>million reflector</title>" in (await http_get(reflector.http_port, "/sessions"))[1]


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


def watch_in_browser(url: str, run: str, go: Path, expected: str) -> tuple[list[str], str]:
    """Open the page on ``run`` while it is held back, let it go, and wait for its answer.

    Returns the states the page showed for the run, in order, and the page's address at the end.
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            state = page.locator(f"#run-{run} .state")
            expect(state).to_have_text("open", timeout=60_000)
            expect(page.locator("#tree h2")).to_have_text(f"{run}: working", timeout=30_000)
            seen = [state.inner_text()]
            (go / "go").touch()  # the held-back partition may finish now
            expect(state).to_have_text("done", timeout=60_000)
            seen.append(state.inner_text())
            expect(page.locator(f"#run-{run} .answer")).to_have_text(json.dumps(expected))
            expect(page.locator("#tree .root")).to_contain_text(f"answer {json.dumps(expected)}")
            return seen, page.url
        finally:
            browser.close()


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Chromium (apt-get install chromium)")
async def test_the_page_follows_a_real_run_to_its_answer(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    token = ("--token-file", str(tmp_path / "token"))
    reflector, url = await start_reflector(str(tmp_path / "store.db"), 0, "--http", "0", *token)
    page = await reflector.line("million reflector: the runs are on")
    options = ["--option", "slow=[150]", "--option", f"marker_dir={tmp_path}"]
    run = Process(
        [sys.executable, "-m", "million", "run", "--reflector", url, "--plugin", "ordered",
         "--input", "w", "--partitions", "400", "--fanout", "20", "--name", "watched",
         "--workers", "1", "--bots", "6", "--json", *options],
        env={"MILLION_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        expected = million_testplugin.expected("w", 400, 20)
        address = f"{page}?run=watched#token={TOKEN}"
        seen, last = await trio.to_thread.run_sync(watch_in_browser, address, "watched", tmp_path, expected)
        assert seen == ["open", "done"]
        assert last == f"{page}?run=watched"  # the token left the address bar at once
        result = json.loads(await run.line(""))
        assert result["answer"] == expected  # the run's own answer agrees
    finally:
        run.stop()
        reflector.stop()


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
        async with transport.connect(f"ws://127.0.0.1:{reflector.http_port}/live") as live:
            await live.send(json.dumps({"run": "odd"}).encode())
            with trio.fail_after(5):
                while (view := json.loads(await live.receive()))["tree"] is None:
                    pass
        assert view["runs"] == []
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
        for path in ["/", "/sessions"]:
            status, head, html = await http_request(port, path)
            assert status == 200 and b"<script>" in html
            headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["Cache-Control"] == "no-store"
            policy = headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
            assert "script-src 'sha256-" in policy and "unsafe" not in policy


def test_the_content_policy_names_each_inline_script_by_hash():
    policy = web.content_policy(b"<style>a{}</style><script>go()</script><script type=module>x</script>")
    script = policy.split("script-src ")[1].split(";")[0].split()
    assert len(script) == 2 and all(source.startswith("'sha256-") for source in script)
    assert "script-src 'none'" in web.content_policy(b"<p>no script</p>")


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


# --- the page against absurd summaries ----------------------------------------------------

ABSURD = {
    "absurd:progress": {
        "run": "absurd", "state": "open", "partitions": 10**18, "completed": -5, "rate": 10**18,
        "workers": 10**18, "answer": None,
    },
    "absurd": {
        "state": "working", "leaf": True, "count": 1e9, "completed": "lots", "working": None,
        "completed_at": [0, 1, 2], "workers": {"3": 2, "4": "many"},
    },
    "wide": {"state": "working", "leaf": False, "count": 1e300, "completed": 1e300, "working": 1},
}  # fmt: skip


def view_absurd_summaries(url: str) -> dict[str, Any]:
    """Open the runs page on the absurd summaries (token in the fragment, then in the old query)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            blocked: list[str] = []
            page.on(
                "console",
                lambda message: blocked.append(message.text) if "Content Security" in message.text else None,
            )
            page.goto(f"{url}/?run=absurd#token={VIEW_TOKEN}")
            expect(page.locator("#tree h2")).to_have_text("absurd: working", timeout=30_000)
            seen = {
                "url": page.url,
                "cells": page.locator("#tree .grid .cell").count(),
                "root": page.locator("#tree .root").inner_text(),
                "more": page.locator("#tree p.muted").first.inner_text(),
                "progress": page.locator("#run-absurd .progress").inner_text(),
                "workers": page.locator("#run-absurd .workers").inner_text(),
                "cell 3": page.locator("#tree .cell").nth(3).inner_text(),
            }
            page.reload()  # the token stays with the tab, out of the address
            expect(page.locator("#tree h2")).to_have_text("absurd: working", timeout=30_000)
            page.goto(f"{url}/?run=wide")
            expect(page.locator("#tree h2")).to_have_text("wide: working", timeout=30_000)
            seen["wide cells"] = page.locator("#tree .grid .cell").count()
            other = browser.new_page()
            other.goto(f"{url}/sessions?token={VIEW_TOKEN}")
            expect(other.locator("#summaries code").first).to_be_visible(timeout=30_000)
            seen["sessions url"] = other.url
            seen["blocked"] = blocked
            return seen
        finally:
            browser.close()


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Chromium (apt-get install chromium)")
async def test_the_page_draws_absurd_summaries_within_bounds_and_keeps_the_token_out_of_the_address():
    summaries = {name: orjson.dumps(summary) for name, summary in ABSURD.items()}
    relay = FakeRelay(ReflectorConfig(token=TOKEN, view_token=VIEW_TOKEN), summaries)
    async with web_port(relay) as port:
        url = f"http://127.0.0.1:{port}"
        seen = await trio.to_thread.run_sync(view_absurd_summaries, url)
    assert seen["url"] == f"{url}/?run=absurd"
    assert seen["sessions url"] == f"{url}/sessions"
    assert seen["cells"] == 1000
    assert seen["wide cells"] == 1000
    assert seen["root"] == "? of 1,000,000,000 partitions complete, ? workers in the root"
    assert seen["more"] == "and 999,999,000 more partitions"
    assert seen["progress"] == "0 of 1,000,000,000,000,000+"
    assert seen["workers"] == "1,000,000,000,000,000+"
    assert seen["cell 3"] == "3 ·2"
    assert seen["blocked"] == []


# --- the ledger on the runs page ----------------------------------------------------------

ROW = ["worker:good", 12, 12, 0, 0, 2400, 12, "nightly", False]
FLAGGED = ["worker:<b>bad</b>", 5, 1, 4, 0, 200, 0, "nightly", True]  # shown as text, never as markup


def ledger_relay(rows: list[Any], identities: int) -> FakeRelay:
    summary = {"identities": identities, "rows": rows}
    return FakeRelay(ReflectorConfig(), {"million-ledger": orjson.dumps(summary)})


def test_the_runs_view_has_the_ledger_rows_that_are_rows():
    rows = [FLAGGED, ROW, ["worker:x", "many", 1, 0, 0, 1, 1, "r", False], "junk", [1] * 9, ROW[:-1]]
    view = RUNS_PAGE.live(ledger_relay(rows, 10), None)
    assert [row["identity"] for row in view["ledger"]] == ["worker:<b>bad</b>", "worker:good"]
    assert view["ledger"][1] == dict(zip(ledger.COLUMNS, ROW, strict=True))
    assert view["ledger_more"] == 8
    empty = RUNS_PAGE.live(FakeRelay(ReflectorConfig()), None)
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


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Chromium (apt-get install chromium)")
async def test_the_page_shows_the_ledger_flagged_identities_marked_and_1000_rows_at_most():
    rows = [FLAGGED, *([*ROW[:-2], f"run-{i}", False] for i in range(1500))]
    async with web_port(ledger_relay(rows, 5000)) as port:
        seen = await trio.to_thread.run_sync(view_ledger, f"http://127.0.0.1:{port}/")
    assert seen["rows"] == 1000 and seen["flagged"] == 1
    assert seen["first"] == ["worker:<b>bad</b>", "5", "1", "4", "0", "0.2 s", "0", "nightly", "flagged"]
    assert seen["bold"] == 0
    assert seen["more"] == "and 4,000 more identities"
