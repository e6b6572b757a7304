import json
import logging

from app.cli import _setup_logging


def test_json_log_lines_are_json_objects(capsys):
    _setup_logging("INFO", "json")
    try:
        logging.getLogger("metallm.test").info("decided %d queries", 3)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["message"] == "decided 3 queries"
        assert record["level"] == "INFO" and record["logger"] == "metallm.test"
        assert "time" in record
    finally:
        _setup_logging("WARNING", "text")
