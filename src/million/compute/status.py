"""What ``million status`` shows: a reflector's status, with the lobby's runs and their progress."""

from __future__ import annotations

from typing import Any

from million.compute.lobby import LOBBY, Lobby
from million.compute.progress import is_run_summary, progress_session
from million.replica.client import Client
from million.replica.session import JoinError, join
from million.replica.view import View
from million.wire.protocol import ErrorCode

__all__ = ["lobby_runs", "status_with_runs"]


async def status_with_runs(client: Client) -> dict[str, Any]:
    """The reflector's status (``Client.status``) with ``runs`` in place of ``summaries``:
    each run of the lobby, named, with the fields of its latest progress summary. With a
    token that only reads, the lobby cannot be joined: the runs are those with a progress
    summary, without their plugin."""
    runs = await lobby_runs(client)
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
    return info


def _progress(summary: Any) -> dict[str, Any]:
    """A progress summary's fields; none if it is not one (anyone may summarize any session)."""
    return summary if is_run_summary(summary) else {}


async def lobby_runs(client: Client) -> dict[str, dict[str, Any]] | None:
    """The runs the lobby lists, by name; none if nobody ever posted one, None if this
    client may not join (its token only reads)."""
    try:
        async with join(client, LOBBY, Lobby, View, create=False) as lobby:
            return dict(lobby.model.runs)
    except JoinError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return {}
        if exc.code == ErrorCode.READ_ONLY:
            return None
        raise
