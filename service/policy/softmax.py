"""Softmax (Boltzmann) over one River regressor per arm, optionally ε-mixed:
``(1−ε)·softmax(scores / temperature) + ε/k`` (exact probabilities; the regressors are
:class:`~service.policy.regressors.RegressorPolicy`'s)."""

from __future__ import annotations

import numpy as np
from river import base as river_base

from service.policy.regressors import RegressorPolicy


class Softmax(RegressorPolicy):
    """Softmax (Boltzmann) over per-arm River regressors, optionally ε-mixed (exact).

    ``p = (1−ε)·softmax(scores / temperature) + ε/k``. Parameters: ``model``,
    ``temperature`` > 0, ``epsilon`` (default 0), ``seed``, ``project_dim``.
    """

    kind = "softmax"

    def __init__(
        self,
        model: river_base.Regressor | None = None,
        temperature: float = 0.1,
        epsilon: float = 0.0,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(model=model, epsilon=epsilon, seed=seed, project_dim=project_dim)
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def _probabilities(self, scores: np.ndarray) -> np.ndarray:
        z = np.exp((scores - scores.max()) / self.temperature)
        return (1.0 - self.epsilon) * z / z.sum() + self.epsilon / len(scores)
