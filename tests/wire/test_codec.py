"""The codec: every message round-trips, and bad frames raise a ProtocolError that says why."""

from __future__ import annotations

import hashlib

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from million.replica.state import digest_of, dump_state
from million.wire import codec, protocol
from million.wire.codec import frames
from million.wire.protocol import ErrorCode, ProtocolError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

EXAMPLES = [
    protocol.Hello(1, "secret", "bot"),
    protocol.Join(3, "run-1", "computation", {"n": 7}, True, 12),
    protocol.Leave("run-1", "v3"),
    protocol.Publish("run-1", "v3", "end", {"index": 2, "output": [1, 2]}),
    protocol.Snapshot("run-1", 10, b'{"model":{"x":1}}', "abc"),
    protocol.Digest("run-1", 10, "abc"),
    protocol.Ping(9),
    protocol.StatusRequest(4, ["run-1:progress"]),
    protocol.Summarize("run-1", "v3", 17, b'{"state":"working","completed":3}'),
    protocol.Welcome(1, "c0ffee", "million 0.1.0"),
    protocol.Event("run-1", 4, 120, "v3", "end", None),
    protocol.Sync(
        1,
        "run-1",
        "v5",
        "computation",
        {"n": 7},
        130,
        True,
        protocol.SnapshotRecord(3, 100, {"model": {}}, "d"),
        [protocol.Event("run-1", 4, 120, "v3", "end", [1])],
    ),
    protocol.Tick("run-1", 200),
    protocol.SnapshotRequest("run-1", 4),
    protocol.DigestRequest("run-1", 4),
    protocol.Left("run-1", "v3"),
    protocol.Error(ErrorCode.NOT_JOINED, "no", "run-1", 3),
    protocol.Pong(9),
    protocol.Status(4, {"sessions": []}),
]


def table_for(message: object) -> dict[str, type]:
    """The decoding table of ``message`` (or of a message class)."""
    cls = message if isinstance(message, type) else type(message)
    if cls in protocol.CLIENT_MESSAGES.values():
        return protocol.CLIENT_MESSAGES
    return protocol.REFLECTOR_MESSAGES


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    encoded = codec.encode(message)
    assert orjson.loads(encoded)["type"] == protocol.MESSAGE_TYPES[type(message)]
    assert codec.decode(encoded, table_for(message)) == [message]


def test_every_message_class_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(protocol.MESSAGE_TYPES)


def test_a_frame_carries_several_messages_in_order():
    events = [protocol.Event("s", seq, seq * 10, "v1", "t", seq) for seq in range(1, 4)]
    frame = codec.frame([codec.encode(e) for e in events])
    assert codec.decode_reflector(frame) == events


def test_the_hot_path_event_encoder_matches_the_converter():
    event = protocol.Event("s", 5, 77, "v2", "topic", {"deep": [1, "two"]})
    assert codec.encode_event(*attrs.astuple(event, recurse=False)) == codec.encode(event)


def test_the_snapshot_encoder_matches_the_converter():
    state = {"seq": 3, "model": {"counts": {1: [2, None]}}}
    snapshot = protocol.Snapshot("s", 3, dump_state(state), digest_of(state))
    encoded = codec.encode_snapshot("s", 3, dump_state(state), protocol.state_digest(dump_state(state)))
    assert encoded == codec.encode(snapshot)


def test_a_snapshots_digest_is_the_digest_of_its_state_bytes_as_the_reflector_receives_them():
    state = {"seq": 3, "model": {"counts": {1: [2, None]}, "name": "é"}}
    raw = dump_state(state)
    assert protocol.state_digest(raw) == hashlib.sha256(raw).hexdigest()[:32] == digest_of(state)
    frame = codec.frame(
        [codec.encode(protocol.Ping(1)), codec.encode_snapshot("s", 3, raw, digest_of(state))]
    )
    (_, received) = codec.decode_client(frame)
    assert received.state == raw
    assert protocol.state_digest(received.state) == received.digest


def test_opaque_payloads_come_back_as_the_bytes_they_were_received_as():
    frame = (
        b'[{"type": "summary", "session": "s", "view": "v1", "seq": 2, "data": [ 1, {"a" : "b"} ]},'
        b' {"type": "snapshot", "session": "s", "seq": 1, "state": {"n" :  1}, "digest": "d"}]'
    )
    summary, snapshot = codec.decode_client(frame)
    assert summary.data == b'[ 1, {"a" : "b"} ]'
    assert snapshot.state == b'{"n" :  1}'


@pytest.mark.parametrize(
    ("frame", "code", "problem"),
    [
        (b"", ErrorCode.MALFORMED, "frame is not valid JSON: Input is a zero-length, empty document"),
        (b"{", ErrorCode.MALFORMED, "frame is not valid JSON: unexpected end of data"),
        (b"[1, 2]", ErrorCode.MALFORMED, "a message must be a JSON object"),
        (b'{"type": 5}', ErrorCode.UNKNOWN_TYPE, "unknown message type 5"),
        (
            b'{"type": "welcome", "version": 1, "connection": "c", "server": "s"}',
            ErrorCode.UNKNOWN_TYPE,
            "unknown message type 'welcome'",
        ),
        (b'{"type": "ping", "ref": "1"}', ErrorCode.MALFORMED, "attribute ref: expected int, got str '1'"),
        (b'{"type": "ping", "ref": true}', ErrorCode.MALFORMED, "attribute ref: expected int, got bool True"),
        (b'{"type": "leave", "session": "s"}', ErrorCode.MALFORMED, "missing field 'view'"),
    ],
)
def test_bad_frames_raise_protocol_errors_that_say_what_is_wrong(frame, code, problem):
    with pytest.raises(ProtocolError) as error:
        codec.decode_client(frame)
    assert error.value.code == code
    assert problem in error.value.message


#: How every message of ``ProtocolError`` raised by the decoder starts, by code.
DECODE_PROBLEMS = {
    ErrorCode.MALFORMED: ("frame is not valid JSON: ", "a message must be a JSON object", "bad '"),
    ErrorCode.UNKNOWN_TYPE: ("unknown message type ",),
}


def decodes_faithfully_or_says_why(frame: bytes, table: dict[str, type]) -> list[object] | ProtocolError:
    """Decode ``frame``: the messages must re-encode to frames that decode to the same
    messages; a refusal must be a decoding error whose message names the problem."""
    try:
        messages = codec.decode(frame, table)
    except ProtocolError as exc:
        assert exc.code in DECODE_PROBLEMS, exc.code
        assert exc.message.startswith(DECODE_PROBLEMS[exc.code]), exc.message
        return exc
    assert all(type(m) in table.values() for m in messages)
    assert codec.decode(codec.frame(codec.encode(m) for m in messages), table) == messages
    return messages


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_faithfully_or_say_why(data):
    decodes_faithfully_or_says_why(data, protocol.CLIENT_MESSAGES)


@given(
    st.sampled_from(sorted(protocol.MESSAGE_TYPES.values())),
    st.dictionaries(st.text(max_size=10), json_values),
)
def test_arbitrary_fields_decode_faithfully_or_say_why(tag, fields):
    frame = orjson.dumps({**fields, "type": tag})
    for table in (protocol.CLIENT_MESSAGES, protocol.REFLECTOR_MESSAGES):
        decoded = decodes_faithfully_or_says_why(frame, table)
        if isinstance(decoded, ProtocolError):
            assert decoded.code == (ErrorCode.MALFORMED if tag in table else ErrorCode.UNKNOWN_TYPE)
        else:
            assert type(decoded[0]) is table[tag]


@given(st.sampled_from(EXAMPLES), st.data())
def test_a_message_with_a_field_changed_decodes_faithfully_or_the_error_names_the_field(message, data):
    body = orjson.loads(codec.encode(message))
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    decoded = decodes_faithfully_or_says_why(orjson.dumps(body), table_for(message))
    if isinstance(decoded, ProtocolError) and key != "type":
        assert decoded.message.startswith(f"bad {body['type']!r} message: ")
        assert f"attribute {key}" in decoded.message


@given(st.sampled_from([protocol.Publish, protocol.Event]), st.data())
def test_the_hot_path_messages_decode_exactly_as_the_converter_structures_them(cls, data):
    fields = {field.name: data.draw(json_values) for field in attrs.fields(cls)}
    frame = orjson.dumps({**fields, "type": protocol.MESSAGE_TYPES[cls]})
    try:
        expected = codec.converter.structure(fields, cls)
    except Exception:
        with pytest.raises(ProtocolError) as error:
            codec.decode(frame, table_for(cls))
        assert error.value.code == ErrorCode.MALFORMED
    else:
        assert codec.decode(frame, table_for(cls)) == [expected]


encoded_strings = st.binary(min_size=1, max_size=50).map(lambda b: b'"' + b.hex().encode() + b'"')


@given(st.lists(encoded_strings, max_size=40))
def test_outgoing_frames_stay_within_the_limit_and_keep_every_message(parts):
    limit = 120
    chunks = frames(parts, limit)
    assert [item for frame in chunks for item in orjson.loads(frame)] == [orjson.loads(p) for p in parts]
    assert all(len(frame) <= limit for frame in chunks if len(orjson.loads(frame)) > 1)


@given(
    st.sampled_from(EXAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=6)
)
def test_frames_with_bytes_flipped_inserted_or_cut_decode_faithfully_or_say_why(message, edits):
    frame = bytearray(codec.encode(message))
    for position, replacement in edits:
        at = position % (len(frame) + 1)
        frame[at : at + len(replacement) % 2 + 1] = replacement
    decodes_faithfully_or_says_why(bytes(frame), table_for(message))
