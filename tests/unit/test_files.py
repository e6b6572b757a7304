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


def test_an_unknown_field_is_a_bad_row_named_with_the_nearest_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"query_id": "a", "text": "hi", "task": "s", "metdata": {"tier": "gold"}}\n'
        '{"query_id": "b", "text": "yo", "task": "s", "label": "x"}\n'
    )
    for kind in ("queries", "labels"):  # a typo loses data whichever file reads the row
        with pytest.raises(InputFileError) as info:
            read_events(path, kind)
        assert f"{path}:1: unknown field 'metdata' (did you mean 'metadata'?)" in str(info.value)
        assert "1 bad rows" in str(info.value)


def test_an_unknown_csv_column_is_told_once_for_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("query_id,text,task,lable\na,hi,s,x\nb,yo,s,y\n")
    with pytest.raises(InputFileError) as info:
        read_events(path, "labels")
    message = str(info.value)
    assert "1 bad rows" in message
    assert f"{path}:1: unknown column 'lable' (did you mean 'label'?)" in message


def test_a_repeated_id_is_a_bad_row_naming_the_first(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"query_id": "a", "text": "hi", "task": "s", "label": "x"}\n'
        '{"query_id": "b", "text": "yo", "task": "s"}\n'
        '{"query_id": "a", "text": "another text", "task": "s", "label": "y"}\n'
    )
    for kind in ("queries", "labels"):
        with pytest.raises(InputFileError) as info:
            read_events(path, kind)
        assert f"{path}:3: query_id 'a' repeats line 1" in str(info.value)


def test_a_dataset_row_may_carry_a_score_instead_of_a_label(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        '{"query_id": "a", "text": "hi", "task": "chat", "score": 0.5}\n'
        '{"query_id": "b", "text": "yo", "task": "s", "label": "x"}\n'
    )
    labels = read_events(jsonl, "labels")
    assert [(e.query_id, e.label, e.score) for e in labels] == [("a", None, 0.5), ("b", "x", None)]
    csv = tmp_path / "d.csv"
    csv.write_text("query_id,text,task,score\na,hi,chat,1\nb,yo,chat,high\n")
    with pytest.raises(InputFileError) as info:
        read_events(csv, "labels")
    assert "d.csv:3: score: Input should be a valid number" in str(info.value)
    csv.write_text("query_id,text,task,score\na,hi,chat,1\n")
    assert [e.score for e in read_events(csv, "labels")] == [1.0]
