import pytest

from producers.files import InputFileError, read_events


def test_jsonl_dataset_serves_queries_and_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"query_id": "a", "text": "hi", "task": "s", "label": "x"}\n\n'
        '{"query_id": "b", "text": "yo", "task": "s"}\n'
    )
    queries = read_events(path, "queries")
    assert [e.query_id for e in queries] == ["a", "b"]
    labels = read_events(path, "labels")
    assert [(e.query_id, e.label) for e in labels] == [("a", "x")]


def test_csv_with_options_and_metadata(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "query_id,text,task,options,metadata,label\n"
        'a,"Which, one?",mc,A|B|C,"{""u"": 1}",B\n'
        'b,Pick,mc,"[""x"", ""y""]",,x\n'
    )
    queries = read_events(path, "queries")
    assert queries[0].options == ["A", "B", "C"] and queries[0].metadata == {"u": 1}
    assert queries[1].options == ["x", "y"] and queries[1].metadata is None
    assert [e.label for e in read_events(path, "labels")] == ["B", "x"]


def test_bad_rows_are_listed_with_line_numbers_and_nothing_is_returned(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"query_id": "a", "text": "hi", "task": "s"}\n'
        "oops\n"
        '{"query_id": "", "text": "hi", "task": "s"}\n'
    )
    with pytest.raises(InputFileError) as info:
        read_events(path, "queries")
    message = str(info.value)
    assert "2 bad rows, nothing was sent" in message
    assert f"{path}:2: not JSON" in message
    assert f"{path}:3: query_id" in message
