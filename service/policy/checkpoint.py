"""Versioned byte serialisation of policies (what the storage layer keeps in Postgres).

Format version 2 (version 1 is still read) — all integers big-endian::

    offset  size  field
    0       8     magic  b"MLLMPOL\\x00"
    8       2     format version (uint16) = 2
    10      4     header length H (uint32)
    14      H     header: UTF-8 JSON object (below)
    14+H    …     payload: a numpy ``.npz`` archive (``np.savez``, no pickled objects)

Header keys:

``kind``            policy name as in ``make_policy`` ("linucb", "lin_ts", …) — dispatch key
``params``          constructor keyword arguments (JSON values)
``arms``            arm ids in slot order (strings or ints)
``n_updates``       number of updates applied
``rng``             ``numpy.random.PCG64`` state (``Generator.bit_generator.state``)
``input_dim``       raw context dimension, or null before the first context
``feature_names``   frozen key order for dict contexts, or null
``pacer``           budget-mode λ state (``BudgetPacer.to_dict()``) or null
``context``         the context builder (``ContextBuilder.state()``: layout, its ``spec``,
                    running statistics) or null; absent in older checkpoints (null)
``costs``           each arm's recorded output tokens and costs (``CostEstimator.to_dict()``,
                    :mod:`service.pricing`) or null; absent in older checkpoints (null)
``conservative``    conservative mode's counts and sums (``ConservativeGuard.to_dict()``,
                    :mod:`service.policy.conservative`) or null; absent in older checkpoints
``state``           kind-specific JSON (e.g. ``{"dim": 384}`` for the linear policies)

Payload arrays: ``projection`` (``input_dim × project_dim``, only if projecting), the context
builder's arrays prefixed ``c_`` (``c_projection``: its embedding projection) and the
kind-specific statistics prefixed ``s_``; for the linear policies (one row per arm in ``arms``
order): ``s_A_packed`` (float64, the upper triangle of each symmetric ``A`` in
``numpy.triu_indices`` order), ``s_b`` (float64), ``s_counts`` (int64), ``s_reward_sum``
(float64) and ``s_scorer`` (float32, the approximate ``A⁻¹`` that scores decisions). Version 1
kept the full ``s_A`` plus ``s_A_inv`` and ``s_theta`` (float64) and no scorer; loading it
re-derives the scorer from ``A``. ``correctness_ucb`` adds ``s_scale`` (float64, the
per-coordinate rescaling its block prior fixed at the first context), ``s_cost_n`` (int64) and
``s_cost_sum`` (float64: each arm's count and sum of the costs it learned). ``arm_means``
keeps ``s_group``, ``s_arm`` (int64: each (task bucket or −1, arm slot) pair), ``s_sums``
(float64, per pair: count and sum of outcomes) and ``s_cost`` (float64, per arm: count and sum
of costs). ``auto`` (the selector) keeps its serving candidate, the arms it scores over, its
switches and each candidate's header fields in ``state``, the score sums ``s_sum`` and
``s_cross`` (float64), and each candidate's own arrays prefixed by its name
(``s_linucb__A_packed``…). The River
baselines keep per-arm arrays: ``s_pulls`` (int64) and ``s_means`` (float64, "ucb") or
``s_wins`` (int64, "thompson"), with the total pull count ``n`` in ``state``; checkpoints
written before kept the River policy object instead, pickled in the uint8 array
``s_pickle_river``, and still load. The regressor policies ("eps_greedy",
"softmax") store their River regressors as pickles in uint8 arrays: only load those from a
trusted store.

``dumps`` → ``loads`` round-trips exactly: same statistics bit for bit, same random state, so
the loaded policy makes the same future choices.

    >>> import numpy as np
    >>> from service.policy import LinUCB, loads
    >>> p = LinUCB(seed=1); p.update("a", np.ones(3), 1.0)
    >>> q = loads(p.dumps())
    >>> x = np.arange(3.0)
    >>> p.choose(["a", "b"], x) == q.choose(["a", "b"], x)
    True
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

MAGIC = b"MLLMPOL\x00"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">8sHI")


class CheckpointError(ValueError):
    """The bytes are not a policy checkpoint this code can read."""


@dataclass
class PolicyState:
    """What a checkpoint keeps of a policy: what ``RoutingPolicy.checkpoint_state`` gives and
    ``RoutingPolicy.from_checkpoint_state`` rebuilds a policy from. This module alone knows how
    it is laid out in bytes."""

    kind: str
    params: dict[str, Any]  # constructor keyword arguments (JSON values)
    arms: list
    n_updates: int
    rng: dict[str, Any]  # the decision Generator's bit_generator.state
    input_dim: int | None
    feature_names: list[str] | None
    projection: np.ndarray | None
    meta: dict[str, Any]  # kind-specific JSON
    arrays: dict[str, np.ndarray]  # constructor arrays and kind-specific statistics
    pacer: Any = None  # a service.pacing.BudgetPacer
    context: Any = None  # a service.context.ContextBuilder
    costs: dict[str, Any] | None = None  # service.pricing.CostEstimator.to_dict()
    conservative: dict[str, Any] | None = None  # ConservativeGuard.to_dict()


class Checkpointable(Protocol):
    def checkpoint_state(self) -> PolicyState: ...


#: The one registry of policy classes, by ``kind``: ``make_policy`` builds from it and
#: :func:`loads` dispatches on it. A class enters it as it is defined
#: (``RoutingPolicy.__init_subclass__`` calls :func:`register`).
POLICIES: dict[str, type] = {}


def register(cls: type) -> None:
    """Make ``cls`` the class of its own ``kind``. A class without a ``kind`` of its own (a
    base class, or a subclass that merely inherits its parent's) is not registered; a second
    class declaring a ``kind`` already taken is an error."""
    kind = cls.__dict__.get("kind")
    if not kind:
        return
    taken = POLICIES.get(kind)
    if taken is not None and taken is not cls:
        raise CheckpointError(
            f"two policy classes declare kind {kind!r}: {taken.__qualname__} and {cls.__qualname__}"
        )
    POLICIES[kind] = cls


def dump_policy(policy: Checkpointable) -> bytes:
    """Serialise ``policy`` (format version 2, see module docstring)."""
    return dump_state(policy.checkpoint_state())


def dump_state(state: PolicyState) -> bytes:
    """Serialise a policy's checkpoint state, with the pacer and context builder it carries
    (format version 2, see module docstring)."""
    context_meta, context_arrays = (None, {}) if state.context is None else state.context.state()
    header = {
        "kind": state.kind,
        "params": state.params,
        "arms": state.arms,
        "n_updates": state.n_updates,
        "rng": state.rng,
        "input_dim": state.input_dim,
        "feature_names": state.feature_names,
        "pacer": None if state.pacer is None else state.pacer.to_dict(),
        "context": context_meta,
        "costs": state.costs,
        "conservative": state.conservative,
        "state": state.meta,
    }
    payload: dict[str, np.ndarray] = {f"s_{k}": v for k, v in state.arrays.items()}
    if state.projection is not None:
        payload["projection"] = state.projection
    payload.update({f"c_{k}": v for k, v in context_arrays.items()})
    buf = io.BytesIO()
    np.savez(buf, **payload)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + buf.getvalue()


def read_header(data: bytes) -> dict:
    """The JSON header of a checkpoint (cheap: the statistics are not decoded)."""
    if len(data) < _PREFIX.size:
        raise CheckpointError("too short to be a policy checkpoint")
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError("not a metallm policy checkpoint (bad magic)")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"unsupported checkpoint format version {version}")
    try:
        return json.loads(data[_PREFIX.size : _PREFIX.size + length])
    except ValueError as exc:
        raise CheckpointError(f"corrupt checkpoint header: {exc}") from exc


def loads(data: bytes) -> Any:
    """Rebuild a policy (a ``RoutingPolicy``) from :func:`dump_policy` bytes, dispatching on
    the header's ``kind``."""
    return from_state(load_state(data))


def from_state(state: PolicyState) -> Any:
    """The policy of a checkpoint's state, by its ``kind``."""
    if state.kind not in POLICIES:
        raise CheckpointError(f"unknown policy kind {state.kind!r}")
    return POLICIES[state.kind].from_checkpoint_state(state)


def load_state(data: bytes) -> PolicyState:
    """The state :func:`dump_state` serialised (the policy not built yet)."""
    header = read_header(data)
    _, _, length = _PREFIX.unpack_from(data)
    with np.load(io.BytesIO(data[_PREFIX.size + length :]), allow_pickle=False) as npz:
        payload = {name: npz[name] for name in npz.files}
    state = PolicyState(
        kind=header["kind"],
        params=header["params"],
        arms=header["arms"],
        n_updates=header["n_updates"],
        rng=header["rng"],
        input_dim=header["input_dim"],
        feature_names=header["feature_names"],
        projection=payload.get("projection"),
        meta=header["state"],
        arrays={k[2:]: v for k, v in payload.items() if k.startswith("s_")},
    )
    if header["pacer"] is not None:
        from service.pacing import BudgetPacer

        state.pacer = BudgetPacer.from_dict(header["pacer"])
    state.costs = header.get("costs")
    state.conservative = header.get("conservative")
    if header.get("context") is not None:
        from service.context import ContextBuilder

        context_arrays = {k[2:]: v for k, v in payload.items() if k.startswith("c_")}
        state.context = ContextBuilder.from_state(header["context"], context_arrays)
    return state
