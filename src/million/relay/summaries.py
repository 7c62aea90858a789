"""Session summaries: what a session's members say it is at, for status requests and the web port.

Part of the relay core (sans-IO). ``Summaries`` keeps the latest summary of each
session as received (the reflector relays the bytes, it never encodes them again), the
most recently updated ``ReflectorConfig.summaries`` of them. ``receive`` checks a
summary before it is kept: at most ``max_summary`` bytes, of an event the session has
reached, JSON nested at most ``max_depth`` deep. ``asked`` finds the summaries a status
request names, where ``*SUFFIX`` stands for every name ending in SUFFIX.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from million.relay.checks import check_json
from million.relay.config import ReflectorConfig
from million.relay.gate import Refused
from million.wire.protocol import ErrorCode, ProtocolError, Summarize

__all__ = ["Summaries"]

MATCHING = 1000  # names a status gets for its ``*SUFFIX`` patterns, the most recently summarized


class Summaries:
    """The latest summary of each session, as received; the most recently updated kept."""

    def __init__(self, config: ReflectorConfig) -> None:
        self.config = config
        self.limit = config.summaries
        self._kept: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # name -> (seq, summary)

    def receive(self, message: Summarize, seq: int) -> None:
        """Keep the summary ``message`` of a session whose last event is ``seq``;
        ``ProtocolError`` (``Refused`` if it is too large) if it is not one to keep."""
        raw = message.data
        if len(raw) > self.config.max_summary:
            raise Refused(
                "summary", f"a summary may have at most {self.config.max_summary} bytes, not {len(raw)}"
            )
        if message.seq > seq + 1:
            raise ProtocolError(ErrorCode.UNEXPECTED, f"a summary of event {message.seq}, after {seq}")
        check_json(raw, self.config.max_depth, "a summary")
        self.keep(message.session, message.seq, raw)

    def keep(self, name: str, seq: int, raw: bytes) -> None:
        """Keep ``raw`` as the summary of ``name`` as of event ``seq``, unless a later one is kept."""
        if seq < self._kept.get(name, (0, b""))[0]:
            return  # a participant that lags behind described an older state
        self._kept[name] = (seq, raw)
        self._kept.move_to_end(name)
        if len(self._kept) > self.limit:
            self._kept.popitem(last=False)

    def names(self) -> list[str]:
        return list(self._kept)

    def get(self, names: Iterable[str]) -> dict[str, bytes]:
        kept = self._kept
        return {name: kept[name][1] for name in names if name in kept}

    def asked(self, names: list[str]) -> dict[str, bytes]:
        """The summaries a status asks for by ``names``; ``*SUFFIX`` stands for every name
        ending in SUFFIX (at most a thousand)."""
        suffixes = tuple(name[1:] for name in names if name.startswith("*"))
        if suffixes:
            matching = [name for name in self._kept if name.endswith(suffixes)]
            names = [name for name in names if not name.startswith("*")] + matching[-MATCHING:]
        return self.get(names)
