"""Hostile payloads fed straight to models and to the client core, no sockets.

Whatever an event carries, a model ignores what is malformed or out of range, the same
way on every replica: two replicas fed the same events keep the same digest, the digest
can still be computed, and nothing is raised out of ``Replica.apply`` or out of
``ClientCore.receive``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from helpers import nested
from million.compute.computation import RETRY_AFTER, Computation
from million.compute.lobby import MAX_OPEN, Lobby
from million.compute.progress import Progress
from million.compute.tree import Spec, SpecError
from million.replica.core import ClientCore, Membership, State
from million.replica.model import Model, Replica, is_json
from million.wire import codec
from million.wire.protocol import (
    VIEW_EXIT,
    VIEW_JOIN,
    DigestRequest,
    Event,
    SnapshotRecord,
    SnapshotRequest,
    Sync,
    Welcome,
)
from models import Ledger

MAX64 = 2**64 - 1


DEEP = nested(300)
DIGITS = "9" * 5000

#: Values that belong nowhere: each is sent in every field of every event below.
HOSTILE: list[Any] = [
    DEEP,
    {"k": DEEP},
    MAX64,
    -MAX64,
    2**70,
    1.5,
    float("nan"),
    True,
    False,
    -1,
    0,
    None,
    "",
    DIGITS,
    [],
    {},
    [DEEP],
    [DEEP, 0, 0],
]


class Pair:
    """Two replicas of one session fed the same events, as two participants would be."""

    def __init__(self, model_cls: type[Model], options: Any, session: str = "R") -> None:
        self.session = session
        self.replicas = [Replica.create(model_cls, session, options) for _ in range(2)]
        self.seq = self.time = 0

    @property
    def model(self) -> Any:
        return self.replicas[0].model

    def send(self, topic: str, data: Any, view: str = "v1", after: int = 1) -> None:
        """Apply an event ``after`` ms of session time after the last."""
        self.seq, self.time = self.seq + 1, self.time + after
        for replica in self.replicas:
            assert replica.apply(Event(self.session, self.seq, self.time, view, topic, data))
            replica.advance(self.time)

    def check(self) -> str:
        """The digest both replicas agree on (computing it must not fail)."""
        one, two = (replica.digest() for replica in self.replicas)
        assert one == two
        restored = Replica.restore(type(self.model), self.session, codec.loads(codec.dumps(self.snapshot())))
        assert restored.digest() == one
        return one

    def snapshot(self) -> dict[str, Any]:
        return self.replicas[0].snapshot()


def shapes(template: dict[str, Any]) -> Iterator[Any]:
    """``template`` with each field replaced by each hostile value or left out, and the
    hostile values in place of the whole."""
    yield from HOSTILE
    for key in template:
        for value in HOSTILE:
            yield {**template, key: value}
        yield {k: v for k, v in template.items() if k != key}


# --- Computation ---------------------------------------------------------------------------

TEMPLATES: dict[str, Any] = {
    "request": {"id": 1, "want": 2},
    "end": {"results": [{"output": 1, "index": 0}], "next": {"id": 2, "want": 1}},
    "inputs": {"inputs": [1, 2, 3], "next": {"id": 1, "want": 1}},
    "output": {"x": 1},
    "claim": {"task": "prepare"},
    "failed": {"index": 0, "error": "ValueError: no"},
    "retry": {"please": 1},
    VIEW_JOIN: {"view": "v9"},
    VIEW_EXIT: {"view": "v1"},
}


@pytest.mark.parametrize("topic", list(TEMPLATES))
@pytest.mark.parametrize("leaf", [True, False])
def test_hostile_computation_events_fail_nothing_and_agree_everywhere(topic, leaf, caplog):
    spec = Spec("p", "1", 0, 3 if leaf else 27, 3, parent="P", index=0)
    pair = Pair(Computation, spec.to_options())
    pair.send(VIEW_JOIN, "v1")
    for data in shapes(TEMPLATES[topic]):
        pair.send(topic, data)
        pair.check()
    for data in HOSTILE:
        pair.send(topic, {"next": data, "index": data, "inputs": data, "output": data})
        pair.check()
    model = pair.model
    assert model.remaining == 3 - sum(model.completed)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_run_through_hostile_events_keeps_only_what_fits_and_still_finishes():
    pair = Pair(Computation, Spec("p", "1", 0, 3, 3, max_rejections=10**6).to_options())
    pair.send(VIEW_JOIN, "evil", view="evil")
    pair.send("claim", "prepare", view="evil")
    for topic, template in TEMPLATES.items():
        for data in shapes(template):
            pair.send(topic, data, view="evil")
    # Its first request, answered as its inputs came, gave it partition 0, which its
    # ``failed`` events then failed: it may take it on again once it has rested.
    pair.send("request", {"id": 99, "want": 3}, view="evil", after=RETRY_AFTER)
    for index in range(3):
        for data in HOSTILE:
            pair.send("end", {"results": [{"index": index, "output": data}]}, view="evil")
    model = pair.model
    assert all(model.completed) and model.remaining == 0
    assert all(is_json(output) for output in model.outputs) and is_json(model.inputs)
    pair.send("output", nested(33), view="evil")
    assert not model.done
    pair.send("output", "answer", view="evil")
    assert model.done and model.output == "answer"
    pair.check()


def test_invalid_computation_options_leave_an_inert_model_everywhere():
    inert = 0
    for options in shapes(Spec("p", "1", 0, 10, 3).to_options()):
        try:
            Spec.from_options(options)
            continue  # still valid (another JSON input, say)
        except SpecError:
            inert += 1
        pair = Pair(Computation, options)
        assert pair.model.count == 0 and pair.replicas[0].subscriptions == {}
        pair.send("output", "forged")
        assert not pair.model.done
        pair.check()
    assert inert > 100


def test_huge_partitions_and_fanout_allocate_nothing():
    options = Spec("p", "1", 0, 10**9, 10**9).to_options()
    pair = Pair(Computation, options)
    assert pair.model.outputs == [] and pair.model.count == 0
    pair.check()


# --- Progress ------------------------------------------------------------------------------


def progress(partitions: int = 9, fanout: int = 3) -> Pair:
    """A run of ``partitions`` over ``fanout`` (9 over 3: leaves R-0, R-1 and R-2 of three
    partitions each) with a process ``v1`` of 5 bots in it."""
    pair = Pair(Progress, {"root": "R", "partitions": partitions, "fanout": fanout}, session="R:progress")
    pair.send("bots", 5)
    return pair


def tell(pair: Pair, leaves: dict[str, Any], computed: int = 0, view: str = "v1") -> None:
    pair.send("progress", {"leaves": leaves, "computed": computed, "bots": 5}, view=view)


def test_leaves_count_as_they_go_and_each_partition_once():
    pair = progress()
    tell(pair, {"R-1": 2, "R-0": 1}, computed=3)
    assert pair.model.done == 3 and pair.model.by_child == {0: 1, 1: 2}
    tell(pair, {"R-1": 1})  # behind what was said: nothing changes
    tell(pair, {"R-1": 3, "R-2": 3})
    assert pair.model.done == 7 and pair.model.spans == [[3, 9]] and pair.model.partial == {0: [3, 1, 0]}
    tell(pair, {"R-1": 3, "R-0": 3, "R-2": 3})  # again, and more: each counted once
    assert pair.model.done == 9 and pair.model.spans == [[0, 9]] and pair.model.partial == {}
    assert pair.model.by_child == {0: 3, 1: 3, 2: 3}
    assert pair.model.processes["v1"]["done"] == 3
    pair.check()


def test_leaves_deeper_down_take_their_range_from_the_tree():
    pair = progress(10, 3)  # of 5, each in leaves of 3 and 2
    tell(pair, {"R-0-1": 2, "R-1-0": 3, "R-1-1": 1})
    assert pair.model.done == 6 and pair.model.spans == [[3, 8]] and pair.model.partial == {8: [2, 1, 1]}
    assert pair.model.by_child == {0: 2, 1: 4}


def test_a_copys_leaf_counts_the_partitions_of_its_original():
    pair = progress()
    tell(pair, {"R-1c1": 3})
    tell(pair, {"R-1": 3, "R-1c2": 3})
    assert pair.model.done == 3 and pair.model.spans == [[3, 6]]


@pytest.mark.parametrize("done", [MAX64, 2**70, 4, -1, 1.0, 2.5, True, "3", None, [3], DEEP, float("inf")])
def test_a_leaf_count_out_of_range_or_not_an_int_is_ignored(done):
    pair = progress()
    tell(pair, {"R-0": 2})
    pair.send("progress", {"leaves": {"R-1": done}, "computed": 0, "bots": 5})
    assert pair.model.done == 2 and pair.model.partial == {0: [3, 2, 0]}
    pair.check()


@pytest.mark.parametrize(
    "data",
    [
        {"leaves": {"R-1": 1}, "bots": 5},
        {"leaves": {"R-1": 1}, "computed": 1},
        {"leaves": {"R-1": 1}, "computed": -1, "bots": 5},
        {"leaves": {"R-1": 1}, "computed": MAX64, "bots": 5},
        {"leaves": {"R-1": 1}, "computed": 1, "bots": -1},
        {"leaves": {"R-1": 1}, "computed": 1, "bots": MAX64},
        {"leaves": {"R-1": 1}, "computed": 1, "bots": 5, "more": 1},
        {"leaves": [["R-1", 1]], "computed": 1, "bots": 5},
        {"leaves": {f"R-{i}": 1 for i in range(1001)}, "computed": 1, "bots": 5},
        None,
        DEEP,
    ],
)
def test_a_malformed_progress_event_is_ignored_whole(data):
    pair = progress()
    pair.send("progress", data)
    assert pair.model.done == 0 and pair.model.processes["v1"]["done"] == 0
    pair.check()


def test_a_process_that_comes_back_under_a_new_view_is_counted_again():
    pair = progress()
    tell(pair, {"R-0": 1}, computed=1)
    pair.send(VIEW_EXIT, "v1")  # its connection broke; it came back as v2
    assert pair.model.bots == 0 and not pair.model.processes["v1"]["present"]
    tell(pair, {"R-0": 3}, computed=2, view="v2")
    assert pair.model.done == 3 and pair.model.bots == 5
    assert [(entry["done"], entry["present"]) for entry in pair.model.processes.values()] == [
        (1, False),
        (2, True),
    ]
    pair.check()


@pytest.mark.parametrize(
    "name",
    [
        f"R-{DIGITS}",
        f"R-1-{DIGITS}",
        "R-1234567",  # beyond any index below the largest fanout
        "R-3",  # beyond this run's children
        "R-0-0",  # below a leaf
        "R",  # not a leaf
        "R-01",
        "R-1c0",
        "R-1c",
        "R-\u0663",  # a digit, but not an ASCII one
        "R-\u00b2",
        "R-",
        "R-1-",
        "R--1",
        "R-+1",
        "R- 1",
        "R-1x",
        "Rx-1",
        "S-1",
        "",
        "r",
    ],
)
def test_a_leaf_that_is_not_one_of_the_runs_leaves_is_ignored(name):
    pair = progress()
    tell(pair, {name: 1})
    assert pair.model.done == 0 and pair.model.partial == {} and pair.model.by_child == {}
    pair.check()


@pytest.mark.parametrize(("name", "first"), [("R-0-0", 0), ("R-99-99", 99), ("R-12-7", 12)])
def test_leaves_below_the_root_count_for_their_first_level_child(name, first):
    pair = progress(10**6, 100)
    tell(pair, {name: 2})
    assert pair.model.done == 2 and pair.model.by_child == {first: 2}


def test_a_root_that_is_a_leaf_counts_alone():
    pair = progress(5, 10)
    tell(pair, {"R": 2})
    assert pair.model.done == 2 and pair.model.by_child == {}
    tell(pair, {"R": 5})
    assert pair.model.done == 5 and pair.model.spans == [[0, 5]]


def test_spans_apart_are_bounded_and_what_does_not_fit_is_not_counted(monkeypatch):
    monkeypatch.setattr("million.compute.progress.MAX_SPANS", 2)
    pair = progress(100, 10)
    tell(pair, {"R-0": 10, "R-2": 10})
    tell(pair, {"R-4": 10})  # a third span apart: no room
    assert pair.model.done == 20 and pair.model.spans == [[0, 10], [20, 30]]
    tell(pair, {"R-1": 10, "R-4": 10})  # R-1 joins the two: room again
    assert pair.model.done == 40 and pair.model.spans == [[0, 30], [40, 50]]
    pair.check()


def test_the_history_keeps_a_bounded_number_of_points():
    pair = progress(10**6, 100)
    for second in range(1, 200):
        pair.send(
            "progress",
            {"leaves": {f"R-{second // 100}-{second % 100}": 100}, "computed": 0, "bots": 5},
            after=1000,
        )
    history = pair.model.history
    assert len(history) <= 61 and history[-1][1] <= pair.model.done == 199 * 100
    assert [done for _, done in history] == sorted(done for _, done in history)
    pair.check()


@contextmanager
def int_digits(limit: int) -> Iterator[None]:
    """Python's limit on digits converted to int set to ``limit`` (0: none), as
    PYTHONINTMAXSTRDIGITS would set it."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


def test_a_leaf_name_of_5000_digits_is_judged_alike_whatever_pythons_digit_limit():
    digests = []
    for limit in (0, 4300, 640):
        with int_digits(limit):
            pair = progress(10**6, 100)
            tell(pair, {f"R-{DIGITS}": 2, "R-3-0": 2})
            assert pair.model.by_child == {3: 2}
            digests.append(pair.check())
    assert len(set(digests)) == 1


@pytest.mark.parametrize("bots", [MAX64, 1_000_001, -1, 1.0, True, "5", None, DEEP])
def test_a_bots_count_out_of_range_is_ignored(bots):
    pair = progress()
    pair.send("bots", 5, view="v1")
    pair.send("bots", bots, view="v2")
    pair.send("bots", bots, view="v1")
    assert pair.model.bots == 5 and list(pair.model.processes) == ["v1"]
    pair.send(VIEW_EXIT, ["v1"])
    pair.send(VIEW_EXIT, "v1")
    assert pair.model.bots == 0
    pair.check()


@pytest.mark.parametrize(
    "options",
    [
        {},
        None,
        [],
        {"root": "R"},
        {"root": "R", "partitions": 10},
        {"root": "R", "partitions": 10, "fanout": 1},
        {"root": "R", "partitions": 10, "fanout": MAX64},
        {"root": "R", "partitions": MAX64},
        {"root": "R", "partitions": 10**15 + 1},
        {"root": "R", "partitions": 0},
        {"root": "R", "partitions": True},
        {"root": "R", "partitions": 1.0},
        {"root": ["R"], "partitions": 10},
        {"root": "bad name", "partitions": 10},
        {"root": DIGITS, "partitions": 10},
    ],
)
def test_progress_with_invalid_options_counts_nothing(options):
    pair = Pair(Progress, options, session="R:progress")
    pair.send("bots", 3)
    tell(pair, {"R-0": 1})
    assert pair.model.done == 0 and pair.model.bots == 0 and pair.replicas[0].subscriptions == {}
    pair.check()


# --- Lobby ---------------------------------------------------------------------------------

POST = {"name": "run-1", "plugin": "demo", "version": "1.0", "partitions": 100, "fanout": 10}


@pytest.mark.parametrize("data", list(shapes(POST)))
def test_a_post_is_taken_only_when_every_field_fits(data):
    pair = Pair(Lobby, None, session="million-lobby")
    pair.send("post", data)
    assert bool(pair.model.runs) == fits(data)
    pair.check()


def fits(data: Any) -> bool:
    """Whether a shape of ``POST`` is a valid post after all (an empty version is one)."""
    if not (type(data) is dict and data.keys() == POST.keys()):
        return False
    if not all(type(data[key]) is type(POST[key]) for key in POST):
        return False
    texts = 1 <= len(data["name"]) <= 190 and len(data["plugin"]) <= 200 and len(data["version"]) <= 200
    return texts and 1 <= data["partitions"] <= 10**15 and 2 <= data["fanout"] <= 10**6


@pytest.mark.parametrize(
    "name", ["a" * 191, "bad name", "", "x/y", "r\u00e9", 7, None, ["run"], {"run": 1}, DIGITS]
)
def test_a_post_whose_name_is_no_run_name_is_ignored(name):
    pair = Pair(Lobby, None, session="million-lobby")
    pair.send("post", {**POST, "name": name})
    assert pair.model.runs == {}
    pair.check()


def test_the_lobby_keeps_a_bounded_number_of_open_runs():
    pair = Pair(Lobby, None, session="million-lobby")
    for index in range(MAX_OPEN + 5):
        pair.send("post", {**POST, "name": f"run-{index}"})
    assert len(pair.model.open_runs()) == MAX_OPEN
    pair.send("done", {"name": "run-0", "answer": 1})
    pair.send("post", {**POST, "name": "late"})
    assert "late" in pair.model.runs and len(pair.model.open_runs()) == MAX_OPEN
    pair.check()


@pytest.mark.parametrize("answer", [DEEP, {"k": DEEP}, nested(33), 2**70, float("nan")])
def test_a_done_whose_answer_a_model_cannot_keep_is_ignored(answer):
    pair = Pair(Lobby, None, session="million-lobby")
    pair.send("post", POST)
    pair.send("done", {"name": "run-1", "answer": answer})
    pair.send("done", {"name": ["run-1"], "answer": 1})
    pair.send("done", ["run-1", 1])
    assert pair.model.open_runs() == ["run-1"]
    pair.send("done", {"name": "run-1", "answer": MAX64})
    assert pair.model.runs["run-1"]["answer"] == MAX64 and not pair.model.open_runs()
    pair.check()


# --- the client core ----------------------------------------------------------------------


def client() -> ClientCore:
    core = ClientCore()
    core.welcome(codec.encode(Welcome(1, "c1", "test")))
    return core


def joined(core: ClientCore, model_cls: type[Model], options: Any = None, **sync: Any) -> Membership:
    """A membership of session ``s`` answered with a Sync (fields ``sync``)."""
    member = core.join("s", model_cls, options)  # the first join of a client: ref 1
    core.receive(codec.encode(Sync(1, "s", "v1", model_cls.model_name, options, 0, **sync)))
    core.data_to_send()
    return member


def raw_event(seq: int, topic: str, data: bytes) -> bytes:
    """An event frame whose data is written as it is, even what orjson cannot write."""
    head = f'{{"type":"event","session":"s","seq":{seq},"time":{seq},"view":"v1","topic":"{topic}","data":'
    return head.encode() + data + b"}"


def ledger_state(**change: Any) -> dict[str, Any]:
    replica = Replica.create(Ledger, "s", None)
    replica.apply(Event("s", 1, 1, "v1", "add", 5))
    return {**replica.snapshot(), **change}


@pytest.mark.parametrize(
    ("seq", "state"),
    [
        (1, ledger_state(futures=[[9, 1, "__init_subclass__", ["x"]]], future_count=1)),
        (1, ledger_state(futures=[[9, 1, "missing_method", []]], future_count=1)),
        (1, ledger_state(subscriptions={"add": ["_guard"]})),
        (1, ledger_state(subscriptions={"add": ["__class__"]})),
        (3, ledger_state()),  # the state after event 1, sent as that after event 3
        (1, ledger_state(seq=0)),
        (1, ledger_state(seq=2**63)),
        (1, ledger_state(random=-1)),
        (1, [1, 2]),
    ],
)
def test_a_forged_snapshot_fails_the_join_with_unusable_state(seq, state):
    core = client()
    name = Ledger.model_name
    member = joined(core, Ledger, snapshot=SnapshotRecord(seq, 1, state, "d"))
    assert member.state is State.FAILED and member.error is not None
    assert member.error.code == "unusable-state"
    assert Ledger.model_name == name
    assert member.group.replica is None


def test_a_snapshot_that_fits_is_taken():
    core = client()
    member = joined(core, Ledger, snapshot=SnapshotRecord(1, 1, ledger_state(), "d"))
    assert member.state is State.SYNCED
    assert member.group.replica is not None and member.group.replica.model.total == 1


def test_a_state_that_cannot_be_encoded_answers_no_request_and_raises_nothing(caplog):
    core = client()
    member = joined(core, Ledger)
    core.receive(raw_event(1, "add", b"[" * 300 + b"]" * 300))
    core.receive(raw_event(2, "add", b"18446744073709551615"))
    assert member.group.replica is not None and member.group.replica.seq == 2
    core.receive(codec.encode(SnapshotRequest("s", 2)))
    core.receive(codec.encode(DigestRequest("s", 2)))
    assert core.data_to_send() == []
    assert "s: no snapshot of event 2: the state cannot be encoded" in caplog.text
    assert "s: no digest of event 2: the state cannot be encoded" in caplog.text


def test_counts_beyond_64_bits_leave_progress_answering_digests():
    core = client()
    joined(core, Progress, {"root": "R", "partitions": 10, "fanout": 3})
    core.receive(raw_event(1, "bots", b"5"))
    core.receive(raw_event(2, "progress", b'{"leaves":{"R-1":18446744073709551615},"computed":1,"bots":5}'))
    core.receive(raw_event(3, "bots", b"18446744073709551615"))
    core.receive(codec.encode(DigestRequest("s", 3)))
    core.receive(codec.encode(SnapshotRequest("s", 3)))
    sent = [codec.loads(frame) for frame in core.data_to_send()]
    messages = [message for frame in sent for message in (frame if isinstance(frame, list) else [frame])]
    assert sorted(message["type"] for message in messages) == ["digest", "snapshot"]


def test_a_deep_payload_leaves_a_computation_answering_digests():
    core = client()
    joined(core, Computation, Spec("p", "1", 0, 3, 3).to_options())
    core.receive(raw_event(1, "inputs", b'{"inputs":[1,2,' + b"[" * 300 + b"]" * 300 + b"]}"))
    core.receive(raw_event(2, "end", b'{"results":[{"index":0,"output":' + b"[" * 300 + b"]" * 300 + b"}]}"))
    core.receive(raw_event(3, "request", b'{"id":1e30,"want":18446744073709551615}'))
    core.receive(codec.encode(DigestRequest("s", 3)))
    assert len(core.data_to_send()) == 1
