"""Nurseries for context managers that run background tasks around their caller's block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A trio nursery that raises a lone exception as itself, not inside an ExceptionGroup.

    Used where a library context manager owns background tasks, so that an error in the
    caller's block (or a failure to start) reaches the caller as the error it is.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf = _single(group)
        if leaf is None:
            raise
        raise leaf from leaf.__cause__


def _single(group: BaseExceptionGroup) -> BaseException | None:
    while len(group.exceptions) == 1:
        only = group.exceptions[0]
        if not isinstance(only, BaseExceptionGroup):
            return only
        group = only
    return None
