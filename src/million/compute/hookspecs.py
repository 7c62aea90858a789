"""The hooks a million plugin implements.

A plugin is a module (or object) with functions marked ``@million.hookimpl``,
published under the entry-point group ``million``. Hooks may be plain functions or
``async`` functions. Plain functions run in a worker thread, so a CPU-bound hook
does not stall the participant's event loop; async hooks run on the event loop and
must not block it. Every value a hook returns must be JSON-serialisable.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("million")
hookimpl = pluggy.HookimplMarker("million")


@hookspec
def check_options(input: Any, options: dict[str, Any]) -> None:
    """Refuse a run before it starts: raise ``ValueError`` (or ``TypeError``) saying what is
    wrong with its ``input`` or ``options``. Optional.

    ``million run`` calls it before it posts the run, and prints the message as one line;
    workers call it before they join a run, and skip a run it refuses. A hook that raises
    later, while the run computes, is a failed attempt instead (``--max-failures``).
    """


@hookspec(firstresult=True)
def prepare_inputs(input: Any, count: int, options: dict[str, Any]) -> list[Any]:
    """Split a session's ``input`` into ``count`` inputs, one per partition or child.

    Called once per session: in a leaf session ``count`` is its number of partitions,
    in an interior session its number of children. Must return a list of exactly
    ``count`` values.
    """


@hookspec(firstresult=True)
def compute(input: Any, index: int, options: dict[str, Any]) -> Any:
    """Compute one partition from the input prepared for it.

    ``index`` is the partition's global number, 0 <= index < the run's partitions.
    """


@hookspec(firstresult=True)
def collect_results(outputs: list[Any], options: dict[str, Any]) -> Any:
    """Combine the outputs of a session's partitions or children, given in index order."""


@hookspec
def log(record: dict[str, Any]) -> None:
    """Observe what happens: every plugin's ``log`` is called with each record.

    A record has at least ``event`` (``prepared``, ``computed``, ``collected``,
    ``failed``) and ``session``; ``computed`` records carry ``indexes``, the global
    numbers of the partitions computed; ``failed`` ones ``hook``, ``error`` and, for
    ``compute``, ``index``. A ``log`` that raises is logged and otherwise ignored.
    """
