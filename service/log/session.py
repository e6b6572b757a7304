"""Session-level advisory locks: the roles and names only one live instance may hold (the
checkpoint writer, an instance's name). Each lock lives on a connection of its own, for as
long as that connection lives: a process killed with -9 loses it at once.
"""

from __future__ import annotations

import contextlib
import logging

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)


class SessionLock:
    """A session-level advisory lock of this schema, on a connection of its own: held for as
    long as that connection lives (a process killed with -9 loses it at once). The service
    elects its one checkpoint writer with it; the other instances only restore."""

    _KEY = "hashtextextended(:n || current_schema(), 0)"  # this schema's lock of that name

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._key_name = f"metallm-{name}:"
        self._conn: Connection | None = None

    def holder_pid(self, conn: Connection) -> int | None:
        """The backend (``pg_backend_pid``) holding this lock now, from any connection."""
        return conn.execute(
            sa.text(
                f"WITH k AS (SELECT {self._KEY} & ((1::bigint << 32) - 1) AS lo, "
                f"({self._KEY} >> 32) & ((1::bigint << 32) - 1) AS hi) "
                "SELECT l.pid FROM pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objsubid = 1 AND l.classid::bigint = k.hi AND l.objid::bigint = k.lo "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"n": self._key_name},
        ).scalar_one_or_none()

    def try_acquire(self) -> bool:
        """Whether this process holds the lock now (taking it if it is free)."""
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.SQLAlchemyError:  # the connection died, and the lock with it
                self.release()
        conn = self.engine.connect()
        try:
            got = conn.execute(
                sa.text(f"SELECT pg_try_advisory_lock({self._KEY})"), {"n": self._key_name}
            ).scalar_one()
            conn.commit()  # a session lock outlives the transaction
        except BaseException:
            with contextlib.suppress(Exception):
                conn.invalidate()  # never back to the pool: it may hold the lock
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    @property
    def held(self) -> bool:
        return self._conn is not None

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):  # gone already
                conn.invalidate()  # closed, not pooled: the session and its lock end
                conn.close()


class InstanceNameTaken(RuntimeError):
    """Another live instance on the database has this instance's name."""


class InstanceName:
    """This instance's name on the database, held for as long as it runs: two live instances
    of one name would each skip the other's notifications of the learning log (and draw from
    alike seeds)."""

    def __init__(self, engine: Engine, instance: str) -> None:
        self.instance = instance
        self._lock = SessionLock(engine, f"instance:{instance}")
        self._claimed = self._lost = False

    def claim(self) -> None:
        """Take the name, or raise :class:`InstanceNameTaken`."""
        self._claimed = True
        if not self._lock.try_acquire():
            self._claimed = False
            raise InstanceNameTaken(
                f"another metallm instance is running as {self.instance!r} on this database "
                "and schema: "
                "give each instance a METALLM_INSTANCE_ID of its own (the default, host name "
                "and process id, is)"
            )

    def keep(self) -> None:
        """Hold the claimed name again if its session ended (a Postgres restart), logging once
        if another instance took it meanwhile (the log follower calls it every poll)."""
        if not self._claimed:
            return
        held = self._lock.try_acquire()
        if not held and not self._lost:
            log.error(
                "another metallm instance now runs as %r on this database and schema (this one "
                "lost the name when its Postgres session ended): give each instance a "
                "METALLM_INSTANCE_ID of its own",
                self.instance,
            )
        self._lost = not held

    def release(self) -> None:
        self._lock.release()
        self._claimed = False
