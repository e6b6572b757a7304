"""http requests: the query ids the HTTP door reserved before calling an arm

Revision ID: 0011_http_requests
Revises: 0010_open_tasks
Create Date: 2026-12-07

The HTTP door (``door/``) reserves a request's query id here, in a transaction of its own
(outside the learning log's lock), before it calls an arm: a retry with the same id and body
then waits for that call or returns its stored decision instead of calling again, on any
instance; another body under the same id is refused. ``lease_until`` bounds a reservation
whose instance died: after it, a retry may take the reservation over.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_http_requests"
down_revision = "0010_open_tasks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "http_requests",
        sa.Column("query_id", sa.Text, primary_key=True),
        sa.Column("body_sha256", sa.Text, nullable=False),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column(
            "reserved_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("http_requests")
