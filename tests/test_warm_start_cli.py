"""`metallm warm-start`: the paper's offline setting, stored as the service's first checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.log import checkpoints
from service.policy import loads
from tests.helpers import metallm_cli

pytestmark = pytest.mark.integration

OUTCOMES = Path(__file__).parents[1] / "producers" / "data" / "demo_outcomes.jsonl"


def test_warm_start_stores_a_checkpoint_the_service_restores(engine, pg_schema, tmp_path):
    out = metallm_cli(pg_schema, "warm-start", str(OUTCOMES), "--limit", "40")
    assert out.returncode == 0, out.stderr
    assert "80 updates over 40 queries" in out.stdout
    with engine.connect() as conn:
        checkpoint = checkpoints.latest_checkpoint(conn)
    policy = loads(checkpoint.state)
    assert policy.n_updates == 80 and sorted(policy.arms) == ["gemma-3-270m", "qwen2.5-0.5b"]
    assert checkpoint.reward_watermark == 0  # no live rewards yet

    # refused before the file is embedded (the whole file: no time spent on it)
    again = metallm_cli(pg_schema, "warm-start", str(OUTCOMES))
    assert again.returncode == 2 and "already has a learned policy" in again.stderr
    assert "embedding" not in again.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": "x"}\n')
    refused = metallm_cli(pg_schema, "warm-start", str(bad))
    assert refused.returncode == 2 and "line 1" in refused.stderr
