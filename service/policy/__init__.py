"""Routing policies: contextual bandits that return the chosen arm with its propensity.

>>> import numpy as np
>>> from service.policy import make_policy, loads
>>> policy = make_policy("linucb", alpha=0.5, epsilon=0.1, seed=7)
>>> choice = policy.choose(["small", "large"], np.array([0.1, 0.9]))
>>> sorted(choice.probabilities.items())
[('large', 0.5), ('small', 0.5)]
>>> policy.update(choice.arm, np.array([0.1, 0.9]), 1.0)
>>> loads(policy.dumps()).n_updates
1
"""

from __future__ import annotations

import inspect
from typing import Any

from service.policy.arm_means import ArmMeans
from service.policy.base import Choice, Context, Pricing, RoutingPolicy
from service.policy.checkpoint import POLICIES, CheckpointError, loads, read_header
from service.policy.correctness_ucb import CorrectnessUCB
from service.policy.eps_greedy import EpsGreedy
from service.policy.hybrid_linucb import HybridLinUCB
from service.policy.lin_ts import LinTS
from service.policy.linear import LinearPolicy
from service.policy.linucb import LinUCB
from service.policy.regressors import RegressorPolicy
from service.policy.selector import Selector
from service.policy.softmax import Softmax
from service.policy.thompson import RiverThompson
from service.policy.ucb import RiverUCB


def make_policy(name: str, **params: Any) -> RoutingPolicy:
    """Build a policy by name (its ``kind``, a key of :data:`POLICIES`, the registry that
    checkpoints are loaded by) with constructor ``params``.

    >>> type(make_policy("thompson", seed=0)).__name__
    'RiverThompson'
    >>> make_policy("ucb", alpah=1.0)
    Traceback (most recent call last):
    ...
    ValueError: ucb takes no parameter 'alpah'; it takes delta, epsilon, seed
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
    takes = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        unknown = sorted(set(params) - set(takes))
        if unknown:
            raise ValueError(
                f"{name} takes no parameter {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(takes) or 'none'}"
            )
    return cls(**params)


__all__ = [
    "ArmMeans",
    "POLICIES",
    "CheckpointError",
    "Choice",
    "Context",
    "CorrectnessUCB",
    "EpsGreedy",
    "HybridLinUCB",
    "LinTS",
    "LinUCB",
    "LinearPolicy",
    "Pricing",
    "RegressorPolicy",
    "RiverThompson",
    "RiverUCB",
    "RoutingPolicy",
    "Selector",
    "Softmax",
    "loads",
    "make_policy",
    "read_header",
]
