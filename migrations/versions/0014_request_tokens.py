"""request tokens: each HTTP reservation carries the token of the request that holds it

Revision ID: 0014_request_tokens
Revises: 0013_pending_label_rows
Create Date: 2026-12-07

A request that reserves a query id (``http_requests``) writes a token of its own (a uuid) with
it. Renewing the lease while its call runs, and giving the reservation up, match on that token:
a request whose reservation was taken over by another one (its lease ended) can then neither
extend nor delete the new owner's. Rows written before have no token.
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_request_tokens"
down_revision = "0013_pending_label_rows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("http_requests", sa.Column("token", sa.Uuid(as_uuid=False), nullable=True))


def downgrade() -> None:
    op.drop_column("http_requests", "token")
