"""group commit: a decision's wait for a slot apart from its call's latency; stats show both

Revision ID: 0010_group_commit
Revises: 0009_priced_decisions
Create Date: 2026-12-07

``latency_ms`` is the call's own time (its attempts, back-off and fallback); the new
``wait_ms`` is the time it queued for a free slot first (the arms' and the gateway's
``max_in_flight``, a local model serving one call at a time). Rows stored before this revision
have NULL in ``wait_ms``. The ``arm_summary`` view (``metallm stats``) gains
``mean_wait_ms`` beside ``mean_latency_ms``.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_group_commit"
down_revision = "0009_priced_decisions"
branch_labels = None
depends_on = None

# 0003's view, with mean_wait_ms added at the end (CREATE OR REPLACE may only append columns)
ARM_SUMMARY = """
CREATE OR REPLACE VIEW arm_summary AS
SELECT arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER ()                AS share,
       count(label)                                           AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(cost_usd)                                          AS cost_per_decision,
       avg(reward)                                            AS mean_reward,
       avg(latency_ms)                                        AS mean_latency_ms,
       count(*) FILTER (WHERE status <> 'ok')                 AS failures,
       avg(wait_ms)                                           AS mean_wait_ms
FROM decisions
GROUP BY arm
"""

ARM_SUMMARY_0003 = """
CREATE VIEW arm_summary AS
SELECT arm,
       count(*)                                               AS decisions,
       count(*)::float / sum(count(*)) OVER ()                AS share,
       count(label)                                           AS labeled,
       avg(correct::int) FILTER (WHERE label IS NOT NULL)     AS accuracy,
       sum(cost_usd)                                          AS cost_usd,
       avg(cost_usd)                                          AS cost_per_decision,
       avg(reward)                                            AS mean_reward,
       avg(latency_ms)                                        AS mean_latency_ms,
       count(*) FILTER (WHERE status <> 'ok')                 AS failures
FROM decisions
GROUP BY arm
"""


def upgrade() -> None:
    op.add_column("decisions", sa.Column("wait_ms", sa.Float, nullable=True))
    op.execute(ARM_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW arm_summary")
    op.execute(ARM_SUMMARY_0003)
    op.drop_column("decisions", "wait_ms")
