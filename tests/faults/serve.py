"""``metallm serve`` exactly as the CLI runs it (settings from the environment, SIGINT/SIGTERM
handlers, exit code), with the query embedder swapped for :class:`HashEmbedder` so that a
restart costs seconds, not a MiniLM load. Used by the fault tests as a process to kill.

With ``--standby`` the process imports everything, then waits for a line on stdin before it
builds the service: the tests keep one such warm process ready so that a restart after a kill
does not wait for Python imports (the service itself, its restore included, starts on "go").

With ``METALLM_TEST_POLICY_DUMP=path``, a clean stop (SIGTERM) writes what the instance's
in-memory policy was when it stopped (after :meth:`Application.stop` caught up with the learning
log) to ``path`` as JSON: its state (``RoutingPolicy.dumps``, base64), watermarks and update
count. The multi-instance scenario compares every instance's policy with the log's replay.
SIGUSR1 writes every thread's stack to the log (for a test that timed out waiting).
"""

from __future__ import annotations

import base64
import contextlib
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import app.application
from app.cli import main
from tests.faults.harness import POLICY_DUMP, HashEmbedder

_stop = app.application.Application.stop


def stop_and_dump(self: app.application.Application) -> None:
    _stop(self)
    path = os.environ.get(POLICY_DUMP)
    if path:
        live = self.live
        dump = {
            "instance": self.learning_log.instance,
            "rng_seed": self.learning_log.rng_seed,
            "watermark": live.watermark,
            "decision_watermark": live.decision_watermark,
            "n_updates": live.policy.n_updates,
            "state": base64.b64encode(live.policy.dumps()).decode(),
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(dump))
        tmp.replace(path)  # whole or absent


def swap_in_test_parts() -> None:
    """The hash embedder and the dumping stop, in this process only (done here, not on
    import, so that a test importing this module keeps the real service)."""
    app.application.Embedder = HashEmbedder  # type: ignore[misc, assignment]
    app.application.Application.stop = stop_and_dump  # type: ignore[method-assign]


def warm_up() -> None:
    """Import what building the service imports on first use (the OpenAI SDK and its aiohttp
    transport, alembic for the schema check: ~1.5 s of CPU), so a standby's start is quick."""
    import service.migrate  # noqa: F401

    with contextlib.suppress(ImportError):  # the build then says what is missing
        import aiohttp  # noqa: F401
        import openai  # noqa: F401

        import service.llm.openai_api  # noqa: F401


if __name__ == "__main__":
    swap_in_test_parts()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks to the log, on demand
    if "--standby" in sys.argv:
        warm_up()
        if not sys.stdin.readline():
            sys.exit(0)  # stdin closed: never needed
    sys.exit(main(["serve"]))
