"""The HTTP door's reservations: a query id held by one request while its arm is called.

A request reserves its query id (with the hash of its body) in a short transaction of its own,
before calling, outside the learning log's lock. The reservation is a lease: it ends at
``lease_until`` (the door's request timeout and a margin), so a reservation whose instance died
blocks a retry no longer than that; a retry with the same body then takes it over. A reservation
carries its request's token: only that request renews it (while its call runs, so a live call's
is never taken over) or gives it up. Another body under the same id is refused. The Kafka
decider skips ids under a live lease (:func:`reserved_ids`) instead of calling for them. The
rows stay after the decision is stored: they keep the body's hash, so a later retry with another
body is refused too. A retry is answered from the stored decision as a client is shown it
(:func:`public_decision`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from service.log.rows import PUBLIC_COLUMNS, PublicDecision
from service.storage import decisions, http_requests, one_of

_RESERVE = sa.text(
    "INSERT INTO http_requests (query_id, body_sha256, instance, lease_until, token)"
    " VALUES (:q, :h, :i, now() + make_interval(secs => :s), CAST(:t AS uuid))"
    " ON CONFLICT (query_id) DO UPDATE SET instance = EXCLUDED.instance,"
    " lease_until = EXCLUDED.lease_until, reserved_at = now(), token = EXCLUDED.token"
    " WHERE http_requests.lease_until < now()"
    " AND http_requests.body_sha256 = EXCLUDED.body_sha256"
    " RETURNING query_id"
)


@dataclass(frozen=True)
class Reservation:
    """Whether this request holds the id (to call for it), else whether the id is held for
    the same body (wait for its decision) or another one (refuse)."""

    owned: bool
    same_body: bool


def reserve(
    conn: Connection,
    query_id: str,
    body_sha256: str,
    instance: str,
    lease_s: float,
    token: str | None = None,
) -> Reservation:
    """Reserve ``query_id`` for a request with this body: a new id, or one whose lease ended
    under the same body, is this request's (:attr:`Reservation.owned`) once ``conn``'s
    transaction commits. ``token`` (a uuid, new for each request) names the request holding it
    (:func:`renew`, :func:`release`)."""
    params = {"q": query_id, "h": body_sha256, "i": instance, "s": lease_s, "t": token}
    got = conn.execute(_RESERVE, params).first()
    if got is not None:
        return Reservation(True, True)
    held = conn.execute(
        sa.select(http_requests.c.body_sha256).where(http_requests.c.query_id == query_id)
    ).scalar()
    return Reservation(False, held == body_sha256)


def release(engine: Engine, query_id: str, token: str) -> None:
    """Give up a reservation whose call will not be stored (it failed before storing): a retry
    need not wait for its lease to end. Only if the request ``token`` still holds it (not a
    request that took it over after its lease ended)."""
    with engine.begin() as conn:
        conn.execute(
            sa.delete(http_requests).where(
                http_requests.c.query_id == query_id, http_requests.c.token == token
            )
        )


def renew(engine: Engine, held: dict[str, str], lease_s: float) -> int:
    """Extend by ``lease_s`` from now the leases of these reservations (query id → token)
    still held by their requests, while their calls run: a live call's reservation is not
    taken over. How many were renewed."""
    if not held:
        return 0
    tokens = sa.literal(list(held.values()), postgresql.ARRAY(sa.Uuid(as_uuid=False)))
    with engine.begin() as conn:
        done = conn.execute(
            sa.update(http_requests)
            .where(one_of(http_requests.c.query_id, held), http_requests.c.token == sa.any_(tokens))
            .values(lease_until=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, lease_s))
        )
    return done.rowcount


def lease_ended(conn: Connection, query_id: str) -> bool:
    """Whether this id's reservation is gone or its lease has ended (its holder died)."""
    live = conn.execute(
        sa.select(http_requests.c.query_id).where(
            http_requests.c.query_id == query_id, http_requests.c.lease_until > sa.func.now()
        )
    ).first()
    return live is None


def reserved_ids(conn: Connection, query_ids: Iterable[str]) -> set[str]:
    """Those of these ids reserved by an HTTP request whose lease has not ended."""
    ids = list(set(query_ids))
    if not ids:
        return set()
    rows = conn.execute(
        sa.select(http_requests.c.query_id).where(
            one_of(http_requests.c.query_id, ids), http_requests.c.lease_until > sa.func.now()
        )
    ).scalars()
    return set(rows)


def public_decision(conn: Connection, query_id: str) -> PublicDecision | None:
    """A stored decision as an HTTP client is shown it, or None when the query is not
    decided."""
    cols = [decisions.c[name] for name in PUBLIC_COLUMNS]
    row = conn.execute(sa.select(*cols).where(decisions.c.query_id == query_id)).first()
    return None if row is None else PublicDecision.from_row(row._mapping)
