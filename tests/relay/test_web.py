"""The reflector's web port: the live page in a real browser, metrics, and its token."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import million_testplugin
import pytest
import trio
from playwright.sync_api import expect, sync_playwright

import million
from helpers import Process, start_reflector
from million.compute.pages import RUNS_PAGE
from million.relay.config import ReflectorConfig
from million.wire import transport
from models import Ledger

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


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


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


async def test_with_a_token_the_web_port_asks_for_it():
    config = ReflectorConfig(port=0, http_port=0, token="web-secret")
    async with million.open_reflector(config) as reflector:
        port = reflector.http_port
        assert (await http_get(port, "/metrics"))[0] == 401
        assert (await http_get(port, "/?token=guess"))[0] == 401
        assert (await http_get(port, "/?token=web-secret"))[0] == 200
        assert (await http_get(port, "/metrics", "Authorization: Bearer web-secret\r\n"))[0] == 200


def watch_in_browser(url: str, run: str, go: Path, expected: str) -> list[str]:
    """Open the page on ``run`` while it is held back, let it go, and wait for its answer.

    Returns the states the page showed for the run, in order.
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}?run={run}")
            state = page.locator(f"#run-{run} .state")
            expect(state).to_have_text("open", timeout=60_000)
            expect(page.locator("#tree h2")).to_have_text(f"{run}: working", timeout=30_000)
            seen = [state.inner_text()]
            (go / "go").touch()  # the held-back partition may finish now
            expect(state).to_have_text("done", timeout=60_000)
            seen.append(state.inner_text())
            expect(page.locator(f"#run-{run} .answer")).to_have_text(json.dumps(expected))
            expect(page.locator("#tree .root")).to_contain_text(f"answer {json.dumps(expected)}")
            return seen
        finally:
            browser.close()


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Chromium (apt-get install chromium)")
async def test_the_page_follows_a_real_run_to_its_answer(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"), 0, "--http", "0")
    web = await reflector.line("million reflector: the runs are on")
    options = ["--option", "slow=[150]", "--option", f"marker_dir={tmp_path}"]
    run = Process(
        [sys.executable, "-m", "million", "run", "--reflector", url, "--plugin", "ordered",
         "--input", "w", "--partitions", "400", "--fanout", "20", "--name", "watched",
         "--workers", "1", "--bots", "6", "--json", *options]
    )  # fmt: skip
    try:
        expected = million_testplugin.expected("w", 400, 20)
        seen = await trio.to_thread.run_sync(watch_in_browser, web, "watched", tmp_path, expected)
        assert seen == ["open", "done"]
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
        upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        status, _ = await http_get(port, "/live", upgrade + key + "Origin: http://evil.example\r\n")
        assert status == 403
