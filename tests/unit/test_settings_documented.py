"""The settings table of docs/configuration.md names every setting the service reads, and
nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
#: read from the environment before any Settings exist (the model files' cache: make install)
READ_ELSEWHERE = {"METALLM_MODEL_CACHE": ROOT / "service" / "onnx_export.py"}


def documented_settings() -> set[str]:
    """The variables of the settings table's first column. A cell may name several: a bare
    ``LABELS_TOPIC`` after ``METALLM_QUERIES_TOPIC`` means ``METALLM_LABELS_TOPIC``, and
    ``_SASL_USERNAME`` after ``METALLM_KAFKA_SASL_MECHANISM`` means
    ``METALLM_KAFKA_SASL_USERNAME`` (the first name with its part from ``_SASL`` replaced)."""
    text = PAGE.read_text()
    section = text[text.index("## Settings (environment or `.env`)") :]
    table = section[section.index("| setting |") :]
    table = table[: table.index("\n\n")]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        cell = row.split("|")[1]
        tokens = re.findall(r"`([A-Z0-9_]+)`", cell)
        first = tokens[0]
        names.add(first)
        for token in tokens[1:]:
            if token.startswith("_"):
                part = token.split("_")[1]
                names.add(first[: first.index(f"_{part}_")] + token)
            else:
                names.add(f"METALLM_{token}")
    return names


def test_every_setting_is_in_the_table_and_every_row_is_a_setting():
    prefix = Settings.model_config["env_prefix"]
    read = {f"{prefix}{name}".upper() for name in Settings.model_fields} - {"METALLM_DATABASE_URL"}
    read.add("DATABASE_URL")  # read bare (METALLM_DATABASE_URL too)
    for name, reader in READ_ELSEWHERE.items():
        assert f'os.environ.get("{name}")' in reader.read_text()
        read.add(name)
    documented = documented_settings()
    assert read - documented == set(), "settings missing from the table"
    assert documented - read == set(), "table rows that are not settings"
