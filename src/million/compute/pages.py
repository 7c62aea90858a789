"""The dashboard of the reflector's web port: the runs, one run, the workers and the
ledger's credit.

Registered on the web port by ``million reflector`` as one page, ``RUNS_PAGE``: the same
HTML (``dashboard.html``) at three addresses, each with its own websocket and view:

- ``/``: the lobby's runs (``runs_view``);
- ``/run?name=RUN``: one run, its first level and its processes (``run_view``; the page
  sends ``{"run": RUN}``);
- ``/workers``: the processes of each open run, and the ledger (``workers_view``).

The relay serves them without knowing what they show. Everything comes from the
summaries that workers publish (``million.compute.progress``), and the ledger's from
``million run`` once it has recorded a run (``million.compute.ledger``). Anyone who joins
a run may write its summaries, so each view keeps only fields of the right type, and
lists within bounds; the page bounds what it draws again.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from million.compute.ledger import LEDGER, summary_rows
from million.compute.progress import is_run_summary, progress_session
from million.relay.web import Relay, WebPage
from million.wire import codec

__all__ = ["RUNS_PAGE", "run_row", "run_view", "runs_view", "session_row", "tree", "workers_view"]

RUNS = 1000  # runs on the runs page, the latest summarized
CHILDREN = 1000  # first-level sessions shown one by one; deeper ones are counted
IDENTITIES = 1000  # rows of the ledger's table
HISTORY = 60  # points of a run's progress over time, the latest
CHILD_CELLS = 100  # first-level children in a run's heat map
PROCESSES = 50  # processes of a run listed
COMPLETED_AT = 200  # partitions of a leaf root whose state is drawn
TEXT = 2000  # characters of a failure kept
NAME = 200  # characters of an identity kept


def runs_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """The runs (the ``RUNS`` latest summarized, by name), and how many more there are."""
    runs, more = _runs(relay)
    return {"runs": [run_row(run, summary) for run, summary in runs], "more_runs": more}


def run_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """The run the page chose (``{"run": name}``): its summary with its processes, and its
    tree; both None until the page has said which run, and the summary None while the
    run has none."""
    run = choice.get("run") if isinstance(choice, dict) else None
    if not isinstance(run, str):
        return {"run": None, "tree": None}
    progress = progress_session(run)
    summary = _decoded(relay, [progress]).get(progress)
    row = run_row(run, summary, processes=True) if is_run_summary(summary) else None
    return {"run": row, "tree": tree(relay, run)}


def workers_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """The open runs with their processes, and the ledger's identities as last summarized,
    with how many more it has."""
    runs, _ = _runs(relay)
    rows = [run_row(run, summary, processes=True) for run, summary in runs if summary["state"] == "open"]
    ledger, more = summary_rows(_decoded(relay, [LEDGER]).get(LEDGER), IDENTITIES)
    return {"runs": rows, "ledger": ledger, "ledger_more": more}


def _runs(relay: Relay) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """The runs with a run summary on their progress session, by name (the ``RUNS`` latest
    summarized), and how many progress sessions are left out."""
    suffix = progress_session("")
    names = [name for name in relay.summary_names() if name.endswith(suffix)]
    decoded = _decoded(relay, names[-RUNS:])
    runs = [(name.removesuffix(suffix), run) for name, run in decoded.items() if is_run_summary(run)]
    runs.sort()
    return runs, max(0, len(names) - RUNS)


def run_row(run: str, summary: Any, *, processes: bool = False) -> dict[str, Any]:
    """What the pages show of ``run``'s summary (one that ``is_run_summary``): its fields of
    the right types, others None. Live figures (rate, ETA, bots, processes) only while it
    is open, the answer once done, the failure once failed; with ``processes``, its
    processes (while it is open)."""
    state = summary["state"]
    live = state == "open"
    row = {
        "run": run,
        "state": state[:NAME],
        "partitions": summary["partitions"],
        "completed": summary["completed"],
        "rate": summary["rate"] if live else None,
        "eta_s": _number(summary.get("eta_s")) if live else None,
        "elapsed_s": _number(summary.get("elapsed_s")),
        "bots": summary["bots"] if live else None,
        "processes": _count(summary.get("processes")) if live else None,
        "answer": summary.get("answer") if state == "done" else None,
        "failure": _text(summary.get("failure"), TEXT) if state == "failed" else None,
        "history": _pairs(summary.get("history"), _number, _count)[-HISTORY:],
        "children": _pairs(summary.get("children"), _count, _count)[:CHILD_CELLS],
    }
    if state == "done":  # every partition is done, whatever was last counted of each child
        row["children"] = [[size, size] for _, size in row["children"]]
    if processes:
        row["workers"] = _processes(summary.get("workers")) if live else []
    return row


def tree(relay: Relay, run: str) -> dict[str, Any]:
    """The run's root, its first-level children, and how many sessions below have finished."""
    prefix = f"{run}-"
    names = [name for name in relay.summary_names() if name == run or name.startswith(prefix)]
    summaries = _decoded(relay, names)
    children: list[tuple[int, dict[str, Any]]] = []
    below = below_done = 0
    for name, summary in summaries.items():
        row = session_row(summary)
        if name == run or row is None:
            continue
        rest = name[len(prefix) :]
        if rest.isdigit():
            children.append((int(rest), row))
        else:
            below += 1
            below_done += row["state"] == "done"
    children.sort(key=lambda child: child[0])
    return {
        "run": run,
        "root": session_row(summaries.get(run)),
        "children": children[:CHILDREN],
        "more_children": max(0, len(children) - CHILDREN),
        "below": {"sessions": below, "done": below_done},
    }


def session_row(summary: Any) -> dict[str, Any] | None:
    """What the pages show of a session's own summary (``progress.summary``): its fields of
    the right types, others None; None if it is no dict."""
    if not isinstance(summary, dict):
        return None
    state = _text(summary.get("state"), NAME)
    completed_at = summary.get("completed_at")
    leaf = summary.get("leaf")
    return {
        "state": state,
        "leaf": leaf if type(leaf) is bool else None,
        "count": _count(summary.get("count")),
        "completed": _count(summary.get("completed")),
        "working": _count(summary.get("working")),
        "failures": _count(summary.get("failures")),
        "failed": _text(summary.get("failed"), TEXT),
        "output": summary.get("output") if state == "done" else None,
        "completed_at": (
            [i for i in completed_at[:COMPLETED_AT] if type(i) is int]
            if isinstance(completed_at, list)
            else None
        ),
    }


def _processes(workers: Any) -> list[dict[str, Any]]:
    """A run summary's processes that are dicts with an identity: their fields of the right types."""
    if not isinstance(workers, list):
        return []
    rows = []
    for entry in workers[:PROCESSES]:
        if not (isinstance(entry, dict) and isinstance(entry.get("identity"), str)):
            continue
        present = entry.get("present")
        rows.append(
            {
                "identity": entry["identity"][:NAME],
                "bots": _count(entry.get("bots")),
                "done": _count(entry.get("done")),
                "rate": _count(entry.get("rate")),
                "seen_s": _number(entry.get("seen_s")),
                "present": present if type(present) is bool else None,
            }
        )
    return rows


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _number(value: Any) -> float | int | None:
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return value if value >= 0 else None
    return None


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _pairs(value: Any, first: Any, second: Any) -> list[list[Any]]:
    """The items of ``value`` that are pairs whose parts pass ``first`` and ``second``."""
    if not isinstance(value, list):
        return []
    pairs = []
    for item in value:
        if isinstance(item, list) and len(item) == 2:
            a, b = first(item[0]), second(item[1])
            if a is not None and b is not None:
                pairs.append([a, b])
    return pairs


def _decoded(relay: Relay, names: list[str]) -> dict[str, Any]:
    return {name: codec.loads(raw) for name, raw in relay.summaries(names).items()}


RUNS_PAGE = WebPage(
    "/",
    resources.files("million.compute").joinpath("dashboard.html").read_bytes(),
    runs_view,
    views=(("/run", run_view), ("/workers", workers_view)),
)
