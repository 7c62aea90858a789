"""The ledger: a well-known replicated session that records, per identity, what its
results earned over every run (BOINC's credit), and the trust they built.

``million run`` records each run there once it has ended (``run_event``: the root's
tally); ``million credit``, ``million status`` and the workers page show it, and a run with
``--verify adaptive`` takes its trust from it. It lives in the reflector's store like
any session, so it survives restarts. Only an ``admin:`` identity may record a run.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from million.compute.lobby import MAX_RUN_NAME
from million.compute.votes import COUNTS, TRUSTED
from million.relay.config import ROLES
from million.replica.model import Model
from million.wire import codec
from million.wire.protocol import SESSION_NAME

__all__ = [
    "COUNTS",
    "LEDGER",
    "Ledger",
    "is_run_event",
    "ordered",
    "run_event",
    "summary",
    "summary_rows",
]

LEDGER = "million-ledger"
MAX_COUNT = 2**62  # every count stays at or below it (a Spec's trust takes no more)
MAX_IDENTITIES = 1000  # identities the ledger keeps (the most recently seen), and per run
KEEP_RUNS = 500  # names of recorded runs kept, so that none is recorded twice
MAX_NAME = 100  # characters of an identity's name: a --tokens name, or a client's label without them
#: ``ROLE:NAME`` as the reflector stamps it; a NAME of printable ASCII, no space.
IDENTITY = re.compile(rf"({'|'.join(ROLES)}):[!-~]{{1,{MAX_NAME}}}")
#: The columns of a summary's rows, and of the workers page's table.
COLUMNS = (
    "identity", "submitted", "validated", "rejected", "pending", "credit_ms", "consecutive", "last_run",
    "flagged",
)  # fmt: skip


@attrs.define
class Ledger(Model, name="million.ledger.1"):
    """Per identity, over every recorded run: the tally's totals, ``consecutive`` (valid
    results since its last rejected one: BOINC's trust counter), ``last_seen`` (session
    time) and ``last_run`` (the latest run that named it), and ``flagged`` (its latest run
    rejected more of its results than that run's ``max_rejections``).

    A ``run`` event is ignored unless an ``admin:`` identity published it, every field is
    of its type and in range, and the run is not recorded yet: the same on every replica.
    """

    identities: dict[str, dict[str, Any]] = attrs.Factory(dict)  # least recently seen first
    runs: dict[str, int] = attrs.Factory(dict)  # run name -> session time it was recorded

    def init(self, options: Any) -> None:
        self.subscribe("run", self.run)

    def run(self, data: Any) -> None:
        """``{"name": run, "tally": {identity: COUNTS}, "max_rejections": n}``, once per run."""
        if not (self.identity.startswith("admin:") and is_run_event(data)) or data["name"] in self.runs:
            return
        self.runs[data["name"]] = self.now
        for identity, counts in data["tally"].items():
            self._record(identity, counts, data["name"], data["max_rejections"])
        _keep_last(self.identities, MAX_IDENTITIES)
        _keep_last(self.runs, KEEP_RUNS)

    def _record(self, identity: str, counts: dict[str, int], run: str, max_rejections: int) -> None:
        entry = self.identities.pop(identity, None) or _new_entry()
        for key in COUNTS:
            entry[key] = min(entry[key] + counts[key], MAX_COUNT)
        grown = min(entry["consecutive"] + counts["validated"], MAX_COUNT)
        entry["consecutive"] = 0 if counts["rejected"] else grown
        entry["last_seen"], entry["last_run"] = self.now, run
        entry["flagged"] = counts["rejected"] > max_rejections
        self.identities[identity] = entry  # the most recently seen last

    def trust(self, minimum: int = TRUSTED) -> dict[str, int]:
        """Identities with at least ``minimum`` consecutive valid results, and that count."""
        return {
            identity: entry["consecutive"]
            for identity, entry in self.identities.items()
            if entry["consecutive"] >= minimum
        }


def _new_entry() -> dict[str, Any]:
    return {**dict.fromkeys(COUNTS, 0), "consecutive": 0, "last_seen": 0, "last_run": "", "flagged": False}


def _keep_last(table: dict[str, Any], count: int) -> None:
    """Drop the oldest entries of ``table`` beyond ``count`` (insertion order: the same everywhere)."""
    for key in list(table)[: max(0, len(table) - count)]:
        del table[key]


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def _is_counts(value: Any) -> bool:
    return type(value) is dict and len(value) == len(COUNTS) and all(_count(value.get(k)) for k in COUNTS)


def _is_tally(value: Any) -> bool:
    if type(value) is not dict or len(value) > MAX_IDENTITIES:
        return False
    return all(
        type(identity) is str and IDENTITY.fullmatch(identity) is not None and _is_counts(counts)
        for identity, counts in value.items()
    )


def is_run_event(data: Any) -> bool:
    """Whether ``data`` is a ``run`` event the ledger takes (whoever published it)."""
    if type(data) is not dict:
        return False
    name = data.get("name")
    return (
        type(name) is str
        and len(name) <= MAX_RUN_NAME
        and SESSION_NAME.fullmatch(name) is not None
        and _count(data.get("max_rejections"))
        and _is_tally(data.get("tally"))
    )


def run_event(name: str, tally: dict[str, dict[str, int]], max_rejections: int) -> dict[str, Any]:
    """The ``run`` event recording ``tally``: the identities the ledger can name (a
    reflector's ``ROLE:NAME``), the ``MAX_IDENTITIES`` that submitted most, each count
    within range."""
    named = [(identity, counts) for identity, counts in tally.items() if IDENTITY.fullmatch(identity)]
    named.sort(key=lambda item: -item[1].get("submitted", 0))
    clean = {
        identity: {key: min(max(counts.get(key, 0), 0), MAX_COUNT) for key in COUNTS}
        for identity, counts in named[:MAX_IDENTITIES]
    }
    return {"name": name, "tally": clean, "max_rejections": min(max(max_rejections, 0), MAX_COUNT)}


def ordered(identities: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The ledger's identities as they are shown: flagged first, then by credit, then by name."""
    return sorted(
        identities.items(), key=lambda item: (not item[1]["flagged"], -item[1]["credit_ms"], item[0])
    )


def summary(model: Ledger, limit: int) -> dict[str, Any]:
    """The ledger for the workers page, in at most ``limit`` encoded bytes: how many identities
    it has, and as many rows of ``COLUMNS`` as fit, in ``ordered`` order."""
    data: dict[str, Any] = {"identities": len(model.identities), "rows": []}
    room = limit - len(codec.dumps(data))
    for identity, entry in ordered(model.identities):
        row = [identity, *(entry[column] for column in COLUMNS[1:])]
        room -= len(codec.dumps(row)) + 1  # and a comma
        if room < 0:
            break
        data["rows"].append(row)
    return data


def summary_rows(data: Any, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The rows of a ledger ``summary`` as objects (at most ``limit``; any that is not a row
    left out: anyone in the session may summarize it), and how many identities were not."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return [], 0
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in data["rows"] if _is_row(row)][:limit]
    total = data.get("identities")
    return rows, (max(0, total - len(rows)) if type(total) is int else 0)


def _is_row(row: Any) -> bool:
    if not (isinstance(row, list) and len(row) == len(COLUMNS)):
        return False
    identity, *counts, last_run, flagged = row
    texts = all(type(text) is str and len(text) <= MAX_RUN_NAME for text in (identity, last_run))
    return texts and all(_count(count) for count in counts) and type(flagged) is bool
