"""Hybrid LinUCB: a reward model shared by every arm plus each arm's own correction.

Disjoint LinUCB learns "this query is hard" once per arm, from that arm's pulls only. The
hybrid model of Li et al. (2010, algorithm 2) adds coefficients ``β`` that every pull teaches,
whatever the arm::

    r ≈ xᵀβ + xᵀθ_a

Both are the ridge-regression solution of that joint model (prior precision ``ridge`` on ``β``
and on every ``θ_a``), found by block elimination from sums that only ever grow::

    A_a = ridge·I + Σ_a x xᵀ     B_a = Σ_a x xᵀ     b_a = Σ_a r x      (per arm: its pulls)
    C   = ridge·I + Σ x xᵀ       c   = Σ r x                           (shared: all pulls)

    A₀ = C − Σ_a B_aᵀ A_a⁻¹ B_a          b₀ = c − Σ_a B_aᵀ A_a⁻¹ b_a
    β = A₀⁻¹ b₀                          θ_a = A_a⁻¹ (b_a − B_a β)

and the score of arm ``a`` is ``xᵀβ + xᵀθ_a + α·sqrt(s_a)`` with the algorithm's variance
``s_a = xᵀA₀⁻¹x − 2·xᵀA₀⁻¹B_aᵀA_a⁻¹x + xᵀA_a⁻¹x + xᵀA_a⁻¹B_aA₀⁻¹B_aᵀA_a⁻¹x``. Because only sums
are stored (removing an arm folds its block into ``C, c``), two copies that saw disjoint parts
of a stream merge exactly (sums add, the doubled prior is taken off once), and a checkpoint
holds exactly those sums. The choice is ε-mixed as in :class:`~service.policy.linucb.LinUCB`
(arms with no pull first), so every logged propensity is exact.

The solves are float64 and cost O(k·d³) after a batch of updates (made lazily, at the next
choice): fine at the context dimensions the router uses (tens); at d = 384 prefer LinUCB.

    >>> import numpy as np
    >>> policy = HybridLinUCB(alpha=0.0, epsilon=0.0, seed=0)
    >>> x = np.array([1.0, 0.5])
    >>> for _ in range(20):
    ...     policy.update("small", x, 1.0); policy.update("large", x, 0.0)
    >>> policy.choose(["small", "large"], x).arm
    'small'
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.policy.base import (
    ArmId,
    Choice,
    Context,
    RoutingPolicy,
    check_ucb_params,
    greedy_mix,
)


class HybridLinUCB(RoutingPolicy):
    """Hybrid LinUCB (shared ``β`` + per-arm ``θ_a``), exploration width ``alpha``, ε-mixing.

    Parameters as :class:`~service.policy.linucb.LinUCB`: ``alpha`` ≥ 0, ``ridge`` > 0,
    ``epsilon`` in [0, 1], ``seed``, ``project_dim``.
    """

    kind = "hybrid_linucb"

    def __init__(
        self,
        alpha: float = 0.3,
        ridge: float = 1.0,
        epsilon: float = 0.05,
        seed: int | None = None,
        project_dim: int | None = None,
    ) -> None:
        super().__init__(seed=seed, project_dim=project_dim)
        check_ucb_params(alpha, epsilon, ridge)
        self.alpha = alpha
        self.ridge = ridge
        self.epsilon = epsilon
        self._ids: list[ArmId] = []
        self._A: dict[ArmId, np.ndarray] = {}
        self._B: dict[ArmId, np.ndarray] = {}
        self._b: dict[ArmId, np.ndarray] = {}
        self._n: dict[ArmId, int] = {}
        self._C: np.ndarray | None = None
        self._c: np.ndarray | None = None
        self._solved: dict | None = None  # derived quantities, dropped on every update

    # ------------------------------------------------------------------ statistics
    @property
    def arms(self) -> list[ArmId]:
        return list(self._ids)

    def _ensure(self, d: int, arm_ids: Sequence[ArmId] = ()) -> None:
        if self._C is None:
            self._C = np.eye(d) * self.ridge
            self._c = np.zeros(d)
        for arm in arm_ids:
            if arm not in self._A:
                self._ids.append(arm)
                self._A[arm] = np.eye(d) * self.ridge
                self._B[arm] = np.zeros((d, d))
                self._b[arm] = np.zeros(d)
                self._n[arm] = 0
                self._solved = None

    def _solve(self) -> dict:
        """β, A₀⁻¹ and per arm A_a⁻¹, θ_a, M_a = A_a⁻¹B_a (cached until the next update)."""
        if self._solved is not None:
            return self._solved
        assert self._C is not None and self._c is not None
        A0, b0 = self._C.copy(), self._c.copy()
        per: dict[ArmId, tuple[np.ndarray, np.ndarray]] = {}
        for arm in self._ids:
            A_inv = np.linalg.inv(self._A[arm])
            M = A_inv @ self._B[arm]
            A0 -= self._B[arm].T @ M
            b0 -= self._B[arm].T @ (A_inv @ self._b[arm])
            per[arm] = (A_inv, M)
        A0 = (A0 + A0.T) / 2
        A0_inv = np.linalg.inv(A0)
        beta = A0_inv @ b0
        arms = {
            arm: (A_inv, M, A_inv @ (self._b[arm] - self._B[arm] @ beta))
            for arm, (A_inv, M) in per.items()
        }
        self._solved = {"beta": beta, "A0_inv": A0_inv, "arms": arms}
        return self._solved

    def estimate(self, arm_id: ArmId) -> tuple[np.ndarray, np.ndarray]:
        """``(β, θ_a)``: the shared and the arm's own coefficients (the ridge solution)."""
        solved = self._solve()
        return solved["beta"], solved["arms"][arm_id][2]

    # ------------------------------------------------------------------ deciding
    def _scores(self, X: np.ndarray, arm_ids: Sequence[ArmId]) -> np.ndarray:
        solved = self._solve()
        beta, A0_inv = solved["beta"], solved["A0_inv"]
        W = X @ A0_inv
        shared_var = np.einsum("nd,nd->n", W, X)
        out = np.empty((X.shape[0], len(arm_ids)))
        for j, arm in enumerate(arm_ids):
            A_inv, M, theta = solved["arms"][arm]
            U = X @ M
            var = (
                shared_var
                - 2.0 * np.einsum("nd,nd->n", W, U)
                + np.einsum("nd,nd->n", X @ A_inv, X)
                + np.einsum("nd,nd->n", U @ A0_inv, U)
            )
            out[:, j] = X @ (beta + theta) + self.alpha * np.sqrt(np.maximum(var, 0.0))
        return out

    def _probabilities(self, ucb: np.ndarray, counts: np.ndarray) -> np.ndarray:
        greedy = (
            np.broadcast_to(counts == 0, ucb.shape)
            if not counts.all()
            else ucb == ucb.max(axis=1, keepdims=True)
        )
        return greedy_mix(greedy, self.epsilon)

    def choose(self, arm_ids: Sequence[ArmId], context: Context) -> Choice:
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        return self.choose_many(arm_ids, self._vector(context)[None, :], projected=True)[0]

    def choose_many(  # type: ignore[override]
        self, arm_ids: Sequence[ArmId], contexts: np.ndarray, projected: bool = False
    ) -> list[Choice]:
        """One choice per row of ``contexts`` (n, d); draws as ``n`` successive ``choose``."""
        if not arm_ids:
            raise ValueError("arm_ids is empty")
        if len(set(arm_ids)) != len(arm_ids):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        X = contexts if projected else self._matrix(contexts)
        if X.shape[0] == 0:
            return []
        self._ensure(X.shape[1], arm_ids)
        ucb = self._scores(X, arm_ids)
        counts = np.array([self._n[a] for a in arm_ids])
        P = self._probabilities(ucb, counts)
        U = self._rng.random(X.shape[0])
        C = np.cumsum(P, axis=1)
        J = np.minimum(((U * C[:, -1])[:, None] >= C).sum(axis=1), len(arm_ids) - 1)
        return [
            Choice(
                arm=arm_ids[j],
                probabilities=dict(zip(arm_ids, p, strict=True)),
                scores=dict(zip(arm_ids, s, strict=True)),
            )
            for j, p, s in zip(J.tolist(), P.tolist(), ucb.tolist(), strict=True)
        ]

    # ------------------------------------------------------------------ learning
    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        x = self._vector(context)
        self.update_many(arm_id, x[None, :], [reward], projected=True)

    def update_many(  # type: ignore[override]
        self,
        arm_id: ArmId,
        contexts: np.ndarray,
        rewards: Sequence[float],
        projected: bool = False,
    ) -> None:
        if len(contexts) != len(rewards):
            raise ValueError(f"{len(contexts)} contexts but {len(rewards)} rewards")
        X = np.asarray(contexts, dtype=np.float64) if projected else self._matrix(contexts)
        if X.shape[0] == 0:
            return
        r = np.asarray(rewards, dtype=np.float64)
        self._ensure(X.shape[1], [arm_id])
        assert self._C is not None and self._c is not None
        gram = X.T @ X
        self._A[arm_id] += gram
        self._B[arm_id] += gram
        self._b[arm_id] += X.T @ r
        self._C += gram
        self._c += X.T @ r
        self._n[arm_id] += X.shape[0]
        self._n_updates += X.shape[0]
        self._solved = None

    def remove_arm(self, arm_id: ArmId) -> None:
        """Forget an arm's own statistics, keeping what its pulls taught the shared model:
        its block is folded into ``C, c`` as the Schur complement it contributed to ``A₀,
        b₀``, so ``β`` and every other arm's scores are unchanged (KeyError if unknown)."""
        if arm_id not in self._A:
            raise KeyError(arm_id)
        assert self._C is not None and self._c is not None
        A_inv = np.linalg.inv(self._A[arm_id])
        B = self._B[arm_id]
        self._C -= B.T @ A_inv @ B
        self._c -= B.T @ (A_inv @ self._b[arm_id])
        for table in (self._A, self._B, self._b, self._n):
            del table[arm_id]
        self._ids.remove(arm_id)
        self._solved = None

    def merge(self, other: HybridLinUCB) -> HybridLinUCB:
        """A policy with the statistics of both (exact: the sums add, one prior)."""
        self._merge_common(other)
        out = loads_copy(self)
        if other._C is None:
            return out
        d = other._C.shape[0]
        out._ensure(d, other._ids)
        assert out._C is not None and out._c is not None
        ridge = np.eye(d) * self.ridge
        out._C += other._C - ridge
        out._c += other._c
        for arm in other._ids:
            out._A[arm] += other._A[arm] - ridge
            out._B[arm] += other._B[arm]
            out._b[arm] += other._b[arm]
            out._n[arm] += other._n[arm]
        out._n_updates += other._n_updates
        if out._input_dim is None:
            out._input_dim, out._projection = other._input_dim, other._projection
            out._feature_names = other._feature_names
        out._solved = None
        return out

    # ------------------------------------------------------------------ checkpoint
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        if self._C is None:
            return {"dim": None}, {}
        ids = self._ids
        d = self._C.shape[0]
        return {"dim": d}, {
            "A": np.stack([self._A[a] for a in ids]) if ids else np.zeros((0, d, d)),
            "B": np.stack([self._B[a] for a in ids]) if ids else np.zeros((0, d, d)),
            "b": np.stack([self._b[a] for a in ids]) if ids else np.zeros((0, d)),
            "counts": np.array([self._n[a] for a in ids], dtype=np.int64),
            "C": self._C,
            "c": self._c,
        }

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        if meta.get("dim") is None:
            return
        self._C, self._c = arrays["C"].copy(), arrays["c"].copy()
        self._ids = list(arms)
        for i, arm in enumerate(arms):
            self._A[arm] = arrays["A"][i].copy()
            self._B[arm] = arrays["B"][i].copy()
            self._b[arm] = arrays["b"][i].copy()
            self._n[arm] = int(arrays["counts"][i])
        self._solved = None


def loads_copy(policy: HybridLinUCB) -> HybridLinUCB:
    """A deep copy through the checkpoint format (what a restore would give)."""
    from service.policy.checkpoint import loads

    return loads(policy.dumps())  # type: ignore[return-value]
