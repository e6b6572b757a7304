"""The context builder: stable hashing, one-hots of unseen tasks and values, online
standardisation, what a bad metadata value raises, and its checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from service.context import (
    ContextBuilder,
    ContextError,
    ContextLayout,
    Feature,
    bucket,
    features_of,
)
from service.policy import LinUCB, loads

EMB = np.linspace(-1.0, 1.0, 384)


def layout(**changes) -> ContextLayout:
    base = {
        "embedding": "project:8",
        "task_buckets": 8,
        "feature_buckets": 8,
        "features": (Feature("subject", "categorical"), Feature("level", "numeric")),
    }
    return ContextLayout(**{**base, **changes})


def test_buckets_are_the_same_in_every_process_and_python_hash_seed() -> None:
    code = (
        "from service.context import bucket;"
        "print([bucket('task', t, 64) for t in ('sentiment', 'intent', 'yes_no', 'ünïcode')])"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(runs) == 1
    # and across versions: these values are part of the stored layout's meaning
    assert bucket("task", "sentiment", 64) == 28
    assert runs == {
        str([bucket("task", t, 64) for t in ("sentiment", "intent", "yes_no", "ünïcode")]) + "\n"
    }


def test_parts_are_where_the_layout_says_and_unseen_values_need_nothing() -> None:
    builder = ContextBuilder(layout(), {"qa": {"subject", "level"}})
    lay = builder.layout
    assert lay.dim(384) == 2 + 8 + 8 + 2 + 8
    x = builder.build("never-seen-task", "hello", {"subject": "brand new", "level": 2}, EMB)
    assert x.dtype == np.float32 and x.shape == (lay.dim(384),)
    assert x[0] == 1.0 and x[1] == 0.0  # bias; length standardised from nothing yet
    task = x[2:10]
    assert task.sum() == 1.0 and task[bucket("task", "never-seen-task", 8)] == 1.0
    # features in name order: level (value, missing), then subject's one-hot. The task
    # does not declare them: they read as missing
    assert x[10:12].tolist() == [0.0, 1.0] and x[12:20].sum() == 0.0
    y = builder.build("qa", "hello", {"subject": "brand new", "level": 2, "other": "x"}, EMB)
    assert y[12 + bucket("subject", "brand new", 8)] == 1.0 and y[12:20].sum() == 1.0
    assert y[10:12].tolist() == [0.0, 0.0]  # a value, standardised from nothing yet: 0
    # the embedding part: the unit vector projected, the same matrix every time
    e = EMB / np.linalg.norm(EMB)
    np.testing.assert_allclose(y[20:], (e @ builder.projection).astype(np.float32))
    other = ContextBuilder(layout(), {"qa": {"subject", "level"}})
    np.testing.assert_array_equal(other.build("qa", "hello", None, EMB)[20:], y[20:])
    # the layout names each block where the builder put it
    assert dict(lay.blocks) == {
        "bias": slice(0, 1),
        "length": slice(1, 2),
        "task": slice(2, 10),
        "feature:level": slice(10, 12),
        "feature:subject": slice(12, 20),
        "embedding": slice(20, None),
    }
    assert y[lay.block("embedding")].shape == (8,)
    with pytest.raises(KeyError, match="has no block 'feature:colour'"):
        lay.block("feature:colour")
    assert dict(ContextLayout(embedding="legacy").blocks) == {"embedding": slice(0, None)}


def test_numbers_are_standardised_online_in_observation_order() -> None:
    builder = ContextBuilder(layout())
    values = [1.0, 3.0, 5.0, 7.0]
    for v in values:
        builder.observe("t", 10, {"level": v})
    z = builder.build("t", "x" * 10, {"level": 4.0}, EMB)[10]
    assert z == pytest.approx((4.0 - np.mean(values)) / np.std(values), rel=1e-6)
    assert builder.build("t", "x", {"level": 1e9}, EMB)[10] == 5.0  # clipped
    assert builder.length.n == 4
    long = builder.build("t", "x" * 1000, None, EMB)
    assert long[1] == 0.0  # every observed length was the same: no spread, no signal
    builder.observe("t", 1000, None)
    assert builder.build("t", "x" * 1000, None, EMB)[1] > 1.0
    assert builder.numeric["level"].n == 4  # a missing value is not counted


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"level": "hard"}, "metadata.level is declared numeric but is 'hard'"),
        ({"level": True}, "declared numeric but is True"),
        ({"level": float("nan")}, "declared numeric but is nan"),
        ({"subject": {"a": 1}}, "metadata.subject is declared categorical but is a dict"),
    ],
)
def test_a_value_that_does_not_fit_its_kind_is_an_error(metadata, message) -> None:
    builder = ContextBuilder(layout(), {"qa": {"subject", "level"}})
    with pytest.raises(ContextError, match=message.replace("(", r"\(")):
        builder.check("qa", metadata)
    builder.check("other-task", metadata)  # not declared there: ignored, as any extra key
    builder.check("qa", {"level": 3, "subject": 7, "extra": object()})


def test_layout_specs_name_every_part_and_reject_bad_ones() -> None:
    assert layout().spec == (
        "v1 bias length task/8 level:numeric subject:categorical/8 emb:project/8@0"
    )
    assert ContextLayout(embedding="legacy").spec == "legacy"
    assert ContextLayout(embedding="raw").dim(384) == 2 + 64 + 384
    for bad in ("project:0", "pca", "project:x", "raw:3"):
        with pytest.raises(ContextError):
            ContextLayout(embedding=bad)
    with pytest.raises(ContextError, match="declared categorical by one task and numeric"):
        features_of({"a": {"k": "categorical"}, "b": {"k": "numeric"}})
    with pytest.raises(ContextError):
        Feature.parse("subject")


def test_the_builder_travels_in_the_policy_checkpoint() -> None:
    builder = ContextBuilder(layout(), {"qa": {"subject", "level"}})
    for i in range(5):
        builder.observe("qa", 10 * i, {"level": i})
    x = builder.build("qa", "some text", {"subject": "s", "level": 2}, EMB)
    policy = LinUCB(seed=0)
    policy.context = builder
    policy.update("a", x, 1.0)
    restored = loads(policy.dumps()).context
    assert restored is not None and restored.spec == builder.spec
    assert restored.state()[0] == builder.state()[0]
    restored.declared = builder.declared
    np.testing.assert_array_equal(
        restored.build("qa", "some text", {"subject": "s", "level": 2}, EMB), x
    )
