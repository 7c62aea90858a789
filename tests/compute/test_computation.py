"""The partition tree over a real reflector: arithmetic, answers, first result wins, faults."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import attrs
import million_testplugin
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import million
from helpers import finish, nested, ordered_spec, start_worker, wait_for_markers
from million.compute.bots import run_bots
from million.compute.computation import Computation
from million.compute.plugins import HookFailed, PluginError, load_plugin, plugin_from_object
from million.compute.runner import open_run
from million.compute.tree import MAX_FANOUT, MAX_PARTITIONS, Spec, SpecError, depth, split
from million.compute.worker import Context, RunRefused, run_spec, work
from million.relay.config import ReflectorConfig
from million.replica.model import Replica
from million.wire import codec
from million.wire.protocol import VIEW_EXIT, VIEW_JOIN, Event
from models import Ledger
from streams import Stream

pytestmark = pytest.mark.one_engine  # the transport is tested elsewhere


@pytest.mark.parametrize(
    ("total", "fanout", "sizes"),
    [
        (7, 2, [4, 3]),
        (9, 3, [3, 3, 3]),
        (17, 4, [9, 8]),
        (9, 4, [3, 3, 3]),
        (8, 4, [4, 4]),
        (1001, 10, [501, 500]),
        (501, 10, [84, 84, 84, 83, 83, 83]),
        (10001, 100, [5001, 5000]),
        (100_000, 100, [10_000] * 10),
        (1_000_000, 100, [10_000] * 100),
        (1_000_001, 100, [500_001, 500_000]),
        (5, 4, [3, 2]),
    ],
)
def test_children_are_as_few_as_the_depth_allows_and_tile_the_partitions(total, fanout, sizes):
    children = split(total, fanout)
    assert [size for _, size in children] == sizes
    assert [start for start, _ in children] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert Spec("p", "1", 0, total, fanout).count == len(sizes)


@pytest.mark.parametrize(("total", "fanout"), [(7, 14), (1, 2), (4, 4)])
def test_what_fits_in_one_session_is_a_leaf(total, fanout):
    spec = Spec("p", "1", 0, total, fanout)
    assert spec.leaf and spec.count == total and depth(total, fanout) == 1 and split(total, fanout) == []


def sessions(total: int, fanout: int) -> int:
    return 1 + sum(sessions(size, fanout) for _, size in split(total, fanout))


def test_a_hundred_thousand_over_a_hundred_makes_full_leaves():
    assert sessions(100_000, 100) == 1 + 10 + 1_000
    assert sessions(10_000, 100) == 1 + 100 and sessions(1_000_000, 100) == 1 + 100 + 10_000


@given(st.integers(1, 10**7), st.integers(2, 1000))
def test_split_properties_for_any_total_and_fanout(total, fanout):
    levels = depth(total, fanout)
    assert fanout**levels >= total and (levels == 1 or fanout ** (levels - 1) < total)
    children = split(total, fanout)
    if levels == 1:
        assert children == []
        return
    sizes = [size for _, size in children]
    assert sum(sizes) == total and 2 <= len(sizes) <= fanout
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert [start for start, _ in children] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert depth(sizes[0], fanout) == levels - 1  # every child fits one level down


def test_a_request_gets_at_most_its_want_and_its_fair_share_of_what_nobody_started():
    stream = Stream(20)
    stream.prepare("a", list(range(20)), want=16)
    assert stream.given("a") == list(range(16))
    stream.send("b", "request", {"id": 1, "want": 16})
    assert stream.given("b") == [16, 17, 18, 19]  # all that is left
    stream.send("c", "request", {"id": 1, "want": 16})
    stream.send("d", "request", {"id": 1, "want": 16})
    # Nothing is left unstarted: each takes one more, the last of the least held.
    assert stream.given("c") == [19] and stream.given("d") == [18]


def test_askers_share_what_nobody_started():
    stream = Stream(12)
    stream.prepare("a", list(range(12)))
    for view in "abc":
        stream.send(view, "request", {"id": 1, "want": 0})  # a want below one asks for one
    assert [stream.given(view) for view in "abc"] == [[0], [1], [2]]
    for view in "abc":
        stream.send(view, "request", {"id": 2, "want": 16})
    assert [stream.given(view) for view in "abc"] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_a_worker_that_left_gives_its_partitions_back_from_the_last():
    stream = Stream(4)
    stream.prepare("a", list(range(4)), want=4)
    stream.send("a", "end", {"results": [{"index": 0, "output": 0}]})
    model = stream.send("a", VIEW_EXIT, "a")
    assert model.workers == {} and model.remaining == 3
    stream.send("b", "request", {"id": 1, "want": 4})
    stream.send("c", "request", {"id": 1, "want": 4})
    assert stream.given("b") == [3] and stream.given("c") == [2]


def child_done(index: int, output: Any = 1) -> dict[str, Any]:
    return {"index": index, "output": output, "tally": {}}


def test_requests_made_before_the_inputs_are_answered_as_they_come_in_the_order_asked():
    stream = Stream(40, fanout=10)
    stream.send("a", "claim", "prepare")
    for view in "bcde":
        stream.send(view, "request", {"id": 1, "want": 1})
    stream.send("c", "request", {"id": 2, "want": 1})  # its last request is the one answered
    stream.send("d", VIEW_EXIT, "d")
    assert [stream.given(view) for view in "bce"] == [[], [], []]
    model = stream.send("a", "inputs", {"inputs": ["w", "x", "y", "z"], "next": {"id": 1, "want": 1}})
    assert [stream.given(view) for view in "abce"] == [[0], [1], [2], [3]]
    assert model.answers["c"][0] == 2 and "d" not in model.answers and model.waiting == {}


def test_workers_beyond_the_leaf_children_take_them_on_before_any_is_done():
    stream = Stream(20, fanout=10)
    stream.prepare("a", ["x", "y"], want=1)
    stream.send("b", "request", {"id": 1, "want": 1})
    stream.send("c", "request", {"id": 1, "want": 1})
    assert [stream.given(view) for view in "abc"] == [[0], [1], [1]]


def test_once_a_leaf_child_is_done_another_is_taken_on_only_when_overdue():
    stream = Stream(30, fanout=10)
    stream.prepare("a", ["x", "y", "z"], want=1)
    stream.send("b", "request", {"id": 1, "want": 1})
    stream.send("c", "request", {"id": 1, "want": 1})
    stream.wait(100)
    stream.send("b", "end", {"results": [child_done(1)], "next": {"id": 2, "want": 1}})
    assert stream.given("b") == [] and stream.model.took == [103]
    stream.wait(40)  # 0 and 2 held for 146 and 142 ms: not yet half as long again as 103
    stream.send("b", "request", {"id": 3, "want": 1})
    assert stream.given("b") == []
    stream.wait(20)  # the model's timer lets those that asked in vain ask again
    epoch = stream.model.epoch
    stream.send("a", "request", {"id": 2, "want": 1})
    assert stream.model.epoch == epoch + 1 and stream.given("a") == [2]


def test_one_slow_holder_does_not_hold_back_help_for_a_stalled_leaf_child():
    stream = Stream(40, fanout=10)
    stream.prepare("a", ["w", "x", "y", "z"], want=1)  # a stalls in child 0
    for view in "bcd":
        stream.send(view, "request", {"id": 1, "want": 1})
    stream.wait(100)
    stream.send("b", "end", {"results": [child_done(1)]})
    stream.send("c", "end", {"results": [child_done(2)]})
    stream.wait(1000)
    stream.send("d", "end", {"results": [child_done(3)]})  # slow, or hostile
    assert stream.model.took == [104, 105, 1103]
    # Child 0, held 1,109 ms, is overdue by the median (105 ms), not by the slowest (1,103 ms).
    stream.send("b", "request", {"id": 2, "want": 1})
    assert stream.given("b") == [0]


def test_a_collector_that_left_passes_the_step_to_whoever_claims_it_next():
    stream = Stream(2)
    stream.send("watch", VIEW_JOIN, "watch", "admin:w")  # the process's own view, never working
    stream.prepare("a", ["x", "y"], want=2, identity="admin:w")
    report = {"results": [{"index": 0, "output": "x"}, {"index": 1, "output": "y"}]}
    assert stream.send("a", "end", report, "admin:w").doing("collect", "a")  # the last reporter
    model = stream.send("a", VIEW_EXIT, "a", "admin:w")
    assert model.tasks["collect"].holders == [] and model.needs("collect", "admin:w")
    assert stream.send("b", "claim", "collect", "admin:v").doing("collect", "b")
    assert stream.send("b", "output", "xy", "admin:v").output == "xy"


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        ("request", None),
        ("request", 7),
        ("request", [1, 2]),
        ("request", {"want": "many"}),
        ("request", {"id": 1, "want": -3}),
        ("request", {"id": 1, "want": 10**18}),
        ("end", "x"),
        ("end", {"results": [{"index": "0", "output": 1}], "next": "more"}),
        ("end", {"results": [{"index": 99, "output": 1}], "next": {"want": 2.5}}),
        ("inputs", None),
        ("inputs", {"inputs": [9], "next": [1]}),
    ],
)
def test_malformed_events_fail_nothing_and_give_away_little(topic, data, caplog):
    stream = Stream(3)
    stream.prepare("a", [0, 1, 2])
    model = stream.send("a", topic, data)
    assert model.inputs == [0, 1, 2] and model.remaining == 3 and not any(model.completed)
    assert len(model.workers.get("a", [])) <= 3
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


DEEP = nested(300)
GONE = object()  # a field left out


def test_a_specs_options_give_it_back():
    root = Spec("p", "1", {"x": [1, 2]}, 1001, 10, {"delay_ms": 3})
    assert Spec.from_options(root.to_options()) == root
    name, options = root.child("R", 1, "in")
    assert name == "R-1"
    assert Spec.from_options(options) == Spec("p", "1", "in", 500, 10, {"delay_ms": 3}, 501, "R", 1)
    big = Spec("p", "1", None, MAX_PARTITIONS, MAX_FANOUT)
    assert Spec.from_options(big.to_options()).count == 1_000  # children of 10**12 each


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"partitions": GONE, "plugin": GONE}, "missing plugin, partitions"),
        ({"extra": 1}, "unknown 'extra'"),
        ({"partitions": True}, "partitions must be an integer from 1 to"),
        ({"partitions": 0}, "partitions must be"),
        ({"partitions": 2.0}, "partitions must be"),
        ({"partitions": 10**15 + 1}, "partitions must be"),
        ({"partitions": 2**70}, "partitions must be .*, not an int"),
        ({"fanout": 1}, "fanout must be an integer from 2 to 1,000,000"),
        ({"fanout": 10**6 + 1}, "fanout must be"),
        ({"fanout": "3"}, "fanout must be"),
        ({"start": -1}, "start must be"),
        ({"start": 10**15}, "go beyond"),
        ({"plugin": 5}, "plugin must be a string"),
        ({"version": None}, "version must be a string"),
        ({"plugin": "p" * 201}, "plugin must be a string of at most 200"),
        ({"parent": "R"}, "parent and index must both"),
        ({"index": 0}, "parent and index must both"),
        ({"parent": "R", "index": 3}, "index 3 is not below the fanout 3"),
        ({"parent": "bad name!", "index": 0}, "parent must be null or a session name"),
        ({"parent": "R", "index": -1}, "index must be"),
        ({"parent": "R", "index": False}, "index must be"),
        ({"options": []}, "options must be a JSON object"),
        ({"options": {"k": DEEP}}, "options must be"),
        ({"input": DEEP}, "input must be a JSON value nested at most 32 deep"),
        ({"input": 2**64}, "input must be"),
        ({"input": float("nan")}, "input must be"),
    ],
)
def test_options_that_describe_no_session_are_refused_with_the_reason(change, message):
    options = {**Spec("p", "1", 0, 10, 3).to_options(), **change}
    options = {key: value for key, value in options.items() if value is not GONE}
    with pytest.raises(SpecError, match=message):
        Spec.from_options(options)
    with pytest.raises(RunRefused, match=f"session R holds no valid computation: .*{message}"):
        run_spec("R", options)


@pytest.mark.parametrize("options", [None, [], "options", {}, {"x": 1}])
def test_options_that_are_no_object_of_spec_fields_are_refused(options):
    with pytest.raises(SpecError, match="options must"):
        Spec.from_options(options)


@pytest.mark.parametrize(
    "options",
    [
        {},
        None,
        [1, 2],
        {**Spec("p", "1", 0, 7, 2).to_options(), "partitions": True},
        {**Spec("p", "1", 0, 7, 2).to_options(), "partitions": 7.5, "fanout": 10},
        {**Spec("p", "1", 0, 7, 2).to_options(), "partitions": "7"},
        Spec("p", "1", 0, 10**9, 10**9).to_options(),
        Spec("p", "1", DEEP, 7, 2).to_options(),
    ],
)
def test_a_computation_with_invalid_options_is_inert(options, caplog):
    replicas = [Replica.create(Computation, "bad", options) for _ in range(2)]
    for replica in replicas:
        model = replica.model
        assert (model.count, model.remaining, model.outputs, model.done) == (0, 0, [], False)
        assert replica.subscriptions == {}
        replica.apply(Event("bad", 1, 1, "v1", "inputs", {"inputs": []}))
        replica.apply(Event("bad", 2, 2, "v1", "output", "forged"))
        assert not model.done and model.inputs is None
    assert replicas[0].digest() == replicas[1].digest()
    assert "a computation with invalid options ignores every event" in caplog.text


def model_state(stream: Stream) -> Any:
    return stream.replica.snapshot()["model"]


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        ("request", {"want": 2}),
        ("request", {"id": 1.0, "want": 2}),
        ("request", {"id": True, "want": 2}),
        ("request", {"id": "1", "want": 2}),
        ("request", {"id": -1, "want": 2}),
        ("request", {"id": 2**63, "want": 2}),
        ("request", {"id": 2**64 - 1, "want": 2}),
        ("request", {"id": [1], "want": 2}),
        ("request", {"id": 1}),
        ("request", {"id": 1, "want": 2.0}),
        ("request", {"id": 1, "want": True}),
        ("request", {"id": 1, "want": "2"}),
        ("end", {"results": [{"index": True, "output": 1}]}),
        ("end", {"results": [{"index": 1.0, "output": 1}]}),
        ("end", {"results": [{"index": -1, "output": 1}]}),
        ("end", {"results": [{"index": 3, "output": 1}]}),
        ("end", {"results": [{"index": 2**64 - 1, "output": 1}]}),
        ("end", {"results": [{"index": 0}]}),
        ("end", {"results": [{"index": 0, "output": DEEP}]}),
        ("end", {"results": [{"index": 0, "output": [2**64]}]}),
        ("end", {"results": [{"index": 0, "output": float("inf")}]}),
        ("end", {"results": [{"index": 0, "output": 1}], "next": {"id": "x", "want": 1}}),
        ("end", {"results": [{"index": 0, "output": 1}], "next": None}),
        ("end", [0, 1]),
        ("end", {"results": []}),
        ("end", {"results": {"index": 0, "output": 1}}),
        ("end", {"results": [{"index": 0, "output": 1}] * 4}),
        ("end", {"results": [{"index": 0, "output": 1}, {"index": 1, "output": DEEP}]}),
        ("end", {"results": [{"index": 0, "output": 1}, 7]}),
        ("inputs", {"inputs": [0, 1, DEEP], "next": {"id": 1, "want": 3}}),
        ("inputs", {"inputs": [0, 1, 2], "next": {"id": 1.5, "want": 3}}),
        ("inputs", {"inputs": [0, 1], "next": {"id": 1, "want": 3}}),
        ("claim", ["prepare"]),
        ("claim", {"prepare": 1}),
        ("claim", "anything"),
        (VIEW_EXIT, ["a"]),
        (VIEW_EXIT, {"a": 1}),
        (VIEW_JOIN, ["a"]),
        ("output", DEEP),
    ],
)
def test_a_malformed_event_changes_nothing(topic, data):
    stream = Stream(3)
    stream.send("a", VIEW_JOIN, "a")
    stream.send("b", VIEW_JOIN, "b")
    before = model_state(stream)
    model = stream.send("b", topic, data)
    assert model_state(stream) == before
    assert model.inputs is None and not model.tasks["prepare"].holders
    stream.replica.digest()  # still encodable


def test_a_batch_counts_each_report_and_one_malformed_report_spoils_it_whole():
    stream = Stream(4)
    stream.prepare("a", [0, 1, 2, 3], want=4)
    model = stream.send("a", "end", {"results": [{"index": 0, "output": 0}, {"index": 1, "output": DEEP}]})
    assert model.remaining == 4 and model.workers == {"a": [0, 1, 2, 3]}
    batch = [{"index": index, "output": index} for index in (0, 1, 3)]
    model = stream.send("a", "end", {"results": batch, "next": {"id": 2, "want": 1}})
    assert model.outputs == [0, 1, None, 3] and model.remaining == 1 and model.workers == {"a": [2]}
    assert model.tally["admin:a"]["validated"] == 1 + 3  # the inputs and three outputs


def test_a_malformed_output_is_ignored_and_a_good_one_still_counts():
    stream = Stream(2)
    stream.prepare("a", [0, 1], want=2)
    stream.send("a", "end", {"results": [{"index": 0, "output": "x"}]})
    stream.send("a", "end", {"results": [{"index": 1, "output": DEEP}], "next": {"id": 2, "want": 1}})
    model = stream.send("a", "end", {"results": [{"index": 1, "output": "y"}]})
    assert model.outputs == ["x", "y"] and model.answers["a"][:2] == [1, [0, 1]]
    stream.send("a", "output", nested(40))
    model = stream.send("a", "output", ["x", "y"])
    assert model.done and model.output == ["x", "y"]
    stream.replica.digest()


@pytest.mark.parametrize(("late", "judged"), [("b", "validated"), ("a", "rejected")])
def test_a_late_report_changes_no_output_is_judged_by_it_and_still_asks(late, judged):
    stream = Stream(2)
    stream.prepare("a", [0, 1], want=1)
    stream.send("b", "request", {"id": 1, "want": 1})
    stream.send("b", "end", {"results": [{"index": 1, "output": "b"}], "next": {"id": 2, "want": 1}})
    assert stream.given("b") == [0]  # nothing is left unstarted: b takes a's
    model = stream.send("b", "end", {"results": [{"index": 0, "output": "b"}]})
    before = dict(model.tally["admin:a"])
    model = stream.send("a", "end", {"results": [{"index": 0, "output": late}], "next": {"id": 2, "want": 1}})
    assert model.outputs == ["b", "b"] and model.answers["a"][:2] == [2, []]
    after = model.tally["admin:a"]
    assert after[judged] == before[judged] + 1 and after["pending"] == before["pending"] == 0


async def compute_run(url: str, name: str, spec: Spec, bots: int, detach: bool = True) -> Any:
    """Create the run, work it with ``bots`` bots in this process, return the answer."""
    async with million.open_client(url) as client, open_run(client, name, spec) as (root, _):
        await run_bots(url, name, bots, detach=detach)
        assert root.model.done
        return root.model.output


async def test_three_levels_of_seven_over_two(reflector):
    demo = load_plugin("demo")
    spec = Spec("demo", demo.version, 2, 7, 2)
    async with million.open_client(reflector.url) as client, open_run(client, "R", spec) as (root, _):
        await run_bots(reflector.url, "R", 3)
        assert root.model.outputs == [8, 6]
        assert root.model.output == 14
    names = {name for name in await reflector.store.names() if ":" not in name}
    assert {"R", "R-0", "R-1"} <= names  # interior sessions; a leaf computed whole has none
    assert names <= {"R", "R-0", "R-0-0", "R-0-1", "R-1", "R-1-0", "R-1-1"}


SLOW = {(10000, 2), (10000, 3), (997, 2)}  # thousands of sessions: the slow tier
SHAPES = [
    pytest.param(partitions, fanout, bots, marks=[pytest.mark.slow] if (partitions, fanout) in SLOW else [])
    for partitions in [1, 2, 99, 100, 101, 997, 10000]
    for fanout in [2, 3, 10, 100]
    for bots in [1, 20]
]


@pytest.mark.parametrize(("partitions", "fanout", "bots"), SHAPES)
async def test_answers_are_right_for_any_shape(reflector, partitions, fanout, bots):
    spec = ordered_spec("in", partitions, fanout)
    answer = await compute_run(reflector.url, f"shape-{partitions}-{fanout}-{bots}", spec, bots)
    assert answer == million_testplugin.expected("in", partitions, fanout)


async def run_keeping_events(name: str, spec: Spec, bots: int) -> tuple[Any, list[dict[str, Any]]]:
    """``compute_run`` on a reflector that keeps every event of the run's root: the
    answer, and those events."""
    config = ReflectorConfig(port=0, leave_snapshot_after=1000)
    async with million.open_reflector(config) as reflector:
        answer = await compute_run(reflector.url, name, spec, bots)
        return answer, [codec.loads(raw) for raw in (await reflector.store.load(name)).events]


async def test_a_leaf_worker_holds_many_partitions_and_reports_them_in_batches():
    answer, events = await run_keeping_events("batch", ordered_spec("batch", 100, 100), 1)
    assert answer == million_testplugin.expected("batch", 100, 100)
    asks = [event["data"] for event in events if event["topic"] == "request"]
    asks += [event["data"]["next"] for event in events if "next" in (event["data"] or {})]
    ends = [event["data"]["results"] for event in events if event["topic"] == "end"]
    assert sorted(report["index"] for results in ends for report in results) == list(range(100))
    # The first window is 16; once the worker knows its pace, it holds the rest at once.
    assert len(ends) <= 3 and len(asks) <= 3 and max(ask["want"] for ask in asks) > 16


async def test_the_bots_of_a_process_ask_once_to_prepare_a_runs_root_before_the_others_join():
    answer, events = await run_keeping_events("herd", ordered_spec("herd", 60, 10), 12)
    assert answer == million_testplugin.expected("herd", 60, 10)
    topics = [event["topic"] for event in events]
    claims = [event for event in events if event["topic"] == "claim"]
    joins = [at for at, topic in enumerate(topics) if topic == "view-join"]
    assert len(joins) > 12 and [claim["data"] for claim in claims] == ["prepare"]
    assert joins[2] < topics.index("claim") < joins[3]  # after the poster, the crew and the first bot


async def test_bots_sent_to_a_run_that_is_over_come_back_with_its_answer(reflector):
    spec = ordered_spec("over", 60, 10)
    answer = await compute_run(reflector.url, "over", spec, 3)
    assert answer == million_testplugin.expected("over", 60, 10)
    with trio.fail_after(30):
        assert await run_bots(reflector.url, "over", 3) == answer


async def test_coordinators_that_stay_in_their_parent_get_the_same_answer(reflector):
    spec = ordered_spec("stay", 50, 3)
    answer = await compute_run(reflector.url, "stay", spec, 4, detach=False)
    assert answer == million_testplugin.expected("stay", 50, 3)


async def test_the_first_result_for_a_partition_wins_everywhere(reflector):
    spec = ordered_spec("x", 2, 4).to_options()
    async with (
        million.open_client(reflector.url) as one,
        million.open_client(reflector.url) as two,
        million.join(one, "first", Computation, options=spec) as a,
        million.join(two, "first", Computation, options=spec) as b,
    ):
        await a.wait_for(lambda model: b.view_id in model.views)
        a.publish("claim", "prepare")
        a.publish("inputs", {"inputs": ["p", "q"], "next": {"id": 1, "want": 2}})
        await b.wait_for(lambda model: model.answers.get(a.view_id, [0, []])[1] == [0, 1])
        a.publish("end", {"results": [{"index": 0, "output": "from a"}]})
        await b.wait_for(lambda model: model.completed[0])
        b.publish("request", {"id": 1, "want": 1})
        await b.wait_for(lambda model: b.view_id in model.answers)
        assert b.model.answers[b.view_id][1] == [1]  # a copy of the one still open
        b.publish("end", {"results": [{"index": 0, "output": "from b"}]})  # never handed to b: ignored
        b.publish("end", {"results": [{"index": 1, "output": "b's own"}]})
        for session in (a, b):
            await session.wait_for(lambda model: model.completed[1])
            assert session.model.outputs == ["from a", "b's own"]
            assert session.model.tally[b.model.views[b.view_id]]["rejected"] == 1
        assert a.replica.digest() == b.replica.digest()


async def test_a_worker_killed_mid_partition_loses_nothing(reflector, tmp_path):
    spec = ordered_spec("k", 3, 4, slow=[0], marker_dir=str(tmp_path))
    async with million.open_client(reflector.url) as client, open_run(client, "killed", spec) as (root, _):
        doomed = start_worker(reflector.url, "killed", 1)
        await wait_for_markers(root, tmp_path, name="0", seconds=20)
        doomed.kill()
        (tmp_path / "go").touch()
        await finish(root, [start_worker(reflector.url, "killed", 1)], 30)
        assert root.model.output == million_testplugin.expected("k", 3, 4)


async def test_a_run_everyone_left_is_finished_by_a_newcomer(reflector, tmp_path):
    spec = ordered_spec("half", 27, 3, slow=list(range(9, 27)), marker_dir=str(tmp_path))
    async with (
        million.open_client(reflector.url) as client,
        open_run(client, "half", spec) as (root, progress),
    ):
        workers = [start_worker(reflector.url, "half", 2) for _ in range(2)]
        with trio.fail_after(30):
            await progress.wait_for(lambda model: model.done >= 9)
        await wait_for_markers(progress, tmp_path, count=2, seconds=30)
        for worker in workers:
            worker.stop()  # SIGINT: every participant leaves
        assert not root.model.done
        assert progress.model.done < 27
        (tmp_path / "go").touch()
        await finish(root, [start_worker(reflector.url, "half", 1)], 60)
        assert root.model.output == million_testplugin.expected("half", 27, 3)


async def test_a_cpu_bound_hook_does_not_stall_the_event_loop(reflector):
    finished = threading.Event()

    class Spinner:
        @million.hookimpl
        def prepare_inputs(self, input: Any, count: int, options: Any) -> list[Any]:
            return [input] * count

        @million.hookimpl
        def compute(self, input: Any, index: int, options: Any) -> Any:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                pass
            finished.set()
            return input

        @million.hookimpl
        def collect_results(self, outputs: list[Any], options: Any) -> Any:
            return outputs

    plugin = plugin_from_object("spinner", Spinner())
    spec = Spec("spinner", "0", 1, 1, 2)
    async with (
        million.open_client(reflector.url) as client,
        million.join(client, "spin", Computation, options=spec.to_options()) as _,
        million.open_client(reflector.url) as other,
        million.join(other, "beside", Ledger) as beside,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(work, Context(client, plugin), "spin", spec.to_options())
        with trio.fail_after(10):
            while beside.model.total < 20:
                beside.publish("add", beside.model.total)
                await beside.wait_for(lambda model, seen=beside.model.total: model.total > seen)
        assert not finished.is_set(), "20 round trips waited for the CPU-bound hook"


async def test_a_worker_with_another_version_of_the_plugin_declines(reflector):
    spec = attrs.evolve(ordered_spec("v", 3, 4), version="0.0.1")
    async with million.open_client(reflector.url) as client, open_run(client, "versions", spec) as (root, _):
        with pytest.raises(PluginError, match=r"needs plugin ordered 0\.0\.1; this machine has 1\.2\.3"):
            await run_bots(reflector.url, "versions", 2)
        assert root.model.inputs is None and root.model.remaining == 3


async def test_a_plugin_that_prepares_the_wrong_number_of_inputs_is_named():
    class Sloppy:
        @million.hookimpl
        def prepare_inputs(self, input: Any, count: int, options: Any) -> list[Any]:
            return [input]

    plugin = plugin_from_object("sloppy", Sloppy())
    with pytest.raises(HookFailed, match="plugin sloppy: it must return a list of 3 inputs, not a list of 1"):
        await plugin.prepare_inputs(1, 3, {})


async def test_a_result_no_model_could_keep_is_refused_where_it_is_made():
    class Deep:
        @million.hookimpl
        def compute(self, input: Any, index: int, options: Any) -> Any:
            value: Any = 1
            for _ in range(40):
                value = [value]
            return value

    plugin = plugin_from_object("deep", Deep())
    with pytest.raises(HookFailed, match="compute: plugin deep: it returned a value nested deeper than 32"):
        await plugin.compute(1, 0, {})


async def test_a_child_made_by_someone_else_with_other_options_ends_the_bots_with_one_error(reflector):
    demo = load_plugin("demo")
    spec = Spec("demo", demo.version, 2, 8, 2)  # forged-0 is a session of its own: not a leaf
    async with million.open_client(reflector.url) as client, open_run(client, "forged", spec) as _:
        forged = attrs.evolve(spec, partitions=1, parent="forged", index=0).to_options()
        async with million.join(client, "forged-0", Computation, options=forged):
            with pytest.raises(million.JoinError) as refused:
                await run_bots(reflector.url, "forged", 2)
        assert refused.value.code == "model-mismatch"


async def test_a_hook_the_plugin_lacks_is_named_each_time_it_is_called():
    class Partial:
        @million.hookimpl
        async def compute(self, input: Any, index: int, options: Any) -> Any:
            return input

    plugin = plugin_from_object("partial", Partial())
    assert (await plugin.compute(5, 0, {})).value() == 5
    for _ in range(2):
        with pytest.raises(PluginError, match="plugin partial does not implement collect_results"):
            await plugin.collect_results([5], {})


def test_the_demo_plugin_is_found_through_its_entry_point():
    plugin = load_plugin("demo")
    assert plugin.name == "demo" and plugin.version
    with pytest.raises(PluginError, match="no plugin named 'nosuch' is installed"):
        load_plugin("nosuch")
