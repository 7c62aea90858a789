"""Votes on values reported by distinct identities, the steps identities are given to
do, and the tally of who reported what.

Part of the ``Computation`` model (deterministic, no I/O): a ``Ballot`` gathers the
values that identities report for one thing (a partition's output, a session's inputs,
its output) until ``needed`` identities agree on one, compared by their encoded bytes.
A ``Task`` is a session's prepare or collect step: the identities given it, the views
doing it now, and the ballot of what they reported.
A ``Tally`` keeps, per identity, how many of its reports were validated (they agreed
with the value taken), rejected, or are still pending, and the compute time claimed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs

from million.wire import codec

__all__ = ["COUNTS", "TRUSTED", "Ballot", "Tally", "Task", "is_tally", "key_of"]

COUNTS = ("submitted", "validated", "rejected", "pending", "claimed_ms", "credit_ms")
TRUSTED = 10  # consecutive valid results that make an identity trusted (BOINC's default)
SHORT = 32  # encoded values up to this many bytes are their own key


def key_of(value: Any) -> str:
    """What a value is compared by: its encoding, or a digest of a long one."""
    raw = codec.dumps(value)
    return raw.decode() if len(raw) <= SHORT else "#" + hashlib.sha256(raw).hexdigest()[:32]


@attrs.define
class Ballot:
    """The values reported for one thing, by identity, until one is taken."""

    votes: dict[str, str] = attrs.Factory(dict)  # identity -> key of what it reported
    values: dict[str, Any] = attrs.Factory(dict)  # key -> value, until one is taken
    claimed: dict[str, int] = attrs.Factory(dict)  # identity -> ms it claimed for its report
    tallies: dict[str, Any] = attrs.Factory(dict)  # identity -> the tally of its copy of a child
    credited: bool = False  # a tally of the value taken was counted
    taken: str | None = None  # the key of the value taken

    def vote(self, identity: str, value: Any, ms: int = 0) -> str:
        """Record ``identity``'s report; its key. A second report of an identity is not
        counted (the caller checks ``identity in votes`` first)."""
        key = key_of(value)
        self.votes[identity] = key
        self.values.setdefault(key, value)
        if ms:
            self.claimed[identity] = ms
        return key

    def agreed(self, needed: int) -> str | None:
        """The key that ``needed`` identities reported, if one has."""
        counts: dict[str, int] = {}
        for key in self.votes.values():
            counts[key] = counts.get(key, 0) + 1
            if counts[key] >= needed:
                return key
        return None

    @property
    def split(self) -> bool:
        """Whether the reports disagree."""
        return len(set(self.votes.values())) > 1

    def take(self, key: str) -> Any:
        """Take the value of ``key``; the others are forgotten."""
        value = self.values[key]
        self.taken, self.values = key, {}
        return value


@attrs.define
class Task:
    """A step (prepare or collect) that ``wanted`` identities are given, each doing it
    through one of its views at a time; ``views`` maps present views to their identity."""

    wanted: int = 1
    holders: list[str] = attrs.Factory(list)  # views doing it now
    claimants: list[str] = attrs.Factory(list)  # identities it was given to
    ballot: Ballot = attrs.Factory(Ballot)

    def give(self, view: str, identity: str, views: dict[str, str]) -> None:
        """Let ``view`` do the step: its identity has it already (an earlier view of it left
        before reporting), or one more identity is wanted."""
        if not self.needs(identity, views):
            return
        if identity not in self.claimants:
            self.claimants.append(identity)
        self.holders.append(view)

    def needs(self, identity: str, views: dict[str, str]) -> bool:
        """Whether a view of ``identity`` would be given the step."""
        if self.ballot.taken or identity in self.ballot.votes:
            return False
        if identity in self.claimants:  # unless a view of it holds it
            return not any(views.get(view) == identity for view in self.holders)
        return len(self.claimants) < self.wanted

    def release(self, view: str, identity: str, views: dict[str, str]) -> None:
        """``view`` of ``identity`` left (``views`` no longer has it): as if it failed the step,
        the next view to claim it takes it. It does not pass to another view of the identity,
        which may not be working the session at all (a process's own view of a run's root)."""
        if view in self.holders:
            self.drop(view, identity, views)

    def drop(self, view: str, identity: str, views: dict[str, str]) -> None:
        """``view`` (of ``identity``), which holds the step, failed it: it holds it no more,
        and its identity's place goes unless another of its views holds the step."""
        self.holders.remove(view)
        if all(views.get(other) != identity for other in self.holders):
            self.claimants = [who for who in self.claimants if who != identity]

    def reported(self, identity: str, views: dict[str, str]) -> None:
        """``identity`` reported: none of its views does the step any more."""
        self.holders = [view for view in self.holders if views.get(view) != identity]


@attrs.define
class Tally:
    """Per identity: reports submitted, validated, rejected and pending; ms claimed and credited."""

    counts: dict[str, dict[str, int]] = attrs.Factory(dict)

    def add(self, identity: str, **amounts: int) -> None:
        entry = self.counts.setdefault(identity, dict.fromkeys(COUNTS, 0))
        for name, amount in amounts.items():
            entry[name] += amount

    def rejected(self, identity: str) -> int:
        return self.counts.get(identity, {}).get("rejected", 0)

    def submit(self, identity: str, ms: int = 0) -> None:
        self.add(identity, submitted=1, pending=1, claimed_ms=ms)

    def taken(self, identity: str, reports: int, ms: int) -> None:
        """``reports`` of ``identity`` that were taken as they came, claiming ``ms``."""
        self.add(identity, submitted=reports, validated=reports, claimed_ms=ms, credit_ms=ms)

    def judge(self, ballot: Ballot, identities: list[str] | None = None) -> None:
        """The pending reports of ``ballot`` (of ``identities``; None: all) are validated or
        rejected by the value taken."""
        for identity in ballot.votes if identities is None else identities:
            if ballot.votes[identity] == ballot.taken:
                self.add(identity, pending=-1, validated=1, credit_ms=ballot.claimed.get(identity, 0))
            else:
                self.add(identity, pending=-1, rejected=1)

    def merge(self, other: Any) -> None:
        """Add a tally reported with a child's output (already checked by ``is_tally``)."""
        for identity, entry in other.items():
            self.add(identity, **entry)


def is_tally(value: Any) -> bool:
    """Whether ``value`` is a tally as ``Tally.counts`` holds it (from a child)."""
    if type(value) is not dict or len(value) > 100_000:
        return False
    for identity, entry in value.items():
        if type(identity) is not str or type(entry) is not dict or set(entry) != set(COUNTS):
            return False
        if not all(type(count) is int and -(2**62) < count < 2**62 for count in entry.values()):
            return False
    return True
