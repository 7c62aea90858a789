"""The client core paired with the relay core in memory: joins, replicas, requests, reconnects."""

from __future__ import annotations

from typing import Any

import pytest

from million.relay.config import ReflectorConfig
from million.relay.sessions import Phase
from million.replica.core import ClientCore, Membership, State
from million.replica.model import Replica
from million.replica.state import dump_state
from million.wire import codec
from million.wire.protocol import (
    VIEW_EXIT,
    VIEW_JOIN,
    Digest,
    DigestRequest,
    ErrorCode,
    Event,
    Join,
    Pong,
    ProtocolError,
    Publish,
    Snapshot,
    SnapshotRequest,
    Status,
    state_digest,
)
from models import Ledger, Tally
from pairing import Relay, connect


def joined(relay: Relay, client: ClientCore, name: str = "s", options: Any = None) -> Membership:
    member = client.join(name, Ledger, options)
    relay.pump()
    assert member.state is State.SYNCED, member.error
    return member


def replica(member: Membership) -> Replica:
    assert member.group.replica is not None
    return member.group.replica


def adds(client: ClientCore, member: Membership, *values: Any) -> None:
    for value in values:
        assert client.publish(member, "add", value)


def topics(relay: Relay, name: str = "s") -> list[tuple[str, str]]:
    return [(event["topic"], event["view"]) for event in relay.store.stream(name)]


def test_a_join_gives_a_synced_membership_whose_replica_holds_the_models_state():
    relay = Relay()
    client = connect(relay, "a")
    member = client.join("s", Ledger, {"target": 3})
    assert member.state is State.JOINING
    relay.pump()
    assert (member.state, member.view_id, member.options) == (State.SYNCED, "v1", {"target": 3})
    model = replica(member).model
    assert (model.target, model.present, model.presence) == (3, ["v1"], [["join", "v1", 0]])
    assert replica(member).seq == 1


def test_two_clients_publishing_at_once_reach_the_same_state_and_digest():
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    one, two = joined(relay, a), joined(relay, b)
    adds(a, one, 1, 2, 3)
    adds(b, two, 4, 5)
    relay.pump()
    assert replica(one).seq == replica(two).seq == 7
    assert replica(one).digest() == replica(two).digest()
    assert [entry[:2] for entry in replica(one).model.entries] == [
        [1, "v1"],
        [2, "v1"],
        [3, "v1"],
        [4, "v2"],
        [5, "v2"],
    ]


def test_a_published_event_is_applied_only_once_it_comes_back_stamped():
    relay = Relay()
    client = connect(relay)
    member = joined(relay, client)
    assert client.publish(member, "add", 1)
    assert replica(member).model.total == 0
    relay.pump()
    assert replica(member).model.total == 1


def test_a_publish_before_the_membership_is_synced_is_dropped():
    relay = Relay()
    client = connect(relay)
    member = client.join("s", Ledger)
    assert not client.publish(member, "add", 1)
    relay.pump()
    assert replica(member).model.total == 0


def test_model_events_reach_every_membership_of_the_session_once_the_event_is_applied():
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    one, two = joined(relay, a, options={"target": 2}), joined(relay, b, options={"target": 2})
    seen: list[tuple[str, int, int]] = []
    for member in (one, two):
        member.handlers["reached"] = [
            lambda total, member=member: seen.append((member.view_id, total, replica(member).model.total))
        ]
    adds(a, one, "x", "y", "z")
    relay.pump()
    assert seen == [("v1", 2, 2), ("v2", 2, 2)]


def test_a_late_joiner_rebuilds_from_the_latest_snapshot_and_replays_the_events_after_it():
    relay = Relay(ReflectorConfig(snapshot_every=5))
    a, b, w = connect(relay, "a"), connect(relay, "b"), connect(relay, "w")
    early = joined(relay, a)
    joined(relay, w)  # another identity, whose digest agrees the snapshot
    adds(a, early, *range(5))  # events 3..7; the snapshot of event 5 is asked, answered and agreed
    relay.pump()
    assert relay.core.sessions["s"].snapshot_seq == 5
    late = joined(relay, b)
    assert (late.group.synced_from, late.group.replayed) == (5, 2)
    assert replica(late).seq == replica(early).seq == 8
    assert replica(late).digest() == replica(early).digest()


def test_a_member_back_on_the_same_connection_replays_only_what_it_missed():
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    first, other = joined(relay, a), joined(relay, b)
    a.leave(first)
    relay.pump()
    adds(b, other, 1, 2, 3)
    relay.pump()
    again = joined(relay, a)
    assert again.group is first.group  # the replica was kept
    assert (again.group.synced_from, again.group.replayed) == (0, 3)
    assert replica(again).digest() == replica(other).digest()


def test_memberships_of_one_session_in_one_client_share_one_replica():
    relay = Relay()
    client = connect(relay)
    one, two = joined(relay, client), joined(relay, client)
    assert one.group is two.group
    assert (one.view_id, two.view_id) == ("v1", "v2")
    assert replica(one).model.present == ["v1", "v2"]


def test_a_dropped_connection_rejoins_every_membership_and_counts_a_resync():
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    members = [joined(relay, a, "s"), joined(relay, a, "t")]
    other = joined(relay, b, "s")
    resynced: list[str] = []
    members[0].on_resync = lambda: resynced.append("s")
    relay.drop(a)
    assert [m.state for m in members] == [State.RESYNCING, State.RESYNCING]
    assert not a.publish(members[0], "add", "lost")
    adds(b, other, "meanwhile")
    relay.pump()
    relay.admit(a)
    relay.pump()
    assert [(m.state, m.resyncs) for m in members] == [(State.SYNCED, 1), (State.SYNCED, 1)]
    assert resynced == ["s"]
    assert members[0].view_id == "v5"  # after v1's exit and "meanwhile"
    assert replica(members[0]).digest() == replica(other).digest()
    assert replica(members[0]).model.present == ["v2", "v5"]


def test_after_a_restart_of_the_reflector_every_client_resyncs_and_the_replicas_agree():
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    one, two = joined(relay, a), joined(relay, b)
    adds(a, one, 1, 2)
    relay.pump()
    relay.restart()
    assert (one.state, two.state) == (State.RESYNCING, State.RESYNCING)
    relay.admit(a)
    relay.admit(b)
    relay.pump()
    assert (one.state, one.resyncs, two.state, two.resyncs) == (State.SYNCED, 1, State.SYNCED, 1)
    assert replica(one).digest() == replica(two).digest()
    assert replica(one).model.present == [one.view_id, two.view_id]
    assert [entry[0] for entry in replica(two).model.entries] == [1, 2]


def test_a_join_given_up_before_its_sync_leaves_again():
    relay = Relay()
    client = connect(relay)
    member = client.join("s", Ledger)
    client.forget(member)
    assert member.state is State.LEFT
    relay.pump()
    assert topics(relay) == [(VIEW_JOIN, "v1"), (VIEW_EXIT, "v1")]
    assert relay.core.sessions["s"].phase is Phase.IDLE
    assert client.statistics().sessions == 0


def test_a_join_given_up_before_its_sync_leaves_no_session_waiting_for_its_snapshot():
    relay = Relay(ReflectorConfig(leave_snapshot_after=3))
    relay.hello("x")
    relay.send("x", Join(1, "s", Ledger.model_name), *[Publish("s", "v1", "add", i) for i in range(5)])
    relay.drop("x")  # a long tail and no snapshot
    client = connect(relay)
    client.forget(client.join("s", Ledger))
    relay.pump()
    session = relay.core.sessions["s"]
    assert (session.phase, session.asked) == (Phase.IDLE, None), "pinned until the connection closes"


def test_a_second_membership_given_up_on_the_way_leaves_and_the_first_stays():
    relay = Relay()
    client = connect(relay)
    first = joined(relay, client)
    second = client.join("s", Ledger)
    client.forget(second)
    relay.pump()
    assert list(relay.core.sessions["s"].views) == ["v1"]
    assert first.synced and not client.departing
    assert replica(first).model.present == ["v1"]


def test_a_leave_is_confirmed_and_a_leaver_that_leaves_one_identity_behind_leaves_a_snapshot():
    relay = Relay(ReflectorConfig(leave_snapshot_after=3))
    client, other = connect(relay, "a"), connect(relay, "w")
    member = joined(relay, client)
    stays = joined(relay, other)
    adds(client, member, 1, 2)
    relay.pump()
    client.leave(member)  # event 5: the leaver is asked a snapshot, the other a digest
    assert member.state is State.LEFT and client.departing
    relay.pump()
    assert not client.departing
    other.leave(stays)  # event 6: the last leaver alone is asked nothing
    relay.pump()
    session = relay.core.sessions["s"]
    assert (session.snapshot_seq, session.phase) == (5, Phase.IDLE)
    state, digest = session.snapshot_state, session.snapshot_digest
    assert state is not None
    assert Replica.restore(Ledger, "s", codec.loads(state)).digest() == digest == replica(member).digest()


def test_snapshot_and_digest_requests_of_the_reflector_are_answered_and_agree():
    relay = Relay(ReflectorConfig(snapshot_every=4))
    a, b = connect(relay, "a"), connect(relay, "b")
    one, two = joined(relay, a), joined(relay, b)
    adds(a, one, 1, 2)
    relay.pump()
    stored = relay.store.snapshots["s"]
    assert stored[0] == 4 and stored[3] == replica(one).digest() == replica(two).digest()
    assert codec.loads(stored[2]) == replica(one).snapshot()
    assert relay.core.statistics().divergences == 0
    assert relay.core.sessions["s"].digests == {}  # the digest came and was paired with the snapshot


def test_a_snapshot_request_is_answered_with_the_replicas_state_and_digest():
    relay = Relay()
    client = connect(relay)
    member = joined(relay, client)
    seq = replica(member).seq
    client.receive(codec.encode(SnapshotRequest("s", seq)))
    (frame,) = client.data_to_send()
    assert codec.decode_client(frame) == [
        Snapshot("s", seq, dump_state(replica(member).snapshot()), replica(member).digest())
    ]


def test_a_digest_request_is_answered_with_the_replicas_digest():
    relay = Relay()
    client = connect(relay)
    member = joined(relay, client)
    client.receive(codec.encode(DigestRequest("s", 1)))
    (frame,) = client.data_to_send()
    assert codec.decode_client(frame) == [Digest("s", 1, replica(member).digest())]


@pytest.mark.parametrize("request_", [SnapshotRequest("s", 7), DigestRequest("s", 7), DigestRequest("t", 1)])
def test_requests_for_another_seq_or_session_than_the_replicas_are_not_answered(request_):
    relay = Relay()
    client = connect(relay)
    joined(relay, client)
    client.receive(codec.encode(request_))
    assert client.data_to_send() == []


def test_outgoing_frames_stay_within_the_reflectors_frame_limit():
    relay = Relay(ReflectorConfig(max_frame=1000))
    client = connect(relay)
    assert client.max_frame == 1000
    member = joined(relay, client)
    values = [f"{i:03}" + "x" * 60 for i in range(40)]
    adds(client, member, *values)
    frames = client.data_to_send()
    assert len(frames) > 1
    assert all(len(frame) <= 1000 for frame in frames)
    sent = [message for frame in frames for message in codec.decode_client(frame)]
    assert sent == [Publish("s", "v1", "add", value) for value in values]


@pytest.mark.parametrize(
    ("name", "model", "create", "code"),
    [
        ("s", Tally, True, ErrorCode.MODEL_MISMATCH),
        ("nowhere", Ledger, False, ErrorCode.NOT_FOUND),
        ("bad/name", Ledger, True, ErrorCode.BAD_NAME),
    ],
)
def test_a_refused_join_fails_with_the_reflectors_error_code(name, model, create, code):
    relay = Relay()
    a, b = connect(relay, "a"), connect(relay, "b")
    joined(relay, a, "s")
    member = b.join(name, model, create=create)
    relay.pump()
    assert member.state is State.FAILED
    assert member.error is not None and member.error.code == code
    assert b.errors[-1].code == code


def test_a_snapshot_the_model_cannot_take_fails_the_join_and_leaves_again():
    relay = Relay(ReflectorConfig(snapshot_every=2))
    relay.hello("x")
    relay.hello("y")
    relay.send("x", Join(1, "s", Ledger.model_name))
    relay.send("y", Join(1, "s", Ledger.model_name))  # event 2: x is asked a snapshot, y a digest
    broken = {"seq": 2, "now": 0, "model": {"total": "many"}, "subscriptions": {}}
    broken |= {"futures": [], "future_count": 0, "random": 1}
    state = codec.dumps(broken)
    relay.send("x", Snapshot("s", 2, state, state_digest(state)))
    relay.send("y", Digest("s", 2, state_digest(state)))  # two identities agree it: it is kept
    assert relay.core.sessions["s"].snapshot_seq == 2
    client = connect(relay)
    member = client.join("s", Ledger)
    relay.pump()
    assert member.state is State.FAILED
    assert member.error is not None and member.error.code == "unusable-state"
    assert list(relay.core.sessions["s"].views) == ["v1", "v2"]  # its view came and went
    assert topics(relay)[-2:] == [(VIEW_JOIN, "v3"), (VIEW_EXIT, "v3")]


def test_a_gap_in_the_stream_is_a_protocol_error():
    relay = Relay()
    client = connect(relay)
    joined(relay, client)
    with pytest.raises(ProtocolError) as gap:
        client.receive(codec.encode(Event("s", 3, 0, "v1", "add", 1)))
    assert gap.value.code == ErrorCode.UNEXPECTED
    assert "event 3 after 1" in gap.value.message


def test_an_event_already_applied_is_skipped():
    relay = Relay()
    client = connect(relay)
    member = joined(relay, client)
    adds(client, member, 1)
    relay.pump()
    before = replica(member).digest()
    client.receive(codec.encode(Event("s", 2, 0, "v1", "add", 1)))
    assert replica(member).digest() == before


def test_ticks_advance_session_time_and_fire_the_models_timers():
    relay = Relay(ReflectorConfig(tick_ms=100))
    client = connect(relay)
    member = joined(relay, client, options={"ring_ms": 250})
    relay.now = 0.2
    relay.tick()
    relay.pump()
    assert (replica(member).now, replica(member).model.rang_at) == (200, None)
    relay.now = 0.35
    relay.tick()
    relay.pump()
    assert (replica(member).now, replica(member).model.rang_at) == (350, 250)


def test_pings_and_status_requests_are_answered_with_their_refs():
    relay = Relay()
    client = connect(relay)
    member = joined(relay, client)
    client.summarize(member, {"state": "working"})
    ping = client.ping()
    status = client.status(["s"])
    relay.pump()
    pong, info = relay.replies[client]
    assert pong == Pong(ping)
    assert isinstance(info, Status) and info.ref == status
    assert info.info["summaries"] == {"s": {"state": "working"}}
    assert [s["name"] for s in info.info["sessions"]] == ["s"]
