"""What ``million status`` shows: a reflector's status, with the lobby's runs and their
progress, and the ledger's credit (also ``million credit``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from million.compute.ledger import LEDGER, Ledger, ordered
from million.compute.lobby import LOBBY, Lobby
from million.compute.progress import is_run_summary, progress_session
from million.replica.client import Client
from million.replica.model import Model
from million.replica.session import JoinError, join
from million.replica.view import View
from million.wire.protocol import ErrorCode

__all__ = ["ledger_identities", "lobby_runs", "status_with_runs"]


async def status_with_runs(client: Client) -> dict[str, Any]:
    """The reflector's status (``Client.status``) with ``runs`` in place of ``summaries``:
    each run of the lobby, named, with the fields of its latest progress summary; and the
    ``ledger`` (``ledger_identities``). With a token that only reads, the lobby cannot be
    joined: the runs are those with a progress summary, without their plugin, and the
    ledger is None."""
    runs = await lobby_runs(client)
    read_only = runs is None
    info: dict[str, Any]
    if runs is None:
        info = await client.status(["*" + progress_session("")])
        found = [summary for summary in info.pop("summaries").values() if is_run_summary(summary)]
        runs = {summary["run"]: {} for summary in found}
        summaries = {progress_session(summary["run"]): summary for summary in found}
    else:
        info = await client.status([progress_session(name) for name in runs])
        summaries = info.pop("summaries")
    info["runs"] = [
        {"name": name, **run, **_progress(summaries.get(progress_session(name)))}
        for name, run in runs.items()
    ]
    info["ledger"] = None if read_only else await ledger_identities(client)
    return info


def _progress(summary: Any) -> dict[str, Any]:
    """A progress summary's fields; none if it is not one (anyone may summarize any session)."""
    return summary if is_run_summary(summary) else {}


async def lobby_runs(client: Client) -> dict[str, dict[str, Any]] | None:
    """The runs the lobby lists, by name; none if nobody ever posted one, None if this
    client may not join (its token only reads)."""
    return await _read(client, LOBBY, Lobby, lambda lobby: dict(lobby.runs))


async def ledger_identities(client: Client) -> dict[str, dict[str, Any]] | None:
    """The ledger's identities, flagged first, then by credit; none if no run was ever
    recorded, None if this client may not join (its token only reads)."""
    return await _read(client, LEDGER, Ledger, lambda ledger: dict(ordered(ledger.identities)))


async def _read(
    client: Client, name: str, model_cls: type[Model], read: Callable[[Any], dict[str, Any]]
) -> dict[str, Any] | None:
    """``read(model)`` of session ``name``; none if it does not exist, None if this client
    may not join it."""
    try:
        async with join(client, name, model_cls, View, create=False) as session:
            return read(session.model)
    except JoinError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return {}
        if exc.code == ErrorCode.READ_ONLY:
            return None
        raise
