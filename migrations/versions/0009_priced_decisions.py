"""priced decisions: the λ a choice was priced at, and the chosen arm's estimated cost

Revision ID: 0009_priced_decisions
Revises: 0008_input_checks
Create Date: 2026-12-07

A policy that learns correctness (``correctness_ucb``) prices each choice at decision time:
λ in force then (budget mode's pacer, or the configured λ) times each arm's cost estimated
before the call. The decision records that λ, so the log, not the instance, says what priced
each choice, and the chosen arm's estimate. Rows stored before this revision, and decisions of
policies that do not price their choices, have NULL in both.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_priced_decisions"
down_revision = "0008_input_checks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("decision_lambda", sa.Float, nullable=True))
    op.add_column("decisions", sa.Column("estimated_cost_usd", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("decisions", "estimated_cost_usd")
    op.drop_column("decisions", "decision_lambda")
