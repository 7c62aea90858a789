"""The ledger model, fed events by hand (no sockets): what a run records per identity,
who may record one, BOINC's trust counter, the bounds it keeps, and its summary."""

from __future__ import annotations

from typing import Any

import pytest

from million.compute.ledger import (
    COLUMNS,
    COUNTS,
    KEEP_RUNS,
    LEDGER,
    MAX_COUNT,
    MAX_IDENTITIES,
    Ledger,
    is_run_event,
    ordered,
    run_event,
    summary,
    summary_rows,
)
from million.replica.model import Replica
from million.wire import codec
from million.wire.protocol import DEFAULT_MAX_FRAME, Event

ADMIN = "admin:lead"


class Replicas:
    """Two replicas of the ledger fed the same events, each stamped with an identity."""

    def __init__(self) -> None:
        self.replicas = [Replica.create(Ledger, LEDGER, None) for _ in range(2)]
        self.seq = 0

    @property
    def model(self) -> Ledger:
        model = self.replicas[0].model
        assert isinstance(model, Ledger)
        return model

    def send(self, data: Any, identity: str = ADMIN, topic: str = "run", time: int | None = None) -> None:
        self.seq += 1
        for replica in self.replicas:
            assert replica.apply(
                Event(LEDGER, self.seq, self.seq if time is None else time, "v1", topic, data, identity)
            )

    def check(self) -> str:
        """The digest both replicas agree on, and that a restored snapshot has too."""
        one, two = (replica.digest() for replica in self.replicas)
        assert one == two
        state = codec.loads(codec.dumps(self.replicas[0].snapshot()))
        assert Replica.restore(Ledger, LEDGER, state).digest() == one
        return one


def counts(**given: int) -> dict[str, int]:
    return {key: given.get(key, 0) for key in COUNTS}


def run(name: str, tally: dict[str, dict[str, int]], max_rejections: int = 3) -> dict[str, Any]:
    return {"name": name, "tally": tally, "max_rejections": max_rejections}


ALICE = counts(submitted=12, validated=10, rejected=1, pending=1, claimed_ms=1200, credit_ms=1000)
BOB = counts(submitted=5, validated=5, claimed_ms=500, credit_ms=500)


def test_a_run_records_its_tally_per_identity():
    ledger = Replicas()
    ledger.send(run("nightly", {"worker:alice": ALICE, "worker:bob": BOB}), time=70)
    assert ledger.model.runs == {"nightly": 70}
    assert ledger.model.identities == {
        "worker:alice": {**ALICE, "consecutive": 0, "last_seen": 70, "last_run": "nightly", "flagged": False},
        "worker:bob": {**BOB, "consecutive": 5, "last_seen": 70, "last_run": "nightly", "flagged": False},
    }
    ledger.send(run("again", {"worker:bob": BOB}), time=90)
    bob = ledger.model.identities["worker:bob"]
    assert {key: bob[key] for key in COUNTS} == {key: 2 * BOB[key] for key in COUNTS}
    assert (bob["consecutive"], bob["last_seen"], bob["last_run"]) == (10, 90, "again")
    assert list(ledger.model.identities) == ["worker:alice", "worker:bob"]  # least recently seen first
    ledger.check()


def test_each_run_is_recorded_once_by_name():
    ledger = Replicas()
    ledger.send(run("once", {"worker:bob": BOB}))
    ledger.send(run("once", {"worker:bob": BOB}))
    ledger.send(run("once", {"worker:carol": BOB}))
    assert ledger.model.identities["worker:bob"]["submitted"] == 5
    assert list(ledger.model.identities) == ["worker:bob"]
    ledger.check()


@pytest.mark.parametrize(
    "identity", ["worker:w1", "viewer:v", "", "admin", "administrator:x", "Admin:x", "x:admin:"]
)
def test_only_an_admin_identity_records_a_run(identity):
    ledger = Replicas()
    ledger.send(run("forged", {"worker:w1": BOB}), identity=identity)
    assert ledger.model.identities == {} and ledger.model.runs == {}
    ledger.send(run("forged", {"worker:w1": BOB}), identity="admin:3fa2b7c0")  # a connection's own identity
    assert ledger.model.runs == {"forged": 2}
    ledger.check()


def test_the_trust_counter_grows_with_valid_results_and_a_rejection_resets_it():
    ledger = Replicas()
    seen = []
    for index, (validated, rejected) in enumerate([(4, 0), (7, 0), (30, 1), (3, 0), (0, 0)]):
        tally = {"worker:w": counts(submitted=validated + rejected, validated=validated, rejected=rejected)}
        ledger.send(run(f"r{index}", tally))
        seen.append(ledger.model.identities["worker:w"]["consecutive"])
    assert seen == [4, 11, 0, 3, 3]
    ledger.check()


def test_trust_names_the_identities_with_enough_consecutive_valid_results():
    ledger = Replicas()
    ledger.send(run("a", {"worker:new": counts(validated=9), "worker:old": counts(validated=10)}))
    ledger.send(run("b", {"worker:bad": counts(validated=50, rejected=1), "worker:new": counts(validated=1)}))
    assert ledger.model.trust() == {"worker:old": 10, "worker:new": 10}
    assert ledger.model.trust(minimum=11) == {}
    assert ledger.model.trust(minimum=0) == {"worker:old": 10, "worker:bad": 0, "worker:new": 10}


@pytest.mark.parametrize(("rejected", "flagged"), [(0, False), (3, False), (4, True)])
def test_an_identity_is_flagged_by_its_latest_run_beyond_max_rejections(rejected, flagged):
    ledger = Replicas()
    ledger.send(run("bad", {"worker:w": counts(submitted=9, rejected=rejected)}, max_rejections=3))
    assert ledger.model.identities["worker:w"]["flagged"] is flagged
    ledger.send(run("strict", {"worker:w": counts(submitted=1, rejected=1)}, max_rejections=0))
    assert ledger.model.identities["worker:w"]["flagged"] is True
    ledger.send(run("clean", {"worker:w": counts(submitted=2, validated=2)}, max_rejections=0))
    assert ledger.model.identities["worker:w"]["flagged"] is False
    ledger.check()


def test_counts_saturate_instead_of_growing_past_64_bits():
    ledger = Replicas()
    huge = counts(submitted=MAX_COUNT, validated=MAX_COUNT, credit_ms=MAX_COUNT)
    for name in ("a", "b"):
        ledger.send(run(name, {"worker:w": huge}))
    entry = ledger.model.identities["worker:w"]
    assert entry["submitted"] == entry["consecutive"] == entry["credit_ms"] == MAX_COUNT
    ledger.check()


def test_the_ledger_keeps_the_most_recently_seen_identities_and_runs():
    ledger = Replicas()
    for index in range(KEEP_RUNS + 3):
        ledger.send(run(f"r{index}", {f"worker:w{index}": counts(submitted=1)}))
    assert len(ledger.model.runs) == KEEP_RUNS and "r0" not in ledger.model.runs
    ledger.send(run("wide", {f"worker:x{i}": counts(submitted=1) for i in range(MAX_IDENTITIES)}))
    assert len(ledger.model.identities) == MAX_IDENTITIES
    assert next(iter(ledger.model.identities)) == "worker:x0"
    ledger.check()


def test_a_full_ledger_of_the_longest_values_fits_in_a_frame():
    ledger = Replicas()
    long_count = counts(**dict.fromkeys(COUNTS, MAX_COUNT))
    tally = {f"worker:{index:0>100}": long_count for index in range(MAX_IDENTITIES)}
    for index in range(KEEP_RUNS):
        ledger.send(run(f"{index:0>190}", tally if index == KEEP_RUNS - 1 else {}))
    assert len(codec.dumps(ledger.replicas[0].snapshot())) < DEFAULT_MAX_FRAME
    assert len(codec.dumps(run("x" * 190, tally))) < DEFAULT_MAX_FRAME  # the event too
    ledger.check()


# --- malformed events ----------------------------------------------------------------------

HOSTILE: list[Any] = [
    2**64 - 1,
    2**70,
    MAX_COUNT + 1,
    -1,
    1.5,
    float("nan"),
    True,
    None,
    "",
    "9" * 5000,
    [],
    {"k": 1},
]


def shapes(template: dict[str, Any]) -> list[Any]:
    """``template`` with each field replaced by each hostile value or left out, and the
    hostile values in place of the whole."""
    found = list(HOSTILE)
    for key in template:
        found += [{**template, key: value} for value in HOSTILE]
        found.append({k: v for k, v in template.items() if k != key})
    return found


VALID = run("r", {"worker:w": BOB})


@pytest.mark.parametrize(
    "data",
    [
        *shapes(VALID),
        *(run("r", {"worker:w": value}) for value in shapes(BOB)),
        run("r", {"worker:w": {**BOB, "extra": 1}}),
        *(
            run("r", {name: BOB})
            for name in [
                "",
                "w",
                "worker:",
                "robot:w",
                "worker:a b",
                "worker:" + "x" * 101,
                "worker:\x1b[2J",
                "worker:r\u00e9",
            ]
        ),
        *(run(name, {"worker:w": BOB}) for name in ["", "bad name", "a" * 191, "r\u00e9"]),
        run("r", {f"worker:w{i}": BOB for i in range(MAX_IDENTITIES + 1)}),
    ],
)
def test_a_malformed_run_event_is_ignored_on_every_replica(data):
    ledger = Replicas()
    ledger.send(data)
    assert (ledger.model.identities, ledger.model.runs) == ({}, {})
    assert not is_run_event(data)
    ledger.check()


def test_other_topics_and_options_change_nothing():
    replica = Replica.create(Ledger, LEDGER, {"anything": [1]})
    replica.apply(Event(LEDGER, 1, 1, "v1", "credit", VALID, ADMIN))
    assert (replica.model.identities, replica.model.runs) == ({}, {})
    assert replica.subscriptions == {"run": ["run"]}


def test_a_run_with_an_empty_tally_is_recorded_and_names_nobody():
    ledger = Replicas()
    ledger.send(run("empty", {}))
    assert (ledger.model.identities, ledger.model.runs) == ({}, {"empty": 1})


# --- what million run sends, and the summary the page reads -----------------------------------


def test_run_event_keeps_what_the_ledger_can_take():
    tally = {
        "worker:a": counts(submitted=3, pending=-1),
        "": counts(submitted=9),  # a timer's or the reflector's: no identity
        "worker:b": {**counts(submitted=MAX_COUNT + 5), "later": 1},
        "worker:c": {"submitted": 1},
    }
    event = run_event("r", tally, -2)
    assert event == run(
        "r",
        {
            "worker:b": counts(submitted=MAX_COUNT),
            "worker:a": counts(submitted=3),
            "worker:c": counts(submitted=1),
        },
        max_rejections=0,
    )
    assert is_run_event(event)
    many = {f"worker:w{i}": counts(submitted=i) for i in range(MAX_IDENTITIES + 10)}
    assert list(run_event("r", many, 3)["tally"])[-1] == "worker:w10"


def test_the_summary_fits_its_limit_and_reads_back_as_rows():
    ledger = Replicas()
    ledger.send(run("r", {f"worker:w{i}": counts(submitted=i, credit_ms=i) for i in range(300)}))
    ledger.send(run("s", {"worker:w5": counts(submitted=9, rejected=9)}, max_rejections=3))
    data = summary(ledger.model, 4096)
    assert len(codec.dumps(data)) <= 4096
    rows, more = summary_rows(codec.loads(codec.dumps(data)), 1000)
    assert 20 < len(rows) < 300 and more == 300 - len(rows)
    assert rows[0] == dict(zip(COLUMNS, ["worker:w5", 14, 0, 9, 0, 5, 0, "s", True], strict=True))
    assert [row["identity"] for row in rows[1:3]] == ["worker:w299", "worker:w298"]
    assert [name for name, _ in ordered(ledger.model.identities)][: len(rows)] == [
        r["identity"] for r in rows
    ]


@pytest.mark.parametrize(
    "data",
    [
        None,
        5,
        "x",
        [],
        {},
        {"rows": 5},
        {"rows": [5, [], ["w"]]},
        {"rows": [["w", 1, 1, 1, 1, 1, 1, "r", "yes"]]},
    ],
)
def test_summary_rows_leave_out_what_is_no_row(data):
    assert summary_rows(data, 10) == ([], 0)


def test_summary_rows_are_capped():
    row = ["worker:w", 1, 1, 0, 0, 1000, 1, "r", False]
    rows, more = summary_rows({"identities": 5000, "rows": [row] * 2000}, 1000)
    assert len(rows) == 1000 and more == 4000
