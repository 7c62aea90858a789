"""Models and replicas without any network: determinism, timers, snapshots."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import million
from million.replica.model import Random, Replica
from million.wire.protocol import Event


@attrs.define
class Clockwork(million.Model, name="test-clockwork"):
    log: list[list[Any]] = attrs.Factory(list)
    scores: dict[int, str] = attrs.Factory(dict)

    def init(self, options: Any) -> None:
        self.subscribe("poke", self.poke)
        self.future(30, self.chime, "a")
        self.future(10, self.chime, "b")

    def poke(self, value: Any) -> None:
        self.log.append(["poke", value, self.now, self.sender, self.random.randbelow(100)])
        self.scores[len(self.log)] = str(value)
        self.future(5, self.chime, f"after {value}")

    def chime(self, label: str) -> None:
        self.log.append(["chime", label, self.now, self.sender])
        if label == "b":
            self.future(10, self.chime, "b again")


def events(*pairs: tuple[int, Any]) -> list[Event]:
    return [Event("clock", seq, time, "v1", "poke", value) for seq, (time, value) in enumerate(pairs, 1)]


def run(replica: Replica, stream: list[Event], ticks: list[int]) -> Replica:
    for event in stream:
        for tick in ticks:
            if tick < event.time:
                replica.advance(tick)
        replica.apply(event)
    for tick in ticks:
        replica.advance(tick)
    return replica


def test_timers_fire_in_due_order_whatever_the_tick_granularity():
    stream = events((12, "x"), (40, "y"))
    fine = run(Replica.create(Clockwork, "clock", None), stream, list(range(0, 100)))
    coarse = run(Replica.create(Clockwork, "clock", None), stream, [99])
    assert fine.digest() == coarse.digest()
    labels = [entry[1] for entry in fine.model.log]
    assert labels == ["b", "x", "after x", "b again", "a", "y", "after y"]
    assert [entry[2] for entry in fine.model.log] == [10, 12, 17, 20, 30, 40, 45]
    assert fine.model.log[0][3] is None  # timers have no sender
    assert fine.model.log[1][3] == "v1"


def test_a_restored_replica_continues_exactly_like_the_original():
    stream = events((12, "x"), (40, "y"), (41, "z"))
    original = Replica.create(Clockwork, "clock", None)
    for event in stream[:2]:
        original.apply(event)
    restored = Replica.restore(Clockwork, "clock", original.snapshot())
    assert restored.digest() == original.digest()
    assert restored.model.scores == original.model.scores  # integer keys survive JSON
    for replica in (original, restored):
        replica.apply(stream[2])
        replica.advance(100)
    assert restored.digest() == original.digest()


def test_events_already_applied_are_skipped_and_gaps_are_refused():
    replica = Replica.create(Clockwork, "clock", None)
    first, second, third = events((1, "a"), (2, "b"), (3, "c"))
    assert replica.apply(first)
    assert not replica.apply(first)
    with pytest.raises(LookupError):
        replica.apply(third)
    assert replica.apply(second)


def test_restoring_a_value_of_the_wrong_type_fails_loudly():
    replica = Replica.create(Clockwork, "clock", None)
    state = replica.snapshot()
    state["model"]["scores"] = {"1": 5}
    with pytest.raises(ValueError, match=r"snapshot does not fit Clockwork.*scores"):
        Replica.restore(Clockwork, "clock", state)


def test_a_failing_handler_is_logged_and_replicas_stay_equal(caplog):
    @attrs.define
    class Fragile(million.Model, name="test-fragile"):
        count: int = 0

        def init(self, options: Any) -> None:
            self.subscribe("poke", self.poke)

        def poke(self, value: Any) -> None:
            self.count += 1
            if value == "boom":
                raise ValueError("boom")

    replicas = [Replica.create(Fragile, "fragile", None) for _ in range(2)]
    for replica in replicas:
        for event in events((1, "boom"), (2, "fine")):
            replica.apply(event)
    assert replicas[0].digest() == replicas[1].digest()
    assert replicas[0].model.count == 2
    assert "boom" in caplog.text


def test_models_subscribe_their_own_methods_only():
    replica = Replica.create(Clockwork, "clock", None)
    with pytest.raises(TypeError):
        replica.model.subscribe("poke", print)


def test_models_are_named_by_their_class_or_by_name():
    class Unnamed(million.Model):
        pass

    assert Clockwork.model_name == "test-clockwork"
    assert Unnamed.model_name.endswith(
        "test_model.test_models_are_named_by_their_class_or_by_name.<locals>.Unnamed"
    )


def test_the_random_generator_is_deterministic_and_in_range():
    one, two = Random(42), Random(42)
    draws = [one.randbelow(10) for _ in range(1000)]
    assert draws == [two.randbelow(10) for _ in range(1000)]
    assert set(draws) == set(range(10))
    assert all(0 <= one.random() < 1 for _ in range(100))
    items = list(range(20))
    one.shuffle(items)
    assert sorted(items) == list(range(20))
    assert Random(7).next64() != Random(8).next64()
