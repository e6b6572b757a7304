import base64
import json

import pytest

from service.events import MAX_TEXT_CHARS, InvalidEvent, LabelEvent, QueryEvent, dlq_record


def q(**fields) -> bytes:
    base = {"query_id": "q1", "text": "Great film", "task": "sentiment"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_query_with_all_fields():
    event = QueryEvent.from_bytes(
        q(options=["A", "B"], metadata={"user": 7}, sent_at="2026-11-27T10:00:00Z")
    )
    assert event.options == ["A", "B"]
    assert event.metadata == {"user": 7}
    assert event.sent_at.year == 2026


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "empty message"),
        (q(query_id=""), "query_id"),
        (q(query_id="x" * 129), "query_id"),
        (q(text=""), "text"),
        (q(text="x" * (MAX_TEXT_CHARS + 1)), "text"),
        (q(task=...), "task: Field required"),
        (q(options=["A"]), "options"),
        (q(options=["A", "A"]), "distinct"),
        (q(options=["A", " "]), "non-empty"),
        (q(extra_field=1), "extra_field"),
        (q(metadata=[1]), "metadata"),
    ],
)
def test_invalid_queries_name_the_reason(raw, reason):
    with pytest.raises(InvalidEvent, match=reason):
        QueryEvent.from_bytes(raw)


def test_text_at_the_size_limit_is_accepted():
    assert len(QueryEvent.from_bytes(q(text="x" * MAX_TEXT_CHARS)).text) == MAX_TEXT_CHARS


def test_label_event():
    event = LabelEvent.from_bytes(b'{"query_id": "q1", "label": "positive"}')
    assert (event.query_id, event.label, event.labeled_at) == ("q1", "positive", None)
    with pytest.raises(InvalidEvent, match="label"):
        LabelEvent.from_bytes(b'{"query_id": "q1"}')


def test_events_round_trip_through_bytes():
    event = QueryEvent.from_bytes(q(options=["A", "B"]))
    assert QueryEvent.from_bytes(event.to_bytes()) == event


def test_dlq_record_keeps_raw_bytes_and_origin():
    body = json.loads(dlq_record(b"k", b"\x00raw", "not JSON", "metallm.queries", 0, 41))
    assert base64.b64decode(body["value_b64"]) == b"\x00raw"
    assert base64.b64decode(body["key_b64"]) == b"k"
    assert (body["reason"], body["topic"], body["partition"], body["offset"]) == (
        "not JSON",
        "metallm.queries",
        0,
        41,
    )
    assert json.loads(dlq_record(None, None, "empty", "t", 0, 0))["value_b64"] is None
