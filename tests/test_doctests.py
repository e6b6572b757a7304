"""The runnable examples in the docstrings of every module of every package (one runner for
all, so a module's examples are checked wherever it lives)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import app
import consumers
import door
import evaluation
import producers
import service

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    module.name
    for package in (app, consumers, door, service, evaluation, producers)
    for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
]


def test_every_module_is_found() -> None:
    assert {"service.policy.linucb", "service.reward", "consumers.batch", "app.cli"} <= set(MODULES)
    assert "evaluation.metrics" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # examples read tests/policy/data relative to the repo root
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"
