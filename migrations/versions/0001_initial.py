"""decisions, pending labels and policy checkpoints

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE reward_seq AS BIGINT")
    op.create_table(
        "decisions",
        sa.Column("query_id", sa.Text, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("options", postgresql.JSONB, nullable=False),
        sa.Column("metadata", postgresql.JSONB),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.Column(
            "decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("arm", sa.Text, nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("probabilities", postgresql.JSONB, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("prediction", sa.Text),
        sa.Column("raw_output", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Float),
        sa.Column("embedding_model", sa.Text, nullable=False),
        sa.Column("context", sa.LargeBinary, nullable=False),
        sa.Column("kafka_partition", sa.Integer),
        sa.Column("kafka_offset", sa.BigInteger),
        sa.Column("label", sa.Text),
        sa.Column("correct", sa.Boolean),
        sa.Column("reward", sa.Float),
        sa.Column("reward_lambda", sa.Float),
        sa.Column("labeled_at", sa.DateTime(timezone=True)),
        sa.Column("reward_applied_at", sa.DateTime(timezone=True)),
        sa.Column("reward_seq", sa.BigInteger, unique=True),
        sa.Column("duplicate_labels", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("propensity > 0 AND propensity <= 1", name="propensity_in_0_1"),
        sa.CheckConstraint("status IN ('ok', 'parse_error', 'llm_error')", name="known_status"),
    )
    op.create_index("decisions_decided_at", "decisions", ["decided_at"])
    op.create_index("decisions_arm_task", "decisions", ["arm", "task"])
    op.create_table(
        "pending_labels",
        sa.Column("query_id", sa.Text, primary_key=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("labeled_at", sa.DateTime(timezone=True)),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("pending_labels_received_at", "pending_labels", ["received_at"])
    op.create_table(
        "policy_checkpoints",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("n_updates", sa.BigInteger, nullable=False),
        sa.Column("reward_watermark", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "service_counters",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("service_counters")
    op.drop_table("policy_checkpoints")
    op.drop_table("pending_labels")
    op.drop_table("decisions")
    op.execute("DROP SEQUENCE reward_seq")
