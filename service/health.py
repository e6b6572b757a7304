"""What the health endpoint tells: whether each dependency answers, and the service's phase.

Readiness (``/readyz``) is true only while the service serves (not while it restores its
policy, not once it stops) and every dependency its role needs answers. Liveness
(``/healthz``) stays true meanwhile: the service recovers by itself when they come back.

A :class:`Prober` thread per dependency reports its state to :class:`Health`, which logs one
line per change of state (lost, back and after how long), never one per retry.

>>> moments = iter([10.0, 17.5]).__next__
>>> health = Health(["kafka", "postgres"], clock=moments)
>>> health.ready(), health.reasons()
(False, ['starting'])
>>> health.serving()
>>> health.ready()
True
>>> health.report("kafka", False, "KafkaTimeoutError")
'kafka cannot be reached (KafkaTimeoutError): not ready until it answers'
>>> health.report("kafka", False, "again") is None  # no change, no line
True
>>> health.ready(), health.reasons()
(False, ['kafka cannot be reached'])
>>> health.report("kafka", True)
'kafka answers again after 7.5 s'
>>> health.ready()
True
>>> health.stopping(); health.ready(), health.reasons()
(False, ['stopping'])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: How often each dependency is probed, and how long a probe may take before it counts as down.
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 3.0


class Health:
    """The dependencies' states (all up at first: the build has just used them) and the phase
    (``starting`` → ``serving`` → ``stopping``). ``on_change(dependency, up)`` is called on each
    change of a dependency's state, under the lock that changes it (keep it quick)."""

    def __init__(
        self,
        dependencies: Iterable[str],
        on_change: Callable[[str, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lost_at: dict[str, float | None] = dict.fromkeys(dependencies)
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self.phase = "starting"

    def serving(self) -> None:
        self.phase = "serving"

    def stopping(self) -> None:
        self.phase = "stopping"

    def report(self, dependency: str, up: bool, detail: str = "") -> str | None:
        """Record a probe's result; on a change of state, log it and return the line."""
        with self._lock:
            lost_at = self._lost_at[dependency]
            if up == (lost_at is None):
                return None
            now = self._clock()
            self._lost_at[dependency] = None if up else now
            if self._on_change is not None:  # with the state, so readers never see them differ
                self._on_change(dependency, up)
        if up:
            line = f"{dependency} answers again after {now - lost_at:.1f} s"  # type: ignore[operator]
            log.info(line)
        else:
            why = f" ({detail})" if detail else ""
            line = f"{dependency} cannot be reached{why}: not ready until it answers"
            log.warning(line)
        return line

    def reasons(self) -> list[str]:
        """Why the service is not ready (empty when it is)."""
        down = [f"{d} cannot be reached" for d, lost in self._lost_at.items() if lost is not None]
        return ([] if self.phase == "serving" else [self.phase]) + down

    def ready(self) -> bool:
        return not self.reasons()


class Prober:
    """Calls ``probe`` every ``interval_s`` on a daemon thread and reports to ``health`` whether
    ``dependency`` answered (``probe`` returned) or not (it raised; its exception's class and
    first words are the detail)."""

    def __init__(
        self,
        health: Health,
        dependency: str,
        probe: Callable[[], None],
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.health = health
        self.dependency = dependency
        self.probe = probe
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"metallm-probe-{dependency}"
        )

    def start(self) -> Prober:
        self._thread.start()
        return self

    def check(self) -> bool:
        """Probe once and report; whether the dependency answered."""
        try:
            self.probe()
        except Exception as exc:
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            self.health.report(self.dependency, False, detail)
            return False
        self.health.report(self.dependency, True)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=PROBE_TIMEOUT_S + self.interval_s + 5)
