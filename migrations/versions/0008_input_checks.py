"""labels outside their decision's label set recorded as rejected; a status for over-long input

Revision ID: 0008_input_checks
Revises: 0007
Create Date: 2026-12-07

A label that arrives before its decision cannot be checked against the query's label set until
the decision is stored. ``pending_labels`` now keeps where the label came from (its Kafka topic,
partition and offset), and a label found outside the set when its decision arrives goes to
``rejected_labels`` with that place and the reason, instead of being applied. A call that an arm
refuses because its input does not fit the arm's context window gets the status
``input_too_long`` (not learnt from).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_input_checks"
down_revision = "0007"
branch_labels = None
depends_on = None

OLD_STATUSES = "status IN ('ok', 'parse_error', 'llm_error')"
NEW_STATUSES = "status IN ('ok', 'parse_error', 'llm_error', 'input_too_long')"


def upgrade() -> None:
    op.add_column("pending_labels", sa.Column("topic", sa.Text, nullable=True))
    op.add_column("pending_labels", sa.Column("partition", sa.Integer, nullable=True))
    op.add_column("pending_labels", sa.Column("kafka_offset", sa.BigInteger, nullable=True))
    op.create_table(
        "rejected_labels",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("query_id", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("topic", sa.Text),
        sa.Column("partition", sa.Integer),
        sa.Column("kafka_offset", sa.BigInteger),
        sa.Column(
            "rejected_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("rejected_labels_query_id", "rejected_labels", ["query_id"])
    op.drop_constraint("known_status", "decisions", type_="check")
    op.create_check_constraint("known_status", "decisions", NEW_STATUSES)


def downgrade() -> None:
    op.drop_constraint("known_status", "decisions", type_="check")
    op.create_check_constraint("known_status", "decisions", OLD_STATUSES)
    op.drop_index("rejected_labels_query_id", table_name="rejected_labels")
    op.drop_table("rejected_labels")
    op.drop_column("pending_labels", "kafka_offset")
    op.drop_column("pending_labels", "partition")
    op.drop_column("pending_labels", "topic")
