"""Models and replicas without any network: determinism, timers, snapshots."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest

import million
from helpers import nested
from million.replica.model import Random, Replica, StateError, handler_names, is_json
from million.replica.state import digest_of, dump_state
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


# --- what restore takes, and what no payload can do ------------------------------------------


def clock_state() -> dict[str, Any]:
    """The state of a Clockwork replica with a subscription, timers and int-keyed scores."""
    replica = Replica.create(Clockwork, "clock", None)
    replica.apply(events((12, "x"))[0])
    return replica.snapshot()


def test_a_snapshot_restores_to_the_same_digest_through_json():
    state = clock_state()
    restored = Replica.restore(Clockwork, "clock", orjson.loads(dump_state(state)))
    assert restored.digest() == digest_of(state)


def spoil(path: str, value: Any) -> dict[str, Any]:
    """``clock_state()`` with the member at ``path`` (keys and indexes split by /) set to ``value``."""
    state = orjson.loads(dump_state(clock_state()))
    *parents, last = path.split("/")
    target: Any = state
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    elif value is DELETE:
        del target[last]
    else:
        target[last] = value
    return state


DELETE = object()
DEEP = nested(300)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("futures/0/2", "__init_subclass__"),
        ("futures/0/2", "missing_method"),
        ("futures/0/2", "_guard"),
        ("futures/0/2", "init_unknown"),
        ("futures/0/2", ["chime"]),
        ("futures/0/3", "x"),
        ("futures/0/0", -1),
        ("futures/0/0", 5),  # due before now
        ("futures/0/0", 2**63),
        ("futures/0/1", 0),
        ("futures/0/1", 99),  # numbered beyond future_count
        ("futures/0", [40, 1, "chime"]),
        ("futures/1/1", 4),  # two futures numbered alike
        ("futures", {"0": [40, 1, "chime", []]}),
        ("subscriptions/poke", ["_guard"]),
        ("subscriptions/poke", ["poke", "poke"]),
        ("subscriptions/poke", ["subscribe"]),
        ("subscriptions/poke", ["now"]),
        ("subscriptions/poke", []),
        ("subscriptions/poke", "poke"),
        ("subscriptions", [["poke", ["poke"]]]),
        ("seq", -1),
        ("seq", 2**64 - 1),
        ("seq", 1.0),
        ("seq", True),
        ("now", "12"),
        ("future_count", None),
        ("random", 2**64),
        ("random", -1),
        ("model", [1]),
        ("model", None),
        ("model/extra", 1),
        ("model/log", DELETE),
        ("model/scores", {"01": "x"}),
        ("model/scores", {"9" * 5000: "x"}),
        ("model/scores", {"1e3": "x"}),
        ("model/log", DEEP),
        ("model/log", [[2**64]]),
        ("extra", 1),
        ("random", DELETE),
    ],
)
def test_restore_takes_only_a_state_the_model_could_have_produced(path, value):
    name = Clockwork.model_name
    with pytest.raises(ValueError, match="clock: "):
        Replica.restore(Clockwork, "clock", spoil(path, value))
    assert Clockwork.model_name == name


@pytest.mark.parametrize("state", [None, [], "state", 7, {}])
def test_restore_refuses_what_is_no_state_at_all(state):
    with pytest.raises(ValueError, match="not a state of Clockwork"):
        Replica.restore(Clockwork, "clock", state)


def test_a_forged_timer_cannot_rename_the_model_class():
    state = spoil("futures/0/2", "__init_subclass__")
    state["futures"][0][3] = ["forged"]
    with pytest.raises(ValueError, match="future"):
        Replica.restore(Clockwork, "clock", state)
    assert Clockwork.model_name == "test-clockwork"


def test_handler_names_are_the_public_functions_the_model_class_defines():
    @attrs.define
    class Derived(Clockwork, name="test-derived"):
        def extra(self, value: Any) -> None:
            pass

        def _hidden(self) -> None:
            pass

    assert handler_names(Clockwork) == {"init", "poke", "chime"}
    assert handler_names(Derived) == {"init", "poke", "chime", "extra"}


def test_models_subscribe_and_schedule_public_methods_only():
    @attrs.define
    class Private(million.Model, name="test-private"):
        calls: int = 0

        def init(self, options: Any) -> None:
            self.subscribe("poke", self._poke)

        def _poke(self, value: Any) -> None:
            self.calls += 1

    replica = Replica.create(Private, "private", None)
    assert replica.subscriptions == {}  # init failed, logged
    with pytest.raises(TypeError, match="public methods"):
        replica.model.future(5, replica.model._poke)


def test_an_unknown_handler_name_is_logged_not_raised(caplog):
    replica = Replica.create(Clockwork, "clock", None)
    replica.subscriptions["poke"].append("missing_method")
    replica.future(1, "missing_method", ("x",))
    replica.futures.append((2, 99, "_guard", ["poke"]))
    first, second = events((1, "a"), (50, "b"))
    assert replica.apply(first) and replica.apply(second)
    replica.advance(100)
    assert [entry[1] for entry in replica.model.log][:2] == ["a", "after a"]
    assert "model handler missing_method failed" in caplog.text
    assert "model handler _guard failed" in caplog.text


@pytest.mark.parametrize("ms", [2**63, 2**63 - 5, -1, 1.5, True])
def test_a_timer_due_beyond_64_bits_fails_its_handler_only(ms):
    @attrs.define
    class Scheduler(million.Model, name="test-scheduler"):
        fired: int = 0

        def init(self, options: Any) -> None:
            self.subscribe("later", self.later)

        def later(self, delay: Any) -> None:
            self.future(delay, self.fire)

        def fire(self) -> None:
            self.fired += 1

    replicas = [Replica.create(Scheduler, "sched", None) for _ in range(2)]
    for replica in replicas:
        replica.apply(Event("sched", 1, 10, "v1", "later", ms))
        replica.advance(2**63 - 1)
    assert replicas[0].futures == [] and replicas[0].model.fired == 0
    assert replicas[0].digest() == replicas[1].digest()


def test_a_state_json_cannot_hold_raises_a_state_error():
    replica = Replica.create(Clockwork, "clock", None)
    replica.apply(Event("clock", 1, 1, "v1", "poke", DEEP))
    with pytest.raises(StateError, match="cannot be encoded"):
        replica.digest()
    replica.model.log[0][1] = 2**64
    with pytest.raises(StateError):
        dump_state(replica.snapshot())


@pytest.mark.parametrize(
    ("value", "fits"),
    [
        (None, True),
        ("x" * 10_000, True),
        (2**64 - 1, True),
        (-(2**63), True),
        (2**64, False),
        (-(2**63) - 1, False),
        (1.5, True),
        (float("nan"), False),
        (float("inf"), False),
        ({"a": [1, {"b": None}]}, True),
        ({1: "a"}, False),
        ((1, 2), False),
        ({"a"}, False),
        (b"x", False),
        (nested(32), True),
        (nested(33), False),
        ({"k": nested(31)}, True),
        ({"k": nested(32)}, False),
    ],
)
def test_is_json_tells_which_values_a_model_may_keep(value, fits):
    assert is_json(value) is fits
