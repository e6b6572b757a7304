"""The settings table of docs/configuration.md names every setting the service reads, and
nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
#: read from the environment before any Settings exist (the model files' cache: make install)
READ_ELSEWHERE = {"METALLM_MODEL_CACHE": ROOT / "service" / "onnx_export.py"}


def table_rows() -> list[tuple[list[str], str]]:
    """Each row of the settings table: the variables its first column names, in order, and its
    default cell. A cell may name several: a bare ``LABELS_TOPIC`` after
    ``METALLM_QUERIES_TOPIC`` means ``METALLM_LABELS_TOPIC``, and ``_SASL_USERNAME`` after
    ``METALLM_KAFKA_SASL_MECHANISM`` means ``METALLM_KAFKA_SASL_USERNAME`` (the first name with
    its part from ``_SASL`` replaced)."""
    text = PAGE.read_text()
    section = text[text.index("## Settings (environment or `.env`)") :]
    table = section[section.index("| setting |") :]
    table = table[: table.index("\n\n")]
    rows = []
    for row in table.splitlines()[2:]:
        cells = row.split("|")
        tokens = re.findall(r"`([A-Z0-9_]+)`", cells[1])
        first = tokens[0]
        names = [first]
        for token in tokens[1:]:
            if token.startswith("_"):
                part = token.split("_")[1]
                names.append(first[: first.index(f"_{part}_")] + token)
            else:
                names.append(f"METALLM_{token}")
        rows.append((names, cells[2].strip()))
    return rows


def documented_settings() -> set[str]:
    return {name for names, _ in table_rows() for name in names}


def same(default: object, shown: str | None) -> bool:
    if shown is None or default is None:
        return shown is default
    if isinstance(default, dict):
        return json.loads(shown) == default
    if isinstance(default, int | float) and not isinstance(default, bool):
        return float(shown) == float(default)
    return str(default) == shown


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


def test_every_default_shown_is_the_settings_default():
    """A default cell of literals (``6``, ``metallm.queries`` / ``metallm.labels``) or ``–``
    (unset) is what Settings defaults to; a default described in words (the host name and pid,
    every usable core) is worked out at start and not compared."""
    fields = Settings.model_fields
    wrong = []
    for names, cell in table_rows():
        if cell == "–":
            shown: list[str | None] = [None] * len(names)
        elif re.fullmatch(r"`[^`]+`( / `[^`]+`)*", cell):
            shown = list(re.findall(r"`([^`]+)`", cell))
        else:
            continue
        assert len(shown) == len(names), f"{names}: {cell}"
        for name, value in zip(names, shown, strict=True):
            field = fields.get(name.removeprefix("METALLM_").lower())
            if field is None:
                continue  # read elsewhere, before any Settings exist
            default = field.default_factory() if field.default_factory else field.default
            if not same(default, value):
                wrong.append(f"{name}: the table says {value!r}, Settings {default!r}")
    assert not wrong, "\n".join(wrong)
