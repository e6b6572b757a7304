"""Policy throughput: pull+update per second at d = 384 with 8 arms, on one core.

Every metallm policy and ``river.bandit.LinUCBDisjoint`` run in the same process, interleaved
round by round so they share the machine's noise; the script prints the median over rounds
and each policy's ratio to River's LinUCBDisjoint. Targets (from issue 3) are printed, never
asserted.

Modes:

* ``seq``   — the River loop: ``choose`` one context, then ``update`` the chosen arm.
* ``batch`` — the service's loop: ``choose_many`` on a batch of contexts, then one
  ``update_many`` per arm with its rewards (delayed feedback within a batch).

``--priced`` times the priced policies on the service's context (d = 450: bias, length, 64
task buckets, a 384-d embedding; 8 arms): a decision with a ``Pricing`` — ``choose``, and
``choose_many`` on one row as ``service/call_ahead.py`` prices each query — then ``learn`` the
outcome with its propensity and λ, one at a time as ``service/learning.py`` applies rewards,
beside LinUCB (``choose`` + ``update``) in the same run, at growing history lengths (a
policy's cost per query must not grow with the history), in wall and in CPU time; the
target of issue 23 (the default policy ≥ 5,000/s) is printed, never asserted.

``--reward`` also replays ``tests/policy/data/gsm8k_outcomes.jsonl`` (MiniLM embeddings, fixed
λ) to measure what the random projection of the 384-d embedding costs in reward, and compares
cold start with the paper's offline/online warm-start settings.

    .venv/bin/python benchmarks/policy_speed.py                 # speed table (~1-2 min)
    .venv/bin/python benchmarks/policy_speed.py --reward        # + gsm8k reward vs dimension
    .venv/bin/python benchmarks/policy_speed.py --priced-only   # the priced policies, d = 450
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from river import bandit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.policy import RoutingPolicy, make_policy  # noqa: E402

D, K = 384, 8
ARMS = [f"arm-{i}" for i in range(K)]
TARGET_PER_S, TARGET_RATIO = 20_000, 150


def _contexts(n: int, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 rows (like normalised sentence embeddings) and rewards in [0, 1]."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, rng.random(n)


class Case:
    """One policy in one mode; ``run(n)`` times ``n`` pull+update steps, returns steps/s."""

    def __init__(self, label: str, make: Callable[[], RoutingPolicy], mode: str, steps: int):
        self.label, self.mode, self.steps = label, mode, steps
        self.policy = make()
        self.X, self.R = _contexts(4096)
        self.t = 0
        self._run(min(steps, 64) if mode == "seq" else 256)  # warm-up: every arm learned

    def _run(self, n: int) -> None:
        X, R, p = self.X, self.R, self.policy
        if self.mode == "seq":
            for _ in range(n):
                i = self.t % len(X)
                arm = p.choose(ARMS, X[i]).arm
                p.update(arm, X[i], R[i])
                self.t += 1
        else:
            batch = 256
            for _ in range(0, n, batch):
                i = self.t % (len(X) - batch)
                Xb, Rb = X[i : i + batch], R[i : i + batch]
                chosen = np.array([c.arm for c in p.choose_many(ARMS, Xb)])
                for arm in ARMS:
                    mask = chosen == arm
                    if mask.any():
                        p.update_many(arm, Xb[mask], Rb[mask])
                self.t += batch

    def run(self) -> float:
        start = time.perf_counter()
        self._run(self.steps)
        return self.steps / (time.perf_counter() - start)


class RiverCase(Case):
    """``river.bandit.LinUCBDisjoint`` on dict contexts (converted outside the timing)."""

    def __init__(self, steps: int):
        self.label, self.mode, self.steps = "river LinUCBDisjoint", "seq", steps
        self.policy = bandit.LinUCBDisjoint(seed=0)
        X, self.R = _contexts(1024)
        self.D = [dict(enumerate(x.tolist())) for x in X]
        self.t = 0
        self._run(16)

    def _run(self, n: int) -> None:
        for _ in range(n):
            i = self.t % len(self.D)
            arm = self.policy.pull(ARMS, context=self.D[i])
            self.policy.update(arm, self.D[i], self.R[i])
            self.t += 1


def speed(rounds: int) -> None:
    cases: list[Case] = [RiverCase(steps=40)]
    per_policy = {
        "linucb": ({}, 400),
        "lin_ts": ({"n_samples": 256}, 300),
        "eps_greedy": ({}, 60),
        "softmax": ({}, 60),
        "ucb": ({}, 2000),
        "thompson": ({"n_samples": 256}, 1000),
    }
    for name, (params, steps) in per_policy.items():
        cases.append(Case(name, lambda n=name, p=params: make_policy(n, seed=0, **p), "seq", steps))
    for dim, steps in ((128, 800), (64, 1500), (32, 1500)):
        cases.append(
            Case(
                f"linucb project_dim={dim}",
                lambda d=dim: make_policy("linucb", seed=0, project_dim=d),
                "seq",
                steps,
            )
        )
    for dim in (None, 64):
        label = "linucb" if dim is None else f"linucb project_dim={dim}"
        cases.append(
            Case(
                label,
                lambda d=dim: make_policy("linucb", seed=0, project_dim=d),
                "batch",
                1024 if dim is None else 4096,
            )
        )
    results: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for r in range(rounds):
        for i, case in enumerate(cases):
            results[i].append(case.run())
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    river = statistics.median(results[0])
    print(f"\npull+update per second, d={D}, {K} arms, one core, median of {rounds} rounds")
    print(f"{'policy':<28} {'mode':<6} {'median/s':>10} {'min/s':>9} {'max/s':>9} {'× River':>8}")
    for i, case in enumerate(cases):
        med = statistics.median(results[i])
        print(
            f"{case.label:<28} {case.mode:<6} {med:>10,.0f} {min(results[i]):>9,.0f} "
            f"{max(results[i]):>9,.0f} {med / river:>8.1f}"
        )
    seq = statistics.median(results[1])
    batch = statistics.median(
        results[[c.label == "linucb" and c.mode == "batch" for c in cases].index(True)]
    )
    print(f"\ntargets for LinUCB at d={D}: ≥ {TARGET_PER_S:,}/s and ≥ {TARGET_RATIO}× River")
    for mode, rate in (("seq  ", seq), ("batch", batch)):
        verdict = "met" if rate >= TARGET_PER_S else "missed"
        ratio = "met" if rate / river >= TARGET_RATIO else "missed"
        print(f"  {mode} {rate:>9,.0f}/s ({verdict}), {rate / river:6.1f}× River ({ratio})")


# ------------------------------------------------------------------------ priced policies


def _service_contexts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Contexts of the service's default layout (d = 450) over 14 tasks, and correctness."""
    from service.context import ContextLayout

    layout = ContextLayout("raw", task_buckets=64)
    rng = np.random.default_rng(seed)
    X = np.zeros((n, layout.dim(384)), dtype=np.float32)
    bias, length, task = layout.block("bias"), layout.block("length"), layout.block("task")
    X[:, bias], X[:, length] = 1.0, rng.normal(size=(n, 1))
    X[np.arange(n), task.start + rng.integers(14, size=n)] = 1.0
    E = rng.normal(size=(n, 384))
    X[:, layout.block("embedding")] = E / np.linalg.norm(E, axis=1, keepdims=True)
    return X, (rng.random(n) < 0.6).astype(np.float64)


class PricedCase:
    """One policy on the service's contexts, called as the service calls it: a decision, then
    its outcome learnt one at a time (``learn`` with the propensity and λ; ``update`` with the
    reward for LinUCB). The decision is ``choose`` (``call="choose"``) or, as
    ``service/call_ahead.py`` prices each query on its own, ``choose_many`` on one row
    (``call="choose_many"``; LinUCB's service path is ``choose_many`` over a whole batch)."""

    def __init__(self, name: str, params: dict, call: str = "choose"):
        from service.context import ContextBuilder, ContextLayout
        from service.policy import Pricing

        self.name, self.call = name, call
        self.label = f"{name} {call}"
        self.policy = make_policy(name, seed=0, **params)
        self.policy.context = ContextBuilder(ContextLayout("raw", task_buckets=64))
        self.X, self.correct = _service_contexts(4096)
        self.pricing = Pricing(0.1, 0.001)
        self.costs = {a: 1e-4 * (i + 1) for i, a in enumerate(ARMS)}
        self.t = 0  # the history: queries decided and learnt so far

    def run(self, n: int) -> tuple[float, float]:
        """``n`` queries; returns queries per second of wall time and of this process's CPU
        time (on a shared machine the wall time also counts the time other processes ran)."""
        p, X, ok, pricing = self.policy, self.X, self.correct, self.pricing
        many = self.call == "choose_many"
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            i = self.t % len(X)
            if p.learns_correctness:
                if many:
                    choice = p.choose_many(ARMS, X[i][None, :], pricing=pricing)[0]
                else:
                    choice = p.choose(ARMS, X[i], pricing=pricing)
                cost = self.costs[choice.arm]
                p.learn(choice.arm, X[i], ok[i], cost, choice.propensity, pricing)
            else:
                choice = p.choose(ARMS, X[i])
                p.update(choice.arm, X[i], ok[i] - 0.1 * self.costs[choice.arm] / 0.001)
            self.t += 1
        return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


PRICED_TARGET = 5_000  # issue 23: the default policy decides and learns ≥ 5,000 queries/s


def priced_speed(history: int, rounds: int) -> None:
    """Queries (a decision and its update) per second at growing history lengths: at each
    mark, ``rounds`` slices of 200 queries per case, interleaved so that every case shares
    the machine's noise; the medians of wall and CPU rates."""
    cases = [
        PricedCase("linucb", {"alpha": 0.1, "epsilon": 0.02}),
        PricedCase("correctness_ucb", {"alpha": 0.5, "epsilon": 0.02}),
        PricedCase("correctness_ucb", {"alpha": 0.5, "epsilon": 0.02}, "choose_many"),
        PricedCase("auto", {"alpha": 0.5, "epsilon": 0.02}),
        PricedCase("auto", {"alpha": 0.5, "epsilon": 0.02}, "choose_many"),
    ]
    marks = [m for m in (1_000, 5_000, 20_000, 50_000) if m <= history]
    wall: dict[str, list[float]] = {c.label: [] for c in cases}
    cpu: dict[str, list[float]] = {c.label: [] for c in cases}
    for mark in marks:
        while any(case.t < mark for case in cases):  # in slices: all share the machine's noise
            for case in cases:
                if case.t < mark:
                    case.run(min(500, mark - case.t))
        timed: dict[str, list[tuple[float, float]]] = {c.label: [] for c in cases}
        for _ in range(rounds):
            for case in cases:
                timed[case.label].append(case.run(200))
        for label, values in timed.items():
            wall[label].append(statistics.median(v[0] for v in values))
            cpu[label].append(statistics.median(v[1] for v in values))
        print(f"history {mark:,} done", file=sys.stderr)
    print(
        f"\npriced policies: decision + update per second, d=450, {K} arms, one core "
        f"(median of {rounds} interleaved slices of 200 queries from each mark)"
    )
    head = " ".join(f"{'at ' + format(m, ','):>9}" for m in marks)
    print(f"{'policy and call':<28} {'wall time:':>10} {head}   {'CPU time:':>9} {head}")
    for c in cases:
        w = " ".join(f"{v:>9,.0f}" for v in wall[c.label])
        u = " ".join(f"{v:>9,.0f}" for v in cpu[c.label])
        print(f"{c.label:<28} {'':>10} {w}   {'':>9} {u}")
    print(f"\ntarget (issue 23): the default policy ≥ {PRICED_TARGET:,}/s at d=450, {K} arms")
    for c in cases[1:]:
        worst = min(cpu[c.label])
        verdict = "met" if worst >= PRICED_TARGET else "missed"
        print(f"  {c.label:<28} slowest CPU-time rate {worst:>7,.0f}/s ({verdict})")


# ------------------------------------------------------------------------ reward vs projection


def _embeddings(texts: list[str]) -> np.ndarray:
    """MiniLM embeddings of ``texts`` through the shared embedding cache (as the tests and
    ``metallm bench`` use it), so the model runs only on the first call."""
    from evaluation.embed_cache import CachedEmbedder

    return CachedEmbedder.for_model().embed(texts)


def reward_vs_projection(seeds: int) -> None:
    from service.outcomes import read_outcomes
    from service.policy.warm_start import replay
    from service.reward import reward

    path = ROOT / "tests" / "policy" / "data" / "gsm8k_outcomes.jsonl"
    records = read_outcomes(path)
    X = _embeddings([r.text for r in records])
    arms = list(records[0].arms)
    unit = float(np.mean([r.cost(arms[0]) for r in records]))  # GPT-4's mean cost
    lam = 0.2

    def mean_reward(pick) -> float:
        return float(
            np.mean([reward(r.correct(pick(r)), r.cost(pick(r)), lam, unit) for r in records])
        )

    print(f"\ngsm8k replay, {len(records)} queries, cold start, λ={lam}, cost_unit=${unit:.2e}")
    for arm in arms:
        print(f"  always {arm:<24} mean reward {mean_reward(lambda r, a=arm: a):.4f}")
    oracle = float(
        np.mean([max(reward(r.correct(a), r.cost(a), lam, unit) for a in arms) for r in records])
    )
    print(f"  per-query oracle                 mean reward {oracle:.4f}")
    print(
        f"\n{'policy':<26} {'dim':>4} {'reward':>8} {'±sd':>6} {'acc':>6} {'cost/q':>9} "
        f"{'steps/s':>8}"
    )
    rows = [("linucb", {}, None), ("lin_ts", {}, None)]
    rows += [("linucb", {}, d) for d in (128, 64, 32, 16)]
    rows += [("eps_greedy", {}, None), ("softmax", {}, None), ("ucb", {}, None)]
    rows += [("thompson", {}, None)]
    for name, params, dim in rows:
        rewards, accs, costs, rates = [], [], [], []
        for seed in range(seeds):
            extra = {} if dim is None else {"project_dim": dim}
            policy = make_policy(name, seed=seed, **params, **extra)
            start = time.perf_counter()
            res = replay(policy, records, X, lam=lam, cost_unit=unit)
            rates.append(len(records) / (time.perf_counter() - start))
            rewards.append(float(np.mean(res.rewards)))
            accs.append(res.accuracy)
            costs.append(res.mean_cost_usd)
        print(
            f"{name:<26} {dim or X.shape[1]:>4} {np.mean(rewards):>8.4f} {np.std(rewards):>6.4f} "
            f"{np.mean(accs):>6.3f} {np.mean(costs):>9.2e} {np.median(rates):>8,.0f}"
        )


def warm_vs_cold(seeds: int) -> None:
    """The paper's settings on the second half of gsm8k: offline (warm start on the first
    half with full information, then frozen), online (warm start, then keep learning from
    bandit feedback) and cold start (bandit feedback only, from the first query)."""
    from service.outcomes import read_outcomes
    from service.policy.warm_start import replay, warm_start

    path = ROOT / "tests" / "policy" / "data" / "gsm8k_outcomes.jsonl"
    records = read_outcomes(path)
    X = _embeddings([r.text for r in records])
    unit = float(np.mean([r.cost(next(iter(r.arms))) for r in records]))
    lam, half = 0.2, len(records) // 2
    print(f"\nsecond half of gsm8k ({len(records) - half} queries), λ={lam}: mean reward ± sd")
    from service.reward import reward

    for arm in records[0].arms:
        always = np.mean([reward(r.correct(arm), r.cost(arm), lam, unit) for r in records[half:]])
        print(f"  always {arm:<24} {always:.4f}")
    print(f"{'policy':<10} {'dim':>4} {'cold':>15} {'offline':>15} {'online':>15}")
    for name, dim in (("linucb", None), ("linucb", 64), ("lin_ts", None)):
        out: dict[str, list[float]] = {"cold": [], "offline": [], "online": []}
        for seed in range(seeds):
            extra = {} if dim is None else {"project_dim": dim}
            cold = make_policy(name, seed=seed, **extra)
            res = replay(cold, records, X, lam=lam, cost_unit=unit)
            out["cold"].append(float(np.mean(res.rewards[half:])))
            for setting in ("offline", "online"):
                policy = make_policy(name, seed=seed, **extra)
                warm_start(policy, records[:half], X[:half], lam=lam, cost_unit=unit)
                res = replay(
                    policy,
                    records[half:],
                    X[half:],
                    lam=lam,
                    cost_unit=unit,
                    learn=setting == "online",
                )
                out[setting].append(float(np.mean(res.rewards)))
        cells = " ".join(
            f"{np.mean(v):>8.4f}±{np.std(v):.4f}"
            for v in (out["cold"], out["offline"], out["online"])
        )
        print(f"{name:<10} {dim or X.shape[1]:>4} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reward", action="store_true", help="also run the gsm8k reward table")
    parser.add_argument("--reward-only", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--priced", action="store_true", help="also time the priced policies")
    parser.add_argument("--priced-only", action="store_true")
    parser.add_argument("--history", type=int, default=20_000, help="longest history timed")
    args = parser.parse_args()
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}, cores: {os.cpu_count()}")
    if not (args.reward_only or args.priced_only):
        speed(args.rounds)
    if args.priced or args.priced_only:
        priced_speed(args.history, args.rounds)
    if args.reward or args.reward_only:
        reward_vs_projection(args.seeds)
        warm_vs_cold(args.seeds)


if __name__ == "__main__":
    main()
