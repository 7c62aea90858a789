"""The relay core against hostile input: nothing a client sends breaks a session, every
limit holds, and every event carries the identity that caused it. Connections are
labels, time is ``relay.now``; no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from million.relay.config import ConfigError, ReflectorConfig, read_identities
from million.relay.sessions import Phase
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
    Ping,
    ProtocolError,
    Publish,
    Snapshot,
    SnapshotRequest,
    Status,
    StatusRequest,
    Summarize,
    Tick,
    state_digest,
)
from pairing import Relay


def relay_with(**config: Any) -> Relay:
    relay = Relay(ReflectorConfig(**config))
    relay.hello("a")
    relay.hello("b")
    return relay


def join(relay: Relay, conn: str, session: str = "s", **fields: Any) -> None:
    relay.send(conn, Join(1, session, fields.pop("model", "m"), **fields))
    for other in list(relay.core.peers):
        relay.messages(other)


def errors(relay: Relay, conn: str) -> list[tuple[str, str]]:
    return [(m.code, m.message) for m in relay.messages(conn) if isinstance(m, Error)]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def publish_raw(session: str, view: str, data: bytes) -> bytes:
    return b'{"type":"publish","session":"%s","view":"%s","topic":"t","data":%s}' % (
        session.encode(),
        view.encode(),
        data,
    )


def seqs(relay: Relay, conn: str) -> list[int]:
    return [m.seq for m in relay.messages(conn) if isinstance(m, Event)]


# --- a session is never broken by a message --------------------------------------------------


def test_a_publish_nested_300_deep_is_refused_to_its_sender_and_seqs_stay_consecutive():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send_frame("a", publish_raw("s", "v1", nested(300)))
    (error,) = errors(relay, "a")
    assert error[0] == ErrorCode.MALFORMED and "cannot be relayed" in error[1]
    assert relay.messages("b") == []  # nobody else hears of it
    relay.send("a", Publish("s", "v1", "t", 1))
    assert seqs(relay, "a") == seqs(relay, "b") == [3]
    assert [e["seq"] for e in relay.store.stream("s")] == [1, 2, 3]


def test_integers_beyond_64_bits_arrive_as_floats_and_break_nothing():
    relay = relay_with()
    join(relay, "a")
    relay.send_frame("a", publish_raw("s", "v1", b"123456789012345678901234567890"))
    (event,) = relay.messages("a")
    assert event.seq == 2 and event.data == pytest.approx(1.2345678901234568e29)


@pytest.mark.parametrize("depth", [65, 300])
def test_join_options_nested_too_deep_are_refused_and_create_nothing(depth):
    relay = relay_with()
    relay.send_frame(
        "a", b'{"type":"join","ref":4,"session":"deep","model":"m","options":%s}' % nested(depth)
    )
    (error,) = [m for m in relay.messages("a") if isinstance(m, Error)]
    assert (error.code, error.ref) == (ErrorCode.MALFORMED, 4)
    assert "deep" not in relay.core.sessions and "deep" not in relay.store.sessions
    join(relay, "a", "deep", options={"fine": [1]})
    assert relay.store.sessions["deep"] == ("m", b'{"fine":[1]}')


def test_a_summary_nested_too_deep_or_of_an_event_to_come_is_refused():
    relay = relay_with()
    join(relay, "a")
    relay.send_frame("a", b'{"type":"summary","session":"s","view":"v1","seq":1,"data":%s}' % nested(65))
    relay.send("a", Summarize("s", "v1", 2**62, b'"forever first"'))
    assert [code for code, _ in errors(relay, "a")] == [ErrorCode.MALFORMED, ErrorCode.UNEXPECTED]
    assert relay.core.summaries(["s"]) == {}


def test_a_snapshot_no_client_could_encode_again_is_refused_and_the_tail_kept():
    relay = relay_with(snapshot_every=2)
    join(relay, "a")
    join(relay, "b")
    asked = "a" if relay.core.sessions["s"].asked.conn == "a" else "b"
    relay.send_frame(
        asked, b'{"type":"snapshot","session":"s","seq":2,"state":%s,"digest":"d"}' % nested(300)
    )
    assert [code for code, _ in errors(relay, asked)] == [ErrorCode.MALFORMED]
    assert relay.core.sessions["s"].snapshot_seq == 0 and len(relay.core.sessions["s"].tail) == 2


def test_a_digest_nobody_asked_for_is_ignored():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Digest("s", 1, "x"))
    relay.send("b", Digest("s", 1, "y"))
    assert relay.core.statistics().divergences == 0
    assert relay.messages("a") == relay.messages("b") == []


# --- limits ------------------------------------------------------------------------------------


def test_members_beyond_the_limit_are_refused_and_counted():
    relay = relay_with(max_members=2)
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Join(9, "s", "m"))
    (error,) = [m for m in relay.messages("a") if isinstance(m, Error)]
    assert (error.code, error.ref) == (ErrorCode.LIMIT, 9)
    assert relay.core.statistics().refused == {"members": 1}


def test_sessions_beyond_the_limit_are_refused_and_those_in_the_store_still_open():
    relay = relay_with(max_open_sessions=2)
    join(relay, "a", "one")
    join(relay, "a", "two")
    relay.send("a", Join(3, "three", "m"))
    assert [code for code, _ in errors(relay, "a")] == [ErrorCode.LIMIT]
    relay.send("b", Join(4, "one", "m"))
    assert errors(relay, "b") == []


def test_a_session_without_snapshots_refuses_events_beyond_its_tail_until_one_is_agreed():
    relay = relay_with(max_tail=4)
    join(relay, "a")
    join(relay, "b")
    relay.send("a", *[Publish("s", "v1", "t", i) for i in range(2)])  # seq 4: the tail is full
    relay.messages("a")
    relay.messages("b")
    relay.send("a", Publish("s", "v1", "t", 4))
    messages = relay.messages("a")
    assert SnapshotRequest("s", 4) in messages
    assert DigestRequest("s", 4) in relay.messages("b")
    assert [m.code for m in messages if isinstance(m, Error)] == [ErrorCode.LIMIT]
    relay.send("b", Digest("s", 4, state_digest(b"{}")))
    relay.send("a", Snapshot("s", 4, b"{}", state_digest(b"{}")), Publish("s", "v1", "t", 5))
    assert seqs(relay, "a") == [5]
    assert relay.core.statistics().refused == {"tail": 1}


def test_the_tail_is_bounded_in_bytes_too():
    relay = relay_with(max_tail_bytes=400)
    join(relay, "a")
    relay.send("a", *[Publish("s", "v1", "t", "x" * 100) for _ in range(4)])
    assert ErrorCode.LIMIT in [code for code, _ in errors(relay, "a")]
    assert relay.core.sessions["s"].tail_bytes < 400 + 200


def test_a_status_costs_by_what_it_describes_and_a_ping_costs_one():
    relay = relay_with(max_messages_per_s=100)
    for i in range(500):
        join(relay, "a", f"s{i}")
    assert relay.core.charge("b", [Ping()] * 10, 0.0) == 0.0
    assert relay.core.charge("a", [StatusRequest(1)], 0.0) == 0.0  # 1 + 50: within 100
    assert relay.core.charge("a", [StatusRequest(2)], 0.0) > 0.0  # another 51: over
    assert relay.core.statistics().refused == {"rate": 1}


def test_a_status_reply_costs_its_sender_by_its_size():
    relay = relay_with(max_messages_per_s=300)
    for i in range(300):
        join(relay, "a", f"s{i}")
    assert relay.core.charge("b", [StatusRequest(1)], 0.0) == 0.0  # 31 units up front
    relay.send("b", StatusRequest(1))
    size = len(codec.encode(relay.messages("b")[0]))
    assert size > 40_000  # 300 sessions described
    pause = relay.core.charge("b", [Ping()], 0.0)
    assert pause == pytest.approx((31 + size // 100 + 1 - 300) / 300)


def test_a_status_lists_at_most_a_thousand_sessions_and_says_how_many_there_are():
    relay = relay_with()
    for i in range(1001):
        join(relay, "a", f"s{i:04}")
    relay.send("b", StatusRequest(1))
    (status,) = relay.messages("b")
    assert isinstance(status, Status)
    assert len(status.info["sessions"]) == 1000 and status.info["sessions_total"] == 1001


# --- who may connect ---------------------------------------------------------------------------


def test_connections_beyond_the_limits_are_refused_in_all_per_address_and_in_their_handshake():
    relay = Relay(ReflectorConfig(max_connections=3, max_connections_per_ip=2, max_handshakes=2))
    core = relay.core
    core.open("1.1.1.1")
    core.open("1.1.1.1")
    with pytest.raises(ProtocolError, match="in their handshake"):
        core.open("2.2.2.2")
    core.hello("x", [Hello(PROTOCOL_VERSION)], 0.0, "x", "1.1.1.1")
    with pytest.raises(ProtocolError, match=r"1\.1\.1\.1 holds 2 connections"):
        core.open("1.1.1.1")
    core.open("2.2.2.2")
    with pytest.raises(ProtocolError, match="maximum of 3 connections"):
        core.open("3.3.3.3")
    core.drop("x", 0.0)
    core.drop("never said hello", 0.0, "1.1.1.1")
    core.open("3.3.3.3")
    assert core.statistics().refused == {"handshakes": 1, "connections_per_ip": 1, "connections": 1}


def test_an_address_sending_wrong_tokens_is_refused_for_a_minute_even_with_the_right_one():
    relay = Relay(ReflectorConfig(token="t" * 16, max_auth_failures=3))
    for i in range(3):
        with pytest.raises(ProtocolError, match="wrong token"):
            relay.hello(f"bad{i}", Hello(PROTOCOL_VERSION, "guess"))
    with pytest.raises(ProtocolError, match="too many wrong tokens"):
        relay.hello("good", Hello(PROTOCOL_VERSION, "t" * 16))
    relay.now = 61.0
    relay.hello("good", Hello(PROTOCOL_VERSION, "t" * 16))


def test_the_token_is_checked_before_anything_else_is_told():
    relay = Relay(ReflectorConfig(token="t" * 16))
    with pytest.raises(ProtocolError) as refused:
        relay.hello("a", Hello(PROTOCOL_VERSION + 1, "guess"))
    assert refused.value.code == ErrorCode.UNAUTHORIZED


def test_the_view_token_reads_and_cannot_write():
    relay = Relay(ReflectorConfig(token="t" * 16, view_token="v" * 16))
    relay.hello("viewer", Hello(PROTOCOL_VERSION, "v" * 16))
    relay.send("viewer", Join(1, "s", "m"), Publish("s", "v1", "t", 1), Ping(2), StatusRequest(3))
    messages = relay.messages("viewer")
    assert [m.code for m in messages if isinstance(m, Error)] == [ErrorCode.READ_ONLY] * 2
    assert any(isinstance(m, Status) for m in messages)
    assert "s" not in relay.core.sessions


# --- time and presence cost what changes ------------------------------------------------------


def test_ticks_go_only_to_silent_sessions_and_an_event_puts_a_session_last():
    relay = relay_with(tick_ms=100)
    for name in ("one", "two", "three"):
        join(relay, "a", name)
    relay.now = 0.05
    relay.send("a", Publish("one", "v1", "t", 1))
    relay.messages("a")
    relay.now = 0.12
    relay.tick()
    assert [m.session for m in relay.messages("a") if isinstance(m, Tick)] == ["two", "three"]
    assert list(relay.core.table.occupied) == ["one", "two", "three"]
    relay.now = 0.16
    relay.tick()
    assert [m.session for m in relay.messages("a") if isinstance(m, Tick)] == ["one"]


def test_presence_is_stored_one_change_at_a_time():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send("a", Leave("s", "v1"))
    assert [(b.joined, b.left) for b in relay.store.batches if b.joined or b.left] == [
        ([("s", "v1")], []),
        ([("s", "v2")], []),
        ([], [("s", "v1")]),
    ]
    assert relay.store.presence == {"s": ["v2"]}


# --- a store that fails ------------------------------------------------------------------------


def test_what_the_store_could_not_keep_is_not_relayed_and_the_session_takes_no_more():
    relay = relay_with()
    join(relay, "a")
    relay.store_fails = "no space left on device"
    relay.send("a", Publish("s", "v1", "t", 1))
    assert relay.messages("a") == [] and relay.cut == {"a"}
    relay.store_fails = None
    relay.send("a", Publish("s", "v1", "t", 2))
    assert [code for code, _ in errors(relay, "a")] == [ErrorCode.STORAGE]
    relay.send("b", Join(2, "s", "m"))
    assert [code for code, _ in errors(relay, "b")] == [ErrorCode.STORAGE]
    relay.drop("a")  # its members gone, it leaves memory and comes back as the store has it
    assert "s" not in relay.core.sessions
    relay.send("b", Join(3, "s", "m"))
    sync, joined = relay.messages("b")
    assert [(e.seq, e.topic) for e in [*sync.events, joined]] == [
        (1, VIEW_JOIN),
        (2, VIEW_EXIT),
        (3, VIEW_JOIN),
    ]
    assert [e["seq"] for e in relay.store.stream("s")] == [1, 2, 3]


def test_an_error_never_reaches_anyone_but_its_cause():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    relay.send_frame("a", b"[" + publish_raw("s", "v1", nested(300)) + b"]")
    relay.send("a", Summarize("s", "v1", 99, b"1"))
    assert relay.messages("b") == []
    assert all(isinstance(m, Error) for m in relay.messages("a"))
    assert relay.core.sessions["s"].phase is Phase.OCCUPIED
    assert codec.loads(relay.store.events["s"][2])["seq"] == 2


# --- identities ----------------------------------------------------------------------------------


def identities_relay() -> Relay:
    identities = read_identities(
        "# name role token\n"
        "alice admin alice-token-0123456789\n"
        "bob worker bob-token-0123456789ab\n\n"
        "eve viewer eve-token-0123456789ab\n"
    )
    return Relay(ReflectorConfig(identities=identities))


def test_every_event_is_stamped_with_the_identity_of_the_connection_that_caused_it():
    relay = identities_relay()
    relay.hello("a", Hello(PROTOCOL_VERSION, "alice-token-0123456789"))
    relay.hello("b", Hello(PROTOCOL_VERSION, "bob-token-0123456789ab"))
    join(relay, "a")
    relay.send("b", Join(2, "s", "m"))
    relay.messages("b")
    relay.send("b", Publish("s", "v2", "t", {"identity": "admin:alice"}))  # a field proves nothing
    relay.send("a", Leave("s", "v1"))
    stamps = [(e["topic"], e["identity"]) for e in relay.store.stream("s")]
    assert stamps == [
        (VIEW_JOIN, "admin:alice"),
        (VIEW_JOIN, "worker:bob"),
        ("t", "worker:bob"),
        (VIEW_EXIT, "admin:alice"),
    ]


def test_a_viewer_identity_only_reads_and_an_unknown_token_is_refused():
    relay = identities_relay()
    relay.hello("e", Hello(PROTOCOL_VERSION, "eve-token-0123456789ab"))
    relay.send("e", Join(1, "s", "m"), StatusRequest(2))
    assert [type(m) for m in relay.messages("e")] == [Error, Status]
    with pytest.raises(ProtocolError, match="wrong token"):
        relay.hello("x", Hello(PROTOCOL_VERSION, "alice-token-012345678"))


def test_without_identities_each_connection_is_an_identity_of_its_own():
    relay = relay_with()
    join(relay, "a")
    join(relay, "b")
    assert [e["identity"] for e in relay.store.stream("s")] == ["admin:a", "admin:b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice admin", "line 1: expected NAME ROLE TOKEN"),
        ("alice boss alice-token-0123456789", "ROLE one of admin, worker, viewer"),
        ("al ice admin alice-token-0123456789", "line 1"),
    ],
)
def test_a_tokens_file_that_does_not_parse_names_its_line(text, message):
    with pytest.raises(ConfigError, match=message):
        read_identities(text)


@pytest.mark.parametrize(
    ("identities", "message"),
    [
        ("alice admin short", "the token of alice must have at least 16 characters"),
        ("a admin same-token-0123456789\nb worker same-token-0123456789", "a token of its own"),
    ],
)
def test_identities_that_cannot_work_are_refused_at_start(identities, message):
    with pytest.raises(ConfigError, match=message):
        ReflectorConfig(identities=read_identities(identities)).check()
    with pytest.raises(ConfigError, match="not both"):
        ReflectorConfig(token="t" * 16, identities=read_identities("a admin " + "t" * 20)).check()
