"""Views: the local, unreplicated side of a session.

A view reads its session's model, reacts to what the model publishes, does work
(its ``run`` task lives in the session's nursery) and publishes events back to the
model through the reflector. It never writes model state itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from million.replica.model import Model

__all__ = ["Host", "View"]


class Host(Protocol):
    """What a view needs of its session (``million.Session`` is one)."""

    @property
    def model(self) -> Any: ...

    @property
    def view_id(self) -> str: ...

    def publish(self, topic: str, data: Any = None) -> bool: ...

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None: ...


class View:
    """Base class of views; one instance per participant per session."""

    def __init__(self, session: Host) -> None:
        self.session = session

    @property
    def model(self) -> Model:
        """The session's model; replaced by a fresh replica after a resync."""
        model: Model = self.session.model
        return model

    @property
    def view_id(self) -> str:
        return self.session.view_id

    def publish(self, topic: str, data: Any = None) -> bool:
        """Send an event to the model; False when it was dropped because the connection is down."""
        return self.session.publish(topic, data)

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        """Call ``handler(data)`` after each event whose handling made the model publish ``topic``."""
        self.session.subscribe(topic, handler)

    async def run(self) -> None:
        """The view's work; runs in the session's nursery until it returns or the session ends."""

    def resynced(self) -> None:
        """Called after a reconnect rebuilt the model: the view id changed and events published
        while disconnected were dropped."""
