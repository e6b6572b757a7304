"""``metallm serve`` exactly as the CLI runs it (settings from the environment, SIGINT/SIGTERM
handlers, exit code), with the query embedder swapped for :class:`HashEmbedder` so that a
restart costs seconds, not a MiniLM load. Used by the fault tests as a process to kill.

With ``--standby`` the process imports everything, then waits for a line on stdin before it
builds the service: the tests keep one such warm process ready so that a restart after a kill
does not wait for Python imports (the service itself, its restore included, starts on "go").
"""

from __future__ import annotations

import sys

import consumers.runner
from service.cli import main
from tests.faults.harness import HashEmbedder

consumers.runner.Embedder = HashEmbedder  # type: ignore[misc, assignment]

if __name__ == "__main__":
    if "--standby" in sys.argv and not sys.stdin.readline():
        sys.exit(0)  # stdin closed: never needed
    sys.exit(main(["serve"]))
