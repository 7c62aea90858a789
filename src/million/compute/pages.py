"""The runs page of the reflector's web port: the lobby's runs, a run's partition tree
and the ledger's credit.

Registered on the web port by ``million reflector``; the relay serves it without knowing
what it shows. Everything comes from the summaries that workers publish
(``million.compute.progress``), and the ledger's from ``million run`` once it has recorded
a run (``million.compute.ledger``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from million.compute.ledger import LEDGER, summary_rows
from million.compute.progress import is_run_summary, progress_session
from million.relay.web import Relay, WebPage
from million.wire import codec

__all__ = ["RUNS_PAGE", "runs_view", "tree"]

CHILDREN = 1000  # first-level sessions shown one by one; deeper ones are counted
IDENTITIES = 1000  # rows of the ledger's table


def runs_view(relay: Relay, choice: Any) -> dict[str, Any]:
    """The runs, the tree of the run the page chose (``{"run": name}``), and the ledger's
    identities as last summarized, with how many more it has."""
    suffix = progress_session("")
    names = [name for name in relay.summary_names() if name.endswith(suffix)]
    runs = [run for run in _decoded(relay, names).values() if is_run_summary(run)]
    runs.sort(key=lambda run: run["run"])
    run = choice.get("run") if isinstance(choice, dict) else None
    ledger, more = summary_rows(_decoded(relay, [LEDGER]).get(LEDGER), IDENTITIES)
    return {
        "runs": runs,
        "tree": tree(relay, run) if isinstance(run, str) else None,
        "ledger": ledger,
        "ledger_more": more,
    }


def tree(relay: Relay, run: str) -> dict[str, Any]:
    """The run's root, its first-level children, and how many sessions below have finished."""
    prefix = f"{run}-"
    names = [name for name in relay.summary_names() if name == run or name.startswith(prefix)]
    summaries = _decoded(relay, names)
    children: list[tuple[int, Any]] = []
    below = below_done = 0
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


def _decoded(relay: Relay, names: list[str]) -> dict[str, Any]:
    return {name: codec.loads(raw) for name, raw in relay.summaries(names).items()}


RUNS_PAGE = WebPage("/", resources.files("million.compute").joinpath("runs.html").read_bytes(), runs_view)
