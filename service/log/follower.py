"""Following the learning log: what other instances append reaches this one's live policy
through a :class:`LogFollower` thread, woken by their NOTIFY (:class:`LogListener`) or by a
poll when notifications do not come.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from psycopg import sql as psycopg_sql
from sqlalchemy.engine import Engine

from service.log.transaction import LOG_CHANNEL_PREFIX, LearningLog

log = logging.getLogger(__name__)


class LogListener:
    """Wakes when another transaction appended to the learning log (LISTEN/NOTIFY on this
    schema's channel). A missed notification costs only time: callers poll as well.
    Notifications sent by ``ignore`` (an instance's id: its own appends) do not wake it."""

    def __init__(self, engine: Engine, ignore: str | None = None) -> None:
        self.engine = engine
        self.ignore = ignore
        self._conn: Any = None
        self._shut = False

    def _connect(self) -> Any:
        raw = self.engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # closed when done, never back to the pool in LISTEN mode
        conn.autocommit = True
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        channel = psycopg_sql.Identifier(f"{LOG_CHANNEL_PREFIX}{schema}")
        conn.execute(psycopg_sql.SQL("LISTEN {}").format(channel))
        return conn

    @property
    def listening(self) -> bool:
        """Whether it is connected and listening (a NOTIFY from now on wakes it)."""
        return self._conn is not None

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for appends; returns how many notifications came. Raises
        the driver's error when Postgres cannot be reached (the next call reconnects)."""
        if self._shut:
            return 0
        if self._conn is None:
            self._conn = self._connect()
        deadline = time.monotonic() + timeout_s
        try:
            n = 0
            while not n and (left := deadline - time.monotonic()) > 0:
                for note in self._conn.notifies(timeout=left, stop_after=1):
                    n += note.payload != self.ignore
            if n:  # drain what else is queued, without waiting
                n += sum(note.payload != self.ignore for note in self._conn.notifies(timeout=0))
            return n
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):  # gone already
                conn.close()

    def shutdown(self) -> None:
        """Close for good (from any thread): a wait in progress ends, none starts again."""
        self._shut = True
        self.close()


class LogFollower:
    """Keeps an instance's live policy up with what other instances append to the learning
    log: wakes on their NOTIFY (or every ``poll_s`` regardless) and syncs."""

    def __init__(self, learning_log: LearningLog, poll_s: float = 1.0) -> None:
        self.learning_log = learning_log
        self.poll_s = poll_s
        # its own appends it applies itself (LearningLog.stored): woken by them, it took the
        # policy's lock from the consumer that had just stored them (benchmarks/scale_out.py)
        self.listener = LogListener(learning_log.engine, ignore=learning_log.instance or None)
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:  # a listener that cannot LISTEN (Postgres away) leaves the poll to sync
                self.listener.wait(self.poll_s)
            except Exception:
                if self.stop_event.is_set():  # stop closed the listener under the wait
                    break
                log.debug("listening for the learning log failed; polling", exc_info=True)
                self.stop_event.wait(self.poll_s)
            try:
                self.learning_log.sync()
                self.learning_log.name.keep()
                failures = 0
            except Exception:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "following the learning log failed; retrying", exc_info=True)
                self.stop_event.wait(min(self.poll_s * 2**failures, 30.0))

    def start(self) -> LogFollower:
        self._thread = threading.Thread(target=self.run, name="metallm-log-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.listener.shutdown()  # ends a wait in progress
        if self._thread is not None:
            self._thread.join(30)
