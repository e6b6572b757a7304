"""decision sequence for budget pacing; the checkpoint's decision watermark

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

In budget mode λ moves with every decision's cost. Decisions get a sequence number in the
order their costs were observed, and checkpoints record the last one they include, so a
restart re-observes exactly the costs after the checkpoint.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "decisions",
        sa.Column("decision_seq", sa.BigInteger, sa.Identity(always=False), nullable=False),
    )
    op.create_unique_constraint("decisions_decision_seq_key", "decisions", ["decision_seq"])
    op.add_column(
        "policy_checkpoints",
        sa.Column("decision_watermark", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("policy_checkpoints", "decision_watermark")
    op.drop_constraint("decisions_decision_seq_key", "decisions")
    op.drop_column("decisions", "decision_seq")
