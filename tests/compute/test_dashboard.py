"""The dashboard on the reflector's web port: its views of hand-written summaries (odd ones
included), and the pages in a real browser following a real run held in its middle."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import million_testplugin
import orjson
import trio
from playwright.sync_api import Page, expect, sync_playwright

from browser import CHROMIUM, CHROMIUM_FLAGS, RECORD_VIOLATIONS, needs_chromium, violations
from helpers import Process, start_reflector
from million.compute import pages
from million.compute.ledger import LEDGER
from million.compute.pages import RUNS_PAGE, run_view, runs_view, workers_view

TOKEN = "dashboard-secret-0123456789"
VIEW_TOKEN = "dashboard-view-0123456789"


@attrs.define
class Summaries:
    """What the views read of a reflector: the latest summary of each session, set by the test."""

    named: dict[str, bytes] = attrs.Factory(dict)

    @classmethod
    def of(cls, summaries: dict[str, Any]) -> Summaries:
        return cls({name: orjson.dumps(summary) for name, summary in summaries.items()})

    def summary_names(self) -> list[str]:
        return list(self.named)

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        return {name: self.named[name] for name in names if name in self.named}


def run_summary(run: str, state: str = "open", **fields: Any) -> dict[str, Any]:
    """A run's summary as ``progress.run_summary`` writes it."""
    summary = {
        "run": run, "state": state, "partitions": 400, "completed": 150, "rate": 30, "eta_s": 8,
        "elapsed_s": 5.5, "bots": 6, "processes": 2, "answer": None, "failure": None,
        "history": [[0, 0], [2.5, 60], [5.5, 150]],
        "children": [[20, 20]] * 7 + [[10, 20]] + [[0, 20]] * 12,
        "workers": [
            {"identity": "worker:a", "bots": 4, "done": 100, "rate": 20, "seen_s": 0.4, "present": True},
            {"identity": "worker:b", "bots": 2, "done": 50, "rate": 10, "seen_s": 9.0, "present": False},
        ],
    }  # fmt: skip
    return {**summary, **fields}


# --- the views ----------------------------------------------------------------------------


def test_the_runs_view_keeps_what_has_its_type_and_live_figures_only_while_open():
    relay = Summaries.of(
        {
            "a:progress": run_summary("a"),
            "b:progress": run_summary("b", "done", answer="42", bots=0, processes=0, rate=0, eta_s=None),
            "c:progress": run_summary("c", "failed", failure="<b>boom</b>" * 1000, answer="not shown"),
            "d:progress": run_summary("claims-another-name"),  # the session names the run
            "e:progress": {**run_summary("e"), "bots": "six"},  # not a run's summary
            "f:progress": run_summary("f", partitions=True),  # a bool is no count
            "g:progress": [1, 2],
            "h": run_summary("h"),  # not a progress session
        }
    )
    view = runs_view(relay, None)
    assert [run["run"] for run in view["runs"]] == ["a", "b", "c", "d"]
    a, b, c, _ = view["runs"]
    assert a == {
        "run": "a", "state": "open", "partitions": 400, "completed": 150, "rate": 30, "eta_s": 8,
        "elapsed_s": 5.5, "bots": 6, "processes": 2, "answer": None, "failure": None,
        "history": [[0, 0], [2.5, 60], [5.5, 150]], "children": run_summary("a")["children"],
    }  # fmt: skip
    assert (b["rate"], b["eta_s"], b["bots"], b["processes"]) == (None, None, None, None)
    assert b["answer"] == "42"
    assert b["children"] == [[20, 20]] * 20  # done: every child is, whatever was counted last
    assert c["answer"] is None and c["failure"] == ("<b>boom</b>" * 1000)[: pages.TEXT]
    assert view["more_runs"] == 0


def test_the_views_drop_malformed_fields_and_bound_lists():
    odd = run_summary(
        "odd",
        eta_s=-3,
        elapsed_s="long",
        processes=1.5,
        history=[[0, 0], "x", [1], [1, -5], [2, 10, 3], [float("inf"), 1], *([[3, 20]] * 100)],
        children=[[1, 2], [3], ["a", 2], *([[0, 5]] * 500)],
        workers=[
            {"identity": "x" * 10_000, "bots": -1, "done": "many", "rate": 1.5, "seen_s": -2, "present": 1},
            {"bots": 3},
            "junk",
            *({"identity": f"w{i}", "bots": 1, "present": True} for i in range(100)),
        ],
    )
    run = run_view(Summaries.of({"odd:progress": odd}), {"run": "odd"})["run"]
    assert run["eta_s"] is None and run["elapsed_s"] is None and run["processes"] is None
    assert run["history"] == [[3, 20]] * pages.HISTORY  # the latest, well formed
    assert run["children"][0] == [1, 2] and len(run["children"]) == pages.CHILD_CELLS
    first, *others = run["workers"]
    nothing = dict.fromkeys(["bots", "done", "rate", "seen_s", "present"])
    assert first == {"identity": "x" * pages.NAME, **nothing}
    assert len(others) == pages.PROCESSES - 3  # the first PROCESSES entries, those that are processes
    assert others[0] == {
        "identity": "w0", "bots": 1, "done": None, "rate": None, "seen_s": None, "present": True
    }  # fmt: skip


def test_the_run_view_has_the_run_the_page_chose_and_its_first_level():
    relay = Summaries.of(
        {
            "r:progress": run_summary("r"),
            "r": {"state": "working", "leaf": False, "count": 3, "completed": 1, "working": 2, "failures": 1,
                  "failed": None, "completed_at": [0], "workers": {}},
            "r-2": {"state": "done", "leaf": True, "count": 5, "completed": 5, "working": 0, "output": "x"},
            "r-0": {"state": "failed", "leaf": "yes", "count": -1, "failed": "hook raised", "failures": 3},
            "r-1": "not a summary",
            "r-0-1": {"state": "done"},
            "r-0-2": {"state": "working"},
            "rr": {"state": "done"},  # another run
        }
    )  # fmt: skip
    for choice in [None, "r", {"run": 5}, {}]:
        assert run_view(relay, choice) == {"run": None, "tree": None}
    view = run_view(relay, {"run": "r"})
    assert view["run"]["run"] == "r" and view["run"]["workers"][0]["identity"] == "worker:a"
    tree = view["tree"]
    assert tree["root"]["count"] == 3 and tree["root"]["working"] == 2 and tree["root"]["failures"] == 1
    assert [index for index, _ in tree["children"]] == [0, 2]
    failed, done = (child for _, child in tree["children"])
    assert failed == {
        "state": "failed", "leaf": None, "count": None, "completed": None, "working": None, "failures": 3,
        "failed": "hook raised", "output": None, "completed_at": None,
    }  # fmt: skip
    assert done["output"] == "x" and done["leaf"] is True
    assert tree["below"] == {"sessions": 2, "done": 1}
    nothing = run_view(relay, {"run": "nothing"})
    assert nothing["run"] is None and nothing["tree"]["root"] is None


def test_the_workers_view_has_the_open_runs_processes_and_the_ledger():
    ledger = {"identities": 3, "rows": [["worker:a", 12, 12, 0, 0, 2400, 12, "r", False], "junk"]}
    relay = Summaries.of(
        {
            "a:progress": run_summary("a"),
            "b:progress": run_summary("b", "done", answer=1),
            LEDGER: ledger,
        }
    )
    view = workers_view(relay, None)
    assert [run["run"] for run in view["runs"]] == ["a"]
    assert [w["identity"] for w in view["runs"][0]["workers"]] == ["worker:a", "worker:b"]
    assert view["runs"][0]["workers"][1]["present"] is False
    assert [row["identity"] for row in view["ledger"]] == ["worker:a"]
    assert view["ledger_more"] == 2


def test_the_dashboard_is_one_page_at_three_addresses():
    assert [page.path for page in RUNS_PAGE.expanded()] == ["/", "/run", "/workers"]
    assert [page.live_path for page in RUNS_PAGE.expanded()] == ["/live", "/run/live", "/workers/live"]
    assert {page.html for page in RUNS_PAGE.expanded()} == {RUNS_PAGE.html}
    assert b'<script src="/plotly.min.js"></script>' in RUNS_PAGE.html


# --- a real run, held in its middle, in a real browser -----------------------------------


def texts(page: Page, selector: str) -> list[str]:
    return [text.strip() for text in page.locator(selector).all_inner_texts()]


def watch_a_run(url: str, run: str, markers: Path, shots: Path, expected: str) -> dict[str, Any]:
    """Look at every page while the run is held, let it go, and look again at its end."""
    seen: dict[str, Any] = {"refused": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.add_init_script(RECORD_VIOLATIONS)

            def look(path: str) -> None:
                seen["refused"] += violations(page)  # of the page being left
                page.goto(f"{url}{path}")

            look(f"/#token={VIEW_TOKEN}")
            seen["address"] = page.url  # the token left it at once
            row = page.locator(f'#runs tr[data-run="{run}"]')
            expect(row.locator(".state")).to_have_text("open", timeout=60_000)
            # Partition 150 is held: some partitions are done, never all of them.
            partial = re.compile(r"^[1-9][0-9,]* of 400$")
            expect(row.locator(".progress")).to_have_text(partial, timeout=30_000)
            expect(page.locator("#runs-plot.js-plotly-plot .main-svg").first).to_be_attached()
            expect(page.locator("#runs-plot .legendtext")).to_have_text(run)
            seen["runs"] = {
                "progress": row.locator(".progress").inner_text(),
                "processes": row.locator(".processes").inner_text(),
                "bots": row.locator(".bots").inner_text(),
            }
            page.screenshot(path=shots / "1-runs-mid-run.png", full_page=True)

            row.locator(".name a").click()  # the run's own page
            expect(page).to_have_url(f"{url}/run?name={run}")
            expect(page.locator("#run-title .state")).to_have_text("open", timeout=30_000)
            expect(page.locator("#run-heat.js-plotly-plot .main-svg").first).to_be_attached()
            # A cell per first-level child.
            expect(page.locator("#run-heat .heatmap-label text")).to_have_count(20)
            expect(page.locator("#run-plot.js-plotly-plot .main-svg").first).to_be_attached()
            expect(page.locator("#run-processes tr.process")).to_have_count(1)
            # The root, 19 of its leaves done; the held one is computed whole, without a session.
            root = page.locator("#run-sessions tbody tr", has=page.locator(".name", has_text="root"))
            expect(root.locator(".progress")).to_have_text("19 of 20 children", timeout=30_000)
            seen["run"] = {
                "bots": page.locator(".fact-bots").inner_text(),
                "processes": page.locator(".fact-processes").inner_text(),
                "process bots": texts(page, "#run-processes tr.process .bots"),
            }
            page.screenshot(path=shots / "2-run-mid-run.png", full_page=True)

            look("/workers")
            expect(page.locator(".run-processes tr.process")).to_have_count(1, timeout=30_000)
            seen["workers"] = {
                "heading": page.locator(".run-processes h3").inner_text(),
                "bots": texts(page, ".run-processes tr.process .bots"),
                "present": texts(page, ".run-processes tr.process .present"),
            }
            page.screenshot(path=shots / "3-workers-mid-run.png", full_page=True)

            look("/sessions")
            for plot in ["#load-sessions", "#load-events"]:
                expect(page.locator(f"{plot}.js-plotly-plot .main-svg").first).to_be_attached(timeout=30_000)
            seen["load note"] = page.locator("#load-note").inner_text()
            page.screenshot(path=shots / "4-reflector-mid-run.png", full_page=True)

            (markers / "go").touch()  # the held partition may finish now
            look(f"/run?name={run}")
            expect(page.locator("#run-title .state")).to_have_text("done", timeout=60_000)
            expect(page.locator(".fact-answer")).to_have_text(json.dumps(expected))
            seen["run at the end"] = texts(page, "#run-facts dt")
            page.screenshot(path=shots / "5-run-done.png", full_page=True)

            look("/")
            expect(row.locator(".state")).to_have_text("done", timeout=30_000)
            expect(row.locator(".answer")).to_have_text(json.dumps(expected))
            seen["runs at the end"] = {
                "progress": row.locator(".progress").inner_text(),
                "processes": row.locator(".processes").inner_text(),
                "bots": row.locator(".bots").inner_text(),
                "rate": row.locator(".rate").inner_text(),
            }
            page.screenshot(path=shots / "6-runs-done.png", full_page=True)
            look("/workers")
            expect(page.locator("#no-open")).to_be_visible(timeout=30_000)
            seen["workers at the end"] = page.locator(".run-processes").count()
            seen["refused"] += violations(page)
            return seen
        finally:
            browser.close()


@needs_chromium
async def test_the_pages_follow_a_real_run_held_in_its_middle_to_its_answer(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "view-token").write_text(VIEW_TOKEN)
    tokens = ("--token-file", str(tmp_path / "token"), "--view-token-file", str(tmp_path / "view-token"))
    reflector, url = await start_reflector(str(tmp_path / "store.db"), 0, "--http", "0", *tokens)
    page = (await reflector.line("million reflector: the runs are on")).rstrip("/")
    markers = tmp_path / "markers"
    markers.mkdir()
    run = Process(
        [sys.executable, "-m", "million", "run", "--reflector", url, "--plugin", "ordered",
         "--input", '"w"', "--partitions", "400", "--fanout", "20", "--name", "watched",
         "--processes", "1", "--bots", "6", "--json",
         "--option", "slow=[150]", "--option", f"marker_dir={markers}"],
        env={"MILLION_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        expected = million_testplugin.expected("w", 400, 20)
        seen = await trio.to_thread.run_sync(watch_a_run, page, "watched", markers, tmp_path, expected)
        result = json.loads(await run.line(""))
    finally:
        run.stop()
        reflector.stop()
    assert seen["address"] == f"{page}/"
    mid = int(seen["runs"]["progress"].split()[0].replace(",", ""))
    assert 0 < mid < 400
    assert seen["runs"]["processes"] == "1" and seen["runs"]["bots"] == "6"
    assert seen["run"] == {"bots": "6", "processes": "1", "process bots": ["6"]}
    assert seen["workers"]["heading"] == "watched: 1 process, 6 bots"
    assert seen["workers"]["bots"] == ["6"] and seen["workers"]["present"] == ["present"]
    assert seen["load note"].startswith("a sample every 2 s")
    assert seen["run at the end"] == ["progress", "elapsed", "answer"]  # no rate, ETA, bots, processes
    assert seen["runs at the end"] == {"progress": "400 of 400", "processes": "", "bots": "", "rate": ""}
    assert seen["workers at the end"] == 0
    assert seen["refused"] == []
    assert result["answer"] == expected  # the run's own answer agrees
    assert all((tmp_path / name).stat().st_size for name in ["1-runs-mid-run.png", "6-runs-done.png"])
