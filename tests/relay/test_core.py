"""The relay core alone, one rule per test: connections are labels, time is ``relay.now``."""

from __future__ import annotations

from typing import Any

import pytest

from million.relay.config import ReflectorConfig
from million.relay.sessions import Candidate, Phase, RelaySession
from million.wire import codec
from million.wire.protocol import (
    PROTOCOL_VERSION,
    VIEW_EXIT,
    VIEW_JOIN,
    Digest,
    DigestRequest,
    Error,
    ErrorCode,
    Event,
    Hello,
    Join,
    Leave,
    Left,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Snapshot,
    SnapshotRecord,
    SnapshotRequest,
    Status,
    StatusRequest,
    Summarize,
    Sync,
    Tick,
    Welcome,
    state_digest,
)
from pairing import Relay


def relay_with(**config: Any) -> Relay:
    """A relay with connections ``a`` and ``b`` admitted."""
    relay = Relay(ReflectorConfig(**config))
    relay.hello("a")
    relay.hello("b")
    return relay


def join(relay: Relay, conn: str, session: str = "s", ref: int = 1, **fields: Any) -> Sync:
    """``conn`` joins ``session`` (model ``m``); the Sync it got. Everyone's messages are read."""
    read_all(relay)
    relay.send(conn, Join(ref, session, fields.pop("model", "m"), **fields))
    sync = relay.messages(conn)[0]
    assert isinstance(sync, Sync), sync
    read_all(relay)
    return sync


def publish(relay: Relay, conn: str, view: str, count: int, session: str = "s") -> None:
    relay.send(conn, *[Publish(session, view, "add", i) for i in range(count)])


def read_all(relay: Relay) -> None:
    for conn in list(relay.core.peers):
        relay.messages(conn)


def stored_seqs(relay: Relay, session: str = "s") -> list[int]:
    return [event["seq"] for event in relay.store.stream(session)]


def requests(messages: list[Any]) -> list[Any]:
    return [m for m in messages if isinstance(m, SnapshotRequest | DigestRequest)]


def phase(relay: Relay, session: str = "s") -> Phase:
    return relay.core.sessions[session].phase


def snapshot(seq: int, state: bytes = b"{}", session: str = "s") -> Snapshot:
    """A snapshot of event ``seq`` with the digest of its state."""
    return Snapshot(session, seq, state, state_digest(state))


# --- hello ----------------------------------------------------------------------------------


def test_a_hello_is_welcomed_with_the_protocol_version_the_connection_name_and_the_frame_limit():
    relay = Relay(ReflectorConfig(max_frame=5000))
    assert relay.hello("c1") == Welcome(PROTOCOL_VERSION, "c1", "million test", 5000)
    assert relay.core.statistics().connections == 1


def test_a_hello_of_another_protocol_version_is_refused():
    relay = Relay()
    with pytest.raises(ProtocolError) as refused:
        relay.hello("a", Hello(PROTOCOL_VERSION + 1))
    assert refused.value.code == ErrorCode.VERSION
    assert f"protocol version {PROTOCOL_VERSION}, not {PROTOCOL_VERSION + 1}" in refused.value.message
    assert relay.core.statistics().connections == 0


@pytest.mark.parametrize("token", [None, "", "open sesame!", "open"])
def test_a_hello_without_the_right_token_is_refused(token):
    relay = Relay(ReflectorConfig(token="open sesame"))
    with pytest.raises(ProtocolError) as refused:
        relay.hello("a", Hello(PROTOCOL_VERSION, token))
    assert (refused.value.code, refused.value.message) == (ErrorCode.UNAUTHORIZED, "missing or wrong token")
    assert relay.core.statistics().connections == 0


def test_a_hello_with_the_right_token_is_welcomed():
    relay = Relay(ReflectorConfig(token="open sesame"))
    assert isinstance(relay.hello("a", Hello(PROTOCOL_VERSION, "open sesame")), Welcome)


@pytest.mark.parametrize(
    "messages",
    [[], [Join(1, "s", "m")], [Hello(PROTOCOL_VERSION), Ping(1)], [Ping(1), Hello(PROTOCOL_VERSION)]],
    ids=["nothing", "join", "hello-and-more", "ping-first"],
)
def test_the_first_frame_must_be_exactly_one_hello(messages):
    relay = Relay()
    with pytest.raises(ProtocolError) as refused:
        relay.core.hello("a", messages, 0.0, "a")
    assert (refused.value.code, refused.value.message) == (
        ErrorCode.UNEXPECTED,
        "the first message must be a hello",
    )
    assert relay.core.statistics().connections == 0


def test_a_hello_after_the_handshake_is_an_error_and_the_connection_goes_on():
    relay = relay_with()
    relay.send("a", Hello(PROTOCOL_VERSION), Ping(2))
    assert relay.messages("a") == [Error(ErrorCode.UNEXPECTED, "unexpected hello"), Pong(2)]


def test_a_message_only_the_reflector_sends_is_unexpected():
    relay = relay_with()
    relay.core.receive("a", Tick("s", 5), 0.0)
    relay.flush()
    assert relay.messages("a") == [Error(ErrorCode.UNEXPECTED, "unexpected tick", "s")]
    assert relay.core.statistics().errors == 1


# --- join -----------------------------------------------------------------------------------


def test_the_first_join_creates_the_session_and_stores_its_creation_record():
    relay = relay_with()
    relay.send("a", Join(7, "s", "m", {"size": 3}))
    assert relay.messages("a") == [
        Sync(7, "s", "v1", "m", {"size": 3}, 0, True, None, []),
        Event("s", 1, 0, "v1", VIEW_JOIN, "v1", identity="admin:a"),
    ]
    assert relay.store.sessions == {"s": ("m", b'{"size":3}')}
    assert relay.store.stream("s") == [
        codec.loads(codec.encode(Event("s", 1, 0, "v1", VIEW_JOIN, "v1", identity="admin:a")))
    ]
    assert relay.store.presence == {"s": ["v1"]}
    assert phase(relay) is Phase.OCCUPIED


def test_a_later_joiner_gets_the_creation_record_and_every_event_so_far():
    relay = relay_with()
    join(relay, "a", options={"size": 3})
    publish(relay, "a", "v1", 1)
    sync = join(relay, "b", ref=4, options={"size": 3})
    assert sync == Sync(
        4,
        "s",
        "v3",
        "m",
        {"size": 3},
        0,
        True,
        None,
        [
            Event("s", 1, 0, "v1", VIEW_JOIN, "v1", identity="admin:a"),
            Event("s", 2, 0, "v1", "add", 0, identity="admin:a"),
        ],
    )


def test_a_join_naming_another_model_is_refused_and_changes_nothing():
    relay = relay_with()
    join(relay, "a")
    batches = len(relay.store.batches)
    relay.send("b", Join(5, "s", "other"))
    assert relay.messages("b") == [
        Error(ErrorCode.MODEL_MISMATCH, "session 's' runs model 'm', not 'other'", "s", 5)
    ]
    assert relay.messages("a") == []
    assert len(relay.store.batches) == batches
    assert list(relay.core.sessions["s"].views) == ["v1"]


def test_a_creating_join_with_other_options_is_refused():
    relay = relay_with()
    join(relay, "a", options={"size": 3})
    relay.send("b", Join(5, "s", "m", {"size": 4}))
    assert relay.messages("b") == [
        Error(ErrorCode.MODEL_MISMATCH, "session 's' was created with model 'm' and other options", "s", 5)
    ]


def test_a_join_that_may_not_create_takes_the_recorded_options_whatever_it_names():
    relay = relay_with()
    join(relay, "a", options={"size": 3})
    sync = join(relay, "b", options={"size": 4}, create=False)
    assert sync.options == {"size": 3}


def test_a_join_that_may_not_create_a_missing_session_is_not_found_and_nothing_is_stored():
    relay = relay_with()
    relay.send("a", Join(3, "nowhere", "m", create=False))
    assert relay.messages("a") == [Error(ErrorCode.NOT_FOUND, "there is no session 'nowhere'", "nowhere", 3)]
    assert "nowhere" not in relay.core.sessions
    assert relay.store.batches == []


@pytest.mark.parametrize("name", ["bad/name", "", "x" * 201, "two words", "é"])
def test_a_join_naming_a_bad_session_name_is_refused(name):
    relay = relay_with()
    relay.send("a", Join(9, name, "m"))
    (error,) = relay.messages("a")
    assert (error.code, error.session, error.ref) == (ErrorCode.BAD_NAME, name, 9)
    assert "must be 1-200 characters" in error.message
    assert relay.core.sessions == {}


def test_memberships_beyond_the_limit_are_refused_and_others_may_still_join():
    relay = relay_with(max_sessions_per_connection=2)
    join(relay, "a", "one", ref=1)
    join(relay, "a", "one", ref=2)  # a second membership of the same session counts too
    relay.send("a", Join(3, "two", "m"))
    assert relay.messages("a") == [
        Error(ErrorCode.LIMIT, "a connection may hold at most 2 memberships", "two", 3)
    ]
    assert join(relay, "b", "two").view == "v1"


def test_a_joiner_after_a_snapshot_gets_the_snapshot_and_only_the_events_after_it():
    relay = relay_with(snapshot_every=4)
    relay.hello("w")
    join(relay, "a")
    join(relay, "w")
    relay.now = 0.5
    publish(relay, "a", "v1", 1)
    relay.now = 1.0
    publish(relay, "a", "v1", 1)  # event 4: a snapshot is asked at session time 1000
    assert requests(relay.messages("a")) == [SnapshotRequest("s", 4)]
    relay.now = 2.0
    relay.send("a", snapshot(4, b'{"n": 4}'), Publish("s", "v1", "add", "after"))
    relay.send("w", Digest("s", 4, state_digest(b'{"n": 4}')))  # another identity agrees
    sync = join(relay, "b")
    assert sync.snapshot == SnapshotRecord(4, 1000, {"n": 4}, state_digest(b'{"n": 4}'))
    assert sync.events == [Event("s", 5, 2000, "v1", "add", "after", identity="admin:a")]
    assert (sync.full, sync.time) == (True, 2000)


def test_a_join_that_has_the_events_up_to_a_seq_gets_only_the_ones_after_it():
    relay = relay_with()
    join(relay, "a")
    publish(relay, "a", "v1", 4)
    sync = join(relay, "b", have=3)
    assert (sync.full, sync.snapshot) == (False, None)
    assert [event.seq for event in sync.events] == [4, 5]


@pytest.mark.parametrize("have", [6, 99, -1])
def test_a_join_that_has_a_seq_the_session_cannot_continue_from_gets_everything(have):
    relay = relay_with()
    join(relay, "a")
    publish(relay, "a", "v1", 4)
    sync = join(relay, "b", have=have)
    assert sync.full
    assert [event.seq for event in sync.events] == [1, 2, 3, 4, 5]


def test_a_connection_that_holds_the_session_already_gets_no_events_in_its_sync():
    relay = relay_with()
    join(relay, "a")
    publish(relay, "a", "v1", 2)
    sync = join(relay, "a", ref=2)
    assert (sync.view, sync.full, sync.snapshot, sync.events) == ("v4", False, None, [])


# --- publish --------------------------------------------------------------------------------


def test_a_published_event_is_stamped_with_the_next_seq_and_the_session_time():
    relay = relay_with()
    relay.now = 1.0
    join(relay, "a")
    relay.now = 2.5
    relay.send("a", Publish("s", "v1", "add", {"x": [1, 2]}))
    assert relay.messages("a") == [Event("s", 2, 1500, "v1", "add", {"x": [1, 2]}, identity="admin:a")]


def test_an_event_goes_to_every_member_the_sender_included_and_to_the_store():
    relay = relay_with()
    relay.hello("c")
    join(relay, "a")
    join(relay, "b")
    relay.send("b", Publish("s", "v2", "add", 5))
    event = Event("s", 3, 0, "v2", "add", 5, identity="admin:b")
    assert relay.messages("a") == relay.messages("b") == [event]
    assert relay.messages("c") == []
    assert relay.store.stream("s")[-1] == codec.loads(codec.encode(event))


def test_a_publish_to_a_session_not_joined_is_an_error():
    relay = relay_with()
    relay.send("a", Publish("s", "v1", "add", 1))
    assert relay.messages("a") == [
        Error(ErrorCode.NOT_JOINED, "view 'v1' has not joined session 's'", "s", None)
    ]


def test_a_connection_may_not_publish_as_another_connections_view():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("b", Publish("s", "v1", "add", 1))
    (error,) = relay.messages("b")
    assert error.code == ErrorCode.NOT_JOINED
    assert relay.messages("a") == []
    assert relay.core.sessions["s"].seq == 2


# --- leave ----------------------------------------------------------------------------------


def test_a_leaver_gets_its_view_exit_then_left_and_the_others_get_the_view_exit():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Leave("s", "v1"))
    exit_event = Event("s", 3, 0, "v1", VIEW_EXIT, "v1", identity="admin:a")
    assert relay.messages("a") == [exit_event, Left("s", "v1")]
    assert relay.messages("b") == [exit_event]
    assert relay.store.presence["s"] == ["v2"]


def test_leaving_a_view_not_held_is_an_error():
    relay = relay_with()
    join(relay, "a")
    relay.send("b", Leave("s", "v1"))
    assert relay.messages("b") == [
        Error(ErrorCode.NOT_JOINED, "view 'v1' has not joined session 's'", "s", None)
    ]
    assert list(relay.core.sessions["s"].views) == ["v1"]


def test_a_leaver_that_leaves_one_identity_behind_is_asked_with_it_before_its_left():
    relay = relay_with(leave_snapshot_after=3)
    join(relay, "a")
    join(relay, "b")
    publish(relay, "a", "v1", 2)
    read_all(relay)
    relay.send("a", Leave("s", "v1"))  # event 5: 5 % 2 picks the leaver for the snapshot
    exit_event = Event("s", 5, 0, "v1", VIEW_EXIT, "v1", identity="admin:a")
    assert relay.messages("a") == [exit_event, SnapshotRequest("s", 5), Left("s", "v1")]
    assert relay.messages("b") == [exit_event, DigestRequest("s", 5)]
    relay.send("a", snapshot(5, b'"five"'))  # the leaver answers after its left
    relay.send("b", Digest("s", 5, state_digest(b'"five"')))
    assert relay.messages("a") == relay.messages("b") == []
    assert relay.store.snapshots["s"] == (5, 0, b'"five"', state_digest(b'"five"'))


def test_the_last_leaver_alone_is_asked_for_nothing_and_the_session_keeps_its_events():
    relay = relay_with(leave_snapshot_after=3)
    join(relay, "a")
    publish(relay, "a", "v1", 2)
    read_all(relay)
    relay.send("a", Leave("s", "v1"))
    assert relay.messages("a") == [
        Event("s", 4, 0, "v1", VIEW_EXIT, "v1", identity="admin:a"),
        Left("s", "v1"),
    ]
    assert stored_seqs(relay) == [1, 2, 3, 4]


def test_a_leaver_after_few_events_is_not_asked_for_a_snapshot():
    relay = relay_with(leave_snapshot_after=4)
    join(relay, "a")
    join(relay, "b")
    read_all(relay)
    relay.send("a", Leave("s", "v1"))
    assert requests(relay.messages("a") + relay.messages("b")) == []


def test_a_leaver_that_leaves_two_identities_behind_is_not_asked_for_a_snapshot():
    relay = relay_with(leave_snapshot_after=1)
    relay.hello("c")
    for conn in "abc":
        join(relay, conn)
    publish(relay, "a", "v1", 5)
    read_all(relay)
    relay.send("a", Leave("s", "v1"))
    assert requests(relay.messages("a") + relay.messages("b") + relay.messages("c")) == []


# --- snapshot -------------------------------------------------------------------------------


def asked_snapshot(relay: Relay, every: int = 4) -> None:
    """``a`` and ``b`` in ``s``: ``a`` asked for a snapshot of event ``every`` (even), ``b``
    for a digest of it."""
    join(relay, "a")
    join(relay, "b")
    publish(relay, "a", "v1", every - 2)
    assert requests(relay.messages("a")) == [SnapshotRequest("s", every)]
    assert requests(relay.messages("b")) == [DigestRequest("s", every)]


def test_a_snapshot_from_a_connection_not_asked_is_refused():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.send("b", snapshot(4))
    assert relay.messages("b") == [Error(ErrorCode.UNEXPECTED, "a snapshot nobody asked for", "s", None)]
    assert relay.core.sessions["s"].snapshot_seq == 0


@pytest.mark.parametrize("seq", [5, 100])
def test_a_snapshot_of_a_seq_not_asked_is_refused(seq):
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.send("a", snapshot(seq))
    assert relay.messages("a") == [Error(ErrorCode.UNEXPECTED, "a snapshot nobody asked for", "s", None)]


@pytest.mark.parametrize("session", ["s", "nowhere"])
def test_a_snapshot_nobody_asked_for_is_refused(session):
    relay = relay_with()
    join(relay, "a")
    relay.send("a", Snapshot(session, 1, b"{}", "d"))
    assert relay.messages("a") == [Error(ErrorCode.UNEXPECTED, "a snapshot nobody asked for", session, None)]


def test_a_snapshot_already_answered_is_refused_the_second_time():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.send("a", snapshot(4))
    assert relay.messages("a") == []
    relay.send("a", snapshot(4))
    assert [m.code for m in relay.messages("a")] == [ErrorCode.UNEXPECTED]


def test_a_snapshot_agreed_replaces_the_events_up_to_its_seq_in_memory_and_in_the_store():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    publish(relay, "a", "v1", 2)
    state = b'{"n" :  4}'  # kept as the bytes it was received as
    relay.send("a", snapshot(4, state))
    relay.send("b", Digest("s", 4, state_digest(state)))
    session = relay.core.sessions["s"]
    digest = state_digest(state)
    assert (session.snapshot_seq, session.snapshot_state, session.snapshot_digest) == (4, state, digest)
    assert [codec.loads(raw)["seq"] for raw in session.tail] == [5, 6]
    assert relay.store.batches[-1].snapshots == [("s", 4, 0, state, digest)]
    assert relay.store.snapshots["s"] == (4, 0, state, digest)
    assert stored_seqs(relay) == [5, 6]


# --- agreement: a snapshot is kept only once another identity sends the same digest ---------


def answers(state: bytes, digest: str, digest_first: bool) -> list[tuple[str, Any]]:
    """``a``'s snapshot of event 4 with ``state`` and ``b``'s ``digest`` of it, in an order."""
    both = [("a", snapshot(4, state)), ("b", Digest("s", 4, digest))]
    return both[::-1] if digest_first else both


@pytest.mark.parametrize("digest_first", [False, True], ids=["snapshot-first", "digest-first"])
def test_a_snapshot_is_kept_only_once_another_identity_sends_the_same_digest(digest_first):
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    state = b'{"n": 4}'
    first, second = answers(state, state_digest(state), digest_first)
    relay.send(*first)
    session = relay.core.sessions["s"]
    assert (session.snapshot_seq, session.snapshot_state, relay.store.snapshots) == (0, None, {})
    assert stored_seqs(relay) == [1, 2, 3, 4]
    relay.send(*second)
    assert (session.snapshot_seq, session.snapshot_state, session.tail) == (4, state, [])
    assert relay.store.snapshots["s"] == (4, 0, state, state_digest(state))
    assert (session.candidate, session.digests) == (None, {})
    assert relay.core.statistics().divergences == 0
    assert relay.messages("a") == relay.messages("b") == []


@pytest.mark.parametrize("digest_first", [False, True], ids=["snapshot-first", "digest-first"])
def test_a_digest_that_differs_drops_the_snapshot_and_counts_a_divergence(digest_first):
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    first, second = answers(b'{"n": "forged"}', state_digest(b'{"n": 4}'), digest_first)
    relay.send(*first)
    relay.send(*second)
    relay.send("b", Digest("s", 4, state_digest(b'{"n": "forged"}')))  # a second answer: nobody's business
    session = relay.core.sessions["s"]
    assert (session.snapshot_seq, session.candidate, relay.store.snapshots) == (0, None, {})
    assert stored_seqs(relay) == [1, 2, 3, 4]
    assert relay.core.statistics().divergences == 1
    assert relay.core.describe(relay.now)["sessions"][0]["divergences"] == 1
    assert relay.messages("a") == relay.messages("b") == []


def test_a_digest_from_the_snapshots_own_identity_does_not_agree_it():
    relay = Relay(ReflectorConfig(snapshot_every=3))
    for conn, label in (("x1", "x"), ("x2", "x"), ("b", "b")):  # x1 and x2: one identity, admin:x
        relay.hello(conn, Hello(PROTOCOL_VERSION, None, label))
    join(relay, "x1")
    join(relay, "x2")
    relay.send("b", Join(1, "s", "m"))  # event 3: 3 % 3 asks x1 for the snapshot
    assert [requests(relay.messages(conn)) for conn in ("x1", "x2", "b")] == [
        [SnapshotRequest("s", 3)],
        [],  # x2 is skipped: the digest is asked of another identity
        [DigestRequest("s", 3)],
    ]
    state = b'{"n": 3}'
    relay.send("x1", snapshot(3, state))
    relay.send("x2", Digest("s", 3, state_digest(state)))
    session = relay.core.sessions["s"]
    assert (session.snapshot_seq, relay.store.snapshots) == (0, {})
    relay.send("b", Digest("s", 3, state_digest(state)))
    assert relay.store.snapshots["s"] == (3, 0, state, state_digest(state))


def test_a_session_agrees_a_snapshot_only_with_a_digest_of_another_identity():
    session: RelaySession[str] = RelaySession("s", "m", b"null", seq=3, tail=[b"1", b"2", b"3"])
    state = b'{"n": 3}'
    assert session.offer(Candidate(3, 0, state, state_digest(state), "admin:x")) is None
    assert session.vouch(3, state_digest(state), "admin:x") is None  # its own identity
    assert (session.snapshot_seq, session.candidate is not None) == (0, True)
    assert session.vouch(3, state_digest(state), "admin:y") is True
    assert (session.snapshot_seq, session.tail, session.candidate) == (3, [], None)


def test_a_snapshot_whose_digest_is_not_the_digest_of_its_state_is_refused():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.send("b", Digest("s", 4, "made up"))  # even a digest that says the same
    relay.send("a", Snapshot("s", 4, b'{"n": 4}', "made up"))
    assert relay.messages("a") == [
        Error(
            ErrorCode.MALFORMED, "the snapshot of event 4 does not carry the digest of its state", "s", None
        )
    ]
    session = relay.core.sessions["s"]
    assert (session.snapshot_seq, session.candidate, relay.store.snapshots) == (0, None, {})
    relay.send("a", snapshot(4, b'{"n": 4}'))  # the request was answered, badly
    assert [m.code for m in relay.messages("a")] == [ErrorCode.UNEXPECTED]
    publish(relay, "a", "v1", 3)
    assert requests(relay.messages("a") + relay.messages("b")) == []  # tried again an interval later
    publish(relay, "a", "v1", 1)
    assert requests(relay.messages("a") + relay.messages("b")) == [
        SnapshotRequest("s", 8),
        DigestRequest("s", 8),
    ]


def test_a_session_of_one_identity_keeps_its_events_and_is_asked_no_snapshot():
    relay = Relay(ReflectorConfig(snapshot_every=2, max_tail=8))
    for conn in ("x1", "x2"):
        relay.hello(conn, Hello(PROTOCOL_VERSION, None, "x"))
        join(relay, conn)
    relay.send("x1", *[Publish("s", "v1", "add", i) for i in range(6)])
    assert requests(relay.messages("x1") + relay.messages("x2")) == []
    assert stored_seqs(relay) == list(range(1, 9))
    relay.send("x2", Publish("s", "v2", "add", "beyond"))  # the tail is full: no snapshot can empty it
    (refused,) = relay.messages("x2")
    assert refused.code == ErrorCode.LIMIT and "since its latest agreed snapshot" in refused.message
    assert requests(relay.messages("x1")) == []
    assert len(relay.core.sessions["s"].tail) == 8


# --- digest ---------------------------------------------------------------------------------


def test_equal_digests_of_one_seq_are_no_divergence():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Digest("s", 2, "x"))
    relay.send("b", Digest("s", 2, "x"))
    assert relay.core.statistics().divergences == 0


def test_a_snapshots_digest_is_compared_with_a_digest_of_the_same_seq():
    relay = relay_with(snapshot_every=3)
    join(relay, "a")
    join(relay, "b")
    publish(relay, "a", "v1", 1)  # seq 3: 3 % 2 asks "b" for a snapshot, "a" for a digest
    relay.send("a", Digest("s", 3, "theirs"))
    relay.send("b", snapshot(3, b'"mine"'))
    assert relay.core.statistics().divergences == 1


def test_unasked_digests_are_ignored():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.send("a", Digest("s", 4, state_digest(b"{}")))  # the snapshot's own connection
    relay.send("b", Digest("s", 3, state_digest(b"{}")))  # another seq
    assert relay.core.sessions["s"].digests == {}
    assert relay.messages("a") == relay.messages("b") == []


def test_a_digest_from_a_connection_not_in_the_session_is_an_error():
    relay = relay_with()
    join(relay, "a")
    relay.send("b", Digest("s", 1, "x"))
    assert relay.messages("b") == [Error(ErrorCode.NOT_JOINED, "not in session 's'", "s", None)]


# --- ping, status, summary ------------------------------------------------------------------


def test_a_ping_is_answered_with_its_ref():
    relay = relay_with()
    relay.send("a", Ping(41), Ping(42))
    assert relay.messages("a") == [Pong(41), Pong(42)]


def test_a_status_describes_the_occupied_sessions_and_the_summaries_asked_for():
    relay = relay_with()
    relay.now = 10.0
    join(relay, "a", options={"size": 1})
    join(relay, "a", "other")
    relay.send("a", Leave("other", "v1"), Summarize("s", "v1", 1, b'{"done": 1}'))
    relay.now = 12.0
    read_all(relay)
    relay.send("b", StatusRequest(3, ["s", "other", "nowhere"]))
    (status,) = relay.messages("b")
    assert isinstance(status, Status) and status.ref == 3
    info = status.info
    assert (info["version"], info["uptime_s"], info["store"]) == ("test", 12.0, "memory")
    assert [s["name"] for s in info["sessions"]] == ["s"]
    assert {k: info["sessions"][0][k] for k in ("model", "participants", "connections", "seq")} == {
        "model": "m",
        "participants": 1,
        "connections": 1,
        "seq": 1,
    }
    assert info["summaries"] == {"s": {"done": 1}}
    assert info["statistics"]["connections"] == 2


def test_a_summary_is_kept_as_the_bytes_it_was_received_as():
    relay = relay_with()
    join(relay, "a")
    relay.send("a", Summarize("s", "v1", 1, b'{ "state" : "working" ,"n":1 }'))
    assert relay.core.summaries(["s", "nowhere"]) == {"s": b'{ "state" : "working" ,"n":1 }'}
    assert relay.messages("a") == []


def test_a_summary_over_the_limit_is_refused_and_the_last_good_one_kept():
    relay = relay_with(max_summary=10)
    join(relay, "a")
    relay.send("a", Summarize("s", "v1", 1, b'"short"'), Summarize("s", "v1", 2, b'"far too long"'))
    assert relay.messages("a") == [
        Error(ErrorCode.LIMIT, "a summary may have at most 10 bytes, not 14", "s", None)
    ]
    assert relay.core.summaries(["s"]) == {"s": b'"short"'}


def test_a_summary_of_an_older_seq_than_the_kept_one_is_ignored():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Summarize("s", "v1", 2, b'"two"'))
    relay.send("b", Summarize("s", "v2", 1, b'"one"'))
    assert relay.core.summaries(["s"]) == {"s": b'"two"'}
    relay.send("b", Summarize("s", "v2", 2, b'"two again"'))
    assert relay.core.summaries(["s"]) == {"s": b'"two again"'}


def test_only_the_most_recent_summaries_are_kept_least_recent_first():
    relay = relay_with(summaries=2)
    for name in ("one", "two", "three"):
        join(relay, "a", name)
    for name in ("one", "two", "one", "three"):
        relay.send("a", Summarize(name, "v1", 1, codec.dumps(name)))
    assert relay.core.summary_names() == ["one", "three"]


def test_a_summary_of_a_view_not_held_is_an_error():
    relay = relay_with()
    join(relay, "a")
    relay.send("b", Summarize("s", "v1", 1, b"1"))
    assert [m.code for m in relay.messages("b")] == [ErrorCode.NOT_JOINED]
    assert relay.core.summary_names() == []


# --- presence -------------------------------------------------------------------------------


def test_joins_and_exits_are_sequenced_events_of_the_stream():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Leave("s", "v1"))
    relay.send("b", Publish("s", "v2", "add", 1))
    assert [(e["seq"], e["topic"], e["view"], e["data"]) for e in relay.store.stream("s")] == [
        (1, VIEW_JOIN, "v1", "v1"),
        (2, VIEW_JOIN, "v2", "v2"),
        (3, VIEW_EXIT, "v1", "v1"),
        (4, "add", "v2", 1),
    ]


def test_a_dropped_connections_memberships_all_exit():
    relay = relay_with()
    join(relay, "a")
    join(relay, "a", ref=2)
    join(relay, "a", "t")
    join(relay, "b")
    relay.now = 1.0
    relay.drop("a")
    assert relay.messages("b") == [
        Event("s", 4, 1000, "v1", VIEW_EXIT, "v1", identity="admin:a"),
        Event("s", 5, 1000, "v2", VIEW_EXIT, "v2", identity="admin:a"),
    ]
    assert relay.store.presence == {"s": ["v3"], "t": []}
    assert "a" not in relay.core.peers
    assert (phase(relay, "s"), phase(relay, "t")) == (Phase.OCCUPIED, Phase.IDLE)


def test_dropping_an_unknown_connection_changes_nothing():
    relay = relay_with()
    relay.drop("nobody")
    assert relay.core.statistics().connections == 2
    assert relay.store.batches == []


# --- time -----------------------------------------------------------------------------------


def test_session_time_runs_only_while_someone_is_present():
    relay = relay_with()
    join(relay, "a")
    relay.now = 1.0
    relay.send("a", Publish("s", "v1", "add", 1), Leave("s", "v1"))
    assert [m.time for m in relay.messages("a") if isinstance(m, Event)] == [1000, 1000]
    relay.now = 10.0  # nobody present for 9 s
    sync = join(relay, "b")
    assert sync.time == 1000
    relay.now = 10.5
    publish(relay, "b", sync.view, 1)
    assert [(e["seq"], e["time"]) for e in relay.store.stream("s")][-2:] == [(4, 1000), (5, 1500)]


def test_the_last_leavers_view_exit_is_stamped_with_the_time_it_left():
    relay = relay_with()
    join(relay, "a")
    relay.now = 1.0
    relay.send("a", Leave("s", "v1"))
    assert relay.messages("a")[0] == Event("s", 2, 1000, "v1", VIEW_EXIT, "v1", identity="admin:a")


def test_a_silent_occupied_session_ticks_with_its_session_time():
    relay = relay_with(tick_ms=100)
    join(relay, "a")
    join(relay, "b")
    relay.now = 0.25
    relay.tick()
    assert relay.messages("a") == relay.messages("b") == [Tick("s", 250)]
    relay.now = 0.3
    relay.tick()  # ticked 50 ms ago
    assert relay.messages("a") == []


def test_a_session_with_a_recent_event_does_not_tick():
    relay = relay_with(tick_ms=100)
    join(relay, "a", "busy")
    join(relay, "a", "quiet")
    relay.now = 0.95
    publish(relay, "a", "v1", 1, "busy")
    relay.messages("a")
    relay.now = 1.0
    relay.tick()
    assert relay.messages("a") == [Tick("quiet", 1000)]


def test_an_empty_session_does_not_tick():
    relay = relay_with(tick_ms=100)
    join(relay, "a")
    relay.send("a", Leave("s", "v1"))
    read_all(relay)
    relay.now = 5.0
    relay.tick()
    assert relay.messages("a") == []


def test_a_connection_over_its_message_rate_is_told_how_long_to_wait():
    relay = relay_with(max_messages_per_s=10)
    core = relay.core
    assert core.charge("a", [Ping()] * 10, 0.0) == 0.0
    assert core.charge("a", [Ping()] * 5, 0.0) == pytest.approx(0.5)
    assert core.charge("b", [Ping()] * 10, 0.0) == 0.0  # each connection has its own allowance
    assert core.charge("a", [Ping()], 1.0) == 0.0  # a second later the allowance is back, to at most 10
    assert core.charge("a", [Ping()] * 20, 100.0) == pytest.approx(1.0)
    assert core.statistics().throttled == 2


# --- snapshot requests ----------------------------------------------------------------------


def test_a_snapshot_is_asked_every_snapshot_every_events():
    relay = relay_with(snapshot_every=4)
    join(relay, "a")
    join(relay, "b")
    relay.send("a", *[Publish("s", "v1", "add", i) for i in range(2)])
    messages = relay.messages("a")
    assert messages[-1] == SnapshotRequest("s", 4)
    assert messages[-2].seq == 4
    relay.send("a", snapshot(4))
    relay.send("b", Digest("s", 4, state_digest(b"{}")))
    read_all(relay)
    publish(relay, "a", "v1", 3)
    assert requests(relay.messages("a") + relay.messages("b")) == []
    publish(relay, "a", "v1", 1)
    assert requests(relay.messages("a")) == [SnapshotRequest("s", 8)]
    assert requests(relay.messages("b")) == [DigestRequest("s", 8)]


def test_a_lone_member_is_asked_no_snapshot():
    relay = relay_with(snapshot_every=2)
    join(relay, "a")
    publish(relay, "a", "v1", 5)
    assert requests(relay.messages("a")) == []


def asked_members(relay: Relay, events: int) -> list[str]:
    """``a`` publishes ``events`` events in ``s``: who got a snapshot request."""
    publish(relay, "a", "v1", events)
    return [c for c in "ab" if any(isinstance(m, SnapshotRequest) for m in relay.messages(c))]


def test_a_snapshot_request_goes_with_a_digest_request_to_another_member():
    relay = relay_with(snapshot_every=4)
    join(relay, "a")
    join(relay, "b")
    publish(relay, "a", "v1", 2)
    got = {conn: requests(relay.messages(conn)) for conn in "ab"}
    assert sorted(got.values(), key=str) == [[DigestRequest("s", 4)], [SnapshotRequest("s", 4)]]


def test_the_member_asked_is_the_one_at_seq_modulo_the_members_and_the_next_one_gives_a_digest():
    relay = relay_with(snapshot_every=4)
    relay.hello("c")
    for conn in "abc":
        join(relay, conn)
    publish(relay, "a", "v1", 1)  # seq 4: asks the member at 4 % 3 = 1, "b"
    assert [requests(relay.messages(conn)) for conn in "abc"] == [
        [],
        [SnapshotRequest("s", 4)],
        [DigestRequest("s", 4)],
    ]
    relay.send("b", snapshot(4))
    relay.send("c", Digest("s", 4, state_digest(b"{}")))
    assert relay.core.sessions["s"].snapshot_seq == 4
    publish(relay, "a", "v1", 4)  # seq 8: 8 % 3 = 2, "c"
    assert [requests(relay.messages(conn)) for conn in "abc"] == [
        [DigestRequest("s", 8)],
        [],
        [SnapshotRequest("s", 8)],
    ]


def test_an_unanswered_request_is_made_again_after_another_interval_and_a_late_answer_ignored():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay, 4)
    publish(relay, "a", "v1", 3)
    assert requests(relay.messages("a")) == []
    publish(relay, "a", "v1", 1)
    assert requests(relay.messages("a")) == [SnapshotRequest("s", 8)]
    relay.send("a", snapshot(4, b'"old"'))
    assert relay.messages("a") == []  # too late: ignored, no error
    assert relay.core.sessions["s"].snapshot_seq == 0
    relay.send("a", snapshot(8, b'"new"'))
    relay.send("b", Digest("s", 8, state_digest(b'"new"')))
    assert relay.store.snapshots["s"] == (8, 0, b'"new"', state_digest(b'"new"'))


def test_a_request_to_a_dropped_connection_is_forgotten_and_the_next_event_asks_another():
    relay = relay_with(snapshot_every=4)
    relay.hello("c")
    for conn in "abc":
        join(relay, conn)
    assert asked_members(relay, 1) == ["b"]  # seq 4: 4 % 3 = 1
    relay.drop("b")  # seq 5
    read_all(relay)
    publish(relay, "a", "v1", 1)  # seq 6: 6 % 2 = 0, "a"; "c" gives the digest
    assert requests(relay.messages("a")) == [SnapshotRequest("s", 6)]
    assert requests(relay.messages("c")) == [DigestRequest("s", 6)]


# --- eviction and restart -------------------------------------------------------------------


def test_a_session_left_empty_goes_idle_once_its_batch_is_stored():
    relay = relay_with()
    join(relay, "a")
    relay.core.receive("a", Leave("s", "v1"), relay.now)
    assert phase(relay) is Phase.EMPTY
    output = relay.core.take()
    assert output.emptied == ["s"]
    assert relay.core.statistics().sessions == 0
    relay.store.commit(output.batch)
    relay.core.stored_batch(output.emptied)
    assert phase(relay) is Phase.IDLE
    assert relay.core.statistics().idle == 1


def both_leave(relay: Relay) -> None:
    """``a`` and ``b`` join ``s``, then leave: ``a`` is asked a snapshot of its exit (event
    3), and ``b`` a digest of it."""
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Leave("s", "v1"))
    assert SnapshotRequest("s", 3) in relay.messages("a")
    assert DigestRequest("s", 3) in relay.messages("b")
    relay.send("b", Leave("s", "v2"))
    read_all(relay)


def test_an_empty_session_awaiting_its_snapshot_goes_idle_and_takes_the_answer_while_in_memory():
    relay = relay_with(leave_snapshot_after=2)
    both_leave(relay)
    assert phase(relay) is Phase.IDLE  # a leaver that never answers cannot pin it
    relay.send("a", snapshot(3))
    relay.send("b", Digest("s", 3, state_digest(b"{}")))
    assert relay.messages("a") == relay.messages("b") == []
    assert relay.store.snapshots["s"][0] == 3


def test_a_session_whose_leaver_never_answers_leaves_memory_and_a_late_answer_is_ignored():
    relay = relay_with(leave_snapshot_after=2, idle_sessions=0)
    both_leave(relay)
    assert "s" not in relay.core.sessions
    relay.send("a", snapshot(3))
    assert relay.messages("a") == []  # no error: it was asked
    assert "s" not in relay.store.snapshots


def test_idle_sessions_beyond_the_limit_leave_memory_oldest_first():
    relay = relay_with(idle_sessions=1)
    for name in ("one", "two"):
        join(relay, "a", name)
        relay.send("a", Leave(name, "v1"))
    assert list(relay.core.sessions) == ["two"]
    assert relay.core.statistics().idle == 1
    assert set(relay.store.sessions) == {"one", "two"}


def test_only_a_join_of_a_stored_session_not_in_memory_needs_loading():
    relay = relay_with(idle_sessions=0)
    join(relay, "a", "gone")
    relay.send("a", Leave("gone", "v1"))
    join(relay, "a", "here")
    core = relay.core
    assert core.needs_load(Join(1, "gone", "m")) == "gone"
    assert core.needs_load(Join(1, "here", "m")) is None
    assert core.needs_load(Join(1, "never", "m")) is None
    assert core.needs_load(Publish("gone", "v1", "add")) is None


def test_an_evicted_session_comes_back_whole_and_its_seqs_go_on():
    relay = relay_with(idle_sessions=0)
    join(relay, "a")
    publish(relay, "a", "v1", 2)
    relay.send("a", Leave("s", "v1"))
    assert "s" not in relay.core.sessions
    relay.now = 3.0
    sync = join(relay, "b")
    assert [(e.seq, e.topic) for e in sync.events] == [
        (1, VIEW_JOIN),
        (2, "add"),
        (3, "add"),
        (4, VIEW_EXIT),
    ]
    assert sync.view == "v5"
    assert stored_seqs(relay) == [1, 2, 3, 4, 5]
    assert phase(relay) is Phase.OCCUPIED


def test_after_a_restart_the_views_present_exit_first_and_the_stream_goes_on():
    relay = relay_with()
    join(relay, "a")
    relay.now = 2.0
    publish(relay, "a", "v1", 2)
    relay.restart()  # killed: no drop, the store still lists v1 as present
    relay.now = 100.0
    relay.hello("b")
    sync = join(relay, "b")
    assert sync.events[-1] == Event("s", 4, 2000, "v1", VIEW_EXIT, "v1", identity="")  # the reflector's own
    assert (sync.view, sync.time) == ("v5", 2000)  # session time resumes from the last event
    assert stored_seqs(relay) == [1, 2, 3, 4, 5]
    assert relay.store.presence["s"] == ["v5"]


def test_a_session_restored_after_a_restart_keeps_its_snapshot():
    relay = relay_with(snapshot_every=4)
    asked_snapshot(relay)
    relay.now = 1.0
    relay.send("a", snapshot(4, b'{"n":4}'), Publish("s", "v1", "add", 5))
    relay.send("b", Digest("s", 4, state_digest(b'{"n":4}')))
    relay.restart()
    relay.hello("b")
    sync = join(relay, "b")
    assert sync.snapshot == SnapshotRecord(4, 0, {"n": 4}, state_digest(b'{"n":4}'))
    assert [(e.seq, e.topic, e.time) for e in sync.events] == [
        (5, "add", 1000),
        (6, VIEW_EXIT, 1000),
        (7, VIEW_EXIT, 1000),
    ]
    assert sync.view == "v8"


def test_reviving_a_session_already_in_memory_changes_nothing():
    relay = relay_with()
    join(relay, "a")
    stored = relay.store.load("s")
    assert stored is not None
    relay.core.revive(stored, relay.now)
    relay.flush()
    assert relay.core.sessions["s"].seq == 1
    assert relay.messages("a") == []
