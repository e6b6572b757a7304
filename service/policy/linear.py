"""Numpy core shared by the linear policies: per-arm ridge-regression sufficient statistics.

For every arm ``a`` (prior ``ridge``, contexts ``x``, rewards ``r``)::

    A_a = ridge·I + Σ x xᵀ        (exact, float64)
    b_a = Σ r·x                   (exact, float64)
    n_a = number of updates
    θ_a = A_a⁻¹ b_a               (exact, float64, solved from A_a on demand)
    S_a ≈ A_a⁻¹                   (float32 scorer, Sherman–Morrison / Woodbury updates)

The statistics are sums, so two copies that saw disjoint parts of a stream merge exactly:
``A = A₁ + A₂ − ridge·I``, ``b = b₁ + b₂``, ``n = n₁ + n₂``.

**Scoring runs on the float32 scorer.** A decision needs ``θ_aᵀx = (S_a x)ᵀb_a`` and
``xᵀA_a⁻¹x = xᵀ S_a x`` for every arm: one stacked float32 product over all arms (a batch
of contexts makes it a single matrix–matrix product). Float32 halves the memory read per pull
and doubles the arithmetic rate, which is what bounds LinUCB at d = 384. The scorer is kept up
to date with rank-one (Sherman–Morrison) or rank-``n`` (Woodbury) updates and re-derived from
the exact ``A`` (Cholesky inverse in float64) every ``RESYNC`` updates of an arm, on a merge,
and whenever a batch is too large for Woodbury, so rounding never accumulates beyond that
window: scores agree with the float64 closed form to ~1e-5 (tested), which is far below any
difference that matters for routing. The exact quantities (``A``, ``b``, ``θ``, ``A⁻¹``)
are what estimates, merges and checkpoints use.

Reading the scorers is what a decision costs (8 arms at d = 450: 6.5 MB), so nothing reads one
twice for the same thing: an arm's ``S_a x`` is kept until the arm changes (an outcome's drift
check, the selector's scoring and its update share it), and a batch's ``S_a b_a`` likewise.
Each kept value is the very product it replaces, so results are the same bit for bit.

``A`` itself is accumulated lazily: contexts are buffered per arm and folded in with one
symmetric rank-``n`` BLAS update (``dsyrk``, upper triangle only) every ``BUFFER`` updates or
whenever ``A`` is read; readers get the full symmetric matrix.

    >>> import numpy as np
    >>> s = LinearArmStats(dim=2, ridge=1.0)
    >>> i = s.add("a")
    >>> s.update(i, np.array([1.0, 0.0]), 1.0)
    >>> s.theta[i].round(12).tolist()            # (I + e₁e₁ᵀ)⁻¹ e₁ = e₁ / 2
    [0.5, 0.0]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.linalg import lapack
from scipy.linalg.blas import dsyrk, sgemm, sger, strsm

from service.policy.base import ArmId, Context, RoutingPolicy

BUFFER = 32
RESYNC = 1024  # updates of an arm between re-derivations of its float32 scorer from A


def _spd_inverse(A: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite matrix from its upper triangle, through its
    Cholesky factor (float64)."""
    c, info = lapack.dpotrf(A, lower=0, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix is not positive definite (dpotrf info={info})")
    inv, info = lapack.dpotri(c, lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"cannot invert (dpotri info={info})")
    return _symmetric(inv)


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose upper triangle (last two axes) is that of ``upper``."""
    out = np.triu(upper)
    return out + np.swapaxes(np.triu(upper, 1), -1, -2)


def _quadratic_forms(S: np.ndarray, XT: np.ndarray, blocks: int = 4) -> np.ndarray:
    """``x_jᵀ S_a x_j`` for symmetric ``S`` (m, d, d) and the columns of ``XT`` (d, n), as an
    (n, m) float64 array.

    Symmetry lets it multiply only the upper block triangle: with ``d`` split into ``blocks``
    parts, ``xᵀSx = Σ_p x_pᵀS_pp x_p + 2·Σ_p x_pᵀS_p,>p x_>p``, i.e. 10/16 of a full product
    for 4 blocks — at d = 384 that is ~30 % faster than one full matrix product.
    """
    m, d, _ = S.shape
    if XT.shape[1] < 16 or d < 64:
        V = (S.reshape(m * d, d) @ XT).reshape(m, d, -1)
        return np.einsum("adn,dn->na", V, XT).astype(np.float64)
    edges = [round(d * p / blocks) for p in range(blocks + 1)]
    out = np.zeros((m, XT.shape[1]), dtype=np.float32)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        Xp = XT[lo:hi]
        out += np.einsum("adn,dn->an", np.matmul(S[:, lo:hi, lo:hi], Xp), Xp)
        if hi < d:
            cross = np.matmul(S[:, lo:hi, hi:], XT[hi:])
            out += 2.0 * np.einsum("adn,dn->an", cross, Xp)
    return out.T.astype(np.float64)


def _add_gram(A: np.ndarray, X: np.ndarray) -> None:
    """``A += XᵀX`` on the upper triangle of the C-ordered ``A``, in place (BLAS ``dsyrk`` on
    the transposed, Fortran-ordered view: its lower triangle is ``A``'s upper one)."""
    dsyrk(1.0, X, beta=1.0, c=A.T, trans=1, lower=1, overwrite_c=1)


class LinearArmStats:
    """Stacked per-arm statistics ``A, b, n`` with a float32 scorer (see module docstring)."""

    def __init__(self, dim: int, ridge: float, capacity: int = 8) -> None:
        if ridge <= 0:
            raise ValueError("ridge must be positive")
        self.dim = dim
        self.ridge = float(ridge)
        self.ids: list[Hashable] = []
        self.index: dict[Hashable, int] = {}
        self._slots_key: tuple | None = None  # cache of the last slots() call
        self._slots = np.zeros(0, dtype=np.intp)
        self._exact: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot → (A⁻¹, θ) float64
        # slot → (x, S x) in float32: the last one-arm product, which the outcome's drift
        # check, the selector's scoring and the update of one outcome all need
        self._product: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._allocate(max(capacity, 1))

    # ------------------------------------------------------------------ storage
    _FIELDS = {
        "_A": np.float64,
        "b": np.float64,
        "counts": np.int64,
        "reward_sum": np.float64,
        "_buffer": np.float64,
        "_n_buffered": np.int64,
        "scorer": np.float32,
        "_theta32": np.float32,
        "_theta_ok": np.bool_,
    }

    def _allocate(self, capacity: int) -> None:
        d, k = self.dim, len(self.ids)
        shapes = {
            "_A": (capacity, d, d),
            "b": (capacity, d),
            "counts": (capacity,),
            "reward_sum": (capacity,),
            "_buffer": (capacity, BUFFER, d),
            "_n_buffered": (capacity,),
            "scorer": (capacity, d, d),
            "_theta32": (capacity, d),  # S_a b_a in float32, for scoring batches
            "_theta_ok": (capacity,),  # whether _theta32[a] is that of the current S_a, b_a
        }
        for name, shape in shapes.items():
            new = np.zeros(shape, dtype=self._FIELDS[name])
            old = getattr(self, name, None)
            if old is not None:
                new[:k] = old[:k]
            setattr(self, name, new)

    @property
    def k(self) -> int:
        return len(self.ids)

    def add(self, arm: Hashable) -> int:
        """Give ``arm`` fresh prior statistics; returns its slot."""
        if arm in self.index:
            raise KeyError(f"arm {arm!r} already present")
        i = self.k
        if i == self._A.shape[0]:
            self._allocate(2 * i)
        self._A[i] = np.eye(self.dim) * self.ridge
        self.scorer[i] = np.eye(self.dim, dtype=np.float32) / np.float32(self.ridge)
        self.b[i] = 0.0
        self.counts[i] = 0
        self.reward_sum[i] = 0.0
        self._n_buffered[i] = 0
        self._changed(i)
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
        self._exact.clear()
        self._product.clear()
        last = self.k - 1
        if i != last:
            for name in self._FIELDS:
                arr = getattr(self, name)
                arr[i] = arr[last]
            self.ids[i] = self.ids[last]
            self.index[self.ids[i]] = i
        self.ids.pop()

    # ------------------------------------------------------------------ learning
    def update(self, i: int, x: np.ndarray, reward: float) -> None:
        """Rank-one update of arm slot ``i`` with context ``x`` (float64) and ``reward``."""
        x32 = x.astype(np.float32)
        self.update_with_product(i, x, reward, x32, self.product(i, x32, keep=False))

    def update_with_product(
        self, i: int, x: np.ndarray, reward: float, x32: np.ndarray, u: np.ndarray
    ) -> None:
        """:meth:`update`, given ``x`` in float32 (``x32``) and ``u = S_i x`` from
        :meth:`product`: a caller that has just read ``u`` (the drift check of an outcome)
        passes it on instead of having it looked up again."""
        S = self.scorer[i]
        denom = 1.0 + float(x32 @ u)
        w = u * np.float32(1.0 / math.sqrt(denom))
        # S ← S − u uᵀ / (1 + xᵀSx) = S − w wᵀ, in place by BLAS sger on the (Fortran-ordered,
        # so not copied) transposed view; w wᵀ is symmetric.
        sger(-1.0, w, w, a=S.T, overwrite_a=True)
        self.b[i] += reward * x
        self.reward_sum[i] += reward
        self.counts[i] += 1
        self._changed(i)
        n = self._n_buffered[i]
        self._buffer[i, n] = x
        self._n_buffered[i] = n + 1
        if n + 1 == BUFFER:
            self._flush(i)
        if self.counts[i] % RESYNC == 0:
            self.resync(i)

    def update_many(self, i: int, X: np.ndarray, rewards: np.ndarray) -> None:
        """Apply the rows of ``X`` (n, d) with ``rewards`` (n,) to slot ``i`` in one step.

        Same statistics as ``n`` calls to :meth:`update`: ``A`` and ``b`` are summed exactly;
        the scorer gets one Woodbury update (or is re-derived from ``A`` when ``n`` is large).
        """
        n = X.shape[0]
        if n == 0:
            return
        self._flush(i)
        _add_gram(self._A[i], X)
        self.b[i] += X.T @ rewards
        self.reward_sum[i] += float(rewards.sum())
        before = int(self.counts[i])
        self.counts[i] += n
        self._changed(i)
        if 2 * n >= self.dim or before // RESYNC != (before + n) // RESYNC:
            self.resync(i)
            return
        # S ← S − (X S)ᵀ (I + X S Xᵀ)⁻¹ (X S) = S − Wᵀ W with W = C⁻¹ X S, C Cᵀ = I + X S Xᵀ
        S = self.scorer[i]
        X32 = X.astype(np.float32)
        U = X32 @ S  # (n, d); S is symmetric
        M = np.eye(n) + (U @ X32.T).astype(np.float64)
        C = np.linalg.cholesky((M + M.T) / 2.0)
        W = strsm(1.0, C.astype(np.float32), U, lower=1)  # C⁻¹U, (n, d)
        sgemm(-1.0, W, W, beta=1.0, c=S.T, trans_a=1, overwrite_c=1)  # S -= Wᵀ W in place

    def shrink(self, i: int, weight: float) -> None:
        """Weigh slot ``i``'s evidence ``weight`` times what it did (drift: what it learnt
        before a change counts for less): ``A = ridge·I + w·Σxxᵀ``, ``b = w·b`` (so ``θ``
        moves toward the prior and ``A⁻¹`` widens); the scorer is re-derived."""
        self._flush(i)
        eye = np.eye(self.dim) * self.ridge
        self._A[i] = eye + weight * (self._A[i] - eye)
        self.b[i] *= weight
        self.reward_sum[i] *= weight
        self._changed(i)
        self.resync(i)

    def resync(self, i: int) -> None:
        """Re-derive slot ``i``'s float32 scorer from the exact ``A`` (drops rounding drift)."""
        self.scorer[i] = self.exact(i)[0]
        self._product.pop(i, None)
        self._theta_ok[i] = False

    def _changed(self, i: int) -> None:
        """Drop what was derived from slot ``i``'s ``A``, ``b`` or scorer."""
        self._exact.pop(i, None)
        self._product.pop(i, None)
        self._theta_ok[i] = False

    def _flush(self, i: int) -> None:
        n = self._n_buffered[i]
        if n:
            _add_gram(self._A[i], self._buffer[i, :n])
            self._n_buffered[i] = 0

    def flush(self) -> None:
        """Fold every buffered context into ``A``."""
        for i in range(self.k):
            self._flush(i)

    @property
    def A(self) -> np.ndarray:
        """``A = ridge·I + Σxxᵀ`` for all slots, shape ``(k, d, d)`` (a symmetric copy)."""
        self.flush()
        return _symmetric(self._A[: self.k])

    # ------------------------------------------------------------------ exact quantities
    def exact(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A⁻¹, θ = A⁻¹b)`` of slot ``i`` in float64, from ``A`` (cached until it changes)."""
        cached = self._exact.get(i)
        if cached is None:
            self._flush(i)
            A_inv = _spd_inverse(self._A[i])
            cached = self._exact[i] = (A_inv, A_inv @ self.b[i])
        return cached

    @property
    def A_inv(self) -> np.ndarray:
        """Exact ``A⁻¹`` for all slots, shape ``(k, d, d)`` (float64, computed on demand)."""
        return np.array([self.exact(i)[0] for i in range(self.k)]).reshape(
            self.k, self.dim, self.dim
        )

    @property
    def theta(self) -> np.ndarray:
        """Exact ridge estimates ``θ = A⁻¹b`` for all slots, shape ``(k, d)``."""
        return np.array([self.exact(i)[1] for i in range(self.k)]).reshape(self.k, self.dim)

    # ------------------------------------------------------------------ scoring
    def product(self, i: int, x32: np.ndarray, keep: bool = True) -> np.ndarray:
        """``S_i x`` (float32) for the float32 context ``x32``, the one-arm product
        ``scorer[i] @ x32``; kept until slot ``i`` changes, so the drift check, the
        selector's scoring and the update of one outcome read ``S_i`` once (do not modify
        the result). ``keep=False`` still returns a kept product but keeps no new one (for
        the update that is about to change slot ``i``)."""
        kept = self._product.get(i)
        # (the test of np.array_equal, without its wrapper: both are contexts of length d)
        if kept is not None and (kept[0] == x32).all():
            return kept[1]
        u = self.scorer[i] @ x32
        if keep:
            self._product[i] = (x32.copy(), u)
        return u

    def products(self, slots: np.ndarray, x32: np.ndarray) -> np.ndarray:
        """``S_a x`` for the given slots, shape ``(len(slots), d)``: each row bit for bit
        :meth:`product` (a stacked ``matmul`` makes one ``gemv`` per arm, with the same
        operands as the one-arm product), and kept as it."""
        k = self.k
        if len(slots) * 2 < k:
            return np.array([self.product(i, x32) for i in slots.tolist()]).reshape(-1, self.dim)
        V = np.matmul(self.scorer[:k], x32)
        key = x32.copy()
        for i in range(k):
            self._product[i] = (key, V[i])
        return V[slots]

    def mean_and_variance(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``θ_a·x`` and ``xᵀA_a⁻¹x`` for every stored arm, from the float32 scorer."""
        k, d = self.k, self.dim
        x32 = x.astype(np.float32)
        V = (self.scorer[:k].reshape(k * d, d) @ x32).reshape(k, d)  # rows S_a x
        variance = (V @ x32).astype(np.float64)
        np.maximum(variance, 0.0, out=variance)
        return np.einsum("kd,kd->k", V, self.b[:k]), variance

    def mean_and_variance_many(
        self, X: np.ndarray, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Same as :meth:`mean_and_variance` for rows of ``X`` (n, d) and the given slots, as
        float32 matrix products over all arms and rows (see :func:`_quadratic_forms`)."""
        m = len(slots)
        S = (
            self.scorer[:m]
            if m == self.k and np.array_equal(slots, np.arange(m))
            else self.scorer[slots]
        )
        means = X @ self._theta(slots).T.astype(np.float64)
        variances = _quadratic_forms(S, np.ascontiguousarray(X.T, dtype=np.float32))
        np.maximum(variances, 0.0, out=variances)
        return means, variances

    def _theta(self, slots: np.ndarray) -> np.ndarray:
        """``S_a b_a`` (float32) of the slots, each recomputed only when its arm changed: the
        same one-arm product as a stacked ``matmul`` over the slots makes."""
        for i in slots[~self._theta_ok[slots]].tolist():
            b32 = self.b[i].astype(np.float32)
            self._theta32[i] = np.matmul(self.scorer[i], b32[:, None])[:, 0]
            self._theta_ok[i] = True
        return self._theta32[slots]

    # ------------------------------------------------------------------ merging / state
    def copy(self) -> LinearArmStats:
        new = LinearArmStats(self.dim, self.ridge, capacity=max(self.k, 1))
        for arm in self.ids:
            new.add(arm)
        k = self.k
        self.flush()
        for name in ("_A", "b", "counts", "reward_sum", "scorer"):
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
                new.resync(i)
            else:
                i = new.add(arm)
                for name in ("_A", "b", "counts", "reward_sum", "scorer"):
                    getattr(new, name)[i] = getattr(other, name)[j]
        return new

    def arrays(self) -> dict[str, np.ndarray]:
        """The exact state as plain float64 arrays (``A`` flushed, ``A⁻¹`` and ``θ`` solved)."""
        k = self.k
        return {
            "A": self.A.copy(),
            "A_inv": self.A_inv,
            "b": self.b[:k].copy(),
            "theta": self.theta,
            "counts": self.counts[:k].copy(),
            "reward_sum": self.reward_sum[:k].copy(),
        }

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps: ``A`` as its packed upper triangle (it is symmetric),
        ``b``, counts, reward sums and the float32 scorer, so a load scores bit for bit alike."""
        k = self.k
        self.flush()
        rows, cols = np.triu_indices(self.dim)
        return {
            "A_packed": self._A[:k, rows, cols],
            "b": self.b[:k].copy(),
            "counts": self.counts[:k].copy(),
            "reward_sum": self.reward_sum[:k].copy(),
            "scorer": self.scorer[:k].copy(),
        }

    @classmethod
    def from_arrays(
        cls, dim: int, ridge: float, ids: Sequence[Hashable], arrays: dict[str, np.ndarray]
    ) -> LinearArmStats:
        """Inverse of :meth:`checkpoint_arrays`; also reads the format-1 arrays (full ``A``,
        no scorer: the scorer is then re-derived from ``A``)."""
        new = cls(dim, ridge, capacity=max(len(ids), 1))
        for arm in ids:
            new.add(arm)
        k = len(ids)
        if "A_packed" in arrays:
            rows, cols = np.triu_indices(dim)
            new._A[:k, rows, cols] = arrays["A_packed"]
            new._A[:k, cols, rows] = arrays["A_packed"]
        else:
            new._A[:k] = arrays["A"]
        for name in ("b", "counts", "reward_sum"):
            getattr(new, name)[:k] = arrays[name]
        if "scorer" in arrays:
            new.scorer[:k] = arrays["scorer"]
        else:
            for i in range(k):
                new.resync(i)
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
        return self._stats.exact(self._stats.index[arm_id])[1].copy()

    def update(self, arm_id: ArmId, context: Context, reward: float) -> None:  # type: ignore[override]
        """Learn ``reward`` for ``arm_id`` on ``context`` (an unknown arm is added first)."""
        x = self._vector(context)
        stats, i = self._slot(arm_id, x.shape[0])
        stats.update(i, x, float(reward))
        self._n_updates += 1

    def _slot(self, arm_id: ArmId, dim: int) -> tuple[LinearArmStats, int]:
        """The statistics (for contexts of ``dim``) and ``arm_id``'s slot in them (an unknown
        arm is added first)."""
        stats = self._stats if self._stats is not None else self._stats_for(dim)
        i = stats.index.get(arm_id)
        return stats, stats.add(arm_id) if i is None else i

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
        return {"dim": self._stats.dim}, self._stats.checkpoint_arrays()

    def _load_state(self, meta: dict, arms: list, arrays: dict[str, np.ndarray]) -> None:
        if meta["dim"] is not None:
            self._stats = LinearArmStats.from_arrays(meta["dim"], self.ridge, arms, arrays)
