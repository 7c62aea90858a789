"""Quorum, rejections and adaptive trust in the ``Computation`` model, fed events by hand
(views ``a``, ``b``, ... are identities ``admin:a``, ``admin:b``, ...)."""

from __future__ import annotations

from streams import Stream


def test_a_value_is_taken_once_verify_identities_agree_and_disagreement_asks_for_more():
    stream = Stream(2, verify=2)
    stream.prepare("a", ["in", "in"])
    assert stream.model.inputs is None  # one preparer is not enough
    stream.prepare("b", ["in", "in"])
    assert stream.model.inputs == ["in", "in"]
    stream.send("a", "request", {"id": 2, "want": 1})
    stream.send("b", "request", {"id": 2, "want": 1})
    assert stream.given("a") == stream.given("b") == [0]
    stream.send("a", "end", {"results": [{"index": 0, "output": "right"}]})
    stream.send("b", "end", {"results": [{"index": 0, "output": "wrong"}]})
    assert not stream.model.completed[0] and stream.model.wanted == [3, 2]
    stream.send("c", "request", {"id": 1, "want": 1})
    assert stream.given("c") == [0]
    stream.send("c", "end", {"results": [{"index": 0, "output": "right"}]})
    assert stream.model.outputs == ["right", None]
    tally = stream.model.tally
    assert [tally[f"admin:{v}"]["validated"] for v in "abc"] == [2, 1, 1]  # a: inputs and result
    assert tally["admin:b"]["rejected"] == 1


def test_no_agreement_within_max_copies_fails_the_run_naming_who_disagreed():
    stream = Stream(2, verify=2, max_copies=2)
    stream.prepare("a", ["in", "in"])
    stream.prepare("b", ["in", "in"])
    for view, output in (("a", 1), ("b", 2)):
        stream.send(view, "request", {"id": 2, "want": 1})
        stream.send(view, "end", {"results": [{"index": 0, "output": output}]})
    assert stream.model.failed == "no 2 identities agreed on partition 0 (admin:a: 1, admin:b: 2)"


def test_reports_for_partitions_never_handed_out_are_rejected_and_bar_their_identity():
    stream = Stream(4, max_rejections=1)
    stream.prepare("a", ["in"] * 4, want=1)
    for index in (1, 2):
        stream.send("m", "end", {"results": [{"index": index, "output": "forged"}]})
    assert stream.model.outputs == [None] * 4 and stream.model.tally["admin:m"]["rejected"] == 2
    stream.send("m", "request", {"id": 1, "want": 2})
    assert stream.given("m") == []  # more than max_rejections: no more work in this run


def test_a_session_handed_alone_to_a_trusted_identity_takes_its_values_alone():
    stream = Stream(2, verify=2, adaptive=True, alone="admin:x")
    stream.prepare("x", ["p", "q"], want=2)
    assert stream.model.inputs == ["p", "q"] and stream.given("x") == [0, 1]
    stream.send("x", "end", {"results": [{"index": 0, "output": "done alone"}]})
    assert stream.model.completed == [True, False]
    stream.send("y", "request", {"id": 1, "want": 1})
    stream.send("y", "end", {"results": [{"index": stream.given("y")[0], "output": "not alone"}]})
    assert stream.model.completed == [True, False]  # another identity needs a second one
    stream.send("x", "end", {"results": [{"index": 1, "output": "not alone"}]})
    assert stream.model.outputs == ["done alone", "not alone"]


def test_adaptive_hands_a_trusted_identitys_partitions_out_alone_most_of_the_time():
    stream = Stream(100, verify=2, adaptive=True, trust={"admin:t": 50})
    stream.prepare("t", ["in"] * 100)
    stream.prepare("u", ["in"] * 100)
    stream.send("t", "request", {"id": 2, "want": 100})
    alone = [index for index in stream.given("t") if stream.model.alone[index] == "admin:t"]
    assert 90 <= len(alone) < 100  # each with probability 1 - 1/50, drawn the same everywhere
    stream.send("u", "request", {"id": 2, "want": 100})
    assert sorted(stream.given("u")) == sorted(set(range(100)) - set(alone))  # copies of the rest
