"""The shape of the partition tree: how partitions split among sessions, and what one
session computes (its ``Spec``, whose JSON form is the session's creation options).

The minimal-depth split: a session of n partitions, with d the smallest depth such that
fanout**d >= n, is a leaf if d <= 1; otherwise it has ceil(n / fanout**(d - 1)) children
sharing n evenly. Leaves are as full as the fanout allows and no child is empty: 100,000
over 100 makes 1 + 10 + 1,000 sessions. Integer arithmetic only: every participant must
agree on the shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from million.replica.state import MAX_DEPTH, describe, is_json
from million.wire.protocol import SESSION_NAME

__all__ = [
    "MAX_FANOUT",
    "MAX_PARTITIONS",
    "Spec",
    "SpecError",
    "branches",
    "depth",
    "share",
    "share_among",
    "split",
]

#: A session keeps several lists of ``min(partitions, fanout)`` entries: at most this many.
MAX_FANOUT = 1_000_000
#: Partitions of a run. Global partition numbers and counts of done partitions stay far
#: inside 64 bits, and the tree is at most 50 levels deep (fanout 2).
MAX_PARTITIONS = 10**15
MAX_TEXT = 200  # characters of a plugin name or version
MAX_VERIFY = 100  # identities that must agree on a value
MAX_TRUSTED = 10_000  # identities a run's trust map names
MAX_FAILURES = 100  # failed attempts a value may have before the run fails


class SpecError(ValueError):
    """Options that do not describe a session of the partition tree."""


def branches(total: int, fanout: int) -> int:
    """Children of a session of ``total`` partitions, 0 for a leaf: with d the smallest
    depth such that fanout**d >= total, as few as fit in depth d - 1 each."""
    if total <= fanout:
        return 0
    capacity = fanout  # partitions a child of depth d - 1 may hold
    while capacity * fanout < total:
        capacity *= fanout
    return -(-total // capacity)


def split(total: int, fanout: int) -> list[tuple[int, int]]:
    """``(start, size)`` of each child of a session of ``total`` partitions (none for a
    leaf). Sizes differ by at most one, the larger first; integer arithmetic only."""
    children = branches(total, fanout)
    return [share_among(total, children, index) for index in range(children)]


def share(total: int, fanout: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of child ``index`` in ``split(total, fanout)``."""
    return share_among(total, branches(total, fanout), index)


def share_among(total: int, children: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of child ``index`` when ``total`` is shared among ``children``
    (``share``, with the number of children known)."""
    base, extra = divmod(total, children)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def depth(total: int, fanout: int) -> int:
    """Levels of sessions for ``total`` partitions: the smallest k with fanout**k >= total."""
    levels, capacity = 1, fanout
    while capacity < total:
        levels, capacity = levels + 1, capacity * fanout
    return levels


@attrs.frozen
class Spec:
    """What one session computes; its JSON form is the session's creation options."""

    plugin: str
    version: str
    input: Any
    partitions: int
    fanout: int
    options: dict[str, Any] = attrs.Factory(dict)
    start: int = 0  # global number of the session's first partition
    parent: str | None = None
    index: int | None = None  # this session's index in its parent
    verify: int = 1  # distinct identities that must report one value before it is taken
    adaptive: bool = False  # a trusted identity's value may be taken alone (BOINC's adaptive replication)
    max_copies: int = 0  # identities a value may be asked of before the run fails; 0: 2 * verify + 1
    max_rejections: int = 3  # rejected results of an identity beyond which it gets no more work
    max_failures: int = 3  # failed attempts at a partition or step before the run fails
    trust: dict[str, int] = attrs.Factory(dict)  # identity -> consecutive valid results, from the ledger
    alone: str = ""  # the trusted identity this session was handed to alone (adaptive), if any

    @property
    def copies(self) -> int:
        """How many identities a value may be asked of, at most."""
        return self.max_copies or 2 * self.verify + 1

    @property
    def leaf(self) -> bool:
        return self.partitions <= self.fanout

    @property
    def count(self) -> int:
        """Partitions (leaf) or children (interior) of this session."""
        return self.partitions if self.leaf else branches(self.partitions, self.fanout)

    def child(
        self, name: str, index: int, input: Any, alone: str = "", copy: int = 0
    ) -> tuple[str, dict[str, Any]]:
        """Name and options of child ``index`` of the session ``name``: its ``copy`` (one
        per identity it was handed to, under verification), worked ``alone`` by one
        identity or not."""
        start, size = share(self.partitions, self.fanout, index)
        spec = attrs.evolve(
            self,
            input=input,
            partitions=size,
            start=self.start + start,
            parent=name,
            index=index,
            alone=alone,
        )
        return f"{name}-{index}" + (f"c{copy}" if copy else ""), spec.to_options()

    def to_options(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_options(cls, options: Any) -> Spec:
        """The spec whose ``to_options`` gave ``options``; ``SpecError`` (a ``ValueError``)
        saying what is wrong with anything else."""
        if type(options) is not dict:
            raise SpecError(f"options must be an object, not {type(options).__name__}")
        _check_fields(options)
        for name, (valid, rule) in _RULES.items():
            if name in options and not valid(options[name]):
                raise SpecError(f"{name} must be {rule}, not {describe(options[name])}")
        spec = cls(**options)
        _check_consistent(spec)
        return spec


def _text(value: Any) -> bool:
    return type(value) is str and len(value) <= MAX_TEXT


def _whole(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: type(value) is int and low <= value <= high


def _parent(value: Any) -> bool:
    return value is None or (type(value) is str and SESSION_NAME.fullmatch(value) is not None)


def _index(value: Any) -> bool:
    return value is None or _whole(0, MAX_FANOUT - 1)(value)


def _plugin_options(value: Any) -> bool:
    return type(value) is dict and is_json(value)


def _trust(value: Any) -> bool:
    if type(value) is not dict or len(value) > MAX_TRUSTED:
        return False
    return all(_text(name) and _whole(0, 2**62)(count) for name, count in value.items())


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "plugin": (_text, f"a string of at most {MAX_TEXT} characters"),
    "version": (_text, f"a string of at most {MAX_TEXT} characters"),
    "input": (is_json, f"a JSON value nested at most {MAX_DEPTH} deep"),
    "partitions": (_whole(1, MAX_PARTITIONS), f"an integer from 1 to {MAX_PARTITIONS:,}"),
    "fanout": (_whole(2, MAX_FANOUT), f"an integer from 2 to {MAX_FANOUT:,}"),
    "options": (_plugin_options, f"a JSON object nested at most {MAX_DEPTH} deep"),
    "start": (_whole(0, MAX_PARTITIONS), f"an integer from 0 to {MAX_PARTITIONS:,}"),
    "parent": (_parent, "null or a session name"),
    "index": (_index, f"null or an integer from 0 to {MAX_FANOUT - 1:,}"),
    "verify": (_whole(1, MAX_VERIFY), f"an integer from 1 to {MAX_VERIFY}"),
    "adaptive": (lambda value: type(value) is bool, "true or false"),
    "max_copies": (_whole(0, MAX_VERIFY * 4), f"an integer from 0 to {MAX_VERIFY * 4}"),
    "max_rejections": (_whole(0, 2**31), "a whole number"),
    "max_failures": (_whole(1, MAX_FAILURES), f"an integer from 1 to {MAX_FAILURES}"),
    "trust": (_trust, f"an object of at most {MAX_TRUSTED:,} identities, each a whole number"),
    "alone": (_text, f"a string of at most {MAX_TEXT} characters"),
}
_REQUIRED = ("plugin", "version", "input", "partitions", "fanout")


def _check_fields(options: dict[str, Any]) -> None:
    missing = [name for name in _REQUIRED if name not in options]
    extra = [describe(name) for name in options if name not in _RULES]
    if missing or extra:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(extra)}"] if extra else []
        raise SpecError(f"options must have the fields of a Spec: {'; '.join(problems)}")


def _check_consistent(spec: Spec) -> None:
    if (spec.parent is None) != (spec.index is None):
        raise SpecError("parent and index must both be given (a child session) or both be null (a root)")
    if spec.index is not None and spec.index >= spec.fanout:
        raise SpecError(f"index {spec.index} is not below the fanout {spec.fanout}")
    if spec.max_copies and spec.max_copies < spec.verify:
        raise SpecError(f"max_copies {spec.max_copies} is below verify {spec.verify}")
    if spec.start + spec.partitions > MAX_PARTITIONS:
        raise SpecError(
            f"partitions from {spec.start} to {spec.start + spec.partitions} go beyond {MAX_PARTITIONS:,}"
        )
