"""The context a routing policy sees: one vector per query, built from the event and its
embedding.

A :class:`ContextLayout` says which parts the vector has, in this order:

- ``bias``: 1.0, so every arm has an intercept (its mean reward);
- ``length``: ``log(1 + characters)`` of the query, standardised online;
- ``task``: a one-hot of the task name hashed into ``task_buckets`` buckets (a new task needs
  no migration, and what was learned for the others is kept);
- one block per **declared metadata feature**, in name order: ``categorical`` → a one-hot of
  the value hashed into ``feature_buckets`` buckets (missing: all zeros); ``numeric`` → the
  value standardised online (missing: 0) and a missing-indicator;
- the embedding: ``none``, ``raw`` (the unit-normalised vector), or ``project:K`` (the
  unit-normalised vector times a seeded Gaussian matrix with entries ``N(0, 1/K)``).

The ``legacy`` layout is the raw embedding alone, as the service used before layouts existed
(decision rows with a NULL ``context_layout``).

**Online standardisation** uses the running mean and variance of the queries observed so far
(Welford): a context is built from the statistics *before* its own query is observed. The
service observes each decision when it is stored, in ``decision_seq`` order, so the statistics
are a projection of the decision log that a restart recomputes (checkpoint + the decisions
stored after it); the benchmark observes each query right after its decision. Until two
queries have been seen a standardised value is 0; values are clipped to ±5 deviations.

**Hashing** is blake2b of ``"<namespace>\\x1f<value>"``: the same bucket in every process and
every Python version (``hash()`` is salted per process and would not be).

    >>> import numpy as np
    >>> layout = ContextLayout(features=(Feature("subject", "categorical"),), embedding="none",
    ...                        task_buckets=4, feature_buckets=4)
    >>> layout.spec
    'v1 bias length task/4 subject:categorical/4 emb:none'
    >>> builder = ContextBuilder(layout, {"qa": {"subject"}})
    >>> x = builder.build("qa", "What is 2+2?", {"subject": "math"}, np.zeros(3))
    >>> x.shape, x[:2].tolist()             # bias, then the length (0: nothing seen yet)
    ((10,), [1.0, 0.0])
    >>> builder.observe("qa", 12, {"subject": "math"}); builder.observe("qa", 200, None)
    >>> round(float(builder.build("qa", "x" * 200, None, np.zeros(3))[1]), 3)
    1.0
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

FeatureKind = Literal["categorical", "numeric"]
FEATURE_KINDS: tuple[str, ...] = ("categorical", "numeric")
LEGACY = "legacy"
#: The defaults (chosen by benchmarks/tune_defaults.py; the buckets are wide so that a few
#: dozen tasks or values rarely share one: unused buckets cost a linear policy nothing)
DEFAULT_EMBEDDING = "raw"
DEFAULT_TASK_BUCKETS = 64
DEFAULT_FEATURE_BUCKETS = 256
CLIP = 5.0
LAYOUT_VERSION = "v1"


class ContextError(ValueError):
    """A layout that cannot be built, or a query whose metadata does not fit it."""


def bucket(namespace: str, value: str, buckets: int) -> int:
    """The bucket of ``value`` among ``buckets``: stable across processes and versions.

    >>> bucket("task", "sentiment", 16), bucket("task", "yes_no", 16)
    (12, 5)
    """
    digest = hashlib.blake2b(f"{namespace}\x1f{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


@dataclass(frozen=True)
class Feature:
    """A metadata key used as a feature: ``categorical`` or ``numeric``."""

    key: str
    kind: FeatureKind

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ContextError(
                f"feature {self.key!r}: kind must be categorical or numeric, not {self.kind!r}"
            )
        if not self.key or any(c.isspace() for c in self.key) or ":" in self.key:
            raise ContextError(f"feature key must be a word without ':' or spaces: {self.key!r}")

    @classmethod
    def parse(cls, spec: str) -> Feature:
        """``KEY:categorical`` or ``KEY:numeric`` (as ``metallm bench --feature`` takes it).

        >>> Feature.parse("subject:categorical")
        Feature(key='subject', kind='categorical')
        """
        key, sep, kind = spec.rpartition(":")
        if not sep or not key:
            raise ContextError(f"a feature is KEY:categorical or KEY:numeric, not {spec!r}")
        return cls(key, kind)  # type: ignore[arg-type]


def parse_embedding(spec: str) -> tuple[str, int | None]:
    """``legacy``, ``none``, ``raw`` or ``project:K`` → (mode, K).

    >>> parse_embedding("project:32"), parse_embedding("none")
    (('project', 32), ('none', None))
    """
    mode, _, k = spec.partition(":")
    if mode in (LEGACY, "none", "raw") and not k:
        return mode, None
    if mode == "project" and k.isdigit() and int(k) > 0:
        return mode, int(k)
    raise ContextError(
        f"context embedding must be legacy, none, raw or project:K (K > 0), not {spec!r}"
    )


@dataclass(frozen=True)
class ContextLayout:
    """Which parts a context has (see the module docstring); ``spec`` names it."""

    embedding: str = DEFAULT_EMBEDDING
    task_buckets: int = DEFAULT_TASK_BUCKETS
    feature_buckets: int = DEFAULT_FEATURE_BUCKETS
    features: tuple[Feature, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        parse_embedding(self.embedding)
        if self.task_buckets < 1 or self.feature_buckets < 1:
            raise ContextError("bucket counts must be >= 1")
        keys = [f.key for f in self.features]
        if len(set(keys)) != len(keys):
            raise ContextError(f"a feature is declared twice: {sorted(keys)}")
        object.__setattr__(self, "features", tuple(sorted(self.features, key=lambda f: f.key)))

    @functools.cached_property
    def reduction(self) -> tuple[str, int | None]:
        """``parse_embedding(self.embedding)``, parsed once (it is read for every query)."""
        return parse_embedding(self.embedding)

    @property
    def legacy(self) -> bool:
        return self.embedding == LEGACY

    @property
    def spec(self) -> str:
        """A canonical name of the layout, stored with each decision and checkpoint."""
        if self.legacy:
            return LEGACY
        parts = [LAYOUT_VERSION, "bias", "length", f"task/{self.task_buckets}"]
        for f in self.features:
            width = f"/{self.feature_buckets}" if f.kind == "categorical" else ""
            parts.append(f"{f.key}:{f.kind}{width}")
        mode, k = self.reduction
        parts.append(f"emb:{mode}" + (f"/{k}@{self.seed}" if mode == "project" else ""))
        return " ".join(parts)

    def dim(self, embedding_dim: int) -> int:
        """Length of a context for embeddings of ``embedding_dim``."""
        mode, k = self.reduction
        emb = {"legacy": embedding_dim, "raw": embedding_dim, "none": 0}.get(mode, k or 0)
        return self.blocks["embedding"].start + emb

    @functools.cached_property
    def blocks(self) -> Mapping[str, slice]:
        """Where each block lies in a context, in order: ``bias``, ``length``, ``task``,
        ``feature:KEY`` for each declared feature, then ``embedding`` (open-ended: its width
        is the embedding's). The ``legacy`` layout has the embedding alone.

        >>> lay = ContextLayout("raw", task_buckets=4, feature_buckets=3,
        ...                     features=(Feature("subject", "categorical"),))
        >>> dict(lay.blocks)  # doctest: +NORMALIZE_WHITESPACE
        {'bias': slice(0, 1, None), 'length': slice(1, 2, None), 'task': slice(2, 6, None),
         'feature:subject': slice(6, 9, None), 'embedding': slice(9, None, None)}
        >>> dict(ContextLayout("legacy").blocks)
        {'embedding': slice(0, None, None)}
        """
        if self.legacy:
            return MappingProxyType({"embedding": slice(0, None)})
        widths = {"bias": 1, "length": 1, "task": self.task_buckets}
        for f in self.features:
            widths[f"feature:{f.key}"] = self.feature_buckets if f.kind == "categorical" else 2
        out, start = {}, 0
        for name, width in widths.items():
            out[name] = slice(start, start + width)
            start += width
        out["embedding"] = slice(start, None)
        return MappingProxyType(out)

    def block(self, name: str) -> slice:
        """Where block ``name`` (one of :attr:`blocks`) lies in a context.

        >>> ContextLayout("raw", task_buckets=64).block("embedding")
        slice(66, None, None)
        """
        try:
            return self.blocks[name]
        except KeyError:
            raise KeyError(f"layout {self.spec!r} has no block {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "embedding": self.embedding,
            "task_buckets": self.task_buckets,
            "feature_buckets": self.feature_buckets,
            "features": [[f.key, f.kind] for f in self.features],
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContextLayout:
        features = tuple(Feature(k, kind) for k, kind in data.get("features", []))
        return cls(
            embedding=data["embedding"],
            task_buckets=int(data["task_buckets"]),
            feature_buckets=int(data["feature_buckets"]),
            features=features,
            seed=int(data.get("seed", 0)),
        )


@dataclass
class RunningStats:
    """Welford's running mean and variance of one number.

    >>> s = RunningStats(); [s.add(v) for v in (1.0, 2.0, 3.0)] and None
    >>> s.mean, round(s.std, 6), round(s.z(4.0), 6)
    (2.0, 0.816497, 2.44949)
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0

    def z(self, value: float) -> float:
        """``value`` standardised (0 until two values are seen, or with no spread), clipped."""
        std = self.std
        if self.n < 2 or std <= 0.0:
            return 0.0
        return max(-CLIP, min(CLIP, (value - self.mean) / std))


def numeric_value(key: str, value: Any) -> float | None:
    """A declared numeric feature's value: a finite number, or None when missing.

    >>> numeric_value("level", 3), numeric_value("level", None)
    (3.0, None)
    >>> numeric_value("level", "hard")
    Traceback (most recent call last):
    ...
    service.context.ContextError: metadata.level is declared numeric but is 'hard'
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ContextError(f"metadata.{key} is declared numeric but is {value!r}")
    return float(value)


def categorical_value(key: str, value: Any) -> str | None:
    """A declared categorical feature's value as text (None when missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ContextError(
        f"metadata.{key} is declared categorical but is a {type(value).__name__}, "
        "not a string or number"
    )


@dataclass
class ContextBuilder:
    """Builds contexts in a :class:`ContextLayout`; pure, no I/O.

    ``declared`` maps a task name to the feature keys that task declares: a query's metadata
    feeds a feature only when its task declares the key (``None``: every task declares every
    feature, as ``metallm bench --feature`` does).
    """

    layout: ContextLayout
    declared: Mapping[str, set[str]] | None = None
    length: RunningStats = field(default_factory=RunningStats)
    numeric: dict[str, RunningStats] = field(default_factory=dict)
    projection: np.ndarray | None = None  # (embedding dim, K), made at the first embedding

    def __post_init__(self) -> None:
        for f in self.layout.features:
            if f.kind == "numeric":
                self.numeric.setdefault(f.key, RunningStats())

    @classmethod
    def for_tasks(
        cls,
        declared: Mapping[str, Mapping[str, str]],
        embedding: str = DEFAULT_EMBEDDING,
        task_buckets: int = DEFAULT_TASK_BUCKETS,
        feature_buckets: int = DEFAULT_FEATURE_BUCKETS,
        seed: int = 0,
    ) -> ContextBuilder:
        """A fresh builder for tasks declaring metadata features ``{task: {key: kind}}``."""
        layout = ContextLayout(
            embedding, task_buckets, feature_buckets, features_of(declared), seed
        )
        return cls(layout, {task: set(keys) for task, keys in declared.items()})

    @property
    def spec(self) -> str:
        return self.layout.spec

    # ------------------------------------------------------------------ checking
    def _uses(self, task: str, key: str) -> bool:
        return self.declared is None or key in self.declared.get(task, ())

    def check(self, task: str, metadata: Mapping[str, Any] | None) -> None:
        """Raise :class:`ContextError` if a declared feature's value does not fit its kind."""
        if not metadata:
            return
        for f in self.layout.features:
            if self._uses(task, f.key):
                parse = numeric_value if f.kind == "numeric" else categorical_value
                parse(f.key, metadata.get(f.key))

    # ------------------------------------------------------------------ building
    def _project(self, embedding: np.ndarray) -> np.ndarray:
        mode, k = self.layout.reduction
        e = np.asarray(embedding, dtype=np.float64).ravel()
        if mode == LEGACY:
            return e
        if mode == "none":
            return e[:0]
        norm = float(np.linalg.norm(e))
        e = e / norm if norm > 0 else e
        if mode == "raw":
            return e
        assert k is not None
        if self.projection is None:
            rng = np.random.default_rng([self.layout.seed, 0x5EED])
            self.projection = rng.normal(0.0, 1.0 / math.sqrt(k), size=(e.shape[0], k))
        if self.projection.shape[0] != e.shape[0]:
            raise ContextError(
                f"embedding has dimension {e.shape[0]}; the context's projection was made for "
                f"{self.projection.shape[0]} (the embedding model changed?)"
            )
        return e @ self.projection

    def build(
        self,
        task: str,
        text: str,
        metadata: Mapping[str, Any] | None,
        embedding: np.ndarray,
    ) -> np.ndarray:
        """The context (float32) of one query, from the statistics observed so far."""
        emb = self._project(embedding)
        if self.layout.legacy:
            return emb.astype(np.float32)
        lay = self.layout
        meta = metadata or {}
        parts: list[np.ndarray] = [
            np.array([1.0, self.length.z(math.log1p(len(text)))]),
            _one_hot(bucket("task", task, lay.task_buckets), lay.task_buckets),
        ]
        for f in lay.features:
            used = self._uses(task, f.key)
            if f.kind == "categorical":
                value = categorical_value(f.key, meta.get(f.key)) if used else None
                index = None if value is None else bucket(f.key, value, lay.feature_buckets)
                parts.append(_one_hot(index, lay.feature_buckets))
            else:
                number = numeric_value(f.key, meta.get(f.key)) if used else None
                parts.append(
                    np.array([0.0, 1.0] if number is None else [self.numeric[f.key].z(number), 0.0])
                )
        parts.append(emb)
        return np.concatenate(parts).astype(np.float32)

    def build_many(
        self,
        queries: Sequence[tuple[str, str, Mapping[str, Any] | None]],
        embeddings: np.ndarray,
    ) -> np.ndarray:
        """Contexts of (task, text, metadata) rows, all from the current statistics."""
        if len(queries) != len(embeddings):
            raise ValueError(f"{len(queries)} queries but {len(embeddings)} embeddings")
        if not queries:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.build(*q, e) for q, e in zip(queries, embeddings, strict=True)])

    def observe(self, task: str, n_chars: int, metadata: Mapping[str, Any] | None) -> None:
        """Count one decided query in the running statistics (see the module docstring)."""
        if self.layout.legacy:
            return
        self.length.add(math.log1p(n_chars))
        meta = metadata or {}
        for key, stats in self.numeric.items():
            if self._uses(task, key):
                try:
                    value = numeric_value(key, meta.get(key))
                except ContextError:
                    value = None  # rows stored before the key was declared numeric
                if value is not None:
                    stats.add(value)

    def stream(
        self,
        queries: Iterable[tuple[str, str, Mapping[str, Any] | None]],
        embeddings: np.ndarray,
    ) -> np.ndarray:
        """Contexts of a stream decided one query at a time: build each, then observe it (what
        the service does with one query in flight; the benchmark's protocol). A value that does
        not fit its feature is a :class:`ContextError` naming its line (from 1)."""
        out = []
        for i, ((task, text, metadata), e) in enumerate(zip(queries, embeddings, strict=True), 1):
            try:
                out.append(self.build(task, text, metadata, e))
            except ContextError as exc:
                raise ContextError(f"line {i}: {exc}") from None
            self.observe(task, len(text), metadata)
        if not out:
            return np.zeros((0, self.layout.dim(embeddings.shape[-1])), dtype=np.float32)
        return np.stack(out)

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able state and arrays, for the policy checkpoint."""
        meta = {
            "layout": self.layout.to_dict(),
            "length": [self.length.n, self.length.mean, self.length.m2],
            "numeric": {k: [s.n, s.mean, s.m2] for k, s in self.numeric.items()},
        }
        arrays = {} if self.projection is None else {"projection": self.projection}
        return meta, arrays

    @classmethod
    def from_state(
        cls,
        meta: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        declared: Mapping[str, set[str]] | None = None,
    ) -> ContextBuilder:
        builder = cls(ContextLayout.from_dict(meta["layout"]), declared)
        builder.length = RunningStats(*meta["length"])
        for key, (n, mean, m2) in meta.get("numeric", {}).items():
            builder.numeric[key] = RunningStats(int(n), float(mean), float(m2))
        builder.projection = arrays.get("projection")
        return builder


def _one_hot(index: int | None, size: int) -> np.ndarray:
    out = np.zeros(size)
    if index is not None:
        out[index] = 1.0
    return out


def features_of(declared: Mapping[str, Mapping[str, str]]) -> tuple[Feature, ...]:
    """The layout features of per-task declarations ``{task: {key: kind}}``; one key declared
    with two kinds by two tasks is an error.

    >>> features_of({"a": {"subject": "categorical"}, "b": {"subject": "categorical"}})
    (Feature(key='subject', kind='categorical'),)
    """
    kinds: dict[str, str] = {}
    for task, keys in declared.items():
        for key, kind in keys.items():
            if kinds.setdefault(key, kind) != kind:
                raise ContextError(
                    f"metadata key {key!r} is declared {kinds[key]} by one task and {kind} by "
                    f"task {task!r}"
                )
    return tuple(Feature(k, v) for k, v in sorted(kinds.items()))  # type: ignore[arg-type]
