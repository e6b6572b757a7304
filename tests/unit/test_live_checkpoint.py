"""The live policy's checkpoint: the policy's state with the pacer and the context builder
beside it, not on the policy. ``tests/data/live_policy_v2.ckpt`` was written by the code before
that change (a LinUCB carrying its pacer and builder as attributes, 3 updates, 3 decisions
observed) and must still restore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.context import ContextBuilder, ContextLayout, Feature
from service.decision import LoggedDecision
from service.learning import ContextMismatch, LivePolicy
from service.pacing import BudgetPacer
from service.policy import loads

OLD = Path(__file__).resolve().parents[1] / "data" / "live_policy_v2.ckpt"
LAYOUT = ContextLayout(
    features=(Feature("subject", "categorical"),),
    embedding="none",
    task_buckets=4,
    feature_buckets=4,
)


def configured(target: float | None = 0.001) -> LivePolicy:
    pacer = None if target is None else BudgetPacer(target, cost_unit=0.001, lr=0.5)
    return LivePolicy("linucb", {"seed": 0}, pacer, ContextBuilder(LAYOUT, {"qa": {"subject"}}))


def test_a_checkpoint_written_before_the_change_restores_policy_pacer_and_builder() -> None:
    live = configured()
    live.load(OLD.read_bytes(), 3, 3, "the old checkpoint")
    assert live.policy.n_updates == 3
    assert (live.pacer.n_observed, live.pacer.lam) == (3, 1.0)
    assert live.context.spec == LAYOUT.spec and live.context.length.n == 3
    assert live.policy.pacer is None and live.policy.context is None  # beside, not on it
    assert live.policy.choose(["cheap", "strong"], np.ones(10)).arm in ("cheap", "strong")


def test_a_checkpoint_keeps_pacer_and_builder_beside_the_policy() -> None:
    live = configured()
    live.observe([LoggedDecision(1, 0.003, "qa", 12, {"subject": "math"})])
    stored = live.snapshot().state
    assert loads(stored).n_updates == 0  # a policy checkpoint as the offline tools read it
    again = configured()
    again.load(stored, 0, 1, "a snapshot")
    assert again.pacer == live.pacer and again.pacer is not live.pacer
    assert again.context.state()[0] == live.context.state()[0]
    assert again.policy.pacer is None and again.policy.context is None


def test_the_configuration_decides_what_of_a_stored_pacer_continues() -> None:
    off = configured(target=None)
    off.load(OLD.read_bytes(), 3, 3, "the old checkpoint")
    assert off.pacer is None  # budget mode switched off
    moved = configured(target=0.002)
    moved.load(OLD.read_bytes(), 3, 3, "the old checkpoint")
    assert moved.pacer.n_observed == 0 and moved.pacer.target_cost_per_query == 0.002
    other = LivePolicy("linucb", {"seed": 0}, context=ContextBuilder(ContextLayout()))
    with pytest.raises(ContextMismatch, match="the old checkpoint"):
        other.load(OLD.read_bytes(), 3, 3, "the old checkpoint")
