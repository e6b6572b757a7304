"""The runnable examples in the docstrings of the evaluation modules."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    f"service.evaluation.{p.stem}"
    for p in sorted((ROOT / "service" / "evaluation").glob("*.py"))
    if p.stem != "__init__"
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # examples read tests/policy/data relative to the repo root
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"
