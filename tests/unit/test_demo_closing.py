"""The demo's closing words name the router it ran, as configured (not a policy it did not run)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from producers.demo import closing
from service.settings import Settings


def rendered(policy: str) -> str:
    console = Console(record=True, width=200)
    console.print(closing(200, 180, "metallm_demo", False, Path("demo.png"), policy))
    return " ".join(console.export_text().split())


def test_the_closing_words_name_the_configured_policy():
    default = Settings.model_fields["policy"].default
    text = rendered(default)
    assert f"Kafka → embedding → the {default} router → an LLM → Postgres" in text
    assert "the linucb router" in rendered("linucb")
    assert "LinUCB" not in text
