"""Policies over one River regressor per arm: the shared part (exact probabilities).

Each arm owns a clone of a River regressor (default: ``linear_model.LinearRegression`` with
SGD) that predicts the reward from the context. Scores are the predictions; subclasses turn
them into the choice distribution in closed form, so the logged propensities are exact:
:class:`~service.policy.eps_greedy.EpsGreedy` and :class:`~service.policy.softmax.Softmax`.

Arms without any update yet share the ``1−ε`` mass (a new arm is explored first). These
policies are not sufficient-statistics models, so :meth:`merge` is not supported. Contexts
reach River as dicts keyed by feature name (dict contexts) or position (vectors).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
from river import base as river_base
from river import linear_model, optim

from service.policy.base import (
    ArmId,
    Choice,
    Context,
    RoutingPolicy,
    draw,
    mixed_greedy_probabilities,
)


def default_regressor() -> river_base.Regressor:
    """Linear regression by SGD (lr 0.05), a sensible default for normalised embeddings."""
    return linear_model.LinearRegression(optimizer=optim.SGD(0.05), intercept_lr=0.05)


def _pickle_array(obj: object) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def _unpickle_array(arr: np.ndarray) -> object:
    return pickle.loads(arr.tobytes())  # noqa: S301 - checkpoints come from our own store


class RegressorPolicy(RoutingPolicy):
    """Per-arm River regressors; subclasses turn the scores into probabilities."""

    def __init__(
        self,
        model: river_base.Regressor | None = None,
        epsilon: float = 0.05,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(seed=seed, project_dim=project_dim)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.model = model
        self.epsilon = epsilon
        self._models: dict[ArmId, river_base.Regressor] = {}
        self._arm_updates: dict[ArmId, int] = {}
        self._keys: list | None = None

    @property
    def arms(self) -> list[ArmId]:
        return list(self._models)

    def _model_for(self, arm: ArmId) -> river_base.Regressor:
        model = self._models.get(arm)
        if model is None:
            template = self.model if self.model is not None else default_regressor()
            model = self._models[arm] = template.clone()
            self._arm_updates[arm] = 0
        return model

    def _keys_for(self, dim: int) -> list:
        """River feature names: the dict keys (unprojected dict contexts) or positions."""
        if self._keys is None or len(self._keys) != dim:
            named = self._feature_names is not None and self._projection is None
            self._keys = list(self._feature_names) if named else list(range(dim))
        return self._keys

    def _features(self, context: Context) -> dict:
        x = self._vector(context)
        return dict(zip(self._keys_for(x.shape[0]), x.tolist(), strict=True))

    def _probabilities(self, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _choose_features(self, arm_ids: Sequence[ArmId], features: dict) -> Choice:
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if len(set(arm_ids)) != len(arm_ids):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        models = [self._model_for(a) for a in arm_ids]
        scores = np.array([float(m.predict_one(features)) for m in models])
        unexplored = np.array([self._arm_updates[a] == 0 for a in arm_ids])
        if unexplored.any():
            p = mixed_greedy_probabilities(unexplored.astype(float), self.epsilon)[0]
        else:
            p = self._probabilities(scores)
        j = draw(p, self._rng.random())
        return Choice(
            arm=arm_ids[j],
            probabilities=dict(zip(arm_ids, p.tolist(), strict=True)),
            scores=dict(zip(arm_ids, scores.tolist(), strict=True)),
        )

    def choose(self, arm_ids: Sequence[ArmId], context: Context) -> Choice:
        """Draw an arm among ``arm_ids`` with exact probabilities."""
        return self._choose_features(arm_ids, self._features(context))

    def choose_many(self, arm_ids: Sequence[ArmId], contexts: np.ndarray) -> list[Choice]:
        """:meth:`choose` for each row (River models predict one row at a time)."""
        X = self._matrix(contexts)
        keys = self._keys_for(X.shape[1])
        return [
            self._choose_features(arm_ids, dict(zip(keys, row.tolist(), strict=True))) for row in X
        ]

    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """One SGD step of ``arm_id``'s regressor towards ``reward``."""
        self._model_for(arm_id).learn_one(self._features(context), float(reward))
        self._arm_updates[arm_id] += 1
        self._n_updates += 1

    def remove_arm(self, arm_id: ArmId) -> None:
        """Forget ``arm_id``'s regressor (KeyError if it has none)."""
        del self._models[arm_id]
        del self._arm_updates[arm_id]

    def merge(self, other: RegressorPolicy) -> RegressorPolicy:
        raise NotImplementedError(
            f"{type(self).__name__} learns by SGD, not sufficient statistics: it cannot merge"
        )

    # -------------------------------------------------------------- checkpoint hooks
    def _checkpoint_params(self) -> tuple[dict, dict[str, np.ndarray]]:
        params = {k: v for k, v in self._get_params().items() if k != "model"}
        return params, {"pickle_model": _pickle_array(self.model)}

    @classmethod
    def _from_checkpoint_params(cls, params: dict, arrays: dict[str, np.ndarray]):
        return cls(model=_unpickle_array(arrays["pickle_model"]), **params)

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"arm_updates": [self._arm_updates[a] for a in self._models]}
        return meta, {"pickle_models": _pickle_array([self._models[a] for a in self._models])}

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        models = _unpickle_array(arrays["pickle_models"])
        self._models = dict(zip(arms, models, strict=True))  # type: ignore[arg-type]
        self._arm_updates = dict(zip(arms, meta["arm_updates"], strict=True))
