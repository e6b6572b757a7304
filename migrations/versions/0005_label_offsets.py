"""label consumer progress, stored with the effects of each batch of labels

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

The label consumer records, in the transaction that applies a batch, the next offset of each
partition it has applied. A label redelivered by Kafka after a crash (its effects committed,
its offset not) is then recognised and changes nothing: no duplicate counted, no warning.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_offsets",
        sa.Column("consumer_group", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("label_offsets")
