"""pending label rows: every different early label of a query waits, in arrival order

Revision ID: 0013_pending_label_rows
Revises: 0012_http_requests
Create Date: 2026-12-07

An early label is checked against its query's label set only when the decision arrives, so
the first one may then be rejected. ``pending_labels`` therefore keeps one row per different
label (or score) of a query, not one per query: ``id`` (an identity, the arrival order) is the
primary key and ``query_id`` an index. When the decision arrives, the first label not rejected
wins and the later ones are its duplicates. The downgrade keeps each query's first row.
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_pending_label_rows"
down_revision = "0012_http_requests"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("pending_labels_pkey", "pending_labels", type_="primary")
    op.add_column(
        "pending_labels",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
    )
    op.create_primary_key("pending_labels_pkey", "pending_labels", ["id"])
    op.create_index("pending_labels_query_id", "pending_labels", ["query_id"])


def downgrade() -> None:
    op.execute(
        "DELETE FROM pending_labels AS p USING pending_labels AS q "
        "WHERE p.query_id = q.query_id AND p.id > q.id"
    )
    op.drop_index("pending_labels_query_id", "pending_labels")
    op.drop_constraint("pending_labels_pkey", "pending_labels", type_="primary")
    op.drop_column("pending_labels", "id")
    op.create_primary_key("pending_labels_pkey", "pending_labels", ["query_id"])
