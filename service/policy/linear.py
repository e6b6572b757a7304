"""Numpy core shared by the linear policies: per-arm ridge-regression sufficient statistics.

For every arm ``a`` (prior ``ridge``, contexts ``x``, rewards ``r``)::

    A_a = ridge·I + Σ x xᵀ        (kept as its inverse, updated by Sherman–Morrison)
    b_a = Σ r·x
    θ_a = A_a⁻¹ b_a              (updated incrementally, O(d))
    n_a = number of updates

The statistics are sums, so two copies that saw disjoint parts of a stream merge exactly:
``A = A₁ + A₂ − ridge·I``, ``b = b₁ + b₂``, ``n = n₁ + n₂``.

All arms live in stacked arrays (slot ``i`` is ``ids[i]``) so that every arm is scored in one
vectorised step. ``A`` itself is accumulated lazily: contexts are buffered per arm and folded in
with one matrix product every ``BUFFER`` updates (or whenever ``A`` is read), which keeps the
per-update cost at one matrix-vector product and one rank-one update of ``A⁻¹``.

    >>> import numpy as np
    >>> s = LinearArmStats(dim=2, ridge=1.0)
    >>> i = s.add("a")
    >>> s.update(i, np.array([1.0, 0.0]), 1.0)
    >>> s.theta[i].tolist()                      # (I + e₁e₁ᵀ)⁻¹ e₁ = e₁ / 2
    [0.5, 0.0]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.linalg.blas import dger

from service.policy.base import ArmId, Context, RoutingPolicy

BUFFER = 32


class LinearArmStats:
    """Stacked per-arm statistics ``A⁻¹, A, b, θ, n`` (see module docstring)."""

    def __init__(self, dim: int, ridge: float, capacity: int = 8) -> None:
        if ridge <= 0:
            raise ValueError("ridge must be positive")
        self.dim = dim
        self.ridge = float(ridge)
        self.ids: list[Hashable] = []
        self.index: dict[Hashable, int] = {}
        self._slots_key: tuple | None = None  # cache of the last slots() call
        self._slots = np.zeros(0, dtype=np.intp)
        self._allocate(max(capacity, 1))

    # ------------------------------------------------------------------ storage
    def _allocate(self, capacity: int) -> None:
        d, k = self.dim, len(self.ids)
        old = getattr(self, "A_inv", None)
        fields = {
            "A_inv": (capacity, d, d),
            "_A": (capacity, d, d),
            "b": (capacity, d),
            "theta": (capacity, d),
            "counts": (capacity,),
            "reward_sum": (capacity,),
            "_buffer": (capacity, BUFFER, d),
            "_n_buffered": (capacity,),
        }
        for name, shape in fields.items():
            dtype = np.int64 if name in ("counts", "_n_buffered") else np.float64
            new = np.zeros(shape, dtype=dtype)
            if old is not None:
                new[:k] = getattr(self, name)[:k]
            setattr(self, name, new)

    @property
    def k(self) -> int:
        return len(self.ids)

    def add(self, arm: Hashable) -> int:
        """Give ``arm`` fresh prior statistics; returns its slot."""
        if arm in self.index:
            raise KeyError(f"arm {arm!r} already present")
        i = self.k
        if i == self.A_inv.shape[0]:
            self._allocate(2 * i)
        self.A_inv[i] = np.eye(self.dim) / self.ridge
        self._A[i] = np.eye(self.dim) * self.ridge
        self.b[i] = 0.0
        self.theta[i] = 0.0
        self.counts[i] = 0
        self.reward_sum[i] = 0.0
        self._n_buffered[i] = 0
        self.ids.append(arm)
        self.index[arm] = i
        self._slots_key = None
        return i

    def slots(self, arm_ids: Sequence[Hashable]) -> np.ndarray:
        """Slots of ``arm_ids`` (unknown arms are added with fresh statistics)."""
        key = tuple(arm_ids)
        if key == self._slots_key:
            return self._slots
        index = self.index
        out = [index[a] if a in index else self.add(a) for a in arm_ids]
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate arm ids in {list(arm_ids)!r}")
        self._slots_key, self._slots = key, np.array(out, dtype=np.intp)
        return self._slots

    def remove(self, arm: Hashable) -> None:
        """Drop ``arm``'s statistics (the last slot moves into its place)."""
        i = self.index.pop(arm)
        self._slots_key = None
        last = self.k - 1
        if i != last:
            for name in (
                "A_inv",
                "_A",
                "b",
                "theta",
                "counts",
                "reward_sum",
                "_buffer",
                "_n_buffered",
            ):
                arr = getattr(self, name)
                arr[i] = arr[last]
            self.ids[i] = self.ids[last]
            self.index[self.ids[i]] = i
        self.ids.pop()

    # ------------------------------------------------------------------ learning
    def update(self, i: int, x: np.ndarray, reward: float) -> None:
        """Rank-one update of arm slot ``i`` with context ``x`` (float64) and ``reward``."""
        A_inv = self.A_inv[i]
        u = A_inv @ x
        denom = 1.0 + float(x @ u)
        w = u * (1.0 / math.sqrt(denom))
        # A⁻¹ ← A⁻¹ − u uᵀ / (1 + xᵀA⁻¹x) = A⁻¹ − w wᵀ, in place by BLAS dger on the
        # (Fortran-ordered, so not copied) transposed view; w wᵀ is symmetric.
        dger(-1.0, w, w, a=A_inv.T, overwrite_a=True)
        theta = self.theta[i]
        theta += u * ((reward - x @ theta) / denom)
        self.b[i] += reward * x
        self.counts[i] += 1
        self.reward_sum[i] += reward
        n = self._n_buffered[i]
        self._buffer[i, n] = x
        self._n_buffered[i] = n + 1
        if n + 1 == BUFFER:
            self._flush(i)

    def update_many(self, i: int, X: np.ndarray, rewards: np.ndarray) -> None:
        """Apply the rows of ``X`` (n, d) with ``rewards`` (n,) to slot ``i`` in one step.

        Same statistics as ``n`` calls to :meth:`update` (up to rounding): ``A`` and ``b`` are
        summed, ``A⁻¹`` gets a Woodbury update (or is re-inverted when ``n`` is large) and
        ``θ = A⁻¹b`` is recomputed.
        """
        n = X.shape[0]
        if n == 0:
            return
        self._flush(i)
        self._A[i] += X.T @ X
        self.b[i] += X.T @ rewards
        if 4 * n < self.dim:
            A_inv = self.A_inv[i]
            U = X @ A_inv  # (n, d); A⁻¹ is symmetric
            S = np.eye(n) + U @ X.T
            A_inv -= U.T @ np.linalg.solve(S, U)
        else:
            A_inv = np.linalg.inv(self._A[i])
        self.A_inv[i] = (A_inv + A_inv.T) / 2.0
        self.theta[i] = self.A_inv[i] @ self.b[i]
        self.counts[i] += n
        self.reward_sum[i] += float(rewards.sum())

    def _flush(self, i: int) -> None:
        n = self._n_buffered[i]
        if n:
            X = self._buffer[i, :n]
            self._A[i] += X.T @ X
            self._n_buffered[i] = 0

    def flush(self) -> None:
        """Fold every buffered context into ``A``."""
        for i in range(self.k):
            self._flush(i)

    @property
    def A(self) -> np.ndarray:
        """``A = ridge·I + Σxxᵀ`` for all slots, shape ``(k, d, d)``."""
        self.flush()
        return self._A[: self.k]

    # ------------------------------------------------------------------ scoring
    def mean_and_variance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``θ_a·x`` and ``xᵀA_a⁻¹x`` for every stored arm (one stacked product each)."""
        k, d = self.k, self.dim
        AX = (self.A_inv[:k].reshape(k * d, d) @ x).reshape(k, d)
        variance = AX @ x
        np.maximum(variance, 0.0, out=variance)
        return self.theta[:k] @ x, variance

    def mean_and_variance_many(
        self, X: np.ndarray, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Same as :meth:`mean_and_variance` for rows of ``X`` (n, d) and the given slots."""
        means = X @ self.theta[slots].T
        variances = np.empty((X.shape[0], len(slots)))
        for j, i in enumerate(slots):
            variances[:, j] = np.einsum("nd,nd->n", X @ self.A_inv[i], X)
        np.maximum(variances, 0.0, out=variances)
        return means, variances

    # ------------------------------------------------------------------ merging / state
    def copy(self) -> LinearArmStats:
        new = LinearArmStats(self.dim, self.ridge, capacity=max(self.k, 1))
        for arm in self.ids:
            new.add(arm)
        k = self.k
        self.flush()
        for name in ("A_inv", "_A", "b", "theta", "counts", "reward_sum"):
            getattr(new, name)[:k] = getattr(self, name)[:k]
        return new

    def merged(self, other: LinearArmStats) -> LinearArmStats:
        """Statistics of the union of both streams (arms of ``self`` first)."""
        if other.dim != self.dim or other.ridge != self.ridge:
            raise ValueError("cannot merge statistics of different dimension or ridge")
        new = self.copy()
        other.flush()
        eye = np.eye(self.dim)
        for j, arm in enumerate(other.ids):
            if arm in new.index:
                i = new.index[arm]
                new._A[i] += other._A[j] - self.ridge * eye
                new.b[i] += other.b[j]
                new.counts[i] += other.counts[j]
                new.reward_sum[i] += other.reward_sum[j]
                A_inv = np.linalg.inv(new._A[i])
                new.A_inv[i] = (A_inv + A_inv.T) / 2.0
                new.theta[i] = np.linalg.solve(new._A[i], new.b[i])
            else:
                i = new.add(arm)
                for name in ("A_inv", "_A", "b", "theta", "counts", "reward_sum"):
                    getattr(new, name)[i] = getattr(other, name)[j]
        return new

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (``A`` flushed), for checkpoints."""
        k = self.k
        return {
            "A": self.A.copy(),
            "A_inv": self.A_inv[:k].copy(),
            "b": self.b[:k].copy(),
            "theta": self.theta[:k].copy(),
            "counts": self.counts[:k].copy(),
            "reward_sum": self.reward_sum[:k].copy(),
        }

    @classmethod
    def from_arrays(
        cls, dim: int, ridge: float, ids: Sequence[Hashable], arrays: dict[str, np.ndarray]
    ) -> LinearArmStats:
        new = cls(dim, ridge, capacity=max(len(ids), 1))
        for arm in ids:
            new.add(arm)
        k = len(ids)
        new._A[:k] = arrays["A"]
        for name in ("A_inv", "b", "theta", "counts", "reward_sum"):
            getattr(new, name)[:k] = arrays[name]
        return new


class LinearPolicy(RoutingPolicy):
    """Common part of :class:`LinUCB` and :class:`LinTS`: statistics, updates, merge, arms."""

    def __init__(
        self, ridge: float = 1.0, seed: int | None = None, project_dim: int | None = None
    ) -> None:
        super().__init__(seed=seed, project_dim=project_dim)
        if ridge <= 0:
            raise ValueError("ridge must be positive")
        self.ridge = ridge
        self._stats: LinearArmStats | None = None

    def _stats_for(self, dim: int) -> LinearArmStats:
        if self._stats is None:
            self._stats = LinearArmStats(dim, self.ridge)
        return self._stats

    @property
    def arms(self) -> list[ArmId]:
        return [] if self._stats is None else list(self._stats.ids)

    @property
    def stats(self) -> LinearArmStats | None:
        """The per-arm sufficient statistics (None before the first context)."""
        return self._stats

    def estimate(self, arm_id: ArmId) -> np.ndarray:
        """Ridge estimate ``θ = A⁻¹b`` of ``arm_id`` (in the projected space, if any)."""
        if self._stats is None or arm_id not in self._stats.index:
            raise KeyError(arm_id)
        return self._stats.theta[self._stats.index[arm_id]].copy()

    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """Learn ``reward`` for ``arm_id`` on ``context`` (an unknown arm is added first)."""
        x = self._vector(context)
        stats = self._stats if self._stats is not None else self._stats_for(x.shape[0])
        i = stats.index.get(arm_id)
        if i is None:
            i = stats.add(arm_id)
        stats.update(i, x, float(reward))
        self._n_updates += 1

    def update_many(self, arm_id: ArmId, contexts: np.ndarray, rewards: Sequence[float]) -> None:
        """Learn several (context, reward) pairs for one arm at once (see
        :meth:`LinearArmStats.update_many`); equivalent to successive :meth:`update` calls."""
        X = self._matrix(contexts)
        r = np.asarray(rewards, dtype=np.float64)
        if r.shape != (X.shape[0],):
            raise ValueError(f"{X.shape[0]} contexts but rewards of shape {r.shape}")
        stats = self._stats_for(X.shape[1])
        i = stats.index.get(arm_id)
        if i is None:
            i = stats.add(arm_id)
        stats.update_many(i, X, r)
        self._n_updates += X.shape[0]

    def remove_arm(self, arm_id: ArmId) -> None:
        """Forget ``arm_id``'s statistics (KeyError if it has none)."""
        if self._stats is None:
            raise KeyError(arm_id)
        self._stats.remove(arm_id)

    def merge(self, other: LinearPolicy) -> LinearPolicy:
        """A new policy with the summed statistics of ``self`` and ``other``.

        The result keeps ``self``'s random state; its update count is the sum of both.
        """
        self._merge_common(other)
        new = self.clone()
        new.pacer = copy.deepcopy(self.pacer)
        new._rng.bit_generator.state = self._rng.bit_generator.state
        new._n_updates = self._n_updates + other._n_updates
        donor = self if self._input_dim is not None else other
        new._input_dim = donor._input_dim
        new._feature_names = self._feature_names or other._feature_names
        new._projection = None if donor._projection is None else donor._projection.copy()
        if self._stats is not None and other._stats is not None:
            new._stats = self._stats.merged(other._stats)
        elif self._stats is not None or other._stats is not None:
            new._stats = (self._stats or other._stats).copy()  # type: ignore[union-attr]
        return new

    # -------------------------------------------------------------- checkpoint hooks
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        if self._stats is None:
            return {"dim": None}, {}
        return {"dim": self._stats.dim}, self._stats.arrays()

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        if meta["dim"] is not None:
            self._stats = LinearArmStats.from_arrays(meta["dim"], self.ridge, arms, arrays)
