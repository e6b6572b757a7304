"""decisions: attempts, fallback arm and option scores of each LLM call

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # requests sent for the decision: retries and the fallback's included
    op.add_column(
        "decisions", sa.Column("attempts", sa.Integer, nullable=False, server_default="1")
    )
    # the arm asked after the chosen arm failed (its answer, if any, is the prediction)
    op.add_column("decisions", sa.Column("fallback_arm", sa.Text))
    # answer_mode "score": the (calibrated) log-score of each allowed answer
    op.add_column("decisions", sa.Column("answer_scores", postgresql.JSONB))
    op.create_check_constraint("attempts_not_negative", "decisions", "attempts >= 0")


def downgrade() -> None:
    op.drop_constraint("attempts_not_negative", "decisions", type_="check")
    op.drop_column("decisions", "answer_scores")
    op.drop_column("decisions", "fallback_arm")
    op.drop_column("decisions", "attempts")
