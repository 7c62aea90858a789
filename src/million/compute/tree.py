"""The shape of the partition tree: how partitions split among sessions, and what one
session computes (its ``Spec``, whose JSON form is the session's creation options).

Integer arithmetic only: every participant must agree on the shape.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Spec", "depth", "share", "split"]


def split(total: int, fanout: int) -> list[tuple[int, int]]:
    """``(start, size)`` of each of ``fanout`` children sharing ``total`` partitions.

    Sizes differ by at most one, the larger first; integer arithmetic only.
    """
    return [share(total, fanout, index) for index in range(fanout)]


def share(total: int, fanout: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of child ``index`` in ``split(total, fanout)``."""
    base, extra = divmod(total, fanout)
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

    @property
    def leaf(self) -> bool:
        return self.partitions <= self.fanout

    @property
    def count(self) -> int:
        """Partitions (leaf) or children (interior) of this session."""
        return self.partitions if self.leaf else self.fanout

    def child(self, name: str, index: int, input: Any) -> tuple[str, dict[str, Any]]:
        """Name and options of child ``index`` of the session ``name``."""
        start, size = share(self.partitions, self.fanout, index)
        spec = attrs.evolve(
            self, input=input, partitions=size, start=self.start + start, parent=name, index=index
        )
        return f"{name}-{index}", spec.to_options()

    def to_options(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Spec:
        return cls(**options)
