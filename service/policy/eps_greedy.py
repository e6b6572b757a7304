"""ε-greedy over one River regressor per arm: ``(1−ε)·argmax(one-hot, ties split evenly) + ε/k``
(exact probabilities; the regressors are :class:`~service.policy.regressors.RegressorPolicy`'s).

    >>> import numpy as np
    >>> policy = EpsGreedy(epsilon=0.2, seed=0)
    >>> x = {"length": 1.0, "digits": 0.0}
    >>> for _ in range(30):
    ...     policy.update("a", x, 1.0); policy.update("b", x, 0.0)
    >>> choice = policy.choose(["a", "b"], x)
    >>> choice.arm, round(choice.probabilities["b"], 3)
    ('a', 0.1)
"""

from __future__ import annotations

import numpy as np
from river import base as river_base

from service.policy.base import mixed_greedy_probabilities
from service.policy.regressors import RegressorPolicy


class EpsGreedy(RegressorPolicy):
    """ε-greedy over per-arm River regressors: ``(1−ε)·argmax + ε/k`` (exact).

    Parameters: ``model`` (River regressor cloned per arm; default
    :func:`default_regressor`), ``epsilon``, ``seed``, ``project_dim``.
    """

    kind = "eps_greedy"

    def __init__(
        self,
        model: river_base.Regressor | None = None,
        epsilon: float = 0.1,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(model=model, epsilon=epsilon, seed=seed, project_dim=project_dim)

    def _probabilities(self, scores: np.ndarray) -> np.ndarray:
        return mixed_greedy_probabilities(scores, self.epsilon)[0]
